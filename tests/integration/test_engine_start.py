"""How the engine actor starts vLLM's processes: forked from the actor's forkserver by default
(pipeline/engine/core_process.py), spawned by vLLM itself with `engine.forkserver: false`."""

from __future__ import annotations

import time

import psutil
import pyarrow as pa
import pytest

from tests.integration.test_engine_death import _cmdline, _ours, run_while

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def engine_core_parent_while(run_job, table: pa.Table, **config) -> tuple[str | None, object]:
    """Run a job; return the command line of its engine core's parent, and the output."""
    started = time.time()
    parents: list[str] = []

    def see_parent() -> bool:
        for proc in _ours():
            try:
                # this job's engine core: not an earlier job's, which may still be ending
                if ("VLLM::EngineCore" in _cmdline(proc) and proc.create_time() >= started
                        and any("MapWorker" in _cmdline(p) for p in proc.parents())):
                    parents.append(_cmdline(proc.parent()))
                    return True
            except psutil.Error:
                continue
        return False

    (out,), _ = run_while(run_job, table, see_parent, interval_s=0.2, **config)
    return (parents[0] if parents else None), out


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
