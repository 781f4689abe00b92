"""Engine actors that outlive one job: started ahead of their jobs, and kept across them.

A job's engine actors are Ray Data's (run.py): they start when the job starts, and the job waits for
them (Ray starting the actor's process, the actor importing vLLM, vLLM starting its engine: 45-60 s
on the 2-core development machine). An evaluation knows its model and engine long before its first
job: the harness first imports itself and builds every request (prompts, few-shot examples,
tokenizing), which takes about as long. `python -m pipeline eval` therefore starts the engine actors
first (`EarlyEngines.start`), and its jobs (one per request kind, run(..., engines=...)) hand their
shards to those actors instead of starting Ray Data's: the engine starts while the harness works, and
once for all request kinds and the variants of one model.

They are the same `EngineActor`s, called the same way (one shard per call, `shards_at_once` calls in
flight per actor) and keeping the same guarantees: a row that kills its engine is isolated by the
actor's supervisor, and an actor whose process dies is restarted by Ray, which calls it again with
the shards it had (`max_task_retries`); a shard already written is not written twice.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import pyarrow as pa

from pipeline.config import JobConfig
from pipeline.engine.shard_calls import answer_shards, standing_actors
from pipeline.engine.work import EngineJob, ShardWork

log = logging.getLogger(__name__)


class EarlyEngines:
    """`engine.num_actors` engine actors of one model (the lower bound of an elastic range)."""

    def __init__(self, config: JobConfig, actors: list[Any]) -> None:
        self.model = config.model
        self._engine = config.engine
        self._actors = actors
        self._used = False

    @classmethod
    def start(cls, job: EngineJob) -> "EarlyEngines":
        """Create the actors (Ray must be up); returns at once, while they start their engines.
        `job`: what they answer until a job of their own comes (run.py's `start_engines`)."""
        actors, _ = standing_actors(job)  # their placement groups go with this driver
        return cls(job.config, actors)

    def serve(self, config: JobConfig) -> bool:
        """Whether these actors can answer `config`'s job: the same model and engine."""
        return config.model == self.model and config.engine == self._engine

    def answer(self, work: list[ShardWork], job: EngineJob, at_once: int) -> Iterator[pa.Table]:
        """Each shard's work answered for `job` (actor.SHARD_DONE rows, as Ray Data's calls return
        them), in the order they finish; `at_once` shards in flight per actor."""
        self._used = True
        yield from answer_shards(self._actors, work, job, at_once)

    def stop(self) -> None:
        """Stop the engines, then the actors. Actors no job used (an evaluation whose answers were all
        recorded before) are killed at once, whether or not their engines are up yet: a killed actor's
        engine process stops with it (engine/core_forkserver.py)."""
        import ray

        try:
            if self._used:
                ray.get([actor.stop.remote() for actor in self._actors], timeout=120)
        except Exception:  # noqa: BLE001 - an actor that cannot stop its engine is killed all the same
            log.warning("an engine actor did not stop its engine", exc_info=True)
        for actor in self._actors:
            ray.kill(actor)
