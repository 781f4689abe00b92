"""Scheduled enrichment: the same job over a folder that grows runs only the new files, never twice."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import JobConfig
from pipeline.job.run import run
from tests.integration.conftest import CONTEXT

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def day(n: int, rows: int) -> pa.Table:
    return pa.table({"id": [f"d{n}-{i}" for i in range(rows)],
                     "prompt": [f"Day {n}, note {i}:" for i in range(rows)]})


def test_three_runs_over_a_growing_folder(tmp_path):
    (tmp_path / "in").mkdir()
    config = JobConfig.model_validate({
        "input": {"path": str(tmp_path / "in"), "id_column": "id"},
        "output": {"path": str(tmp_path / "out"), "rows_per_file": 8},
        "engine": {"device": "cpu", "dtype": "float32", "max_model_len": CONTEXT, "gpu_memory_utilization": 0.5},
        "defaults": {"max_tokens": 4},
    })
    expected, mtimes = [], {}
    for n, rows in ((1, 12), (2, 5), (3, 9)):
        pq.write_table(day(n, rows), tmp_path / "in" / f"day-{n}.parquet")
        expected += day(n, rows).column("id").to_pylist()
        summary = run(config)
        assert summary.rows_run == rows  # only the new file ran ...
        assert summary.rows_in == summary.rows_out == len(expected)
        data = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "data").iterdir()}
        assert all(data[name] == mtime for name, mtime in mtimes.items())  # ... earlier files untouched
        mtimes = data
        keys = pq.read_table(tmp_path / "out" / "data").column("row_key").to_pylist()
        assert sorted(keys) == sorted(expected)  # each row once
    assert sorted(name.split("-")[0] + "-" + name.split("-")[1] for name in mtimes) == \
        ["day-1"] * 2 + ["day-2"] + ["day-3"] * 2

    again = run(config)  # nothing new: nothing runs, nothing is written
    assert again.nothing_to_do and again.rows_run == 0 and again.rows_out == len(expected)
    runs = sorted((tmp_path / "out" / "runs").glob("*.json"))
    assert [json.loads(p.read_text())["rows_run"] for p in runs] == [12, 5, 9]  # the run log
