"""How the engine actor starts vLLM's processes: forked from the actor's forkserver by default
(pipeline/core_process.py), spawned by vLLM itself with `engine.forkserver: false`."""

from __future__ import annotations

import threading
import time

import psutil
import pyarrow as pa
import pytest

from tests.integration.test_engine_death import _cmdline, _ours

pytestmark = pytest.mark.engine


def engine_core_parent_while(run_job, table: pa.Table, **config) -> tuple[str, object]:
    """Run a job in a thread; return the command line of its engine core's parent, and the output."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False)  # in the main thread (see test_engine_death)
    result: list = []
    started = time.time()
    job = threading.Thread(target=lambda: result.append(run_job(table, **config)))
    job.start()
    parent = None
    while parent is None and job.is_alive():
        for proc in _ours():
            try:
                # this job's engine core: not an earlier job's, which may still be ending
                if ("VLLM::EngineCore" in _cmdline(proc) and proc.create_time() >= started
                        and any("MapWorker" in _cmdline(p) for p in proc.parents())):
                    parent = _cmdline(proc.parent())
            except psutil.Error:
                continue
        time.sleep(0.2)
    job.join(timeout=600)
    (out,) = result
    return parent, out


def test_with_the_forkserver_off_vllm_spawns_its_engine_core_under_the_actor(run_job):
    rows = 40
    table = pa.table({"id": [f"s{i}" for i in range(rows)], "prompt": [f"Spawned {i}" for i in range(rows)],
                      "max_tokens": [64] * rows, "ignore_eos": [True] * rows})
    parent, out = engine_core_parent_while(run_job, table, input={"id_column": "id"},
                                           engine={"forkserver": False})
    assert parent is not None, "no engine core was seen while the job ran"
    assert "MapWorker(MapBatches(EngineActor))" in parent  # vLLM's own spawn, from the actor
    assert sorted(out.rows) == sorted(table.column("id").to_pylist())
    assert all(r["error"] is None for r in out.rows.values())
