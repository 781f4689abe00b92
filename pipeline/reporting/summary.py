"""The job summary: the whole output, summed from its shards' tallies, then what this run did."""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, Field

from pipeline.config import JobConfig
from pipeline.io import storage
from pipeline.io.resume import OutputTallies, ResumeState
from pipeline.io.tally import Tally
from pipeline.reporting.cost import Cost, run_cost
from pipeline.reporting.progress import EngineRun, EngineUse, utilisation


class RequestCounts(BaseModel):
    """As OpenAI's Batch API reports them."""

    total: int = 0
    completed: int = 0
    failed: int = 0


class JobSummary(BaseModel):
    """The whole output (every run that wrote to it), then what this run did."""

    input: str = ""
    output: str = ""
    rows_in: int = Field(0, description="Rows of the input, all files.")
    variants: list[str] = Field(default_factory=list, description="A sweep's variants.")
    records_expected: int = Field(0, description="rows_in x variants: one record per row and variant.")
    rows_out: int = Field(0, description="Records in the output, written by this run or earlier ones.")
    completions: int = 0
    choices: int = 0
    errors: int = 0
    errors_by_type: dict[str, int] = Field(default_factory=dict)
    finish_reasons: dict[str, int] = Field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    rows_retried: int = 0
    rows_recovered: int = 0
    rows_failed: int = 0
    # this run
    nothing_to_do: bool = Field(False, description="Every shard was already in the output.")
    shards: int = Field(0, description="Shards of the input.")
    shards_kept: int = Field(0, description="Shards earlier runs finished, not run again.")
    shards_run: int = Field(0, description="Shards this run wrote.")
    rows_per_shard: int = Field(0, description="output.rows_per_file: given, recorded, or sized to the cluster.")
    shards_failed: dict[str, str] = Field(default_factory=dict, description=(
        "Shards with no records (their file could not be read or written): shard -> why. The job "
        "failed; a rerun resumes and runs only these."))
    rows_run: int = Field(0, description="Rows this run wrote.")
    rows_shared: int = Field(0, description=(
        "Rows of this run answered with an earlier row's answer to the same greedy or seeded request, "
        "without an engine (docs/request-semantics.md#answered-once)."))
    rows_from_store: int = Field(0, description=(
        "Rows of this run answered from the answer store (answers engines gave earlier jobs), without an engine."))
    prompt_tokens_computed: int = Field(0, description=(
        "Prompt tokens of this run an engine computed (the rows' prompt tokens less those shared, from "
        "the store, or read from the prefix cache)."))
    prompt_tokens_cached: int = Field(0, description=(
        "Prompt tokens of this run an engine read from its prefix cache instead of computing them "
        "(docs/evaluation.md#a-shared-context-computed-once)."))
    shards_redone: int = Field(0, description="Shard attempts run again after an engine actor died.")
    shards_changed: int = Field(0, description=(
        "Done shards answered again (or dropped) because their input file changed (input.when_changed: redo)."))
    engine_restarts: int = Field(0, description="Engines started again after one died.")
    engine_startup_s: list[float] = Field(default_factory=list, description="One per engine start.")
    engines: list[EngineUse] = Field(default_factory=list, description=(
        "Each engine of this run: node, rows, busy time over its time alive after start-up."))
    engine_utilisation: float = Field(0.0, description="All engines' busy time over their time alive.")
    first_engine_ready_s: float = Field(0.0, description=(
        "From the job's start to its first engine ready: planning, Ray, the actor, the engine."))
    wall_s: float = 0.0
    run_completion_tokens: int = 0
    output_tokens_per_s: float = Field(0.0, description="This run's completion tokens / wall_s.")
    cost: Cost | None = Field(None, description="What this run's engines cost (reporting/cost.py).")
    provenance: dict[str, Any] = Field(default_factory=dict, description=(
        "How the output was made: versions, fingerprints, engine arguments, defaults, seeds (job/provenance.py)."))
    failure: str | None = Field(None, description=(
        "Why this run failed though its rows have records: its error records are more than "
        "output.max_error_share of the rows it answered (no _SUCCESS; exit 3). A rerun with nothing to "
        "do repeats the last run's failure; `--redo-errors` answers those rows again."))
    comparison: list[dict[str, Any]] = Field(default_factory=list, description=(
        "A sweep's (or a scored job's) comparison, one line per variant (also comparison.csv/.json/.png)."))

    @classmethod
    def of(cls, total: Tally, run: Tally, **fields) -> "JobSummary":
        errors = total.rows - total.completions
        wall_s = fields.get("wall_s", 0.0)
        return cls(
            rows_out=total.rows, completions=total.completions, choices=total.choices, errors=errors,
            errors_by_type=total.errors_by_type, finish_reasons=total.finish_reasons,
            prompt_tokens=total.prompt_tokens, completion_tokens=total.completion_tokens,
            request_counts=RequestCounts(total=total.rows, completed=total.completions, failed=errors),
            rows_retried=total.rows_retried, rows_recovered=total.rows_recovered, rows_failed=total.rows_failed,
            rows_run=run.rows, rows_shared=run.rows_shared, rows_from_store=run.rows_from_store,
            prompt_tokens_computed=run.engine_tokens()[0] - run.prefix_cached_tokens,
            prompt_tokens_cached=run.prefix_cached_tokens,
            run_completion_tokens=run.completion_tokens,
            output_tokens_per_s=round(run.completion_tokens / wall_s, 1) if wall_s else 0.0,
            **fields,
        )

    def _per_engine_prompt_tokens(self) -> str:
        """` (<engine>: computed/cached, ...)` for a run with several engines."""
        if len(self.engines) < 2:
            return ""
        return " (" + ", ".join(f"{e.engine}: {e.prompt_tokens_computed}/{e.prompt_tokens_cached}"
                                for e in self.engines) + ")"

    def _engine_lines(self) -> list[str]:
        pools = sorted({e.pool for e in self.engines if e.pool})
        started = [e for e in self.engines if not e.pool]
        engines = ", ".join(f"{e.engine} on {e.node[:8]}: {e.busy_share:.0%} of {e.alive_s:.0f}s" for e in self.engines)
        if pools and not started:  # a job on a standing pool: no start-up of its own; its share of the engines
            return [f"engines:             pool {', '.join(pools)}, ready {self.first_engine_ready_s:.1f}s after the start",
                    f"engine restarts:     {self.engine_restarts}",
                    f"engine share:        {self.engine_utilisation:.0%} of the engines' time while the job ran "
                    f"was its rows' ({engines})"]
        return [f"engine start-up:     {', '.join(f'{s:.1f}s' for s in self.engine_startup_s) or 'n/a'} "
                f"(first engine ready {self.first_engine_ready_s:.1f}s after the start)",
                f"engine restarts:     {self.engine_restarts}",
                f"engine utilisation:  {self.engine_utilisation:.0%} busy" + (f" ({engines})" if self.engines else "")]

    def render(self) -> str:
        if self.nothing_to_do:
            return (f"nothing to do: all {self.shards} shards ({self.rows_out} records for {self.rows_in} "
                    f"input rows) are already in {self.output}"
                    + (f"\n\nFAILED (the last run that answered rows): {self.failure}" if self.failure else ""))
        lines = [
            f"input -> output:     {self.input} -> {self.output}",
            f"rows in / out:       {self.rows_in} / {self.rows_out}"
            + (f" ({len(self.variants)} variants: {self.records_expected} records expected)" if self.variants else ""),
            f"completions:         {self.completions} ({self.choices} choices)",
            f"errors:              {self.errors} {self.errors_by_type or ''}".rstrip(),
            f"finish reasons:      {self.finish_reasons}",
            f"tokens:              {self.prompt_tokens} prompt, {self.completion_tokens} completion",
            f"retried rows:        {self.rows_retried} ({self.rows_recovered} recovered, {self.rows_failed} failed)",
            f"this run:            {self.rows_run} rows in {self.shards_run} shards "
            f"({self.shards_kept} of {self.shards} shards kept from earlier runs, "
            f"{self.shards_redone} redone after an actor died"
            + (f", {self.shards_changed} again because their input file changed" if self.shards_changed else "") + ")",
            *([f"answered once:       {self.rows_shared} rows with an earlier row's answer to the same request, "
               f"{self.rows_from_store} from the answer store: no engine work"]
              if self.rows_shared or self.rows_from_store else []),
            *([f"prompt tokens:       {self.prompt_tokens_computed} computed by the engines, "
               f"{self.prompt_tokens_cached} read from their prefix caches" + self._per_engine_prompt_tokens()]
              if self.prompt_tokens_cached else []),
            *self._engine_lines(),
            f"wall time:           {self.wall_s:.1f}s",
            f"output tokens/s:     {self.output_tokens_per_s:.0f}",
        ]
        if self.cost is not None and self.cost.engine_s:
            lines.append(f"cost:                {self.cost.render()}")
        if self.shards_failed:
            lines += ["", f"FAILED: {len(self.shards_failed)} shards have no records; fix the cause and run the "
                      "same command again to run only these:"]
            lines += [f"  {name}: {why or 'not written'}" for name, why in sorted(self.shards_failed.items())]
        if self.failure:
            lines += ["", f"FAILED: {self.failure}"]
        if self.comparison:
            what = f"sweep: {len(self.variants)} variants" if self.variants else "scores"
            lines += ["", f"{what} (comparison.csv, .json, .png in {self.output})"]
        return "\n".join(lines)


