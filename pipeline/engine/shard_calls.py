"""A job's shards handed to engine actors that outlive it (job/early_engines.py, pool/): each actor
keeps `at_once` of the job's shards in flight, as Ray Data's actor pool does for a job's own actors.

Several jobs feeding the same actors at once each keep their own `at_once` shards in flight on each
actor: every job has the same number of shards in each engine, whose rows the engine answers together.
That is the fair share between jobs (docs/engine-pools.md): with equal shards, equal rows in the engine.
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Iterator

import pyarrow as pa

from pipeline.engine.actor import SHARD_DONE
from pipeline.engine.work import EngineJob, ShardWork

log = logging.getLogger(__name__)


def answer_shards(actors: list[Any], key: str, work: list[ShardWork], job: EngineJob,
                  at_once: int) -> Iterator[pa.Table]:
    """Each shard's work answered for the job `key` (SHARD_DONE rows, as Ray Data's calls return them),
    in the order they finish. An actor Ray restarts is called again with the shards it had (the actors'
    `max_task_retries`); a call that fails for good (its actor was stopped) is a shard without records,
    which a rerun answers."""
    import ray

    job_ref = ray.put(job)
    waiting = collections.deque(work)
    running: dict[Any, tuple[Any, ShardWork]] = {}
    load = {i: 0 for i in range(len(actors))}
    while waiting or running:
        while waiting and (i := next_actor(load, at_once)) is not None:
            item = waiting.popleft()
            ref = actors[i].answer_for.remote(key, job_ref, pa.Table.from_pylist([item.as_row()]))
            running[ref] = (i, item)
            load[i] += 1
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            i, item = running.pop(ref)
            load[i] -= 1
            try:
                yield ray.get(ref)
            except ray.exceptions.RayError as exc:
                log.error("shard %s: its engine actor was lost (%s)", item.out, type(exc).__name__)
                yield pa.Table.from_pylist([{
                    "shard": item.out, "rows": 0, "seconds": 0.0, "engine": "", "node": "", "tally": None,
                    "error": f"its engine actor was lost ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                             "a rerun answers it"}], schema=SHARD_DONE)


def next_actor(load: dict[int, int], at_once: int) -> int | None:
    """The actor the next shard goes to: the least loaded (the first of those), so a job's shards spread
    over every actor rather than filling the first; None when each has `at_once` in flight."""
    i = min(load, key=load.__getitem__)
    return i if load[i] < at_once else None


def forget(actors: list[Any], key: str) -> None:
    """Tell the actors the job `key` has ended (its meters stop); best effort."""
    for actor in actors:
        try:
            actor.forget.remote(key)
        except Exception:  # noqa: BLE001 - an actor that is gone forgot it already
            log.debug("could not tell an engine actor that job %s ended", key, exc_info=True)
