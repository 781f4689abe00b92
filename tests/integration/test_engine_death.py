"""Processes killed in the middle of a job: the job finishes, each row key once, nothing lost.

The Ray actor process itself killed (Ray starts it again and Ray Data gives the new actor the shards
that were not written), an engine frozen, and one worker of a tensor-parallel engine killed. The vLLM
engine process killed from outside under an actor (the actor starts a new engine and retries the rows
that were in flight) is test_poison_rows.py's second test, beside a poison row, and the two-node chaos
test's first kill.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow]
ROWS = 600
MAX_TOKENS = 200  # 120k tokens: ~40 s of generation on 2 cores, so the kill lands in it


def _cmdline(proc: psutil.Process) -> str:
    return " ".join(proc.cmdline()) or proc.name()


def _ours() -> list[psutil.Process]:
    """This test process's descendants: the local Ray it started, its actors and their engines (never
    another process's, on a shared machine)."""
    return psutil.Process().children(recursive=True)


def ray_engine_actor() -> psutil.Process | None:
    """The Ray Data actor process hosting an engine."""
    for proc in _ours():
        try:
            if "MapWorker(MapBatches(EngineActor))" in _cmdline(proc):
                return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def engine_core_of_a_ray_actor() -> psutil.Process | None:
    """The EngineCore process under a Ray Data actor (not the parity suite's reference server)."""
    for proc in _ours():
        try:
            if "VLLM::EngineCore" not in _cmdline(proc):
                continue
            if any("MapWorker" in _cmdline(p) for p in proc.parents()):
                return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def rows_answered() -> int:
    """Rows the job's engines have answered so far, from the job's stats actor (0 before it exists)."""
    import ray

    from pipeline.reporting.progress import STATS_ACTOR_PREFIX

    total = 0
    for name in ray.util.list_named_actors():
        if name.startswith(STATS_ACTOR_PREFIX):
            try:
                snapshot = ray.get(ray.get_actor(name).snapshot.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - the job may just have ended
                continue
            total += sum(e.get("rows", 0) for e in snapshot["engines"].values())
    return total


def long_rows() -> pa.Table:
    return pa.table({
        "id": [f"r{i:03d}" for i in range(ROWS)],
        "prompt": [f"Row {i} says" for i in range(ROWS)],
        "max_tokens": [MAX_TOKENS] * ROWS,
        "temperature": [0.0] * ROWS,
        "ignore_eos": [True] * ROWS,
    })


def run_while(run_job, table: pa.Table, watch, interval_s: float = 0.5, **config):
    """Run a job in a thread, calling `watch()` every `interval_s` until it returns True, the job ends
    or 240 s pass; return the job's output and whether `watch` returned True."""
    import ray

    # Start the shared local Ray here, in the main thread: Ray starts its GCS and raylet with a parent-death
    # signal, which Linux sends when the *thread* that started them ends, so a Ray started inside the job
    # thread would die with it, under the next test.
    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False)
    result: list = []
    job = threading.Thread(target=lambda: result.append(run_job(table, **config)))
    job.start()
    seen = False
    deadline = time.monotonic() + 240
    while not seen and time.monotonic() < deadline and job.is_alive():
        seen = watch()
        time.sleep(interval_s)
    job.join(timeout=600)
    return result, seen


def run_and_kill(run_job, table: pa.Table, find, ready, **config):
    """Run a job in a thread; SIGKILL the process `find` returns once `ready(process)`; return the output."""

    def kill() -> bool:
        proc = find()
        if proc is not None and ready(proc):
            os.kill(proc.pid, signal.SIGKILL)
            return True
        return False

    result, killed = run_while(run_job, table, kill, **config)
    assert killed, "the job finished before the process could be killed"
    (out,) = result
    return out


def assert_each_row_once_and_answered(out, table: pa.Table) -> None:
    keys = out.table.column("row_key").to_pylist()
    assert sorted(keys) == sorted(table.column("id").to_pylist())  # each row exactly once
    errors = [r["error"] for r in out.rows.values() if r["error"] is not None]
    assert errors == []  # the rows in flight were answered again
    assert all(r["response"]["usage"]["completion_tokens"] == MAX_TOKENS for r in out.rows.values())


