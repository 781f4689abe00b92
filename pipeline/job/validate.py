"""`validate`: read the whole input, build every row's request and check it, without an engine.

The checks are vLLM's own, run without starting an engine: the request model (types and ranges), the
served model name, tokenization and the context length with the model's tokenizer, and the sampling
parameters (`SamplingParams` and its `verify` against the model config). A row this finds invalid
would get the same error record from a job.

In a quiet session (`python -m pipeline validate` without `--verbose`, reporting/console.py), vLLM's
lines go to the log file with the others': its logging is not set up with a handler of its own on the
terminal, so they reach the session's handlers (its errors are still shown).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Iterator

from pydantic import BaseModel, Field

from pipeline.io.plan import plan_input
from pipeline.io.read import python_rows, read_shard
from pipeline.config import JobConfig
from pipeline.engine import engine_args, sizing
from pipeline.engine.request_checker import RequestChecker
from pipeline.io.plan import INPUT_ERROR, ROW_KEY
from pipeline.protocol import BodyError
from pipeline.job.run import request_builder
from pipeline.reporting import console


class ValidationReport(BaseModel):
    input: str
    rows: int = 0
    valid_rows: int = 0
    errors: dict[str, int] = Field(default_factory=dict, description="'type (code) param': rows")
    examples: dict[str, list[str]] = Field(default_factory=dict, description="a few row keys per error")
    prompt_tokens: dict[str, float] = Field(default_factory=dict, description="min/mean/p50/p95/max")
    max_new_tokens: int = Field(0, description="The most tokens the job could generate (valid rows).")
    engines: str = Field("", description="What each engine reserves from Ray and where it may go.")
    vllm_args: dict[str, Any] = Field(default_factory=dict, description=(
        "engine.vllm as vLLM's parser read it: what the engine is given besides the engine keys."))
    setup_s: float = Field(0.0, description="Loading vLLM, the model config and the tokenizer.")
    seconds: float = Field(0.0, description="Reading and checking the rows.")
    rows_per_s: float = 0.0

    def render(self) -> str:
        lines = [f"input:            {self.input}",
                 f"rows:             {self.rows}",
                 f"valid rows:       {self.valid_rows}",
                 f"invalid rows:     {self.rows - self.valid_rows}"]
        for kind, count in sorted(self.errors.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {count:>6}  {kind}   e.g. {', '.join(self.examples[kind])}")
        stats = self.prompt_tokens
        if stats:
            lines.append("prompt tokens:    min {min:.0f}, mean {mean:.1f}, p50 {p50:.0f}, p95 {p95:.0f}, "
                         "max {max:.0f}".format(**stats))
        lines.append(f"max new tokens:   {self.max_new_tokens} (if every valid row ran to its max_tokens)")
        lines.append(f"engines:          {self.engines}")
        if self.vllm_args:
            lines.append(f"vLLM arguments:   {self.vllm_args} (engine.vllm, as vLLM read them)")
        lines.append(f"checked in:       {self.seconds:.2f}s ({self.rows_per_s:.0f} rows/s), after "
                     f"{self.setup_s:.1f}s loading the tokenizer and vLLM's checks")
        return "\n".join(lines)


@dataclass
class RowCheck:
    key: str
    error: dict[str, Any] | None
    prompt_tokens: list[int]
    max_new_tokens: int


def check_rows(config: JobConfig) -> Iterator[RowCheck]:
    """Every input row's verdict, in input order; raises InputError for job-level problems."""
    yield from _checked(*_prepare(config))


def _prepare(config: JobConfig) -> tuple[Any, Any, RequestChecker]:
    plan = plan_input(config.input, config.output.rows_per_file or 2048)  # any size serves validate
    return plan, request_builder(config, plan.format), RequestChecker(config, vllm_logs_to_terminal=console.verbose())


def _checked(plan: Any, builder: Any, checker: RequestChecker) -> Iterator[RowCheck]:
    loop = asyncio.new_event_loop()
    try:
        yield from _check_shards(plan, builder, checker, loop)
    finally:
        loop.close()


def _check_shards(plan: Any, builder: Any, checker: RequestChecker, loop: Any,
                 chunk: int = 512) -> Iterator[RowCheck]:
    """Rows are checked a chunk at a time, concurrently, so vLLM's tokenizer batches their prompts."""
    for shard in plan.shards:
        table = read_shard(plan, shard)
        problems = table.column(INPUT_ERROR).to_pylist()
        keys = table.column(ROW_KEY).to_pylist()
        rows = python_rows(table.drop_columns([INPUT_ERROR]), problems)
        for start in range(0, len(keys), chunk):
            verdicts: list[RowCheck | None] = []
            pending: dict[int, Any] = {}
            for i in range(start, min(start + chunk, len(keys))):
                if problems[i] is not None:
                    verdicts.append(RowCheck(keys[i], problems[i], [], 0))
                    continue
                try:
                    pending[len(verdicts)] = checker.check(builder.body(rows[i]))
                    verdicts.append(None)
                except BodyError as exc:
                    verdicts.append(RowCheck(keys[i], exc.error, [], 0))
            results = loop.run_until_complete(_gather(list(pending.values())))
            for slot, result in zip(pending, results):
                verdicts[slot] = RowCheck(keys[start + slot], *result)
            yield from verdicts


async def _gather(coroutines: list[Any]) -> list[Any]:
    return await asyncio.gather(*coroutines)


def validate(config: JobConfig, examples_per_error: int = 3) -> ValidationReport:
    """Check every row of the input and summarize; raises InputError for job-level problems."""
    setup_started = time.monotonic()
    vllm = engine_args.vllm_args(config.engine)  # VllmArgsError first: a config error
    prepared = _prepare(config)  # plans the input, loads the tokenizer and vLLM's checks
    started = time.monotonic()
    errors: Counter[str] = Counter()
    examples: dict[str, list[str]] = defaultdict(list)
    prompt_lengths: list[int] = []
    report = ValidationReport(input=config.input.path, vllm_args=vllm, engines=sizing.describe(config.engine))
    for row in _checked(*prepared):
        report.rows += 1
        if row.error is None:
            report.valid_rows += 1
            prompt_lengths.extend(row.prompt_tokens)
            report.max_new_tokens += row.max_new_tokens
            continue
        kind = error_kind(row.error)
        errors[kind] += 1
        if len(examples[kind]) < examples_per_error:
            examples[kind].append(row.key)
    if prompt_lengths:
        ordered = sorted(prompt_lengths)
        report.prompt_tokens = {
            "min": ordered[0], "mean": round(statistics.fmean(ordered), 1),
            "p50": ordered[len(ordered) // 2], "p95": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))],
            "max": ordered[-1]}
    report.errors, report.examples = dict(errors), dict(examples)
    report.setup_s = round(started - setup_started, 3)
    report.seconds = round(time.monotonic() - started, 3)
    report.rows_per_s = round(report.rows / report.seconds, 1) if report.seconds else 0.0
    return report


def error_kind(error: dict[str, Any]) -> str:
    return f"{error['type']} ({error['code']}) param={error['param']}"