def error_share_failure(run: Tally, repeated: int, max_share: float) -> str | None:
    """Why a run whose rows all have records failed, or None: its error records (less the `repeated`
    rows input.repeated_keys: keep_first recorded as errors) are more than `max_share` of its rows."""
    rows, errors = run.rows - repeated, run.rows - run.completions - repeated
    if rows <= 0 or errors / rows <= max_share:
        return None
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(run.errors_by_type.items(), key=lambda kv: -kv[1])[:3])
    return (f"{errors} of the {rows} rows this run answered are error records ({errors / rows:.0%}, more than "
            f"output.max_error_share {max_share:.0%}): {kinds}. The records are written; read their `error` "
            "column, fix the cause, then rerun with --redo-errors to answer those shards again")


def summarize(config: JobConfig, rows_in: int, state: ResumeState, tallies: OutputTallies, runs: list[EngineRun],
              accelerators: tuple[float, str], started: float, provenance: dict[str, Any]) -> JobSummary:
    """The summary of the whole output after a run: its tallies, what this run's engines did and cost,
    and whether the run failed (shards without records; too many error records)."""
    variants = config.variants()
    engines = [e for r in runs for e in r.engines]
    attempts = [s for r in runs for s in r.shard_starts]
    ready = [r.first_ready_at for r in runs if r.first_ready_at is not None]
    missing = {i.out: "" for i in state.items if i.out not in tallies.written}
    missing.update({name: why for r in runs for name, why in r.failed.items() if name not in tallies.written})
    summary = JobSummary.of(
        tallies.total, tallies.run,
        input=storage.redact(config.input.path), output=storage.redact(config.output.path), rows_in=rows_in,
        variants=[v.name for v in variants if v.name], records_expected=rows_in * len(variants),
        nothing_to_do=state.nothing_to_do, shards=len(state.items), shards_kept=state.kept,
        shards_run=len(state.pending) - len(missing), rows_per_shard=config.output.rows_per_file or 0,
        shards_failed=missing, shards_redone=len(attempts) - len(set(attempts)), shards_changed=len(state.changed),
        engine_restarts=sum(1 for e in engines if not e.engine.endswith("-1")),
        engine_startup_s=[e.startup_s for e in engines], engines=engines, engine_utilisation=utilisation(engines),
        first_engine_ready_s=round(min(ready) - started, 3) if ready else 0.0,
        wall_s=round(time.time() - started, 3), provenance=provenance,
        cost=run_cost(engines, *accelerators, *tallies.run.engine_tokens(),
                      config.cost.price_per_accelerator_hour, config.cost.currency),
    )
    repeated = sum(len(i.shard.duplicates) for i in state.pending if i.out in tallies.written)  # keep_first's
    summary.failure = state.last_failure if state.nothing_to_do else \
        error_share_failure(tallies.run, repeated, config.output.max_error_share)
    return summary
