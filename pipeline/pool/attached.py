"""A job's side of a standing pool: find it, check it serves the job, hand it the job's shards.

A job whose config names a pool (`engine.pool: NAME`, or `--pool NAME`) joins the pool's Ray cluster
(its own `ray_address`, the cluster of `ray job submit`, or the local head `engines start` left on this
machine), asks the pool's keeper for its engines and feeds them its shards itself (engine/
shard_calls.py), as it would feed engines of its own. Before any row is sent it refuses, in one line,
a pool that does not exist or has stopped, and a pool whose model, adapters, engine settings or
request defaults differ from the job's (`PoolError`, exit 2).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterator

import pyarrow as pa

from pipeline.config import ConfigError, JobConfig, in_ray_job
from pipeline.engine.shard_calls import answer_shards
from pipeline.engine.work import EngineJob, ShardWork
from pipeline.pool import local_head
from pipeline.pool.keeper import NAMESPACE

log = logging.getLogger(__name__)

# engine settings a job may set apart from its pool's: how the job feeds the engines, not the engines
JOB_SIDE = {"num_actors", "rows_in_flight", "shards_in_flight", "pool", "if_no_pool"}


class PoolError(ConfigError):
    """The job's pool cannot answer it (missing, stopped, or serving something else)."""


class NoSuchPool(PoolError):
    """The job's pool does not run (never started, stopped, or no cluster with pools)."""


def ray_address(config: JobConfig) -> str | None:
    """Where a job that names a pool finds Ray (None: the job's usual place)."""
    if config.ray_address or in_ray_job():
        return None
    head = local_head.find()
    if head is None:
        raise NoSuchPool(f"engine.pool is {config.engine.pool!r}, but no Ray cluster with pools runs on this "
                        f"machine: start the pool first (python -m pipeline engines start --config CONFIG "
                        f"--name {config.engine.pool}), or set ray_address to the pool's cluster")
    head.join()
    return head.address


def join_local_head(config: JobConfig) -> None:
    """For a job that names a pool: Ray's settings for it, before Ray is imported (the command line
    calls it as it reads the config); on this machine's local head, the head's token."""
    if not config.engine.pool:
        return
    # a job on a pool is seconds long: its driver exports its metrics every half second, not every 10 s,
    # so that the wait for its last figures to be exported (reporting/metrics.flush) is as short
    os.environ.setdefault("RAY_metrics_report_interval_ms", "500")
    if not (config.ray_address or in_ray_job()):
        head = local_head.find()
        if head is not None:
            head.join()


def mismatch(pool: JobConfig, job: JobConfig) -> str | None:
    """The first setting in which the pool's engines differ from what the job asks; None if none."""
    for variant in job.variants():
        if variant.model != pool.model:
            return _differs("model", pool.model.model_dump(), variant.model.model_dump())
    engine = _differs("engine", pool.engine.model_dump(exclude=JOB_SIDE), job.engine.model_dump(exclude=JOB_SIDE))
    if engine:
        return engine
    return _differs("defaults", pool.defaults.sampling_defaults(), job.defaults.sampling_defaults())


def _differs(section: str, pool: dict[str, Any], job: dict[str, Any]) -> str | None:
    for key in sorted(set(pool) | set(job)):
        if pool.get(key) != job.get(key):
            return f"{section}.{key}: the pool's engines have {pool.get(key)!r}, this job asks for {job.get(key)!r}"
    return None


class PoolEngines:
    """A pool's engines as one job uses them (run.py's `engines`: `serve`, `answer`, `stop`)."""

    def __init__(self, name: str, config: JobConfig, actors: list[Any]) -> None:
        self.name = name
        self._config = config
        self._actors = actors

    @classmethod
    def attach(cls, config: JobConfig) -> "PoolEngines":
        """The engines of `config.engine.pool` for this job (Ray joined already); PoolError if they cannot
        answer it."""
        import ray

        name = config.engine.pool
        try:
            keeper = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            running = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                             if a["namespace"] == NAMESPACE)
            raise NoSuchPool(f"no pool named {name!r} runs on this Ray cluster (pools: {', '.join(running) or 'none'}); "
                            f"start it: python -m pipeline engines start --config CONFIG --name {name}") from None
        try:
            spec = ray.get(keeper.spec.remote(), timeout=60)
            actors = ray.get(keeper.attach.remote(), timeout=60)
        except ray.exceptions.RayError:
            actors = None
        if actors is None:
            raise NoSuchPool(f"pool {name!r} has stopped; start it again: python -m pipeline engines start "
                            f"--config CONFIG --name {name}")
        different = mismatch(spec.job.config, config)
        if different:
            raise PoolError(f"pool {name!r} cannot answer this job: {different}. Use the pool's settings, or "
                            "another pool (python -m pipeline engines status lists them)")
        log.info("attached to pool %s: %d engine%s", name, len(actors), "s" if len(actors) != 1 else "")
        return cls(name, spec.job.config, actors)

    def serve(self, config: JobConfig) -> bool:
        return config.model == self._config.model

    def engine_job(self, job: EngineJob) -> EngineJob:
        """`job` as the pool's engines take it (its engine time is its share of theirs)."""
        from dataclasses import replace

        return replace(job, pool=self.name)

    def answer(self, work: list[ShardWork], job: EngineJob, at_once: int) -> Iterator[pa.Table]:
        yield from answer_shards(self._actors, work, self.engine_job(job), at_once)

    def stop(self) -> None:
        """Nothing to stop: the engines are the pool's (the job's calls have ended)."""
