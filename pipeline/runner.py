"""The main flow: input shards -> engine actors (one vLLM engine each) -> one record per row, once.

    plan the input: files, format, schema, shards     -- job-level problems stop here, before Ray
      -> check the output folder: same job? which shards are done?   -- a rerun resumes
      -> each pending shard goes to an engine actor, which
           reads its rows (Parquet or OpenAI batch JSONL), each with a row key,
           turns each row into a /v1/completions body (spec defaults < job defaults < row values),
           answers them all concurrently (the response body or the error body),
           writes the shard's tally, then its records, atomically: the shard is done
      -> the summary of the whole output, the run log, then _SUCCESS
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from typing import Any

import pyarrow as pa

from pipeline import inputs, outputs
from pipeline.config import JobConfig, Variant, in_ray_job
from pipeline.inputs import INPUT_ERROR, ROW_KEY, InputPlan, Shard
from pipeline.protocol import BodyError, RequestBuilder, completion_id, error_body
from pipeline.records import output_schema, result_arrays
from pipeline.summary import JobSummary, Tally

log = logging.getLogger(__name__)
VARIANT_PARAMS = "variant_params"  # a sweep's records: the variant's request fields, as JSON
SHARD_DONE = pa.schema([("shard", pa.string()), ("rows", pa.int64()), ("seconds", pa.float64())])


def request_builder(config: JobConfig, input_format: str) -> RequestBuilder:
    served_name = config.model.resolved_served_name()
    defaults = config.defaults.body_defaults()
    if input_format == "openai_batch":
        return RequestBuilder(served_name=served_name, body_defaults=defaults, body_column="body",
                              field_columns=False)
    cfg = config.input
    return RequestBuilder(served_name=served_name, body_defaults=defaults, body_column=cfg.body_column,
                          prompt_column=cfg.prompt_column, columns=cfg.columns, template=cfg.template)


@dataclass
class _Retries:
    """Per shard: rows answered again, and how those ended."""

    retried: int = 0
    recovered: int = 0
    failed: int = 0


class EngineActor:
    """A Ray Data actor hosting one vLLM engine. Each call is one shard: read, answer, write.

    All of a shard's rows are in the engine at once, and the actor works on `engine.shards_in_flight`
    shards together, so the engine stays full across shard boundaries.

    When the engine process dies (killed, out of memory, a request that crashes it), the actor starts a
    new engine and answers the rows that were in flight again, after a backoff. A row's last retry runs
    alone, so a row that kills every engine it reaches is found: it is recorded as a 500 error and the
    job goes on. When the actor process itself dies, Ray starts it again and Ray Data gives it the
    unfinished shards; a shard's records are written once, when it is done.
    """

    def __init__(self, config: JobConfig, plan: InputPlan, builder: RequestBuilder, schema: pa.Schema,
                 params: dict[str, dict[str, Any]], stats: Any = None) -> None:
        # vLLM's INFO lines (one per engine step phase) drown the job's own output; raise it with
        # VLLM_LOGGING_LEVEL=INFO in the job's environment.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from pipeline.tiny_model import resolve_model

        self._config = config
        self._plan = plan
        self._model_path = resolve_model(config.model.path)
        self._schema = schema
        self._builder = builder
        self._params = params  # variant name -> its request fields (a sweep), which beat the row's
        self._stats = stats
        self._engine = self._start_engine()
        self._restart_lock = asyncio.Lock()
        self._alone = asyncio.Semaphore(1)

    def _start_engine(self) -> Any:
        from pipeline.engine import CompletionEngine

        engine = CompletionEngine.start(self._config.engine, self._model_path, self._builder.served_name,
                                        self._config.defaults.sampling_defaults())
        self._report("engine_startup_s", engine.startup_s)
        self._report("engine_ready_at", time.time())
        return engine

    def _report(self, name: str, value: Any) -> None:
        if self._stats is not None:
            self._stats.add.remote(name, value)

    def __del__(self) -> None:
        # Ray Data deletes the UDF when it retires the actor: stop the engine before the process goes.
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()

    async def __call__(self, batch: pa.Table) -> pa.Table:
        done = []
        for item in batch.to_pylist():
            variant, out = item.pop("variant"), item.pop("out")
            done.append(await self._shard(Shard(**{**item, "duplicates": tuple(item["duplicates"])}), variant, out))
        return pa.Table.from_pylist(done, schema=SHARD_DONE)

    async def _shard(self, shard: Shard, variant: str, out: str) -> dict[str, Any]:
        started = time.time()
        self._report("shard_started", out)
        table = await asyncio.to_thread(inputs.read_shard, self._plan, shard)
        problems = table.column(INPUT_ERROR).to_pylist()
        keys = table.column(ROW_KEY).to_pylist()
        rows = inputs.python_rows(table.drop_columns([INPUT_ERROR]), problems)
        retries = _Retries()
        params = self._params[variant]
        answers = await asyncio.gather(*(self._answer(key, row, problem, params, retries)
                                         for key, row, problem in zip(keys, rows, problems)))
        response, error = result_arrays(answers)
        records = table.append_column("response", response).append_column("error", error)
        if VARIANT_PARAMS in self._schema.names:
            records = records.append_column(VARIANT_PARAMS, pa.array([json.dumps(params)] * len(keys), pa.string()))
        records = records.select(self._schema.names).cast(self._schema)
        tally = Tally.of_records(records, **asdict(retries), intervals=[[started, time.time()]])
        await asyncio.to_thread(outputs.write_shard, self._config.output, out, records, tally)
        return {"shard": out, "rows": shard.rows, "seconds": time.time() - started}

    async def _answer(self, key: str, row: dict[str, Any] | None, problem: dict | None, params: dict[str, Any],
                      retries: _Retries) -> tuple[dict | None, dict | None]:
        if problem is not None:
            return None, problem
        try:
            body = {**self._builder.body(row), **params}
        except BodyError as exc:
            return None, exc.error
        answer = await self._complete(body, retries)
        if answer.response is not None:
            answer.response["id"] = completion_id(key, body)
        return answer.response, answer.error

    async def _complete(self, body: dict[str, Any], retries: _Retries) -> Any:
        """Answer a body; an engine death or a 500 is retried `engine.row_retries` times, with backoff."""
        from pipeline.engine import Answer, EngineDeadError

        limit = self._config.engine.row_retries
        attempt = 0
        while True:
            engine = self._engine
            try:
                if attempt and attempt == limit:  # the last retry runs alone
                    async with self._alone:
                        answer = await engine.complete(body)
                else:
                    answer = await engine.complete(body)
                if answer.error is None or answer.error["code"] < 500:
                    if attempt:
                        retries.recovered += 1
                    return answer
                failure = f"the engine answered {answer.error['code']}: {answer.error['message']}"
            except EngineDeadError as exc:
                failure = f"the engine died ({exc})"
                await self._replace(engine)
            if attempt == limit:
                if attempt:
                    retries.failed += 1
                tries = f"tried {attempt + 1} times, the last one alone on its engine" if attempt else "tried once"
                return Answer(error=error_body(f"{failure}; this request was {tries}, and was not retried "
                                               "again", "InternalServerError", 500))
            if attempt == 0:
                retries.retried += 1
            await asyncio.sleep(self._config.engine.retry_backoff_s * 2 ** attempt)
            attempt += 1

    async def _replace(self, dead: Any) -> None:
        """Start a new engine once per death, however many requests saw it die."""
        async with self._restart_lock:
            if self._engine is not dead:
                return
            log.warning("the vLLM engine died; starting a new one and retrying the rows in flight")
            try:
                dead.shutdown()
            except Exception:  # noqa: BLE001 - the old engine is gone either way
                log.debug("shutting down the dead engine failed", exc_info=True)
            self._engine = self._start_engine()
            self._report("engine_restarts", 1)


def _stats_actor():
    import ray

    @ray.remote(num_cpus=0)
    class Stats:
        def __init__(self) -> None:
            self.values: dict[str, list[Any]] = {}

        def add(self, name: str, value: Any) -> None:
            self.values.setdefault(name, []).append(value)

        def get(self) -> dict[str, list[Any]]:
            return self.values

    return Stats.remote()


def _init_ray(config: JobConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = config.ray_address or ("auto" if in_ray_job() else None)
    if address is None:
        ray.init(address="local", include_dashboard=False)  # never a cluster another `ray start` left
    else:
        ray.init(address=address)


def _actor_resources(config: JobConfig) -> dict[str, Any]:
    engine = config.engine
    if engine.resolved_device() == "gpu":
        # One GPU per tensor-parallel rank; vLLM's TP workers share the actor's reservation.
        return {"num_gpus": engine.tensor_parallel_size, "num_cpus": 1}
    return {"num_cpus": engine.cpus_per_actor}


def _record_schema(config: JobConfig, plan: InputPlan) -> pa.Schema:
    """The output columns: the row key, the kept input columns, a sweep's `variant_params`, then
    `response` and `error`."""
    keep = config.output.columns
    if keep is not None:
        missing = sorted(set(keep) - set(plan.schema.names))
        if missing:
            raise inputs.InputError(f"output.columns names {missing}, which the input does not have; "
                                    f"its columns: {', '.join(plan.schema.names)}")
    fields = [f for f in plan.schema if keep is None or f.name == ROW_KEY or f.name in keep]
    if config.sweep is not None:
        if VARIANT_PARAMS in plan.schema.names or "variant" in plan.schema.names:
            raise inputs.InputError(f"input columns `variant` and `{VARIANT_PARAMS}` are reserved in a sweep; "
                                    "rename them")
        fields.append(pa.field(VARIANT_PARAMS, pa.string()))
    return output_schema(pa.schema(fields))


@dataclass(frozen=True)
class WorkItem:
    """A shard answered by one variant (a plain job's only variant is unnamed)."""

    variant: Variant
    shard: Shard

    @property
    def out(self) -> str:
        """Its name below data/ and shards/: `<shard>`, or `variant=<name>/<shard>` in a sweep."""
        return self.variant.folder() + self.shard.id


def _run_items(config: JobConfig, plan: InputPlan, items: list[WorkItem], schema: pa.Schema) -> dict[str, list]:
    """Answer one model's pending work items on its engine actors; return what the actors reported."""
    import ray
    from ray.data import ActorPoolStrategy

    _init_ray(config)
    ray.data.DataContext.get_current().enable_progress_bars = os.environ.get("CI") != "true"
    stats = _stats_actor()
    actor_plan = replace(plan, shards=[])  # each actor gets its shards from Ray Data, not the whole list
    params = {item.variant.name: item.variant.params for item in items}
    work = ray.data.from_items([{**asdict(i.shard), "variant": i.variant.name, "out": i.out} for i in items],
                               override_num_blocks=len(items))
    done = work.map_batches(
        EngineActor,
        fn_constructor_args=(config, actor_plan, request_builder(config, plan.format), schema, params, stats),
        batch_format="pyarrow",
        batch_size=1,
        compute=ActorPoolStrategy(size=min(config.engine.num_actors, len(items)),
                                  max_tasks_in_flight_per_actor=config.engine.shards_in_flight),
        # A retiring actor stops its engine itself (EngineActor.__del__). Ray's default kills an exiting
        # actor's child processes first, under vLLM's running output reader: an ERROR and tracebacks
        # after a job that succeeded. (The raylet still cleans up the process group of a dead actor.)
        runtime_env={"env_vars": {"RAY_kill_child_processes_on_worker_exit": "false"}},
        **_actor_resources(config),
    )
    for batch in done.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            log.info("shard %s done: %d rows in %.1fs", row["shard"], row["rows"], row["seconds"])
    counts = ray.get(stats.get.remote())
    ray.kill(stats)
    return counts


def run(config: JobConfig) -> JobSummary:
    """Run the job (or the part earlier runs left) and return the summary of the whole output."""
    started = time.time()
    plan = inputs.plan_input(config.input, config.output.rows_per_file)  # InputError before Ray starts
    schema = _record_schema(config, plan)
    done = outputs.prepare(config.output, config.identity())  # OutputError before Ray starts
    variants = config.variants()
    items = [WorkItem(v, s) for v in variants for s in plan.shards]
    pending = [i for i in items if i.out not in done]
    finished = not pending and outputs.is_complete(config.output.path)
    counts: dict[str, list] = defaultdict(list)
    if pending:
        outputs.unmark(config.output.path)
        log.info("%d of %d shards to run (%d rows); %d done by earlier runs", len(pending), len(items),
                 sum(i.shard.rows for i in pending), len(items) - len(pending))
        # one model after another (variants are listed model by model): each engine loads once
        for model, group in itertools.groupby(pending, key=lambda i: i.variant.model):
            reported = _run_items(config.model_copy(update={"model": model}), plan, list(group), schema)
            for name, values in reported.items():
                counts[name] += values

    total, run_tally, by_variant = Tally(), Tally(), {v.name: Tally() for v in variants}
    pending_names = {i.out for i in pending}
    for item, tally in zip(items, outputs.read_tallies(config.output.path, [i.out for i in items])):
        total.add(tally)
        by_variant[item.variant.name].add(tally)
        if item.out in pending_names:
            run_tally.add(tally)
    attempts = counts["shard_started"]
    ready = counts["engine_ready_at"]
    summary = JobSummary.of(
        total, run_tally,
        input=inputs.redact(config.input.path), output=inputs.redact(config.output.path), rows_in=plan.rows,
        variants=[v.name for v in variants if v.name], records_expected=plan.rows * len(variants),
        nothing_to_do=finished, shards=len(items), shards_kept=len(items) - len(pending),
        shards_run=len(pending), shards_redone=len(attempts) - len(set(attempts)),
        engine_restarts=len(counts["engine_restarts"]),
        engine_startup_s=[round(s, 3) for s in counts["engine_startup_s"]],
        first_engine_ready_s=round(min(ready) - started, 3) if ready else 0.0,
        wall_s=round(time.time() - started, 3),
    )
    if config.sweep is not None and not finished:
        from pipeline.compare import write_comparison

        summary.comparison = write_comparison(config, variants, by_variant)
    if not finished:
        text = json.dumps(summary.model_dump(), indent=2)
        outputs.write_text(outputs.run_log_path(config.output.path, started), text)
        outputs.write_text(outputs.summary_path(config.output.path), text)
        outputs.write_text(outputs.marker_path(config.output.path), "")
    return summary
