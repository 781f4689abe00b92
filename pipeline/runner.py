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

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from pipeline import adapters, core_process, inputs, outputs, pool, storage
from pipeline.config import JobConfig, Variant, in_ray_job
from pipeline.inputs import INPUT_ERROR, ROW_KEY, InputPlan, Shard
from pipeline.protocol import BodyError, RequestBuilder, completion_id, error_body
from pipeline.scoring import score
from pipeline.records import output_schema, result_arrays
from pipeline.progress import EngineMeter, EngineUse, ProgressLine, engine_use, start_stats, utilisation
from pipeline.progress import snapshot as progress_snapshot
from pipeline.summary import JobSummary, Tally
from pipeline.supervisor import EngineSupervisor, EngineUnavailable, Row

log = logging.getLogger(__name__)
VARIANT_PARAMS = "variant_params"  # a sweep's records: the variant's request fields, as JSON
SHARD_DONE = pa.schema([("shard", pa.string()), ("rows", pa.int64()), ("seconds", pa.float64()),
                        ("error", pa.string())])


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


@dataclass
class _Retries:
    """Per shard: rows answered again, and how those ended."""

    retried: int = 0
    recovered: int = 0
    failed: int = 0


SHARD_TRIES = 3  # reading or writing a shard: tries before the shard is reported failed


