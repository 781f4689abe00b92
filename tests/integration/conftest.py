"""Integration fixtures: whole jobs on a local Ray with the real vLLM CPU engine and the tiny model."""

from __future__ import annotations

import itertools
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import JobConfig
from pipeline.io.records import response_body
from pipeline.job.run import run
from pipeline.reporting.summary import JobSummary

CONTEXT = 256  # small, so "max_tokens omitted -> shrink to the context left" is cheap to observe
_jobs = itertools.count()


class JobResult:
    def __init__(self, table: pa.Table, summary: JobSummary, input_table: pa.Table, output: Path) -> None:
        self.output = output  # the job's output folder
        self.table = table
        self.summary = summary
        self.input = input_table
        self.rows = {row["id"]: row for row in table.to_pylist()}

    def response(self, row_id: str) -> dict:
        row = self.rows[row_id]
        assert row["error"] is None, row["error"]
        return response_body(row["response"])

    def error(self, row_id: str) -> dict:
        row = self.rows[row_id]
        assert row["response"] is None, row["response"]
        return row["error"]


@pytest.fixture(scope="session")
def run_job(tmp_path_factory):
    """Run a whole job over `table` and return its output; all jobs share one local Ray."""

    def _run(table: pa.Table, **config: object) -> JobResult:
        folder: Path = tmp_path_factory.mktemp(f"job{next(_jobs)}")
        pq.write_table(table, folder / "input.parquet")
        job = JobConfig.model_validate({
            "input": {**config.pop("input", {}), "path": str(folder / "input.parquet")},
            "output": {**config.pop("output", {}), "path": str(folder / "out")},
            "engine": {"device": "cpu", "dtype": "float32", "max_model_len": CONTEXT,
                       "gpu_memory_utilization": 0.5, **config.pop("engine", {})},
            **config,
        })
        summary = run(job)
        return JobResult(pq.read_table(folder / "out" / "data"), summary, table, folder / "out")

    yield _run
    import ray

    ray.shutdown()


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from pipeline.models.tiny_model import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("builtin:tiny-llama"))
