"""The engine actor: a Ray Data actor hosting one vLLM engine (through its supervisor). Each call is a
shard: read its rows, build their bodies, answer them all concurrently, write its records and tally."""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from pipeline.config import Variant
from pipeline.engine import core_forkserver, sizing, vllm_metrics
from pipeline.engine.completion_engine import CompletionEngine
from pipeline.engine.supervisor import EngineSupervisor, EngineUnavailable, Row
from pipeline.engine.shared_answers import SharedAnswers, answers_from_store, repeated, share_key, store_new_answers
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
    shared: int = 0  # rows answered with an earlier row's answer (the same greedy or seeded request)
    from_store: int = 0  # rows answered from the answer store
    reused_prompt_tokens: int = 0  # the tokens of both: no engine worked on them
    reused_completion_tokens: int = 0
    prefix_cached_tokens: int = 0  # prompt tokens the engine read from its prefix cache, not computed
    engines: dict[str, None] = field(default_factory=dict)  # the engines that answered rows (`<actor>-<n>`)

    def reused(self, response: dict[str, Any] | None) -> None:
        if response is not None:
            self.reused_prompt_tokens += response["usage"]["prompt_tokens"]
            self.reused_completion_tokens += response["usage"]["completion_tokens"]


# Every engine actor's, Ray Data's too (run.py):
# - the actor stops its engine itself (Ray's default kills its child processes first);
# - it runs at the driver's CPU priority, not Ray's nice 15 for workers (which vLLM's processes
#   inherit), as Ray starts its own job supervisor: on a machine it shares with the driver, the
#   driver's work took the CPU the engine was starting with (docs/performance.md, item 7).
RUNTIME_ENV = {"env_vars": {"RAY_kill_child_processes_on_worker_exit": "false", "RAY_worker_niceness": "0"}}
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

        self._config = config  # the model, engine and defaults its engines are built from
        self._served_name = job.builder.served_name
        self._model_path = resolve_model(config.model.path)
        self._adapters = adapters.localize(adapters.discover(config.model))  # remote ones copied here
        context = ray.get_runtime_context()
        # an actor restarted by Ray keeps its id but not its process: the pid tells its engines apart
        self._node = context.get_node_id()
        self._meter_id = f"{context.get_actor_id()[:8]}.{os.getpid()}"
        self._meter = job.meter(self._meter_id, self._node)
        self._own = _JobOnActor(job, self._meter)  # the job it was constructed with (Ray Data's calls)
        self._guests: dict[str, _JobOnActor] = {}  # jobs it answers besides (answer_for), by key
        self._running: dict[tuple[str, str], asyncio.Future] = {}  # (output, shard) -> its call, any job's
        self._started_at = time.time()
        self._jobs_served = 0
        self._last_call_at = self._started_at  # the end of the last call, any job's
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

    async def answer_for(self, key: str, job: EngineJob, batch: pa.Table) -> pa.Table:
        """A call of an actor that outlives its jobs (job/early_engines.py, pool/): as Ray Data's call,
        for the job `key`, which has the actor's model and engine and its own input, output and meter.
        Several jobs' calls run at once; the engine's busy time is split between the jobs by their rows
        in it (their meters share the actor's). An actor Ray restarted is constructed with the job it was
        created for, and takes the later jobs the same way."""
        guest = self._guests.get(key)
        if guest is None:
            self._forget_idle_guests()
            self._jobs_served += 1
            guest = self._guests[key] = _JobOnActor(job, job.meter(self._meter_id, self._node, share=self._meter))
            # the job's figures count this engine from now; its engine time is its share of the busy time
            guest.meter.engine_started(self._supervisor.engine.startup_s, self._hardware, counted=False,
                                       pool=job.pool)
        return await self._calls(guest, batch)

    def forget(self, key: str) -> None:
        """The job `key` has ended: its meter stops."""
        guest = self._guests.pop(key, None)
        if guest is not None:
            guest.meter.stop()

    def _forget_idle_guests(self) -> None:
        """Keep the last KEPT_JOBS jobs without calls in flight (a job that ended without saying so)."""
        idle = sorted((g.last_call_at, k) for k, g in self._guests.items() if g.calls == 0)
        for _, key in idle[:max(0, len(idle) - KEPT_JOBS)]:
            self.forget(key)

    async def status(self) -> dict[str, Any]:
        """What `engines status` shows of this actor: its engine, how busy, the jobs it served."""
        now = time.time()
        calls = sum(g.calls for g in self._guests.values()) + self._own.calls
        last = self._last_call_at
        alive = max(now - self._started_at, 1e-9)
        return {"engine": self._meter.engine_id, "node": self._node, "model": self._served_name,
                "pid": os.getpid(), "busy_share": round(min(self._meter.busy_s() / alive, 1.0), 4),
                "jobs_served": self._jobs_served, "shards_in_flight": calls,
                "idle_s": 0.0 if calls else round(now - last, 1), "alive_s": round(alive, 1),
                "engine_alive": not self._supervisor.engine.errored}

    def stop(self) -> None:
        """Stop the engine (an actor that outlives its jobs, before it is killed)."""
        for key in list(self._guests):
            self.forget(key)
        self._meter.stop()
        self._supervisor.shutdown()

    def _start_engine(self) -> Any:
        """Start an engine; one that dies while starting (killed, out of memory) is started again,
        `engine.row_retries` times, after the same backoff as a row's."""
        self._meter.engine_starting()
        for attempt in range(self._config.engine.row_retries + 1):
            try:
                engine = CompletionEngine.start(
                    self._config.engine, self._model_path, self._served_name,
                    self._config.defaults.sampling_defaults(), self._adapters,
                    stat_loggers=self._stat_loggers())
                break
            except Exception as exc:  # noqa: BLE001 - vLLM raises RuntimeError and others
                if attempt == self._config.engine.row_retries:
                    raise
                log.warning("the vLLM engine failed while starting (%s: %s); starting it again", type(exc).__name__, exc)
                time.sleep(self._config.engine.retry_backoff_s * 2 ** attempt)
        self._meter.engine_started(engine.startup_s, self._hardware)
        for guest in self._guests.values():  # the jobs answered now count the new engine (and its start-up)
            guest.meter.engine_started(engine.startup_s, self._hardware, pool=guest.job.pool)
        return engine

    def _stat_loggers(self) -> tuple[type, ...]:
        """vLLM's Ray metrics logger for the next engine, with the job's labels (engine.engine_metrics)."""
        tags = self._meter.next_engine_tags() if self._config.engine.resolved_engine_metrics() else None
        return (vllm_metrics.stat_logger(tags),) if tags else ()

    async def __call__(self, batch: pa.Table) -> pa.Table:
        """Ray Data's call: the shards of the job the actor was constructed with."""
        return await self._calls(self._own, batch)

    async def _calls(self, job: "_JobOnActor", batch: pa.Table) -> pa.Table:
        """One call's shards for `job`, counted as its calls in flight (the actor's idle time, and which
        jobs it may forget)."""
        job.calls += 1
        try:
            return await self._shards(job, batch)
        finally:
            job.calls -= 1
            job.last_call_at = self._last_call_at = time.time()

    async def _shards(self, job: "_JobOnActor", batch: pa.Table) -> pa.Table:
        done = []
        for row in batch.to_pylist():
            work = ShardWork.from_row(row)
            out = work.out
            started = time.time()
            try:
                rows, tally = await self._shard_once(job, work)
                failure = None
            except (ShardFailed, EngineUnavailable) as exc:
                rows, tally, failure = 0, None, str(exc)
            except Exception as exc:  # noqa: BLE001 - a bug must not take the other shards with it
                log.exception("shard %s failed", out)
                rows, tally, failure = 0, None, f"{type(exc).__name__}: {exc} (a bug: please report it)"
            done.append({"shard": out, "rows": rows, "seconds": time.time() - started, "error": failure,
                         "engine": job.meter.engine_id, "node": self._node,
                         "tally": tally.model_dump_json() if tally is not None else None})
        return pa.Table.from_pylist(done, schema=SHARD_DONE)

    async def _shard_once(self, job: "_JobOnActor", work: ShardWork) -> tuple[int, Tally | None]:
        """`_shard`, once on this actor: a call for a shard whose call is still running (a job rerun on a
        pool while its killed driver's calls go on) waits for that call and writes nothing itself."""
        where = (job.job.config.output.path, work.out)
        running = self._running.get(where)
        if running is not None:
            await asyncio.shield(running)
            return 0, None
        call = self._running[where] = asyncio.ensure_future(self._shard(job, work.shard, work.variant, work.out))
        try:
            return await asyncio.shield(call)
        finally:
            if call.done():
                self._running.pop(where, None)
            else:  # this caller was cancelled: the shard goes on for whoever waits on it
                call.add_done_callback(lambda _: self._running.pop(where, None))

    async def _shard(self, on: "_JobOnActor", shard: Shard, variant: str, out: str) -> tuple[int, Tally | None]:
        """Answer and write one shard; returns its rows and tally (0 and None if an earlier attempt wrote
        it already)."""
        job = on.job
        if await asyncio.to_thread(outputs.shard_written, job.config.output, out):
            return 0, None  # Ray Data ran this shard again (its result was lost with a node): it is done
        await self._supervisor.load_adapters()  # an adapter that does not load fails its shards, not rows
        started = time.time()
        on.meter.shard_started(out)
        table = await self._with_retries(job, f"reading shard {out} of {shard.file}", read_shard, job.plan, shard)
        problems = table.column(INPUT_ERROR).to_pylist()
        keys = table.column(ROW_KEY).to_pylist()
        rows = python_rows(table.drop_columns([INPUT_ERROR]), problems)
        retries = _Retries()
        params = job.variants[variant].params
        bodies = [self._body(job, key, row, problem, job.variants[variant])
                  for key, row, problem in zip(keys, rows, problems)]
        stored, store_keys = await asyncio.to_thread(answers_from_store, job, keys, bodies, retries)
        answers = await self._answers(on, list(zip(keys, [s if s is not None else b for b, s in zip(bodies, stored)])),
                                      retries)
        response, error = result_arrays(answers)
        await asyncio.to_thread(store_new_answers, job, store_keys, bodies, stored, answers, response)
        records = table.append_column("response", response).append_column("error", error)
        records = job.score(records)  # a scored job's `score` column
        if VARIANT_PARAMS in job.schema.names:
            records = records.append_column(VARIANT_PARAMS, pa.array([json.dumps(params)] * len(keys), pa.string()))
        records = records.select(job.schema.names).cast(job.schema)
        tally = Tally.of_records(records, **asdict(retries), intervals=[[started, time.time()]])
        tally.source = shard.source  # the input file as it was: a rerun compares it
        await self._with_retries(job, f"writing shard {out}", outputs.write_shard, job.config.output, out, records,
                                 tally)
        sent = on.meter.beat()
        if sent is not None:  # the job's stats hold this shard's rows before its result reaches the driver
            try:
                await asyncio.wait_for(asyncio.wrap_future(sent.future()), STATS_WAIT_S)
            except Exception:  # noqa: BLE001 - figures are best effort; the records are what matters
                log.debug("the job's stats actor did not take shard %s's figures", out, exc_info=True)
        return shard.rows, tally

    async def _answers(self, on: "_JobOnActor", rows: list[tuple[str, Any]], retries: _Retries) -> list[tuple[dict | None, dict | None]]:
        """Each row's (response, error), in order. The rows go into the engine a chunk at a time: each
        chunk is validated and its prompts tokenized as one batch in a thread (not row by row in the
        event loop) while the chunks before it are answered, so the engine starts on a shard's first
        rows at once rather than after the whole shard is prepared."""
        chunk_rows = self._config.engine.max_num_seqs
        chunks: list[asyncio.Future] = []
        default_temperature = on.job.config.defaults.temperature
        merge = on.job.config.answer_store.merge_repeats
        try:
            for start in range(0, len(rows), chunk_rows):
                # a row whose request an earlier row of the job asked (greedy or seeded) waits for that answer
                chunk = [(key, body, on.shared.claim(k) if merge and isinstance(body, dict)
                          and (k := share_key(body, default_temperature)) is not None else None)
                         for key, body in rows[start:start + chunk_rows]]
                engine = self._supervisor.engine
                prepared = await asyncio.to_thread(engine.prepare, [b for _, b, share in chunk if isinstance(b, dict)
                                                                    and (share is None or share[0])])
                chunks.append(asyncio.ensure_future(self._answer_chunk(on, engine, chunk, prepared, retries)))
            return [answer for chunk in await asyncio.gather(*chunks) for answer in chunk]
        finally:
            for pending in chunks:  # none left running when something raised
                pending.cancel()

    async def _answer_chunk(self, on: "_JobOnActor", engine: Any, chunk: list[tuple[str, Any, Any]],
                            prepared: Any, retries: _Retries) -> list[tuple[dict | None, dict | None]]:
        requests = iter(prepared.requests)
        try:
            return await asyncio.gather(*(
                _answered_already(body) if not isinstance(body, dict)
                else self._answer(on, key, Row(body, next(requests), engine, meter=on.meter), retries)
                if share is None
                else self._lead(on, key, Row(body, next(requests), engine, meter=on.meter), retries, share[1])
                if share[0]
                else repeated(key, body, share[1], retries)
                for key, body, share in chunk))
        finally:
            engine.release(prepared)

    async def _lead(self, on: "_JobOnActor", key: str, row: Row, retries: _Retries,
                    shared: asyncio.Future) -> tuple[dict | None, dict | None]:
        """A row whose answer later rows with the same request share (shared_answers.py)."""
        try:
            answer = await self._answer(on, key, row, retries)
        except BaseException as exc:
            if not shared.done():
                shared.set_exception(exc)
                shared.exception()  # retrieved: a row that repeats it, if any, raises it itself
            raise
        if not shared.done():
            shared.set_result(answer)
        return answer

    def _body(self, job: EngineJob, key: str, row: dict[str, Any] | None, problem: dict | None,
              variant: Variant) -> dict[str, Any] | tuple[dict | None, dict | None]:
        """The row's request body, or its (response, error) when it has none."""
        if problem is not None:
            return None, problem
        try:
            return {**job.builder.body(row, variant.served_name), **variant.params}
        except BodyError as exc:
            return None, exc.error
        except Exception as exc:  # noqa: BLE001 - a bug or an unforeseen input must not fail the shard
            return None, _pipeline_bug_record(key, exc)

    async def _answer(self, on: "_JobOnActor", key: str, row: Row, retries: _Retries) -> tuple[dict | None, dict | None]:
        """The row's (response, error); whatever goes wrong with this row stays this row's."""
        try:
            answer, retried = await self._supervisor.answer(row)
            if retried:
                retries.retried += 1
                if answer.error is not None and answer.error["code"] >= 500:
                    retries.failed += 1
                else:
                    retries.recovered += 1
            retries.prefix_cached_tokens += answer.prefix_cached_tokens
            retries.engines[on.meter.engine_id] = None
            if answer.response is not None:
                answer.response["id"] = completion_id(key, row.body)
                on.meter.answered(answer.response["usage"]["completion_tokens"], answer.response["usage"]["prompt_tokens"],
                                  answer.prefix_cached_tokens)
            return answer.response, answer.error
        except EngineUnavailable:
            raise  # no engine: the shard fails, and a rerun answers its rows
        except Exception as exc:  # noqa: BLE001 - a bug or an unforeseen input must not fail the shard
            return None, _pipeline_bug_record(key, exc)

    async def _with_retries(self, job: EngineJob, what: str, fn: Any, *args: Any) -> Any:
        """Run a shard-wide step in a thread, `SHARD_TRIES` times with backoff; raise ShardFailed."""
        for attempt in range(SHARD_TRIES):
            try:
                return await asyncio.to_thread(fn, *args)
            except Exception as exc:  # noqa: BLE001 - storage errors come in every type
                message = f"{type(exc).__name__}: {exc}"
                for uri in (job.config.input.path, job.config.output.path):
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


KEPT_JOBS = 4  # jobs without calls in flight an actor keeps (their meters) until they say they ended


@dataclass(eq=False)
class _JobOnActor:
    """A job as one actor answers it: what the job handed it, the job's meter here, its calls."""

    job: EngineJob
    meter: Any
    calls: int = 0  # in flight
    last_call_at: float = 0.0
    shared: SharedAnswers = field(default_factory=SharedAnswers)  # answers its repeated requests share


class ShardFailed(RuntimeError):
    """Reading or writing a whole shard kept failing; the driver fails the job once the rest is written."""