class EngineActor:
    """A Ray Data actor hosting one vLLM engine. Each call is one shard: read, answer, write.

    All of a shard's rows go into the engine at once, and the actor works on several shards together
    (`pool.shards_at_once`: enough to hold `engine.rows_in_flight` rows), so the engine stays full
    whatever the shard size and across shard boundaries.

    A row's failure stays the row's: anything that goes wrong building, answering or recording one row
    becomes that row's error record. Reading or writing a shard is tried again; a shard that still
    fails is reported to the driver, which fails the job after the other shards are written.

    The engine is the actor's `EngineSupervisor`'s (pipeline/supervisor.py): when the engine process dies
    (killed, out of memory, a request that crashes it) or stops making progress, it starts a new one and
    tries the rows that were in it again, in parts that run alone, so that a row that kills every
    engine it reaches is found in few deaths and recorded as a 500 error, and no other row is; the job
    goes on. When no engine can be started, the shards waiting for one fail (a rerun answers them).
    When the actor process itself dies, Ray starts it again and Ray Data gives it the unfinished
    shards; a shard's records are written once, when it is done.
    """

    def __init__(self, config: JobConfig, plan: InputPlan, builder: RequestBuilder, schema: pa.Schema,
                 variants: dict[str, Variant], stats: Any = None) -> None:
        # vLLM's INFO lines (one per engine step phase) drown the job's own output; raise it with
        # VLLM_LOGGING_LEVEL=INFO in the job's environment.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        if config.engine.forkserver:
            core_process.start()  # first: it imports vLLM for the engine core while this process does
        import ray

        from pipeline.tiny_model import resolve_model

        self._config = config
        self._plan = plan
        self._model_path = resolve_model(config.model.path)
        self._adapters = adapters.localize(adapters.discover(config.model))  # remote ones copied here
        self._schema = schema
        self._builder = builder
        self._variants = variants  # by name: its request fields (a sweep), which beat the row's
        context = ray.get_runtime_context()
        # an actor restarted by Ray keeps its id but not its process: the pid tells its engines apart
        self._meter = EngineMeter(stats, f"{context.get_actor_id()[:8]}.{os.getpid()}", context.get_node_id())
        engine = config.engine
        self._supervisor = EngineSupervisor(self._start_engine(), self._start_engine, row_retries=engine.row_retries,
                                            retry_backoff_s=engine.retry_backoff_s,
                                            stall_timeout_s=engine.stall_timeout_s, meter=self._meter)

    def _start_engine(self) -> Any:
        """Start an engine; one that dies while starting (killed, out of memory) is started again,
        `engine.row_retries` times, after the same backoff as a row's."""
        from pipeline.engine import CompletionEngine

        for attempt in range(self._config.engine.row_retries + 1):
            try:
                engine = CompletionEngine.start(self._config.engine, self._model_path, self._builder.served_name,
                                                self._config.defaults.sampling_defaults(), self._adapters)
                break
            except Exception as exc:  # noqa: BLE001 - vLLM raises RuntimeError and others
                if attempt == self._config.engine.row_retries:
                    raise
                log.warning("the vLLM engine failed while starting (%s: %s); starting it again", type(exc).__name__, exc)
                time.sleep(self._config.engine.retry_backoff_s * 2 ** attempt)
        self._meter.engine_started(engine.startup_s)
        return engine

    def __del__(self) -> None:
        # Ray Data deletes the UDF when it retires the actor: stop the engine before the process goes.
        supervisor = getattr(self, "_supervisor", None)
        if supervisor is not None:
            supervisor.shutdown()

    async def __call__(self, batch: pa.Table) -> pa.Table:
        done = []
        for item in batch.to_pylist():
            variant, out = item.pop("variant"), item.pop("out")
            shard = Shard(**{**item, "duplicates": tuple(item["duplicates"])})
            started = time.time()
            try:
                rows = await self._shard(shard, variant, out)
                failure = None
            except (ShardFailed, EngineUnavailable) as exc:
                rows, failure = 0, str(exc)
            except Exception as exc:  # noqa: BLE001 - a bug must not take the other shards with it
                log.exception("shard %s failed", out)
                rows, failure = 0, f"{type(exc).__name__}: {exc} (a bug: please report it)"
            done.append({"shard": out, "rows": rows, "seconds": time.time() - started, "error": failure})
        return pa.Table.from_pylist(done, schema=SHARD_DONE)

    async def _shard(self, shard: Shard, variant: str, out: str) -> int:
        """Answer and write one shard; returns its rows (0 if an earlier attempt wrote it already)."""
        if await asyncio.to_thread(outputs.shard_written, self._config.output, out):
            return 0  # Ray Data ran this shard again (its result was lost with a node): it is done
        await self._supervisor.load_adapters()  # an adapter that does not load fails its shards, not rows
        started = time.time()
        self._meter.shard_started(out)
        table = await self._tried(f"reading shard {out} of {shard.file}", inputs.read_shard, self._plan, shard)
        problems = table.column(INPUT_ERROR).to_pylist()
        keys = table.column(ROW_KEY).to_pylist()
        rows = inputs.python_rows(table.drop_columns([INPUT_ERROR]), problems)
        retries = _Retries()
        params = self._variants[variant].params
        bodies = [self._body(key, row, problem, self._variants[variant])
                  for key, row, problem in zip(keys, rows, problems)]
        answers = await self._answers(list(zip(keys, bodies)), retries)
        response, error = result_arrays(answers)
        records = table.append_column("response", response).append_column("error", error)
        records = score.with_scores(self._config.scoring, records)  # a scored job's `score` column
        if VARIANT_PARAMS in self._schema.names:
            records = records.append_column(VARIANT_PARAMS, pa.array([json.dumps(params)] * len(keys), pa.string()))
        records = records.select(self._schema.names).cast(self._schema)
        tally = Tally.of_records(records, **asdict(retries), intervals=[[started, time.time()]])
        await self._tried(f"writing shard {out}", outputs.write_shard, self._config.output, out, records, tally)
        self._meter.beat()
        return shard.rows

    async def _answers(self, rows: list[tuple[str, Any]], retries: _Retries) -> list[tuple[dict | None, dict | None]]:
        """Each row's (response, error), in order. The rows go into the engine a chunk at a time: each
        chunk is validated and its prompts tokenized as one batch in a thread (not row by row in the
        event loop) while the chunks before it are answered, so the engine starts on a shard's first
        rows at once rather than after the whole shard is prepared."""
        chunk_rows = self._config.engine.max_num_seqs
        chunks: list[asyncio.Future] = []
        try:
            for start in range(0, len(rows), chunk_rows):
                chunk = rows[start:start + chunk_rows]
                engine = self._supervisor.engine
                prepared = await asyncio.to_thread(engine.prepare, [b for _, b in chunk if isinstance(b, dict)])
                chunks.append(asyncio.ensure_future(self._answer_chunk(engine, chunk, prepared, retries)))
            return [answer for chunk in await asyncio.gather(*chunks) for answer in chunk]
        finally:
            for pending in chunks:  # none left running when something raised
                pending.cancel()

    async def _answer_chunk(self, engine: Any, chunk: list[tuple[str, Any]], prepared: Any,
                            retries: _Retries) -> list[tuple[dict | None, dict | None]]:
        requests = iter(prepared.requests)
        try:
            return await asyncio.gather(*(
                self._answer(key, Row(body, next(requests), engine), retries) if isinstance(body, dict)
                else _done(body)
                for key, body in chunk))
        finally:
            engine.release(prepared)

    def _body(self, key: str, row: dict[str, Any] | None, problem: dict | None,
              variant: Variant) -> dict[str, Any] | tuple[dict | None, dict | None]:
        """The row's request body, or its (response, error) when it has none."""
        if problem is not None:
            return None, problem
        try:
            return {**self._builder.body(row, variant.served_name), **variant.params}
        except BodyError as exc:
            return None, exc.error
        except Exception as exc:  # noqa: BLE001 - a bug or an unforeseen input must not fail the shard
            return None, _bug(key, exc)

    async def _answer(self, key: str, row: Row, retries: _Retries) -> tuple[dict | None, dict | None]:
        """The row's (response, error); whatever goes wrong with this row stays this row's."""
        try:
            answer, retried = await self._supervisor.answer(row)
            if retried:
                retries.retried += 1
                if answer.error is not None and answer.error["code"] >= 500:
                    retries.failed += 1
                else:
                    retries.recovered += 1
            if answer.response is not None:
                answer.response["id"] = completion_id(key, row.body)
                self._meter.answered(answer.response["usage"]["completion_tokens"])
            return answer.response, answer.error
        except EngineUnavailable:
            raise  # no engine: the shard fails, and a rerun answers its rows
        except Exception as exc:  # noqa: BLE001 - a bug or an unforeseen input must not fail the shard
            return None, _bug(key, exc)

    async def _tried(self, what: str, fn: Any, *args: Any) -> Any:
        """Run a shard-wide step in a thread, `SHARD_TRIES` times with backoff; raise ShardFailed."""
        for attempt in range(SHARD_TRIES):
            try:
                return await asyncio.to_thread(fn, *args)
            except Exception as exc:  # noqa: BLE001 - storage errors come in every type
                message = f"{type(exc).__name__}: {exc}"
                for uri in (self._config.input.path, self._config.output.path):
                    message = message.replace(uri, storage.redact(uri))
                if attempt == SHARD_TRIES - 1:
                    raise ShardFailed(f"{what} failed {SHARD_TRIES} times, the last with {message}") from exc
                log.warning("%s failed (%s); trying again", what, message)
                await asyncio.sleep(2 ** attempt)


