"""The engine-core process forked from the forkserver (pipeline.core_process) starts as a spawned one
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

import psutil
import pytest

from pipeline.engine import core_process

pytestmark = pytest.mark.skipif(not core_process.supported(), reason="forkserver and pidfd: Linux")

STARTER = """
import json, multiprocessing.forkserver, os, sys, time
from pipeline.engine import core_process
from tests.unit.test_core_process import probe

core_process.PRELOAD = ["json"]  # vLLM's modules are the engine core's; the probe needs none
assert core_process.start()
os.environ["PROBE"] = "set after the forkserver started"  # as vLLM sets RAY_ADDRESS just before
os.environ.pop("DROPPED")

process = core_process._CONTEXT.Process(target=probe, args=(sys.argv[1], float(sys.argv[2])))
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
from pipeline.engine import core_process
from vllm.v1.engine import utils

seen = {}
with core_process.forked_engine_core():  # before start(): vLLM's own context
    seen["unstarted"] = utils.get_mp_context().get_start_method()
core_process.PRELOAD = ["json"]
core_process.start()
with core_process.forked_engine_core():
    context = utils.get_mp_context()
    seen["started"] = context.get_start_method()
    seen["ours"] = context is core_process._CONTEXT
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
