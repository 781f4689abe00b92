"""Which CPU cores the engine actor and vLLM's engine core run on, where the engine computes on CPUs.

vLLM's CPU engine binds its model worker's threads to all of the process's cores but some it keeps
free "for the scheduler process" (one per worker on x86): on a 2-core machine the worker computes on
core 0 and core 1 is left for the rest. vLLM moves nothing onto the core it left free, though, and
the engine actor's event loop (vLLM's OpenAI layer, tokenizing, detokenizing, this pipeline's rows)
runs wherever the kernel puts it, on the worker's core too: each time it does, the worker's step
waits for it. With short requests that is most of the actor's time.

`share_out_cores` moves the actor's threads onto the cores the workers were not bound to, and
vLLM's engine-core process onto the workers' cores. The engine core and its worker take turns (vLLM
runs the CPU engine without async scheduling: the engine core schedules a step, the worker computes
it, the engine core reads its output), so on the same cores neither waits for the other, and the
actor has the free cores to itself. Left to the kernel, the engine core often shared the actor's
core, and its steps waited for the actor (docs/performance.md: long generations 3% slower).
`for_a_new_engine` puts the actor back on all of its cores first: an engine started from a narrowed
process would inherit the narrow set, and vLLM would bind its worker inside it. Neither changes
anything when no engine process is bound to fewer cores than the actor has (a GPU engine, or vLLM's
binding turned off).
"""

from __future__ import annotations

import contextlib
import logging
import os

import psutil

log = logging.getLogger(__name__)

# This process's cores as Ray gave them, before any narrowing.
_ALL: set[int] | None = None


def _allowed() -> set[int]:
    return set(os.sched_getaffinity(0))


def _set(process: psutil.Process, cores: set[int]) -> None:
    for thread in process.threads():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(thread.id, cores)


def share_out_cores() -> set[int] | None:
    """Move this process's threads off the cores vLLM bound its engine's workers to, and the engine
    core onto them; returns the cores this process now runs on, or None when nothing was moved."""
    global _ALL
    if not hasattr(os, "sched_setaffinity"):
        return None
    everything = _ALL if _ALL is not None else _allowed()
    _ALL = everything
    bound: set[int] = set()
    engine_cores = []
    for child in psutil.Process().children(recursive=True):
        try:
            cores = set(child.cpu_affinity())
        except psutil.Error:
            continue
        if cores < everything:
            bound |= cores  # a worker vLLM bound to its cores
        elif _is_engine_core(child):
            engine_cores.append(child)
    rest = everything - bound
    if not bound or not rest:
        return None
    _set(psutil.Process(), rest)
    for engine_core in engine_cores:
        with contextlib.suppress(psutil.Error):
            _set(engine_core, bound)
    log.info("the engine's worker and engine core run on cores %s; the actor on %s", sorted(bound), sorted(rest))
    return rest


def _is_engine_core(process: psutil.Process) -> bool:
    """vLLM's engine-core process, by the title vLLM gives it (`VLLM::EngineCore`, `..._DP0`); not
    the forkserver it may be forked from, which must keep every core for the next engine."""
    try:
        return "::EngineCore" in " ".join(process.cmdline())
    except psutil.Error:
        return False


def for_a_new_engine() -> None:
    """Put this process back on all of its cores, so that a new engine's worker is bound as vLLM
    binds it (from the process's own set of cores)."""
    if _ALL is not None and _allowed() != _ALL:
        _set(psutil.Process(), _ALL)


def bind_workers(workers: int) -> None:
    """vLLM's CPU engine binds each of its workers (tensor x pipeline parallel ranks) to a NUMA node of
    its own and stops when there are fewer ("Not enough allowed NUMA nodes to bind threads of 2 local
    CPUWorkers"). Split this process's cores among the workers instead, as vLLM's own setting for it
    (`VLLM_CPU_OMP_THREADS_BIND`, "0|1") does; a value the user set is kept."""
    if workers <= 1 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    cores = sorted(_ALL if _ALL is not None else _allowed())
    if len(cores) < workers:
        raise RuntimeError(f"{workers} CPU workers (tensor x pipeline parallel) need at least {workers} cores; "
                           f"this engine has {len(cores)}: raise engine.cpus_per_actor")
    size = len(cores) // workers
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
        ",".join(str(c) for c in cores[i * size:(i + 1) * size]) for i in range(workers))
    log.info("the engine's %d CPU workers bound to cores %s", workers, os.environ["VLLM_CPU_OMP_THREADS_BIND"])
