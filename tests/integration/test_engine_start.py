"""How the engine actor starts vLLM's processes: by default the engine core forked from the actor's
forkserver and, on CPU, the model worker forked from the engine core (pipeline/engine/core_forkserver.py);
both spawned by vLLM itself with `engine.forkserver: false`."""

from __future__ import annotations

import time

import psutil
import pyarrow as pa
import pytest

from tests.integration.test_engine_death import _cmdline, _ours, run_while

pytestmark = [pytest.mark.engine, pytest.mark.slow]


# What vLLM's executor sets for a worker it binds to cores; a spawned worker starts with it in its
# environment, a forked one does not (its process image is the forkserver's).
BINDING = ("GOMP_CPU_AFFINITY", "OMP_PLACES", "KMP_AFFINITY")


def engine_processes_while(run_job, table: pa.Table, **config) -> tuple[dict, object]:
    """Run a job; return its engine core's parent (command line) and its model worker's parent,
    starting environment and cores, as seen once the worker is up; and the job's output."""
    started = time.time()
    seen: dict = {}

    def see() -> bool:
        for proc in _ours():
            try:
                # this job's engine core: not an earlier job's, which may still be ending
                if ("VLLM::EngineCore" in _cmdline(proc) and proc.create_time() >= started
                        and any("MapWorker" in _cmdline(p) for p in proc.parents())):
                    workers = [c for c in proc.children() if "VLLM::Worker" in _cmdline(c)]
                    if not workers:
                        return False
                    seen.update(core_parent=_cmdline(proc.parent()), worker_parent=workers[0].ppid(),
                                engine_core=proc.pid, worker_cores=workers[0].cpu_affinity(),
                                worker_binding=[k for k in BINDING if k in workers[0].environ()])
                    return True
            except psutil.Error:
                continue
        return False

    (out,), _ = run_while(run_job, table, see, interval_s=0.2, **config)
    return seen, out


def _rows(tag: str, rows: int = 40) -> pa.Table:
    return pa.table({"id": [f"{tag}{i}" for i in range(rows)], "prompt": [f"{tag} {i}" for i in range(rows)],
                     "max_tokens": [64] * rows, "ignore_eos": [True] * rows})


def _all_answered(out, table: pa.Table) -> None:
    assert sorted(out.rows) == sorted(table.column("id").to_pylist())
    assert all(r["error"] is None for r in out.rows.values())


def test_on_cpu_the_model_worker_is_forked_from_the_engine_core_and_bound_to_its_core(run_job):
    table = _rows("forked")
    seen, out = engine_processes_while(run_job, table, input={"id_column": "id"})
    assert seen, "no engine core with its worker was seen while the job ran"
    assert "forkserver" in seen["core_parent"]  # the engine core, forked from the actor's forkserver
    assert seen["worker_parent"] == seen["engine_core"]
    assert seen["worker_binding"] == []  # forked: not started with the binding in its environment
    assert len(seen["worker_cores"]) == 1  # and yet bound to the one core vLLM gave it (of the 2 here)
    _all_answered(out, table)


def test_with_the_forkserver_off_vllm_spawns_its_engine_core_under_the_actor(run_job):
    table = _rows("spawned")
    seen, out = engine_processes_while(run_job, table, input={"id_column": "id"},
                                       engine={"forkserver": False})
    assert seen, "no engine core with its worker was seen while the job ran"
    assert "MapWorker(MapBatches(EngineActor))" in seen["core_parent"]  # vLLM's own spawn, from the actor
    assert seen["worker_binding"]  # spawned by vLLM, with the binding in its environment
    assert len(seen["worker_cores"]) == 1
    _all_answered(out, table)
