"""What a shard's records hold, counted: a tally per shard, written beside the shard's records (so a
resumed job counts earlier runs' shards without reading their records) and summed into the job summary."""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field


class Tally(BaseModel):
    """The records of one shard (or of many, summed)."""

    rows: int = 0
    completions: int = Field(0, description="Rows answered with a response body.")
    choices: int = 0
    errors_by_type: dict[str, int] = Field(default_factory=dict, description="`error.type (code)`: rows.")
    finish_reasons: dict[str, int] = Field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rows_retried: int = Field(0, description="Rows answered again after their engine died or answered 500.")
    rows_recovered: int = Field(0, description="Retried rows that got an answer (a response or a 4xx).")
    rows_failed: int = Field(0, description="Retried rows given up on: recorded as a 500 error.")
    rows_shared: int = Field(0, description=(
        "Rows answered with an earlier row's answer to the same request (greedy or seeded): no engine work."))
    rows_from_store: int = Field(0, description="Rows answered from the answer store: no engine work.")
    reused_prompt_tokens: int = Field(0, description=(
        "The prompt tokens of the shared rows and of those from the store (in prompt_tokens too)."))
    reused_completion_tokens: int = Field(0, description=(
        "Their completion tokens (in completion_tokens too)."))
    prefix_cached_tokens: int = Field(0, description=(
        "Prompt tokens an engine read from its prefix cache instead of computing them (in prompt_tokens "
        "too; docs/evaluation.md#a-shared-context-computed-once)."))
    intervals: list[list[float]] = Field(default_factory=list, description=(
        "[start, end] unix times of the shards' work: busy time, for tokens per second."))
    engines: list[str] = Field(default_factory=list, description=(
        "The engines (`<actor>-<n>`, as the summary's engines) that answered the shard's rows: one, unless "
        "its engine was replaced while the shard ran. Summed: all of them."))
    source: str = Field("", description=(
        "One shard's input file as it was when the shard was answered (`size:mtime_ns`): a rerun that "
        "finds another redoes the shard or stops (input.when_changed). Not summed."))

    @classmethod
    def of_records(cls, table: pa.Table, *, retried: int = 0, recovered: int = 0, failed: int = 0, shared: int = 0,
                   from_store: int = 0, reused_prompt_tokens: int = 0, reused_completion_tokens: int = 0,
                   prefix_cached_tokens: int = 0, engines: Iterable[str] = (),
                   intervals: list[list[float]] = ()) -> "Tally":
        response, error = table.column("response"), table.column("error")
        usage = pc.struct_field(response, "usage")
        choices = pc.list_flatten(pc.struct_field(response, "choices"))
        errors = Counter(f"{t} ({c})" for t, c in zip(pc.struct_field(error, "type").to_pylist(),
                                                        pc.struct_field(error, "code").to_pylist())
                         if t is not None)
        return cls(
            rows=table.num_rows,
            completions=table.num_rows - response.null_count,
            choices=len(choices),
            errors_by_type=dict(errors),
            finish_reasons=dict(Counter(pc.struct_field(choices, "finish_reason").to_pylist())),
            prompt_tokens=int(pc.sum(pc.struct_field(usage, "prompt_tokens")).as_py() or 0),
            completion_tokens=int(pc.sum(pc.struct_field(usage, "completion_tokens")).as_py() or 0),
            rows_retried=retried, rows_recovered=recovered, rows_failed=failed, rows_shared=shared,
            rows_from_store=from_store, reused_prompt_tokens=reused_prompt_tokens,
            reused_completion_tokens=reused_completion_tokens, prefix_cached_tokens=prefix_cached_tokens,
            engines=sorted(engines), intervals=list(intervals),
        )

    def add(self, other: "Tally") -> None:
        for name in ("rows", "completions", "choices", "prompt_tokens", "completion_tokens", "rows_retried",
                     "rows_recovered", "rows_failed", "rows_shared", "rows_from_store", "reused_prompt_tokens",
                     "reused_completion_tokens", "prefix_cached_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.errors_by_type = dict(Counter(self.errors_by_type) + Counter(other.errors_by_type))
        self.finish_reasons = dict(Counter(self.finish_reasons) + Counter(other.finish_reasons))
        self.intervals = self.intervals + other.intervals
        self.engines = sorted(set(self.engines) | set(other.engines))

    def engine_tokens(self) -> tuple[int, int]:
        """(prompt, completion) tokens an engine worked on: the records' less the reused rows'."""
        return (self.prompt_tokens - self.reused_prompt_tokens, self.completion_tokens - self.reused_completion_tokens)

    def busy_s(self) -> float:
        """Seconds in which at least one of these shards was being worked on (overlaps counted once)."""
        busy, end = 0.0, float("-inf")
        for start, stop in sorted(self.intervals):
            if stop > end:
                busy += stop - max(start, end)
                end = stop
        return busy
