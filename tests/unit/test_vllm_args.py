"""engine.vllm: any argument of the installed vLLM's engine, read by vLLM's own parser before Ray starts
(pipeline/engine/engine_args.py)."""

import pytest

from pipeline.config import EngineConfig
from pipeline.engine.engine_args import VllmArgsError, engine_args, vllm_args


def cfg(**vllm) -> EngineConfig:
    return EngineConfig(device="cpu", vllm=vllm)


def test_names_and_values_as_vllm_serve_takes_them():
    parsed = vllm_args(cfg(**{"kv-cache-dtype": "fp8", "quantization": "fp8", "pipeline_parallel_size": 2,
                              "enable_expert_parallel": True, "load_format": "safetensors", "revision": "main",
                              "hf_overrides": {"num_hidden_layers": 2}, "tokenizer": "/models/tok",
                              "speculative_config": {"method": "ngram", "num_speculative_tokens": 3},
                              "distributed_executor_backend": "ray"}))
    assert parsed["kv_cache_dtype"] == "fp8" and parsed["quantization"] == "fp8"
    assert parsed["pipeline_parallel_size"] == 2 and parsed["enable_expert_parallel"] is True
    assert parsed["hf_overrides"] == {"num_hidden_layers": 2}
    assert parsed["speculative_config"]["method"] == "ngram" and parsed["speculative_config"]["num_speculative_tokens"] == 3
    assert parsed["distributed_executor_backend"] == "ray" and parsed["tokenizer"] == "/models/tok"
    assert vllm_args(cfg(enable_expert_parallel=False))["enable_expert_parallel"] is False
    assert vllm_args(cfg(revision=None)) == {}  # null: vLLM's default
    assert vllm_args(EngineConfig()) == {}


def test_they_reach_the_engine_arguments_and_the_jobs_own_stay():
    args = engine_args(cfg(kv_cache_dtype="fp8", tokenizer="/models/tok"), "/models/m", "m", {"temperature": 0.2})
    assert args.kv_cache_dtype == "fp8" and args.tokenizer == "/models/tok"
    assert args.model == "/models/m" and args.generation_config == "vllm" and args.enforce_eager is True


@pytest.mark.parametrize("key, value, message", [
    ("kv_cache_dtyp", "fp8", "engine.vllm.kv_cache_dtyp is no argument of vLLM"),
    ("kv_cache_dtyp", "fp8", "did you mean kv_cache_dtype"),
    ("kv-cache-dtype", "fp9", "engine.vllm.kv-cache-dtype: argument --kv-cache-dtype: invalid choice: 'fp9'"),
    ("pipeline_parallel_size", "two", "engine.vllm.pipeline_parallel_size: argument --pipeline-parallel-size"),
    ("enable_expert_parallel", "yes", "engine.vllm.enable_expert_parallel must be true or false"),
    ("model", "/other", "engine.vllm.model: the job sets it from model.path"),
    ("disable_log_stats", False, "from engine.engine_metrics"),
    ("max_model_len", 4096, "set engine.max_model_len instead"),
    ("dtype", "half", "set engine.dtype instead"),
])
def test_a_wrong_name_or_value_says_which_key_and_what_vllm_says(key, value, message):
    with pytest.raises(VllmArgsError) as caught:
        vllm_args(cfg(**{key: value}))
    assert message in str(caught.value)
