"""Engine actors that outlive a job (job/early_engines.py, pool/): started (`standing_actors`), and
handed a job's shards: each actor keeps `at_once` of the job's shards in flight, as Ray Data's actor
pool does for a job's own actors.

Several jobs feeding the same actors at once each keep their own `at_once` shards in flight on each
actor: every job has the same number of shards in each engine, whose rows the engine answers together.
That is the fair share between jobs (docs/engine-pools.md): with equal shards, equal rows in the engine.

Shards that share a long prompt prefix (`ShardWork.affinity`: an evaluation's documents after the same
few-shot examples) go to the same actor, whose engine's prefix cache holds that prefix (`Placement`).
"""

from __future__ import annotations

import collections
import logging
import uuid
from typing import Any, Iterator

import pyarrow as pa

from pipeline.engine import sizing
from pipeline.engine.actor import RUNTIME_ENV, SHARD_DONE, EngineActor
from pipeline.engine.work import EngineJob, ShardWork

log = logging.getLogger(__name__)


def standing_actors(job: EngineJob) -> tuple[list[Any], list[Any]]:
    """`engine.num_actors` engine actors (the lower bound of a range) and, for GPU layouts, their
    placement groups, created now (Ray must be up): they start their engines while the caller goes
    on. `job`: what each is constructed with (and again when Ray restarts it: `max_restarts`)."""
    import ray

    resources = sizing.actor_resources(job.config.engine)
    placement = resources.pop("ray_remote_args_fn", None)  # a placement group per actor (GPU layouts)
    actor = ray.remote(EngineActor)
    actors, groups = [], []
    for _ in range(job.config.engine.actor_range()[0]):
        options = placement() if placement else {}
        if options:
            groups.append(options["scheduling_strategy"].placement_group)
        actors.append(actor.options(**resources, **options, runtime_env=RUNTIME_ENV, max_restarts=-1,
                                    max_task_retries=-1).remote(job))
    return actors, groups


def answer_shards(actors: list[Any], work: list[ShardWork], job: EngineJob, at_once: int) -> Iterator[pa.Table]:
    """Each shard's work answered for `job` (SHARD_DONE rows, as Ray Data's calls return them), in the
    order they finish; the actors are told the job ended when it does (its meters stop). An actor Ray
    restarts is called again with the shards it had (the actors' `max_task_retries`); a call that fails
    for good (its actor was stopped) is a shard without records, which a rerun answers."""
    key = uuid.uuid4().hex  # the job, as the actors know it
    try:
        yield from _answer_shards(actors, key, work, job, at_once)
    finally:
        _forget(actors, key)


def _answer_shards(actors: list[Any], key: str, work: list[ShardWork], job: EngineJob,
                   at_once: int) -> Iterator[pa.Table]:
    import ray

    job_ref = ray.put(job)
    waiting = Placement(work)
    running: dict[Any, tuple[Any, ShardWork]] = {}
    load = {i: 0 for i in range(len(actors))}
    while waiting or running:
        while waiting and (i := next_actor(load, at_once)) is not None:
            item = waiting.take(i)
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


class Placement:
    """The shards waiting for an actor, and which actor takes which (prefix-aware placement, as vLLM's
    issue 12080 and BatchLLM (arXiv 2412.03594) place requests: by the prefix they share).

    An actor with room takes the first waiting shard whose affinity it took before (its engine's
    prefix cache holds what those shards share), else the first whose affinity no actor has taken
    (it becomes the actor's), else (only other actors' affinities wait) the first waiting shard: an
    idle engine is worse than a prefix computed twice. Shards without affinity go in order."""

    def __init__(self, work: list[ShardWork]) -> None:
        self._waiting = collections.deque(work)
        self._owner: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def take(self, actor: int) -> ShardWork:
        """The shard `actor` answers next (one must be waiting)."""
        chosen = None
        for index, item in enumerate(self._waiting):
            owner = self._owner.get(item.affinity) if item.affinity else None
            if owner == actor:
                chosen = index
                break
            if chosen is None and owner is None:
                chosen = index
                if not item.affinity:
                    break
        item = self._waiting[chosen or 0]
        del self._waiting[chosen or 0]
        if item.affinity:
            self._owner.setdefault(item.affinity, actor)
        return item


def _forget(actors: list[Any], key: str) -> None:
    """Tell the actors the job `key` has ended (its meters stop); best effort."""
    for actor in actors:
        try:
            actor.forget.remote(key)
        except Exception:  # noqa: BLE001 - an actor that is gone forgot it already
            log.debug("could not tell an engine actor that job %s ended", key, exc_info=True)
