"""The main flow: rows -> engine actors (one vLLM engine each) -> one completion record per row.

    plan the input (files, format, schema, row count)       -- job-level problems stop here
      -> read rows (Parquet or OpenAI batch JSONL), each with a row key
      -> each row becomes a /v1/completions body (spec defaults < job defaults < row values)
      -> engine actors answer bodies, many in flight: the response body or the error body
      -> write the records (Parquet or OpenAI batch JSONL), then the summary, then _SUCCESS
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any

import pyarrow as pa

from pipeline import inputs, outputs
from pipeline.config import JobConfig, in_ray_job
from pipeline.inputs import INPUT_ERROR, ROW_KEY, InputPlan
from pipeline.protocol import BodyError, RequestBuilder, error_body
from pipeline.records import output_schema, result_arrays
from pipeline.summary import JobSummary, summarize_output

log = logging.getLogger(__name__)
# A row in flight when the engine died this many times is retried alone; one more death fails it.
ISOLATE_AFTER_DEATHS = 2


def request_builder(config: JobConfig, input_format: str) -> RequestBuilder:
    served_name = config.model.resolved_served_name()
    defaults = config.defaults.body_defaults()
    if input_format == "openai_batch":
        return RequestBuilder(served_name=served_name, body_defaults=defaults, body_column="body",
                              field_columns=False)
    cfg = config.input
    return RequestBuilder(served_name=served_name, body_defaults=defaults, body_column=cfg.body_column,
                          prompt_column=cfg.prompt_column, columns=cfg.columns, template=cfg.template)


class EngineActor:
    """A Ray Data actor hosting one vLLM engine; batches are answered concurrently on its event loop.

    When the engine process dies (killed, out of memory, a request that crashes it), the actor starts a
    new engine and answers the rows that were in flight again. A row in flight at two deaths is retried
    alone, so a row that kills every engine it reaches is found: after a third death it is recorded as a
    500 error and the job goes on.
    """

    def __init__(self, config: JobConfig, builder: RequestBuilder, schema: pa.Schema,
                 stats: Any = None) -> None:
        # vLLM's INFO lines (one per engine step phase) drown the job's own output; raise it with
        # VLLM_LOGGING_LEVEL=INFO in the job's environment.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from pipeline.tiny_model import resolve_model

        self._config = config
        self._model_path = resolve_model(config.model.path)
        self._schema = schema
        self._builder = builder
        self._stats = stats
        self._engine = self._start_engine()
        self._restart_lock = asyncio.Lock()
        self._alone = asyncio.Semaphore(1)

    def _start_engine(self) -> Any:
        from pipeline.engine import CompletionEngine

        engine = CompletionEngine.start(self._config.engine, self._model_path, self._builder.served_name,
                                        self._config.defaults.sampling_defaults())
        self._report("engine_startup_s", engine.startup_s)
        return engine

    def _report(self, name: str, value: float) -> None:
        if self._stats is not None:
            self._stats.add.remote(name, value)

    def __del__(self) -> None:
        # Ray Data deletes the UDF when it retires the actor: stop the engine before the process goes.
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()

    async def __call__(self, batch: pa.Table) -> pa.Table:
        problems = batch.column(INPUT_ERROR).to_pylist()
        answers = await asyncio.gather(*(
            self._answer(row, problem)
            for row, problem in zip(inputs.python_rows(batch.drop_columns([INPUT_ERROR]), problems), problems)))
        response, error = result_arrays(answers)
        table = batch.append_column("response", response).append_column("error", error)
        return table.select(self._schema.names).cast(self._schema)

    async def _answer(self, row: dict[str, Any] | None, problem: dict | None) -> tuple[dict | None, dict | None]:
        if problem is not None:
            return None, problem
        try:
            body = self._builder.body(row)
        except BodyError as exc:
            return None, exc.error
        answer = await self._complete(body)
        return answer.response, answer.error

    async def _complete(self, body: dict[str, Any]) -> Any:
        from pipeline.engine import Answer, EngineDeadError

        deaths = 0
        while True:
            engine = self._engine
            try:
                if deaths >= ISOLATE_AFTER_DEATHS:
                    async with self._alone:
                        return await engine.complete(body)
                return await engine.complete(body)
            except EngineDeadError as exc:
                deaths += 1
                self._report("rows_retried", 1)
                await self._replace(engine)
                if deaths > ISOLATE_AFTER_DEATHS:
                    self._report("rows_failed_engine", 1)
                    return Answer(error=error_body(
                        f"the engine died {deaths} times while answering this request, the last time "
                        f"while it was the only retried request; it was not retried again ({exc})",
                        "InternalServerError", 500))

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
            self.values: dict[str, list[float]] = {}

        def add(self, name: str, value: float) -> None:
            self.values.setdefault(name, []).append(value)

        def get(self) -> dict[str, list[float]]:
            return self.values

    return Stats.remote()


def _init_ray(config: JobConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = config.ray_address or ("auto" if in_ray_job() else None)
    if address is None:
        ray.init(include_dashboard=False)
    else:
        ray.init(address=address)


def _actor_resources(config: JobConfig) -> dict[str, Any]:
    engine = config.engine
    if engine.resolved_device() == "gpu":
        # One GPU per tensor-parallel rank; vLLM's TP workers share the actor's reservation.
        return {"num_gpus": engine.tensor_parallel_size, "num_cpus": 1}
    return {"num_cpus": engine.cpus_per_actor}


def _record_schema(config: JobConfig, plan: InputPlan) -> pa.Schema:
    """The output columns: the row key, the kept input columns, then `response` and `error`."""
    keep = config.output.columns
    if keep is not None:
        missing = sorted(set(keep) - set(plan.schema.names))
        if missing:
            raise inputs.InputError(f"output.columns names {missing}, which the input does not have; "
                                    f"its columns: {', '.join(plan.schema.names)}")
    fields = [f for f in plan.schema if keep is None or f.name == ROW_KEY or f.name in keep]
    return output_schema(pa.schema(fields))


def run(config: JobConfig) -> JobSummary:
    """Run the job end to end and return its summary (also written beside the output)."""
    import ray
    from ray.data import ActorPoolStrategy

    started = time.time()
    plan = inputs.plan_input(config.input)  # raises InputError before Ray starts
    schema = _record_schema(config, plan)
    builder = request_builder(config, plan.format)
    _init_ray(config)
    ray.data.DataContext.get_current().enable_progress_bars = os.environ.get("CI") != "true"
    stats = _stats_actor()

    outputs.clear(config.output.path)
    records = inputs.read(plan).map_batches(
        EngineActor,
        fn_constructor_args=(config, builder, schema, stats),
        batch_format="pyarrow",
        batch_size=config.engine.batch_size,
        compute=ActorPoolStrategy(size=config.engine.num_actors,
                                  max_tasks_in_flight_per_actor=config.engine.max_batches_in_flight),
        **_actor_resources(config),
    )
    if config.output.format == "parquet":
        outputs.write_parquet(records, config.output.path, schema)
    else:
        outputs.write_openai_batch(records, config.output.path)

    counts = ray.get(stats.get.remote())
    ray.kill(stats)
    summary = summarize_output(config.output, rows_in=plan.rows, wall_s=time.time() - started,
                               engine_startup_s=counts.get("engine_startup_s", []))
    summary.engine_restarts = len(counts.get("engine_restarts", []))
    summary.rows_retried = len(counts.get("rows_retried", []))
    outputs.write_text(outputs.summary_path(config.output.path), json.dumps(summary.model_dump(), indent=2))
    outputs.write_text(outputs.marker_path(config.output.path), "")
    return summary
