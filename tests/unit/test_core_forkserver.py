"""The engine-core process forked from the forkserver (pipeline.core_forkserver) starts as a spawned one
would: with the starting process's environment of the moment, and ending when that process ends.

Each case runs in an interpreter of its own (a forkserver is a process-wide thing), with a real
forkserver; the forked process runs a probe instead of vLLM's engine core.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from pipeline.engine import core_forkserver

pytestmark = pytest.mark.skipif(not core_forkserver.supported(), reason="forkserver and pidfd: Linux")

STARTER = """
import json, multiprocessing.forkserver, os, sys, time
from pipeline.engine import core_forkserver
from tests.unit.test_core_forkserver import probe

core_forkserver.PRELOAD = ["json"]  # vLLM's modules are the engine core's; the probe needs none
assert core_forkserver.start()
os.environ["PROBE"] = "set after the forkserver started"  # as vLLM sets RAY_ADDRESS just before
os.environ.pop("DROPPED")

process = core_forkserver._CONTEXT.Process(target=probe, args=(sys.argv[1], float(sys.argv[2])))
process.start()
print(json.dumps({"child": process.pid, "me": os.getpid()}), flush=True)
process.join()
print("joined", process.exitcode, flush=True)
"""


def probe(path: str, linger: float) -> None:
    """What the forked process runs: sets its title as vLLM does, writes what it sees, then stays
    `linger` seconds."""
    import setproctitle

    setproctitle.setproctitle("VLLM::EngineCore")
    with open(path, "w") as f:
        json.dump({"probe": os.environ.get("PROBE"), "dropped": os.environ.get("DROPPED"),
                   "parent": os.getppid(), "title": psutil.Process().cmdline()}, f)
    time.sleep(linger)


def _start(tmp_path, linger: float) -> tuple[subprocess.Popen, dict]:
    env = {**os.environ, "DROPPED": "the forkserver's copy of the environment has it"}
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(tmp_path / "seen.json"), str(linger)],
                               stdout=subprocess.PIPE, text=True, env=env)
    return starter, json.loads(starter.stdout.readline())


def _wait_for(path, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, "the forked process wrote nothing"
        time.sleep(0.1)
    time.sleep(0.1)
    return json.loads(path.read_text())


def test_the_forked_process_has_the_starters_environment_of_the_moment_not_the_forkservers(tmp_path):
    starter, pids = _start(tmp_path, linger=0)
    seen = _wait_for(tmp_path / "seen.json")
    assert starter.wait(timeout=30) == 0 and "joined 0" in starter.stdout.read()
    assert seen["probe"] == "set after the forkserver started"
    assert seen["dropped"] is None  # unset in the starter after the forkserver copied it
    assert seen["parent"] != pids["me"]  # forked by the forkserver, not by the starter
    assert seen["title"][0] == "VLLM::EngineCore"  # what ps shows, and what finds the process


def test_the_forked_process_ends_when_its_starter_is_killed(tmp_path):
    starter, pids = _start(tmp_path, linger=600)
    _wait_for(tmp_path / "seen.json")
    child = psutil.Process(pids["child"])
    forkserver = child.parent()
    assert child.is_running() and forkserver.pid != pids["me"]
    os.kill(pids["me"], signal.SIGKILL)  # the actor dies: nothing of it runs any more
    starter.wait(timeout=10)
    gone, alive = psutil.wait_procs([child, forkserver], timeout=20)
    for proc in alive:
        proc.kill()
    assert alive == [], f"still running after its starter was killed: {[p.pid for p in alive]}"


SWAP = """
import json
from pipeline.engine import core_forkserver
from vllm.v1.engine import utils

seen = {}
with core_forkserver.forked_engine_core():  # before start(): vLLM's own context
    seen["unstarted"] = utils.get_mp_context().get_start_method()
core_forkserver.PRELOAD = ["json"]
core_forkserver.start()
with core_forkserver.forked_engine_core():
    context = utils.get_mp_context()
    seen["started"] = context.get_start_method()
    seen["ours"] = context is core_forkserver._CONTEXT
seen["after"] = utils.get_mp_context().get_start_method()
print(json.dumps(seen))
"""


def test_vllm_starts_its_engine_core_from_the_forkserver_only_inside_the_block_and_only_once_started():
    # What the engine actor asks of vLLM, on any device: the context vLLM's engine-core launcher uses
    done = subprocess.run([sys.executable, "-c", SWAP], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["started"] == "forkserver" and seen["ours"]
    assert seen["unstarted"] == seen["after"] != "forkserver"  # vLLM's own (fork or spawn), untouched


def _config(workers: int = 1) -> SimpleNamespace:
    """What vLLM's thread binding reads of a VllmConfig."""
    return SimpleNamespace(kv_transfer_config=None, parallel_config=SimpleNamespace(
        local_world_size=workers, data_parallel_rank_local=None, _api_process_count=1))