async def _done(answer: tuple[dict | None, dict | None]) -> tuple[dict | None, dict | None]:
    return answer


def _bug(key: str, exc: Exception) -> dict[str, Any]:
    """The 500 error record of a row the pipeline failed on (logged: it is a bug)."""
    log.error("row %s: answering it failed; recorded as a 500 error and the job goes on", key, exc_info=exc)
    return error_body(f"the pipeline failed while answering this row ({type(exc).__name__}: {exc}); the other "
                      "rows were answered. This is a bug: please report it with the row.",
                      "InternalServerError", 500)


class ShardFailed(RuntimeError):
    """Reading or writing a whole shard kept failing; the driver fails the job once the rest is written."""


def _init_ray(config: JobConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = config.ray_address or ("auto" if in_ray_job() else None)
    if address is None:
        ray.init(address="local", include_dashboard=False)  # never a cluster another `ray start` left
    else:
        ray.init(address=address)


def _record_schema(config: JobConfig, plan: InputPlan) -> pa.Schema:
    """The output columns: the row key, the kept input columns, a sweep's `variant_params`, then
    `response` and `error` (and a scored job's `score`)."""
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


def _run_items(config: JobConfig, plan: InputPlan, items: list[WorkItem], schema: pa.Schema) -> Ran:
    """Answer one model's pending work items on its engine actors."""
    import ray

    _init_ray(config)
    show = os.environ.get("CI") != "true"
    ray.data.DataContext.get_current().enable_progress_bars = show
    stats = start_stats()
    actor_plan = plan.for_readers()  # each actor gets its shards from Ray Data, not the whole list
    variants = {item.variant.name: item.variant for item in items}
    rows = sum(i.shard.rows for i in items)
    work = ray.data.from_items([{**asdict(i.shard), "variant": i.variant.name, "out": i.out} for i in items],
                               override_num_blocks=len(items))
    done = work.map_batches(
        EngineActor,
        fn_constructor_args=(config, actor_plan, request_builder(config, plan.format), schema, variants, stats),
        batch_format="pyarrow",
        batch_size=1,
        compute=pool.actor_pool(config.engine, len(items), rows / len(items)),
        # A retiring actor stops its engine itself (EngineActor.__del__). Ray's default kills an exiting
        # actor's child processes first, under vLLM's running output reader: an ERROR and tracebacks
        # after a job that succeeded. (The raylet still cleans up the process group of a dead actor.)
        runtime_env={"env_vars": {"RAY_kill_child_processes_on_worker_exit": "false"}},
        **pool.actor_resources(config.engine),
    )
    failed: dict[str, str] = {}
    progress = ProgressLine(stats, rows) if show else contextlib.nullcontext()
    with progress:
        for batch in done.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                if row["error"] is not None:
                    failed[row["shard"]] = row["error"]
                    log.error("shard %s has no records: %s", row["shard"], row["error"])
                else:
                    log.info("shard %s done: %d rows in %.1fs", row["shard"], row["rows"], row["seconds"])
    end = time.time()
    snap = progress_snapshot(stats, getattr(progress, "last", None))
    ray.kill(stats)
    ready = [e["ready_at"] for e in snap["engines"].values() if "ready_at" in e]
    return Ran(engine_use(snap["engines"], end), snap["shard_starts"], failed, min(ready) if ready else None)


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


def run(config: JobConfig) -> JobSummary:
    """Run the job (or the part earlier runs left) and return the summary of the whole output."""
    started = time.time()
    plan = inputs.plan_input(config.input)  # the files and their rows; InputError before Ray starts
    config = _shard_size(config, plan.rows)
    plan.shards = inputs.cut_shards(plan, config.output.rows_per_file)
    schema = _record_schema(config, plan)
    adapters.check_job(config)  # AdapterError before Ray starts
    done = outputs.prepare(config.output, config.identity())  # OutputError before Ray starts
    variants = config.variants()
    items = [WorkItem(v, s) for v in variants for s in plan.shards]
    pending = [i for i in items if i.out not in done]
    finished = not pending and outputs.is_complete(config.output.path)
    ran: list[Ran] = []
    if pending:
        outputs.unmark(config.output.path)
        log.info("%d of %d shards to run (%d rows, %d per shard); %d done by earlier runs", len(pending),
                 len(items), sum(i.shard.rows for i in pending), config.output.rows_per_file,
                 len(items) - len(pending))
        # one model after another, each engine loaded once (a base model and its adapters: one model)
        by_model: dict[str, list[WorkItem]] = {}
        for item in pending:
            by_model.setdefault(item.variant.model.model_dump_json(), []).append(item)
        for group in by_model.values():
            ran.append(_run_items(config.model_copy(update={"model": group[0].variant.model}), plan, group, schema))

    written = outputs.done_shards(config.output) if pending else done
    total, run_tally, by_variant = Tally(), Tally(), {v.name: Tally() for v in variants}
    pending_names = {i.out for i in pending}
    present = [i for i in items if i.out in written]
    for item, tally in zip(present, outputs.read_tallies(config.output.path, [i.out for i in present])):
        total.add(tally)
        by_variant[item.variant.name].add(tally)
        if item.out in pending_names:
            run_tally.add(tally)
    engines = [e for r in ran for e in r.engines]
    attempts = [s for r in ran for s in r.shard_starts]
    ready = [r.first_ready_at for r in ran if r.first_ready_at is not None]
    missing = {i.out: "" for i in items if i.out not in written}
    missing.update({name: why for r in ran for name, why in r.failed.items() if name not in written})
    summary = JobSummary.of(
        total, run_tally,
        input=storage.redact(config.input.path), output=storage.redact(config.output.path), rows_in=plan.rows,
        variants=[v.name for v in variants if v.name], records_expected=plan.rows * len(variants),
        nothing_to_do=finished, shards=len(items), shards_kept=len(items) - len(pending),
        shards_run=len(pending) - len(missing), rows_per_shard=config.output.rows_per_file,
        shards_failed=missing, shards_redone=len(attempts) - len(set(attempts)),
        engine_restarts=sum(1 for e in engines if not e.engine.endswith("-1")),
        engine_startup_s=[e.startup_s for e in engines], engines=engines, engine_utilisation=utilisation(engines),
        first_engine_ready_s=round(min(ready) - started, 3) if ready else 0.0,
        wall_s=round(time.time() - started, 3),
    )
    if (config.sweep is not None or config.scoring is not None) and not finished:
        from pipeline.compare import write_comparison

        summary.comparison = write_comparison(config, variants, by_variant)
    if not finished:
        text = json.dumps(summary.model_dump(), indent=2)
        storage.write_text(outputs.run_log_path(config.output.path, started), text)
        storage.write_text(outputs.summary_path(config.output.path), text)
        if not missing:
            storage.write_text(outputs.marker_path(config.output.path), "")
    return summary
