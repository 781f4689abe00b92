"""The engine actor keeps its own work off the cores vLLM bound its CPU worker to (pipeline/engine/cpu_binding.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.engine import cpu_binding

# A process standing for the engine actor, with children standing for vLLM's engine processes: a
# "worker" bound to the first core (as vLLM binds its CPU worker), an "engine core" (vLLM's title) and
# a "forkserver" (no title) left on all; and a second thread of the actor's own (its thread pools).
ACTOR = """
import json, multiprocessing as mp, os, time
from pipeline.engine import cpu_binding

def child(bind, title, ready):
    if bind:
        os.sched_setaffinity(0, bind)
    if title:
        import setproctitle
        setproctitle.setproctitle(title)
    ready.set()
    time.sleep(60)

if __name__ == "__main__":
    everything = sorted(os.sched_getaffinity(0))
    procs, readies = [], []
    for bind, title in (({everything[0]}, "VLLM::Worker"), (None, "VLLM::EngineCore"), (None, None)):
        ready = mp.Event()
        p = mp.Process(target=child, args=(bind, title, ready), daemon=True)
        p.start(); ready.wait(30); procs.append(p); readies.append(ready)
    import threading
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait, daemon=True)
    helper.start()
    moved = cpu_binding.share_out_cores()
    after = {"actor": sorted(os.sched_getaffinity(0)), "thread": sorted(os.sched_getaffinity(helper.native_id)), "worker": sorted(os.sched_getaffinity(procs[0].pid)),
             "core": sorted(os.sched_getaffinity(procs[1].pid)), "moved": sorted(moved or []),
             "forkserver": sorted(os.sched_getaffinity(procs[2].pid))}
    cpu_binding.for_a_new_engine()
    after["actor_for_a_new_engine"] = sorted(os.sched_getaffinity(0))
    after["everything"] = everything
    for p in procs:
        p.kill()
    print(json.dumps(after))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs at least 2 cores")
def test_the_actor_moves_off_the_workers_core_the_engine_core_onto_it_and_back_for_a_new_engine(tmp_path):
    script = tmp_path / "actor.py"
    script.write_text(ACTOR)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads(done.stdout.strip().splitlines()[-1])
    everything = state["everything"]
    rest = everything[1:]
    assert state["worker"] == everything[:1]  # the worker keeps its core
    assert state["moved"] == rest and state["actor"] == rest and state["thread"] == rest
    assert state["core"] == everything[:1]  # the engine core takes turns with its worker, on its core
    assert state["forkserver"] == everything  # the next engine core is forked from it: all cores
    assert state["actor_for_a_new_engine"] == everything  # a new engine's worker binds from all cores


def test_nothing_moves_when_no_engine_process_is_bound():
    # A GPU engine (or vLLM's binding turned off): no child is bound to fewer cores, nothing changes.
    done = subprocess.run([sys.executable, "-c", "import os; from pipeline.engine import cpu_binding; before = "
                           "os.sched_getaffinity(0); print(cpu_binding.share_out_cores(), "
                           "os.sched_getaffinity(0) == before)"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["None", "True"]


def test_cpu_workers_of_one_engine_split_its_cores(monkeypatch):
    """vLLM binds each CPU worker (TP x PP rank) to a NUMA node and stops with fewer nodes than workers;
    the actor gives each worker a share of its cores instead (VLLM_CPU_OMP_THREADS_BIND)."""
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(cpu_binding, "_ALL", {0, 1, 2, 3, 4})
    cpu_binding.bind_workers(1)
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ  # one worker: vLLM's own binding
    cpu_binding.bind_workers(2)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0,1|2,3"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "4|3")  # the user's is kept
    cpu_binding.bind_workers(2)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "4|3"
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    with pytest.raises(RuntimeError, match="raise engine.cpus_per_actor"):
        cpu_binding.bind_workers(8)
