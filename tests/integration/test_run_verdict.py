"""A scheduled run that goes wrong says so: a new file without the columns or with an earlier file's
row keys stops the run before any engine starts (exit 2), and a run whose rows (nearly) all failed
exits 3 without _SUCCESS, its records written. Real engine, real local Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import JobConfig
from pipeline.io.plan import InputError
from pipeline.job.run import run, start_engines
from tests.integration.conftest import CONTEXT

pytestmark = pytest.mark.engine
ROOT = Path(__file__).resolve().parents[2]
ENGINE = {"device": "cpu", "dtype": "float32", "max_model_len": CONTEXT, "gpu_memory_utilization": 0.5}


def _job(folder: Path, **output) -> JobConfig:
    return JobConfig.model_validate({
        "input": {"path": str(folder / "in"), "id_column": "id"},
        "output": {"path": str(folder / "out"), "rows_per_file": 4, **output},
        "engine": ENGINE, "defaults": {"max_tokens": 2, "temperature": 0.0},
    })


def _day(folder: Path, name: str, ids: list[str], prompt_column: str = "prompt", **columns) -> None:
    (folder / "in").mkdir(exist_ok=True)
    pq.write_table(pa.table({"id": ids, prompt_column: [f"Note {i}:" for i in ids], **columns}), folder / "in" / name)


def _data_files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (folder / "out" / "data").iterdir()}


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """One engine for this module's in-process jobs (the same model and engine settings)."""
    actors = start_engines(_job(tmp_path_factory.mktemp("engines")))
    yield actors
    actors.stop()


def test_a_bad_new_file_or_repeated_keys_stop_the_run_before_any_engine(tmp_path, engines):
    _day(tmp_path, "day-1.parquet", [f"a{i}" for i in range(6)])
    first = run(_job(tmp_path), engines=engines)
    assert (first.rows_run, first.errors, first.failure) == (6, 0, None)
    day_1 = _data_files(tmp_path)

    _day(tmp_path, "day-2.parquet", [f"b{i}" for i in range(5)], prompt_column="text")  # renamed column
    with pytest.raises(InputError, match=rf"input file {tmp_path}/in/day-2.parquet has no `prompt` column"):
        run(_job(tmp_path), engines=engines)
    _day(tmp_path, "day-2.parquet", ["b0", "a1", "b2", "a3", "b4"])  # fixed, but two keys of day 1
    with pytest.raises(InputError) as repeated:
        run(_job(tmp_path), engines=engines)
    assert f"'a1' in {tmp_path}/in/day-2.parquet, first in {tmp_path}/in/day-1.parquet" in str(repeated.value)
    assert _data_files(tmp_path) == day_1  # nothing written for day 2, day 1 untouched
    assert (tmp_path / "out" / "_SUCCESS").exists()

    _day(tmp_path, "day-2.parquet", [f"b{i}" for i in range(5)])  # fixed: the next run answers it
    second = run(_job(tmp_path), engines=engines)
    assert (second.rows_run, second.rows_out, second.errors, second.failure) == (5, 11, 0, None)
    assert {k: v for k, v in _data_files(tmp_path).items() if k in day_1} == day_1
    keys = pq.read_table(tmp_path / "out" / "data").column("row_key").to_pylist()
    assert sorted(keys) == sorted([f"a{i}" for i in range(6)] + [f"b{i}" for i in range(5)])
    assert run(_job(tmp_path), engines=engines).nothing_to_do


def test_a_run_mostly_failing_fails_and_redo_errors_answers_those_shards_again(tmp_path, engines):
    # half the rows fail (max_tokens -1, a 400), all in the second shard: data, not a failed run
    _day(tmp_path, "day-1.parquet", [f"h{i}" for i in range(8)], max_tokens=[2] * 4 + [-1] * 4)
    half = run(_job(tmp_path), engines=engines)
    assert (half.errors, half.failure) == (4, None) and (tmp_path / "out" / "_SUCCESS").exists()
    clean_shard = min(_data_files(tmp_path))

    # every row of the next file fails: its records are written, the run fails
    _day(tmp_path, "day-2.parquet", [f"f{i}" for i in range(8)], max_tokens=[-1] * 8)
    failed = run(_job(tmp_path), engines=engines)
    assert failed.rows_run == 8 and failed.rows_out == 16 and failed.errors == 12
    assert failed.failure.startswith("8 of the 8 rows this run answered are error records (100%")
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["failure"] == failed.failure
    before = _data_files(tmp_path)
    again = run(_job(tmp_path), engines=engines)  # nothing new: still failed, nothing rewritten
    assert again.nothing_to_do and again.failure == failed.failure
    assert not (tmp_path / "out" / "_SUCCESS").exists() and _data_files(tmp_path) == before

    # redo_errors (--redo-errors): the three shards with error records are answered again, the clean one kept
    redone = run(_job(tmp_path, redo_errors=True), engines=engines)
    assert (redone.rows_run, redone.rows_out, redone.errors) == (12, 16, 12)
    assert redone.failure.startswith("12 of the 12 rows")  # the rows are still bad: still failed
    after = _data_files(tmp_path)
    assert after[clean_shard] == before[clean_shard]
    assert all(after[name] != mtime for name, mtime in before.items() if name != clean_shard)


def test_the_command_exits_3_for_a_failed_run_and_again_with_nothing_to_do(tmp_path):
    _day(tmp_path, "day-1.parquet", [f"x{i}" for i in range(4)], max_tokens=[-1] * 4)
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps(_job(tmp_path).model_dump(exclude_defaults=True)))
    env = {**os.environ, "PIPELINE_LOG_DIR": str(tmp_path / "logs")}
    command = [sys.executable, "-m", "pipeline", "run", "--config", str(config)]
    first = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert first.returncode == 3, first.stdout + first.stderr
    assert "FAILED: 4 of the 4 rows this run answered are error records (100%" in first.stdout
    assert "4 BadRequestError (400)" in first.stdout
    assert not (tmp_path / "out" / "_SUCCESS").exists() and len(list((tmp_path / "out" / "data").iterdir())) == 1
    second = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert second.returncode == 3, second.stdout + second.stderr
    assert "nothing to do" in second.stdout and "FAILED (the last run that answered rows)" in second.stdout
