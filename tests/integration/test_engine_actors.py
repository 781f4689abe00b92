"""Engine actors that outlive one job (job/early_engines.py): started before their jobs, kept across them,
on the session's local Ray with the real CPU engine."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import JobConfig
from pipeline.io.records import response_body
from pipeline.job.run import run, start_engines

pytestmark = pytest.mark.engine
ENGINE = {"device": "cpu", "dtype": "float32", "max_model_len": 256, "gpu_memory_utilization": 0.5}


def _job(folder: Path, table: pa.Table, output: str, rows_per_file: int, **engine: object) -> JobConfig:
    folder.mkdir(exist_ok=True)
    pq.write_table(table, folder / "input.parquet")
    return JobConfig.model_validate({"input": {"path": str(folder / "input.parquet")},
                                     "output": {"path": str(folder / output), "rows_per_file": rows_per_file},
                                     "engine": {**ENGINE, **engine}})


def _records(folder: Path) -> dict[str, dict]:
    rows = pq.read_table(folder / "data").to_pylist()
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows if r["error"]][:3]
    return {r["id"]: {k: v for k, v in response_body(r["response"]).items() if k not in ("id", "created")}
            for r in rows}


def _pid_of(engine) -> int:
    return int(engine.engine.split(".")[1].split("-")[0])  # `<actor>.<pid>-<engine of this job>`


def _pid(summary) -> int:
    (engine,) = summary.engines
    return _pid_of(engine)


def _processes(pid: int) -> list[psutil.Process]:
    """The actor's process and its engine's (the forkserver, the engine core, the CPU worker)."""
    actor = psutil.Process(pid)
    return [actor, *actor.children(recursive=True)]


def test_engines_started_before_their_jobs_answer_each_job_once_started(run_job, tmp_path):
    sample = pq.read_table("data/sample_prompts.parquet").slice(0, 24).drop_columns(["max_tokens", "seed"])
    table = sample.append_column("max_tokens", pa.array([4] * 24)).append_column("seed", pa.array(range(24))) \
                  .append_column("logprobs", pa.array([2] * 24)).append_column("echo", pa.array([True] * 24))
    first = _job(tmp_path / "first", table, "out", rows_per_file=8)
    second = _job(tmp_path / "second", table, "out", rows_per_file=6)
    engines = start_engines(first)
    try:
        one = run(first, engines=engines)
        two = run(second, engines=engines)
        pid = _pid(one)
        processes = _processes(pid)
        niceness = {p.name(): p.nice() for p in processes}
    finally:
        engines.stop()

    # one engine, started once, answered both jobs; each job's figures are its own
    assert _pid(two) == pid
    assert one.engines[0].startup_s == two.engines[0].startup_s > 0
    assert (one.rows_out, one.errors, one.shards) == (24, 0, 3)
    assert (two.rows_out, two.errors, two.shards) == (24, 0, 4)
    assert one.engines[0].rows == two.engines[0].rows == 24
    assert one.engine_restarts == two.engine_restarts == 0
    # the same answers (every row greedy or seeded; echo and logprobs included), whoever's job it was
    assert _records(tmp_path / "first" / "out") == _records(tmp_path / "second" / "out")
    assert len(processes) >= 3, [p.name() for p in processes]
    # the actor and its engine's processes run at the driver's priority, not Ray's nice 15 for workers
    assert set(niceness.values()) == {os.getpriority(os.PRIO_PROCESS, 0)}, niceness
    deadline = time.monotonic() + 60  # `stop` stops the engine and its processes, then the actor
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_an_engine_actor_killed_mid_job_is_restarted_and_its_shards_answered_once(run_job, tmp_path):
    sample = pq.read_table("data/sample_prompts.parquet").slice(0, 120).drop_columns(["max_tokens"])
    table = sample.append_column("max_tokens", pa.array([48] * 120))
    # one shard at a time: when the first is written, the others are still to come (the kill lands mid-job)
    job = _job(tmp_path / "job", table, "out", rows_per_file=10, shards_in_flight=1)
    engines = start_engines(job)
    killed: list[int] = []
    try:
        warm = run(_job(tmp_path / "warm", table.slice(0, 2), "out", rows_per_file=2, shards_in_flight=1),
                   engines=engines)
        pid = _pid(warm)

        def kill_when_a_shard_is_written() -> None:
            # after the second shard's file: the actor sent the first shard's figures before it took the
            # second (one in flight), so the killed process is in the summary. (Killed between writing a
            # shard and sending its figures, a process is missing from it; its rows are counted all the
            # same, from the shard's tally.)
            data = tmp_path / "job" / "out" / "data"
            while not (data.exists() and len(list(data.iterdir())) >= 2):
                time.sleep(0.2)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

        import threading

        threading.Thread(target=kill_when_a_shard_is_written, daemon=True).start()
        summary = run(job, engines=engines)
    finally:
        engines.stop()

    assert killed == [pid]
    rows = pq.read_table(tmp_path / "job" / "out" / "data").column("id").to_pylist()
    assert sorted(rows) == sorted(table.column("id").to_pylist())  # every row once
    assert (summary.rows_out, summary.errors, summary.shards_failed) == (120, 0, {})
    pids = {_pid_of(e) for e in summary.engines}
    assert pid in pids and len(pids) == 2, summary.engines  # Ray started the actor again, in a new process
