"""An evaluation sweep: 2 models x 4 variants over one dataset, each engine loaded once."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.evaluation.compare import render
from pipeline.config import JobConfig
from pipeline.job.run import run
from tests.integration.conftest import CONTEXT

pytestmark = pytest.mark.engine
ROWS = 6
GRID = {"temperature": [0.0, 1.0], "max_tokens": [4, 12]}


def sweep_config(tmp_path, output: str, models: list[str]) -> JobConfig:
    return JobConfig.model_validate({
        "input": str(tmp_path / "in.parquet"),
        "output": str(tmp_path / output),
        "engine": {"device": "cpu", "dtype": "float32", "max_model_len": CONTEXT, "gpu_memory_utilization": 0.5},
        "defaults": {"ignore_eos": True},
        "sweep": {"models": [{"path": m} for m in models], "grid": GRID, "variants": [{"seed": 11}]},
        "cost": {"price_per_accelerator_hour": 3.6},
    })


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sweep")
    pq.write_table(pa.table({"prompt": [f"Sweep row {i}:" for i in range(ROWS)],
                             "temperature": [0.5] * ROWS}),  # the variant's value beats the row's
                   tmp_path / "in.parquet")
    config = sweep_config(tmp_path, "out", ["builtin:tiny-llama", "builtin:tiny-llama-b"])
    return tmp_path, config, run(config)


def test_every_model_and_variant_answers_every_row_with_one_engine_load_per_model(sweep):
    tmp_path, config, summary = sweep
    assert len(summary.engine_startup_s) == 2  # two models, eight variants: two engine loads
    assert len(summary.variants) == 8 and summary.rows_out == summary.records_expected == 8 * ROWS
    table = pq.read_table(tmp_path / "out" / "data")  # Hive folders: variant=<name>/
    assert sorted(set(table.column("variant").to_pylist())) == sorted(summary.variants)
    for variant in config.variants():
        rows = table.filter(pa.compute.equal(table.column("variant"), variant.name)).to_pylist()
        assert len(rows) == ROWS
        assert all(json.loads(r["variant_params"]) == variant.params for r in rows)
        assert all(r["response"]["model"] == variant.model.resolved_served_name() for r in rows)
        assert all(r["response"]["usage"]["completion_tokens"] == variant.params["max_tokens"] for r in rows)
    assert {v.name.split("_")[0] for v in config.variants()} == {"tiny-llama", "tiny-llama-b"}
    # greedy rows differ between the two models (other weights), as a comparison should show
    greedy = {r["variant"]: r["response"]["choices"][0]["text"] for r in table.to_pylist()
              if r["row_key"] == "in.parquet:0" and '"temperature": 0.0' in r["variant_params"]
              and '"max_tokens": 12' in r["variant_params"]}
    assert len(set(greedy.values())) == 2


def test_comparison_table_csv_json_and_plot(sweep):
    tmp_path, _, summary = sweep
    lines = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert [line["variant"] for line in lines] == summary.variants
    for line in lines:
        tokens = json.loads(line["params"])["max_tokens"]
        assert line["rows"] == ROWS and line["errors"] == 0
        assert line["completion_tokens"] == ROWS * tokens
        assert line["completion_mean"] == line["completion_p50"] == line["completion_p95"] == tokens
        assert line["finish_reasons"] == {"length": ROWS} and line["tokens_per_s"] > 0
    with open(tmp_path / "out" / "comparison.csv") as f:
        assert [row["variant"] for row in csv.DictReader(f)] == summary.variants
    assert (tmp_path / "out" / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tiny-llama-b_seed11_temperature1.0_max_tokens12" in render(summary.comparison)
    # each variant's share of its model's engine time: the shares add up to the job's cost
    assert all(line["accelerator_s"] > 0 and line["cost"] > 0 for line in lines)
    assert sum(line["accelerator_s"] for line in lines) == pytest.approx(summary.cost.accelerator_s, rel=1e-3)
    assert sum(line["cost"] for line in lines) == pytest.approx(summary.cost.total, rel=1e-3)
    for line in lines:
        assert line["cost_per_million_output_tokens"] == pytest.approx(
            line["cost"] / (line["completion_tokens"] / 1e6), rel=1e-6)


def test_seeded_variants_reproduce_when_rerun(sweep):
    tmp_path, _, _ = sweep
    again = sweep_config(tmp_path, "again", ["builtin:tiny-llama"])  # one model: names lose the prefix
    run(again)
    first = pq.read_table(tmp_path / "out" / "data").to_pylist()
    second = pq.read_table(tmp_path / "again" / "data").to_pylist()

    def texts(rows, prefix=""):
        return {(r["variant"].removeprefix(prefix), r["row_key"]): r["response"]["choices"][0]["text"]
                for r in rows if r["variant"].startswith(prefix) and "temperature1.0" in r["variant"]}

    expected = texts(first, "tiny-llama_")
    assert len(expected) == 2 * ROWS
    assert texts(second) == expected  # seed 11 at temperature 1.0: the same text in a new job