@pytest.mark.parametrize("bind, forked", [("0", True), ("nobind", True), ("0,1", False)])
def test_the_worker_is_forked_only_when_vllm_binds_it_to_one_core_or_none(monkeypatch, bind, forked):
    # vLLM's own binding (OMPProcessManager) from its own setting: one thread on one core can be set
    # after OpenMP has loaded, each of several threads on a core of its own cannot
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", bind)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    why_not = core_forkserver.fork_worker_or_why_not(_config())
    assert (why_not is None) == forked, why_not
    if not forked:
        assert "[[0, 1]]" in why_not


def test_the_worker_is_forked_only_when_its_preloaded_libraries_are_loaded_here(monkeypatch):
    import torch

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    gomp = next(Path(torch.__file__).parent.glob("lib/libgomp*.so*"))  # what vLLM preloads; torch loaded it
    monkeypatch.setenv("LD_PRELOAD", str(gomp))
    assert core_forkserver.fork_worker_or_why_not(_config()) is None
    monkeypatch.setenv("LD_PRELOAD", f"{gomp}:/nowhere/libtcmalloc.so.4")
    assert "/nowhere/libtcmalloc.so.4 is not loaded" in core_forkserver.fork_worker_or_why_not(_config())


@pytest.mark.parametrize("environ, cores", [
    ({"GOMP_CPU_AFFINITY": "3"}, {3}),  # what vLLM sets with torch's OpenMP (libgomp) preloaded
    ({"OMP_PLACES": "{5}", "OMP_PROC_BIND": "true"}, {5}),  # with no OpenMP preloaded
    ({"KMP_AFFINITY": "granularity=fine,explicit,proclist=[7]", "KMP_BLOCKTIME": "5"}, {7}),  # Intel's
    ({"OMP_NUM_THREADS": "1"}, None),  # not bound
])
def test_a_forked_worker_finds_its_core_where_vllm_put_it_for_openmp(environ, cores):
    assert core_forkserver._bound_cores(environ) == cores


FORKED_WORKER = """
import json, os, sys
import torch
from pipeline.engine import core_forkserver

os.environ.update(GOMP_CPU_AFFINITY=sys.argv[1], OMP_NUM_THREADS="1")  # as vLLM's executor sets them
worker = core_forkserver._FORK.Process(target=lambda: print(json.dumps(
    {"cores": sorted(os.sched_getaffinity(0)), "threads": torch.get_num_threads()}), flush=True))
worker.start()
worker.join()
print(json.dumps({"exitcode": worker.exitcode, "mine": sorted(os.sched_getaffinity(0))}))
"""


def test_a_forked_worker_binds_itself_to_its_core_and_thread_count_before_it_runs():
    core = max(os.sched_getaffinity(0))
    done = subprocess.run([sys.executable, "-c", FORKED_WORKER, str(core)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    worker, parent = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    assert worker == {"cores": [core], "threads": 1}
    assert parent["exitcode"] == 0 and parent["mine"] == sorted(os.sched_getaffinity(0))  # the parent unbound


EXECUTOR = """
import json, sys
from types import SimpleNamespace
import vllm.platforms
from vllm.v1.executor import multiproc_executor as executor
from pipeline.engine import core_forkserver
from tests.unit.test_core_forkserver import _config

seen = {}
# vLLM's executor start, reduced to what it asks first: the context it starts its workers with
executor.MultiprocExecutor._init_executor = lambda self: seen.update(
    context=executor.get_mp_context().get_start_method(), ours=executor.get_mp_context() is core_forkserver._FORK)
before = executor.get_mp_context
if sys.argv[1] == "gpu":
    vllm.platforms.current_platform = SimpleNamespace(is_cpu=lambda: False)
core_forkserver._fork_workers_on_cpu()
seen["patched"] = executor.get_mp_context is not before
executor.MultiprocExecutor._init_executor(SimpleNamespace(vllm_config=_config()))
seen["after"] = executor.get_mp_context().get_start_method()
print(json.dumps(seen))
"""


@pytest.mark.parametrize("device, bind, context", [
    ("cpu", "0", "fork"),  # one core: the engine core forks its worker
    ("cpu", "0,1", "spawn"),  # two cores for one worker: vLLM's spawn
    ("gpu", "0", "spawn"),  # not CPU: vLLM's executor is left as it is (here the CPU platform's spawn)
])
def test_what_the_engine_core_asks_of_vllms_executor_by_device_and_binding(device, bind, context):
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": bind,
           "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}  # what vLLM's CPU platform sets in the engine core
    env.pop("LD_PRELOAD", None)
    done = subprocess.run([sys.executable, "-c", EXECUTOR, device], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["context"] == context and seen["ours"] == (context == "fork")
    assert seen["patched"] == (device == "cpu")
    assert seen["after"] == "spawn"  # outside an executor's start, vLLM's own context


def test_the_private_executor_hook_the_worker_fork_wraps_is_still_vllms():
    """core_forkserver wraps vLLM's private MultiprocExecutor._init_executor and get_mp_context: with
    the pinned vLLM both are there, and _init_executor still starts the workers through the context."""
    import inspect

    from vllm.v1.executor import multiproc_executor

    assert callable(multiproc_executor.get_mp_context)
    source = inspect.getsource(multiproc_executor.MultiprocExecutor._init_executor)
    assert "get_mp_context" in source or "WorkerProc.make_worker_process" in source
