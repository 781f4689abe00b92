"""Engines fed whatever the shard size, shards sized to the job, and how busy the engines were."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import JobConfig
from pipeline.job.run import run
from pipeline.io.tally import Tally
from tests.integration.conftest import CONTEXT

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def most_at_once(intervals: list[list[float]]) -> int:
    """The most shards that were being answered at the same moment."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


def job(tmp_path, rows: int, **output) -> JobConfig:
    pq.write_table(pa.table({"prompt": [f"Item {i} is" for i in range(rows)], "max_tokens": [8] * rows}),
                   tmp_path / "in.parquet")
    return JobConfig.model_validate({
        "input": str(tmp_path / "in.parquet"), "output": {"path": str(tmp_path / "out"), **output},
        "engine": {"device": "cpu", "dtype": "float32", "max_model_len": CONTEXT, "gpu_memory_utilization": 0.5,
                   "max_num_seqs": 64},
    })


def test_small_shards_are_answered_together_and_engine_use_is_reported(run_job, tmp_path):
    # rows_in_flight is 2 x 64 = 128 rows: an actor takes 128 / 20 + 1 = 8 shards of 20 rows at once
    config = job(tmp_path, 160, rows_per_file=20)
    summary = run(config)
    assert summary.rows_out == 160 and summary.errors == 0
    tallies = [Tally.model_validate_json(p.read_text()) for p in (tmp_path / "out" / "shards").glob("*.json")]
    assert len(tallies) == 8
    assert most_at_once([i for t in tallies for i in t.intervals]) == 8  # all 8 shards in the engine together
    (engine,) = summary.engines
    assert engine.rows == 160 and engine.completion_tokens == summary.completion_tokens
    assert 0 < engine.busy_s <= engine.alive_s
    # the job's figure is busy time over time alive (the rounded seconds the summary lists); the
    # engine's share is the same ratio unrounded, which differs by more than 0.002 when the engine
    # was up for well under a second
    assert summary.engine_utilisation == pytest.approx(engine.busy_s / engine.alive_s, abs=1e-4)
    assert summary.engine_utilisation == pytest.approx(engine.busy_share, abs=0.01)
    assert summary.engine_startup_s == [engine.startup_s]
    print(f"\n160 rows in 8 shards of 20: {most_at_once([i for t in tallies for i in t.intervals])} answered "
          f"at once; engine busy {engine.busy_share:.0%} of {engine.alive_s:.1f}s")


def test_default_shard_size_is_sized_to_the_job_and_kept_for_reruns(run_job, tmp_path):
    config = job(tmp_path, 100)
    summary = run(config)
    assert summary.rows_per_shard == 25 and summary.shards == 4  # 100 rows, 1 actor: 4 shards
    recorded = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert recorded["output"]["rows_per_file"] == 25
    # new rows land: the rerun keeps the recorded size, so the first file's shards are the same ones
    pq.write_table(pa.table({"prompt": ["More"] * 300, "max_tokens": [8] * 300}), tmp_path / "in2.parquet")
    (tmp_path / "more").mkdir()
    (tmp_path / "in.parquet").rename(tmp_path / "more" / "in.parquet")
    (tmp_path / "in2.parquet").rename(tmp_path / "more" / "in2.parquet")
    again = run(config.model_copy(update={"input": config.input.model_copy(update={"path": str(tmp_path / "more")})}))
    assert again.rows_per_shard == 25
    assert again.shards_kept == 4 and again.shards_run == 12 and again.rows_out == 400


def test_a_shard_goes_into_the_engine_in_chunks_and_every_row_keeps_its_own_record(run_job):
    # One shard of 150 rows with max_num_seqs 16: the actor feeds it in 10 chunks (the last of 6 rows),
    # each validated and tokenized in a thread while the chunks before it are answered. Rows that get
    # a 400 sit in several chunks; echo shows that each response answers its own row's prompt.
    rows, bad = 150, {0, 17, 77, 149}
    table = pa.table({"id": [f"r{i}" for i in range(rows)], "prompt": [f"Item {i} is" for i in range(rows)],
                      "max_tokens": [-1 if i in bad else 2 for i in range(rows)], "echo": [True] * rows})
    out = run_job(table, output={"rows_per_file": rows}, engine={"max_num_seqs": 16})
    assert out.summary.shards == 1 and out.summary.rows_out == rows and out.summary.errors == len(bad)
    for i in range(rows):
        if i in bad:
            assert out.error(f"r{i}")["code"] == 400 and out.error(f"r{i}")["param"] == "max_tokens"
        else:
            response = out.response(f"r{i}")
            assert response["choices"][0]["text"].startswith(f"Item {i} is")
            assert response["usage"]["completion_tokens"] == 2
