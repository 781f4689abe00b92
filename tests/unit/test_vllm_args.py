"""engine.vllm: any argument of the installed vLLM's engine, read by vLLM's own parser before Ray starts
(pipeline/engine/engine_args.py)."""

import pytest

from pipeline.config import EngineConfig
from pipeline.engine.engine_args import VllmArgsError, engine_args, vllm_args


def cfg(**vllm) -> EngineConfig:
    return EngineConfig(device="cpu", vllm=vllm)


def gpu(**vllm) -> EngineConfig:
    return EngineConfig(device="gpu", vllm=vllm)


def test_names_and_values_as_vllm_serve_takes_them():
    parsed = vllm_args(gpu(**{"kv-cache-dtype": "fp8", "quantization": "fp8", "pipeline_parallel_size": 2,
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


def test_what_the_cpu_build_takes_but_cannot_run_stops_before_any_work():
    with pytest.raises(VllmArgsError, match="pipeline_parallel_size: vLLM's CPU build cannot run pipeline stages"):
        vllm_args(cfg(pipeline_parallel_size=2))
    with pytest.raises(VllmArgsError, match="CPU build has no Ray executor"):
        vllm_args(cfg(distributed_executor_backend="ray"))
    assert vllm_args(cfg(pipeline_parallel_size=1)) == {"pipeline_parallel_size": 1}


def test_a_gpu_engine_over_pipeline_stages_runs_on_vllms_ray_executor():
    staged = EngineConfig(device="gpu", tensor_parallel_size=8, vllm={"pipeline_parallel_size": 2})
    args = engine_args(staged, "/models/m", "m", {})
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (8, 2)
    assert args.distributed_executor_backend == "ray"
    assert engine_args(EngineConfig(device="gpu", tensor_parallel_size=8), "/m", "m", {}).distributed_executor_backend is None
    mine = EngineConfig(device="gpu", vllm={"pipeline_parallel_size": 2, "distributed_executor_backend": "mp"})
    assert engine_args(mine, "/m", "m", {}).distributed_executor_backend == "mp"  # the user's choice wins


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


def test_batch_invariant_mode_is_a_gpu_setting_and_part_of_the_outputs_identity():
    from pipeline.config import ConfigError, JobConfig, load_config

    with pytest.raises(ConfigError, match="batch_invariant needs a GPU engine"):
        load_config(None, ["engine.device=cpu", "engine.batch_invariant=true"], input="in.parquet", output="out")
    gpu_job = JobConfig.model_validate({"input": "in", "output": "out", "engine": {"device": "gpu", "batch_invariant": True}})
    assert gpu_job.identity()["engine"]["batch_invariant"] is True
    assert "batch_invariant" not in JobConfig.model_validate({"input": "in", "output": "out"}).identity()["engine"]


def test_the_private_argparse_list_still_holds_every_engine_argument_of_the_pinned_vllm():
    """engine_args.cli_actions reads argparse's private `_actions` (no public list exists): it must
    still hold an option for every field of vLLM's engine arguments, each with the dataclass's name."""
    import argparse
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from pipeline.engine.engine_args import cli_actions

    parser = FlexibleArgumentParser(prog="engine.vllm", add_help=False)
    AsyncEngineArgs.add_cli_args(parser)
    actions = cli_actions(parser)
    assert all(isinstance(a, argparse.Action) and a.option_strings for a in actions.values())
    fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    assert {"kv_cache_dtype", "quantization", "enable_expert_parallel", "tokenizer"} <= set(actions)
    assert len(set(actions) & fields) >= 0.9 * len(set(actions)), sorted(set(actions) - fields)
    assert isinstance(actions["enable_expert_parallel"], argparse.BooleanOptionalAction)
