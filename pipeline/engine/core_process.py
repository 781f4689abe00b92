"""vLLM's engine-core process, forked from a process that has imported vLLM already.

vLLM starts its engine core with multiprocessing's `spawn`: a new interpreter that imports torch and
vLLM again, after the engine actor has imported them itself, one after the other (about 5 s of the
engine's start-up on the 2-core development machine). Here the actor starts a forkserver first thing
(`start`), which imports the engine core's modules while the actor imports its own; when vLLM then
starts the engine core (`forked_engine_core`), it is forked from the forkserver, imported already.
vLLM's own API server has the same mode (`VLLM_WORKER_MULTIPROC_METHOD=forkserver`, which its CPU
platform overrides); a restarted engine gets the same head start.

What `spawn` gave the engine core and a fork would not, the process is given back:
- the environment: a forkserver's children inherit the forkserver's, so the actor's environment at
  the moment vLLM starts the engine core (vLLM sets variables for it just before) is carried along
  and put in place before vLLM's code runs;
- its end with the actor: a spawned engine core is the actor's child, but a forked one is the
  forkserver's, and the forkserver outlives the actor as long as a process it forked lives. So the
  engine core watches the actor and stops (SIGTERM, vLLM's shutdown) when the actor is gone.

The model worker vLLM's CPU engine runs in a further process is still spawned by the engine core
(its thread binding is read from the environment when torch loads). Nothing is forked from the
actor itself (Ray's threads), and the forkserver never touches a GPU: it only imports, as vLLM's
own forkserver mode does.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import os
import select
import signal
import sys
import threading
from typing import Iterator

# What the engine-core process runs: its entry point and the executor that starts the worker.
PRELOAD = ["vllm.v1.engine.core", "vllm.v1.executor.multiproc_executor"]

_started = False


def supported() -> bool:
    """Forking from a forkserver, and watching a process by its pidfd: Linux."""
    return sys.platform.startswith("linux") and hasattr(os, "pidfd_open")


def start() -> bool:
    """Start the forkserver, which imports the engine core's modules in the background; returns at
    once. False where it is not supported (then vLLM spawns its engine core as usual)."""
    global _started
    if not supported():
        return False
    if not _started:
        multiprocessing.forkserver.set_forkserver_preload(PRELOAD)
        multiprocessing.forkserver.ensure_running()
        _started = True
    return True


class _EngineCoreProcess(multiprocessing.context.ForkServerProcess):
    """A process forked from the forkserver that starts as a spawned one would: with the starting
    process's environment of the moment, and ending when that process ends."""

    def start(self) -> None:
        self._environ = dict(os.environ)
        self._starter = os.getpid()
        super().start()

    def run(self) -> None:
        _title_settable()
        os.environ.clear()
        os.environ.update(self._environ)
        _end_with(self._starter)
        super().run()


class _Context(multiprocessing.context.ForkServerContext):
    Process = _EngineCoreProcess


_CONTEXT = _Context()


def _title_settable() -> None:
    """Let vLLM set the process title (`VLLM::EngineCore`, what `ps` shows) after the environment
    is replaced: setproctitle finds the title's memory from the environment's, once, on first use."""
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.getproctitle()


def _end_with(pid: int) -> None:
    """Send this process SIGTERM (vLLM's engine core shuts down on it) when process `pid` ends."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # gone already
        os.kill(os.getpid(), signal.SIGTERM)
        return

    def watch() -> None:
        select.select([fd], [], [])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="watch-engine-actor", daemon=True).start()


@contextlib.contextmanager
def forked_engine_core() -> Iterator[None]:
    """While in this block, vLLM starts its engine-core process from the forkserver (when `start`
    started one); vLLM's own checks before starting it still run."""
    if not _started:
        yield
        return
    from vllm.v1.engine import utils

    vllm_context = utils.get_mp_context

    def context() -> multiprocessing.context.BaseContext:
        vllm_context()  # vLLM's checks, and the environment it sets for the process
        return _CONTEXT

    utils.get_mp_context = context
    try:
        yield
    finally:
        utils.get_mp_context = vllm_context