def test_actor_process_killed_mid_job(run_job, tmp_path_factory):
    table = long_rows()
    out_dirs = []

    engine_processes: list[psutil.Process] = []

    first_written: list[float] = []

    def a_shard_is_written(actor: psutil.Process) -> bool:
        # kill once the actor has written a shard, 2 s later: some work is kept, and the next wave of
        # shards (~13 s of generation) is in flight, not yet handed over in the gap between waves
        written = [p for d in Path(tmp_path_factory.getbasetemp()).glob("job*/out/data") for p in d.iterdir()
                   if d.parent.parent not in out_dirs and p.suffix == ".parquet"]
        engine_processes[:] = actor.children(recursive=True)  # its forkserver, engine core and worker
        if written and not first_written:
            first_written.append(time.monotonic())
        return bool(first_written) and time.monotonic() - first_written[0] >= 2.0

    for existing in Path(tmp_path_factory.getbasetemp()).glob("job*"):
        out_dirs.append(existing)  # earlier jobs' outputs do not count
    # two shards at a time (an actor would take all 6 at once): they finish in waves, so the kill lands
    # with some shards written and some in flight
    out = run_and_kill(run_job, table, ray_engine_actor, a_shard_is_written,
                       input={"id_column": "id"}, output={"rows_per_file": 100}, engine={"shards_in_flight": 2})
    assert_each_row_once_and_answered(out, table)
    # the killed actor's engine processes ended with it (the engine core is the forkserver's child)
    assert len(engine_processes) >= 3
    _, left = psutil.wait_procs(engine_processes, timeout=30)
    assert left == [], f"left running after their actor was killed: {[_cmdline(p) for p in left]}"
    assert out.summary.shards == out.summary.shards_run == 6
    assert out.summary.shards_redone >= 1  # the shards the dead actor held were given to the new one
    assert len(out.summary.engine_startup_s) >= 2
    print(f"\nactor killed mid-job: {ROWS} rows in, {out.summary.rows_out} out, 0 lost, 0 duplicated; "
          f"{out.summary.shards_redone} shard attempts redone ({out.summary.shards_redone * 100} rows at most), "
          f"start-ups {out.summary.engine_startup_s}, wall {out.summary.wall_s:.1f}s")


def test_an_engine_that_stops_making_progress_is_replaced(run_job):
    """The engine core frozen (SIGSTOP) mid-job: alive to every check but giving no output. After
    `engine.stall_timeout_s` it is treated as dead: replaced, its rows answered by the new engine."""
    table = long_rows().slice(0, 256)  # in waves of 64 rows: the first answered, the next in the engine
    frozen: list[psutil.Process] = []

    def freeze() -> bool:
        core = engine_core_of_a_ray_actor()
        if core is None or rows_answered() == 0:
            return False
        os.kill(core.pid, signal.SIGSTOP)
        frozen.append(core)
        return True

    result, stopped = run_while(run_job, table, freeze, input={"id_column": "id"},
                                engine={"stall_timeout_s": 10, "max_num_seqs": 64})
    assert stopped, "the job finished before its engine could be frozen"
    (out,) = result
    assert_each_row_once_and_answered(out, table)
    assert out.summary.engine_restarts == 1
    assert not frozen[0].is_running() or frozen[0].status() == psutil.STATUS_ZOMBIE  # the frozen engine was stopped
    print(f"\nengine frozen mid-job: {table.num_rows} rows answered, 1 restart after the 10 s stall timeout, "
          f"wall {out.summary.wall_s:.1f}s")


def test_a_tensor_parallel_engine_that_loses_one_worker_is_replaced_whole(run_job):
    """A multi-process engine (tensor parallel 2 on the CPU build: two workers) whose second worker is
    killed: vLLM's engine stops, the actor starts a whole new engine (both workers), and the rows that
    were in it are answered by the new one (docs/gpu-clusters.md)."""
    table = long_rows().slice(0, 192)  # in waves of 64 rows: the first answered, the next in the engine
    killed: list[int] = []

    def second_worker() -> psutil.Process | None:
        for proc in _ours():
            try:
                if "VLLM::Worker_TP1" in _cmdline(proc) and any("MapWorker" in _cmdline(p) for p in proc.parents()):
                    return proc
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return None

    def answering(worker: psutil.Process) -> bool:
        if rows_answered() > 0:
            killed.append(worker.pid)
            return True
        return False

    out = run_and_kill(run_job, table, second_worker, answering, input={"id_column": "id"},
                       engine={"tensor_parallel_size": 2, "cpus_per_actor": 2, "max_num_seqs": 64})
    assert killed
    assert_each_row_once_and_answered(out, table)
    assert out.summary.engine_restarts == 1 and len(out.summary.engine_startup_s) == 2
    assert out.summary.rows_retried > 0 and out.summary.rows_failed == 0
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE
