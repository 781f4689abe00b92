"""The engine actor: a Ray Data actor hosting one vLLM engine (through its supervisor). Each call is a
shard: read its rows, build their bodies, answer them all concurrently, write its records and tally."""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from pipeline.config import Variant
from pipeline.engine import core_forkserver, sizing, vllm_metrics
from pipeline.engine.completion_engine import CompletionEngine
from pipeline.engine.supervisor import EngineSupervisor, EngineUnavailable, Row
from pipeline.engine.work import EngineJob, ShardWork
from pipeline.io import outputs, storage
from pipeline.io.plan import INPUT_ERROR, ROW_KEY, Shard
from pipeline.io.read import python_rows, read_shard
from pipeline.io.records import VARIANT_PARAMS, result_arrays
from pipeline.io.tally import Tally
from pipeline.models import adapters
from pipeline.models.tiny_model import resolve_model
from pipeline.protocol import BodyError, completion_id, error_body

log = logging.getLogger(__name__)
# what each call returns: a line per shard (its rows, or why it has no records)
SHARD_DONE = pa.schema([("shard", pa.string()), ("rows", pa.int64()), ("seconds", pa.float64()),
                        ("error", pa.string()), ("engine", pa.string()), ("node", pa.string()),
                        ("tally", pa.string())])  # the written shard's tally (JSON): the job's metrics count it


@dataclass
class _Retries:
    """Per shard: rows answered again, and how those ended."""

    retried: int = 0
    recovered: int = 0
    failed: int = 0


SHARD_TRIES = 3  # reading or writing a shard: tries before the shard is reported failed
STATS_WAIT_S = 10.0  # a shard's last figures: how long to wait for the job's stats actor to take them


