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

On CPU, vLLM's engine core then starts its model worker, a third process, and vLLM's CPU platform
makes that a spawn too (a third import of torch and vLLM, and at the end a full interpreter teardown:
about 10 s of each engine's start and 2-3 s of its stop on the 2-core development machine). Where a
fork gives the worker what spawn would (`fork_worker_or_why_not`), the engine core forks it instead,
as vLLM's executor does on GPUs. Spawn gave the worker two things at its start, before torch loads:
- the libraries in `LD_PRELOAD` (vLLM preloads torch's OpenMP runtime): the worker is forked only
  when every one of them is loaded in the engine core already;
- its OpenMP thread binding (`OMP_NUM_THREADS` and the cores, which OpenMP reads once, when it
  loads): the worker is forked only when it computes on one thread bound to one core (or unbound),
  and binds itself to that core first thing (`_ForkedWorker`), as OpenMP would have bound it. A
  worker on several cores is spawned: each of its threads on a core of its own cannot be set after
  OpenMP has loaded.
Otherwise vLLM spawns it, as before. Nothing is forked from the actor itself (Ray's threads), and the
forkserver never touches a GPU: it only imports, as vLLM's own forkserver mode does.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import os
import re
import select
import signal
import sys
import threading
from typing import Any, Iterator, Mapping

log = logging.getLogger(__name__)

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
        _fork_workers_on_cpu()
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


def fork_worker_or_why_not(vllm_config: Any) -> str | None:
    """None when a model worker forked from this process (the engine core) gets what vLLM's spawn
    would give it on CPU; else why not. Its OpenMP binding is vLLM's own, computed as vLLM's executor
    computes it just after (`OMPProcessManager`)."""
    preloaded = [path for path in os.environ.get("LD_PRELOAD", "").replace(" ", ":").split(":") if path]
    loaded = _loaded_libraries()
    missing = [path for path in preloaded if os.path.realpath(path) not in loaded]
    if missing:
        return f"LD_PRELOAD {', '.join(missing)} is not loaded in the engine core"
    try:
        from vllm.utils.ompmultiprocessing import OMPProcessManager

        binding = OMPProcessManager(vllm_config)
    except Exception as exc:  # noqa: BLE001 - vLLM raises its own error when it binds the spawned worker
        return f"vLLM's thread binding: {exc}"
    if not binding.skip_setup and any(len(cores) != 1 for cores in binding.cpu_lists):
        return f"the worker's threads are bound to cores {binding.cpu_lists}, which OpenMP reads when it loads"
    return None


def _loaded_libraries() -> set[str]:
    """The shared libraries mapped into this process (their real paths)."""
    try:
        with open("/proc/self/maps") as maps:
            fields = [line.split(None, 5) for line in maps]
    except OSError:
        return set()
    return {os.path.realpath(f[5].strip()) for f in fields if len(f) == 6 and ".so" in f[5]}


class _ForkedWorker(multiprocessing.context.ForkProcess):
    """vLLM's model worker, forked from the engine core: binds itself to its core (the one vLLM's
    executor put in `GOMP_CPU_AFFINITY` / `OMP_PLACES` / `KMP_AFFINITY` for it) and takes its thread
    count from `OMP_NUM_THREADS`, before vLLM's worker code runs, as OpenMP does when a spawned worker
    loads torch."""

    def start(self) -> None:
        self._cores = _bound_cores(os.environ)  # the executor's binding for this worker, set just now
        super().start()

    def run(self) -> None:
        import torch

        if self._cores:
            os.sched_setaffinity(0, self._cores)
        threads = os.environ.get("OMP_NUM_THREADS", "")
        if threads.isdigit() and int(threads) > 0:
            torch.set_num_threads(int(threads))
        super().run()


def _bound_cores(environ: Mapping[str, str]) -> set[int] | None:
    """The cores vLLM's executor binds a worker to (one, when it is forked), from the variables it sets
    for it; None when it binds none."""
    for key in ("GOMP_CPU_AFFINITY", "OMP_PLACES", "KMP_AFFINITY"):
        value = environ.get(key, "")
        if key == "KMP_AFFINITY":
            value = value.partition("proclist=")[2]
        cores = {int(core) for core in re.findall(r"\d+", value)}
        if cores:
            return cores
    return None


class _ForkContext(multiprocessing.context.ForkContext):
    Process = _ForkedWorker


_FORK = _ForkContext()


def _fork_workers_on_cpu() -> None:
    """In the engine core, on CPU: vLLM's executor forks its model workers from this process, which
    has imported torch and vLLM already, where `fork_worker_or_why_not` finds that the fork gives them
    what spawn would; else it spawns them, as vLLM's CPU platform has it."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.executor import multiproc_executor

    executor = multiproc_executor.MultiprocExecutor
    if not (hasattr(multiproc_executor, "get_mp_context") and hasattr(executor, "_init_executor")):
        return  # another vLLM than the one this was written for (0.32): its own spawn
    vllm_context = multiproc_executor.get_mp_context
    # PRIVATE INTERNAL: vLLM 0.32 has no public hook where its executor starts its workers; tests/unit/
    # test_core_forkserver.py fails if the pinned vLLM changes it (and without it, vLLM's own spawn stays)
    vllm_init = executor._init_executor  # private-internal: vLLM MultiprocExecutor._init_executor
    forking = False  # while an executor that forks its workers starts them

    def context() -> multiprocessing.context.BaseContext:
        chosen = vllm_context()  # vLLM's checks, and the environment it sets
        return _FORK if forking else chosen

    def init_executor(self: Any) -> None:
        nonlocal forking
        why_not = fork_worker_or_why_not(self.vllm_config)
        if why_not:
            log.info("vLLM spawns the model worker (not forked from the engine core): %s", why_not)
        forking = why_not is None
        try:
            vllm_init(self)
        finally:
            forking = False

    multiproc_executor.get_mp_context = context
    executor._init_executor = init_executor  # private-internal: vLLM MultiprocExecutor._init_executor
