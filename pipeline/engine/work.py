"""What a job hands its engine actors: the job's part (`EngineJob`, once per actor and job) and each
call's part (`ShardWork`, one shard for one variant). The job room builds them (job/run.py), the
engine actor reads them (actor.py); Ray carries them between processes."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import pyarrow as pa

from pipeline.config import JobConfig, Variant
from pipeline.io.answer_store import AnswerStore
from pipeline.io.plan import InputPlan, Shard
from pipeline.protocol import RequestBuilder


@dataclass(frozen=True)
class EngineJob:
    """A job as its engine actors see it: what to answer, how, and where the records go."""

    config: JobConfig  # the model and engine (the actor's engine is built from them), input, output, defaults
    plan: InputPlan | None  # what a shard's reader needs (format, filesystem, schema), without the shard list
    builder: RequestBuilder  # a row -> its /v1/completions body
    schema: pa.Schema | None  # the records' Arrow schema (None: actors started before their job)
    variants: dict[str, Variant]  # by name: the sweep's request fields, which beat the row's
    score: Callable[[pa.Table], pa.Table]  # adds a scored job's `score` column (or returns the records)
    meter: Callable[..., Any]  # meter(engine_id, node[, share=]): counts the engine's work for the job
    store: AnswerStore | None = None  # where greedy and seeded rows' answers are kept and found (io/answer_store.py)
    pool: str = ""  # the standing pool whose engines answer it (pool/): its engine time is its share of theirs


@dataclass(frozen=True)
class ShardWork:
    """One call's work: a shard answered by one variant, written as `out` below data/."""

    shard: Shard
    variant: str  # the variant's name ("" for a plain job)
    out: str  # `<shard>`, or `variant=<name>/<shard>` in a sweep
    # shards with the same affinity share a long prompt prefix: they go to the same engine, whose prefix
    # cache holds it (shard_calls.Placement); "" for none
    affinity: str = ""

    def as_row(self) -> dict[str, Any]:
        """As a row of the tables Ray Data hands the actor."""
        return {**asdict(self.shard), "variant": self.variant, "out": self.out, "affinity": self.affinity}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "ShardWork":
        shard = {k: v for k, v in row.items() if k not in ("variant", "out", "affinity")}
        return cls(Shard(**{**shard, "duplicates": tuple(shard["duplicates"])}), row["variant"], row["out"],
                   row.get("affinity") or "")
