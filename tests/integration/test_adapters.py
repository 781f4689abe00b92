"""LoRA adapters: rows address them by `model`; a sweep over a base and its adapters loads one engine."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from pipeline.models.adapters import unknown_model_message

pytestmark = pytest.mark.engine
ADAPTERS = {"tiny-lora-a": "builtin:tiny-lora-a", "tiny-lora-b": "builtin:tiny-lora-b"}
PROMPT = "Once upon a time there was a small dragon"
GREEDY = {"temperature": 0.0, "max_tokens": 8}


@pytest.fixture(scope="module")
def job(run_job):
    models = [None, "tiny-llama", "tiny-lora-a", "tiny-lora-b", "gpt-nope"]
    table = pa.table({"id": ["default", "base", "a", "b", "unknown"], "prompt": [PROMPT] * len(models),
                      "model": models})
    return run_job(table, model={"adapters": ADAPTERS}, defaults=GREEDY)


def test_rows_are_answered_by_the_adapter_they_name(job):
    texts = {}
    for row_id, model in (("default", "tiny-llama"), ("base", "tiny-llama"), ("a", "tiny-lora-a"),
                          ("b", "tiny-lora-b")):
        response = job.response(row_id)
        assert response["model"] == model
        assert response["usage"]["completion_tokens"] == GREEDY["max_tokens"]
        texts[row_id] = response["choices"][0]["text"]
    assert texts["default"] == texts["base"]
    # the same greedy request: each adapter answers differently from the base and from the other
    assert len({texts["base"], texts["a"], texts["b"]}) == 3, texts


def test_an_unknown_model_is_a_404_listing_the_base_and_its_adapters(job):
    error = job.error("unknown")
    assert (error["code"], error["type"], error["param"]) == (404, "NotFoundError", "model")
    assert error["message"] == unknown_model_message("gpt-nope", "tiny-llama", list(ADAPTERS))
    assert "tiny-llama; adapters: tiny-lora-a, tiny-lora-b" in error["message"]
    assert len(job.summary.engine_startup_s) == 1


def test_validate_knows_the_adapters(job, tmp_path):
    import pyarrow.parquet as pq

    from pipeline.config import JobConfig
    from pipeline.job.validate import check_rows

    pq.write_table(job.input, tmp_path / "in.parquet")
    config = JobConfig.model_validate({
        "input": {"path": str(tmp_path / "in.parquet"), "id_column": "id"}, "output": str(tmp_path / "out"),
        "model": {"adapters": ADAPTERS}, "defaults": GREEDY,
        "engine": {"device": "cpu", "dtype": "float32", "max_model_len": 256}})
    verdicts = {check.key: check.error for check in check_rows(config)}
    assert {k for k, v in verdicts.items() if v is None} == {"default", "base", "a", "b"}
    assert verdicts["unknown"] == job.error("unknown")


@pytest.fixture(scope="module")
def sweep(run_job):
    table = pa.table({"id": [f"r{i}" for i in range(3)], "prompt": [f"Sweep row {i}:" for i in range(3)]})
    return run_job(table, model={"adapters": ADAPTERS}, defaults={"ignore_eos": True},
                   sweep={"models": ["tiny-llama", "tiny-lora-a", "tiny-lora-b"],
                          "grid": {"temperature": [0.0], "max_tokens": [4, 8]}})


def test_a_sweep_over_a_base_and_its_adapters_loads_one_engine(sweep):
    summary = sweep.summary
    print("engine loads for base + 2 adapters x 2 variants:", len(summary.engine_startup_s))
    assert len(summary.engine_startup_s) == 1
    assert summary.rows_out == summary.records_expected == 6 * 3
    lines = summary.comparison
    assert [(line["model"], json.loads(line["params"])["max_tokens"]) for line in lines] == [
        (model, tokens) for model in ("tiny-llama", "tiny-lora-a", "tiny-lora-b") for tokens in (4, 8)]
    assert all(line["rows"] == 3 and line["errors"] == 0 for line in lines)
    texts = {}
    for row in sweep.table.to_pylist():
        model = row["variant"].split("_")[0]
        assert row["response"]["model"] == model
        if json.loads(row["variant_params"])["max_tokens"] == 8:
            texts.setdefault(model, []).append(row["response"]["choices"][0]["text"])
    assert len({tuple(t) for t in texts.values()}) == 3  # three models, three sets of answers