class EngineActor:
    """A Ray Data actor hosting one vLLM engine. Each call is one shard: read, answer, write.

    All of a shard's rows go into the engine at once, and the actor works on several shards together
    (`sizing.shards_at_once`: enough to hold `engine.rows_in_flight` rows), so the engine stays full
    whatever the shard size and across shard boundaries.

    A row's failure stays the row's: anything that goes wrong building, answering or recording one row
    becomes that row's error record. Reading or writing a shard is tried again; a shard that still
    fails is reported to the driver, which fails the job after the other shards are written.

    The engine is the actor's `EngineSupervisor`'s (supervisor.py): when the engine process dies
    (killed, out of memory, a request that crashes it) or stops making progress, it starts a new one and
    tries the rows that were in it again, in parts that run alone, so that a row that kills every
    engine it reaches is found in few deaths and recorded as a 500 error, and no other row is; the job
    goes on. When no engine can be started, the shards waiting for one fail (a rerun answers them).
    When the actor process itself dies, Ray starts it again and Ray Data gives it the unfinished
    shards; a shard's records are written once, when it is done.
    """

    def __init__(self, job: EngineJob) -> None:
        """`job.score` and `job.meter` come from the job, so that this room imports neither evaluation
        nor reporting: the meter counts this actor's engine work (enter, leave, answered,
        engine_starting, engine_started, shard_started, beat, next_engine_tags)."""
        config = job.config
        # vLLM's INFO lines (one per engine step phase) drown the job's own output; raise it with
        # VLLM_LOGGING_LEVEL=INFO in the job's environment.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        if config.engine.forkserver:
            core_forkserver.start()  # first: it imports vLLM for the engine core while this process does
        import ray

        self._take_job(job)
        self._job_key: str | None = None  # the job it answers for, if it outlives its jobs (answer_for)
        self._model_path = resolve_model(config.model.path)
        self._adapters = adapters.localize(adapters.discover(config.model))  # remote ones copied here
        context = ray.get_runtime_context()
        # an actor restarted by Ray keeps its id but not its process: the pid tells its engines apart
        self._node = context.get_node_id()
        self._meter_id = f"{context.get_actor_id()[:8]}.{os.getpid()}"
        self._meter = job.meter(self._meter_id, self._node)
        self._hardware = sizing.hardware(config.engine)  # what its engines run on, for the summary
        engine = config.engine
        self._supervisor = EngineSupervisor(self._start_engine(), self._start_engine, row_retries=engine.row_retries,
                                            retry_backoff_s=engine.retry_backoff_s,
                                            stall_timeout_s=engine.stall_timeout_s, meter=self._meter)
        # Ray Data retires the actor by letting its process exit, and the actor is never collected
        # first (the start-up heap is frozen out of the collector: completion_engine.settle_for_serving).
        # At the exit, vLLM's own clean-up would stop the engine with its output handler still reading,
        # which logs the engine's exit as an error. This goes first (atexit runs the latest registered
        # first; vLLM's clean-up registered as the engine started). The one place the actor's engine is
        # stopped at its end, besides `stop` (an actor that outlives its jobs).
        atexit.register(self._supervisor.shutdown)

    def _take_job(self, job: EngineJob) -> None:
        self._config = job.config
        self._plan = job.plan
        self._builder = job.builder
        self._schema = job.schema
        self._variants = job.variants
        self._score = job.score

    async def answer_for(self, key: str, job: EngineJob, batch: pa.Table) -> pa.Table:
        """A call of an actor that outlives its jobs (job/early_engines.py): as Ray Data's call, for the job
        `key`. The first call of a job takes the job (same model and engine, its own input, output and
        meter); the engine stays. An actor Ray restarted is constructed with its first job again, and
        takes the job the same way."""
        if key != self._job_key:
            self._take_job(job)
            previous, self._meter = self._meter, job.meter(self._meter_id, self._node)
            previous.stop()
            # the job's figures count this engine from now: its stats (and cost) are the job's own
            self._meter.engine_started(self._supervisor.engine.startup_s, self._hardware, counted=False)
            self._supervisor.use_meter(self._meter)
            self._job_key = key
        return await self(batch)

    def stop(self) -> None:
        """Stop the engine (an actor that outlives its jobs, before it is killed)."""
        self._meter.stop()
        self._supervisor.shutdown()

    def _start_engine(self) -> Any:
        """Start an engine; one that dies while starting (killed, out of memory) is started again,
        `engine.row_retries` times, after the same backoff as a row's."""
        self._meter.engine_starting()
        for attempt in range(self._config.engine.row_retries + 1):
            try:
                engine = CompletionEngine.start(
                    self._config.engine, self._model_path, self._builder.served_name,
                    self._config.defaults.sampling_defaults(), self._adapters,
                    stat_loggers=self._stat_loggers())
                break
            except Exception as exc:  # noqa: BLE001 - vLLM raises RuntimeError and others
                if attempt == self._config.engine.row_retries:
                    raise
                log.warning("the vLLM engine failed while starting (%s: %s); starting it again", type(exc).__name__, exc)
                time.sleep(self._config.engine.retry_backoff_s * 2 ** attempt)
        self._meter.engine_started(engine.startup_s, self._hardware)
        return engine

    def _stat_loggers(self) -> tuple[type, ...]:
        """vLLM's Ray metrics logger for the next engine, with the job's labels (engine.engine_metrics)."""
        tags = self._meter.next_engine_tags() if self._config.engine.resolved_engine_metrics() else None
        return (vllm_metrics.stat_logger(tags),) if tags else ()

    async def __call__(self, batch: pa.Table) -> pa.Table:
        done = []
        for row in batch.to_pylist():
            work = ShardWork.from_row(row)
            shard, variant, out = work.shard, work.variant, work.out
            started = time.time()
            try:
                rows, tally = await self._shard(shard, variant, out)
                failure = None
            except (ShardFailed, EngineUnavailable) as exc:
                rows, tally, failure = 0, None, str(exc)
            except Exception as exc:  # noqa: BLE001 - a bug must not take the other shards with it
                log.exception("shard %s failed", out)
                rows, tally, failure = 0, None, f"{type(exc).__name__}: {exc} (a bug: please report it)"
            done.append({"shard": out, "rows": rows, "seconds": time.time() - started, "error": failure,
                         "engine": self._meter.engine_id, "node": self._node,
                         "tally": tally.model_dump_json() if tally is not None else None})
        return pa.Table.from_pylist(done, schema=SHARD_DONE)

    async def _shard(self, shard: Shard, variant: str, out: str) -> tuple[int, Tally | None]:
        """Answer and write one shard; returns its rows and tally (0 and None if an earlier attempt wrote
        it already)."""
        if await asyncio.to_thread(outputs.shard_written, self._config.output, out):
            return 0, None  # Ray Data ran this shard again (its result was lost with a node): it is done
        await self._supervisor.load_adapters()  # an adapter that does not load fails its shards, not rows
        started = time.time()
        self._meter.shard_started(out)
        table = await self._with_retries(f"reading shard {out} of {shard.file}", read_shard, self._plan, shard)
        problems = table.column(INPUT_ERROR).to_pylist()
        keys = table.column(ROW_KEY).to_pylist()
        rows = python_rows(table.drop_columns([INPUT_ERROR]), problems)
        retries = _Retries()
        params = self._variants[variant].params
        bodies = [self._body(key, row, problem, self._variants[variant])
                  for key, row, problem in zip(keys, rows, problems)]
        answers = await self._answers(list(zip(keys, bodies)), retries)
        response, error = result_arrays(answers)
        records = table.append_column("response", response).append_column("error", error)
        records = self._score(records)  # a scored job's `score` column
        if VARIANT_PARAMS in self._schema.names:
            records = records.append_column(VARIANT_PARAMS, pa.array([json.dumps(params)] * len(keys), pa.string()))
        records = records.select(self._schema.names).cast(self._schema)
        tally = Tally.of_records(records, **asdict(retries), intervals=[[started, time.time()]])
        tally.source = shard.source  # the input file as it was: a rerun compares it
        await self._with_retries(f"writing shard {out}", outputs.write_shard, self._config.output, out, records, tally)
        sent = self._meter.beat()
        if sent is not None:  # the job's stats hold this shard's rows before its result reaches the driver
            try:
                await asyncio.wait_for(asyncio.wrap_future(sent.future()), STATS_WAIT_S)
            except Exception:  # noqa: BLE001 - figures are best effort; the records are what matters
                log.debug("the job's stats actor did not take shard %s's figures", out, exc_info=True)
        return shard.rows, tally

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
                else _answered_already(body)
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
            return None, _pipeline_bug_record(key, exc)

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
            return None, _pipeline_bug_record(key, exc)

    async def _with_retries(self, what: str, fn: Any, *args: Any) -> Any:
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


async def _answered_already(answer: tuple[dict | None, dict | None]) -> tuple[dict | None, dict | None]:
    return answer


def _pipeline_bug_record(key: str, exc: Exception) -> dict[str, Any]:
    """The 500 error record of a row the pipeline failed on (logged: it is a bug)."""
    log.error("row %s: answering it failed; recorded as a 500 error and the job goes on", key, exc_info=exc)
    return error_body(f"the pipeline failed while answering this row ({type(exc).__name__}: {exc}); the other "
                      "rows were answered. This is a bug: please report it with the row.",
                      "InternalServerError", 500)


class ShardFailed(RuntimeError):
    """Reading or writing a whole shard kept failing; the driver fails the job once the rest is written."""
