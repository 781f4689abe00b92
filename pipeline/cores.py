"""Which CPU cores the engine actor's own work runs on, on a node where the engine computes on CPUs.

vLLM's CPU engine binds its model worker's threads to all of the process's cores but some it keeps
free "for the scheduler process" (one per worker on x86): on a 2-core machine, the worker computes on
core 0 and core 1 is left for everything else. vLLM does not move anything onto the cores it left
free, though: the engine actor's event loop (vLLM's OpenAI layer, detokenizing, this pipeline's rows)
and vLLM's engine-core process, which polls while the worker computes, run wherever the kernel puts
them, on the worker's core too, and each time they do the worker's step waits for them.

`keep_off_the_worker` moves them (this process's threads and the engine's processes other than its
workers) onto the cores the workers were not bound to. `for_a_new_engine` puts this process back on
all of its cores first: an engine started from a narrowed process would inherit the narrow set, and
vLLM would bind its worker inside it. Neither changes anything when no engine process is bound to
fewer cores than this process has (a GPU engine, or vLLM's binding turned off).

On the 2-core development machine, 20,000 short requests (docs/performance.md), two runs each way:
the generation phase took 17.0-17.7 s with this and 18.0-18.1 s without.
"""

from __future__ import annotations

import contextlib
import logging
import os

import psutil

log = logging.getLogger(__name__)


def _allowed() -> set[int]:
    return set(os.sched_getaffinity(0))


# This process's cores as Ray gave them, before any narrowing.
_ALL: set[int] | None = None


def _threads(process: psutil.Process) -> list[int]:
    return [thread.id for thread in process.threads()]


def _set(process: psutil.Process, cores: set[int]) -> None:
    for tid in _threads(process):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(tid, cores)


def keep_off_the_worker() -> set[int] | None:
    """Move this process and the engine's non-worker processes off the cores vLLM bound its workers
    to; returns the cores they now run on, or None when nothing was moved."""
    global _ALL
    if not hasattr(os, "sched_setaffinity"):
        return None
    me = psutil.Process()
    everything = _ALL if _ALL is not None else _allowed()
    _ALL = everything
    children = me.children(recursive=True)
    bound: set[int] = set()
    free_roaming = []
    for child in children:
        try:
            cores = set(child.cpu_affinity())
        except psutil.Error:
            continue
        if cores < everything:
            bound |= cores  # a worker vLLM bound to its cores
        else:
            free_roaming.append(child)
    rest = everything - bound
    if not bound or not rest:
        return None
    for process in (me, *free_roaming):
        with contextlib.suppress(psutil.Error):
            _set(process, rest)
    log.info("the engine's worker computes on cores %s; the actor and the engine core run on %s",
             sorted(bound), sorted(rest))
    return rest


def for_a_new_engine() -> None:
    """Put this process back on all of its cores, so that a new engine's worker is bound as vLLM
    binds it (from the process's own set of cores)."""
    if _ALL is not None and _allowed() != _ALL:
        _set(psutil.Process(), _ALL)
