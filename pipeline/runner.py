"""The main flow: Parquet prompts -> engine actors (one vLLM engine each) -> completion records.

    read rows (Parquet)
      -> each row becomes a /v1/completions body (spec defaults < job defaults < row values)
      -> engine actors answer bodies, many in flight, one record per row: response or error
      -> write Parquet with an explicit schema, then the job summary beside it
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any

import pyarrow as pa

from pipeline import datasets
from pipeline.config import JobConfig, in_ray_job
from pipeline.protocol import BodyError, row_to_body
from pipeline.records import output_schema, result_arrays
from pipeline.summary import JobSummary, summarize_output

log = logging.getLogger(__name__)


class EngineActor:
    """A Ray Data actor hosting one vLLM engine; batches are answered concurrently on its event loop."""

    def __init__(self, config: JobConfig, schema: pa.Schema, stats: Any = None) -> None:
        # vLLM's INFO lines (one per engine step phase) drown the job's own output; raise it with
        # VLLM_LOGGING_LEVEL=INFO in the job's environment.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from pipeline.engine import CompletionEngine
        from pipeline.tiny_model import resolve_model

        self._schema = schema
        self._served_name = config.model.resolved_served_name()
        self._body_defaults = config.defaults.body_defaults()
        self._body_column = config.input.body_column
        self._engine = CompletionEngine.start(
            config.engine, resolve_model(config.model.path), self._served_name,
            config.defaults.sampling_defaults())
        if stats is not None:
            stats.add.remote("engine_startup_s", self._engine.startup_s)

    def __del__(self) -> None:
        # Ray Data deletes the UDF when it retires the actor: stop the engine before the process goes.
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()

    async def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        answers = await asyncio.gather(*(self._answer(row) for row in rows))
        response, error = result_arrays(answers)
        table = batch.append_column("response", response).append_column("error", error)
        return table.select(self._schema.names).cast(self._schema)

    async def _answer(self, row: dict[str, Any]) -> tuple[dict | None, dict | None]:
        try:
            body = row_to_body(row, self._body_defaults, self._served_name, self._body_column)
        except BodyError as exc:
            return None, exc.error
        answer = await self._engine.complete(body)
        return answer.response, answer.error


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
    if address is None and config.engine.resolved_device() == "cpu":
        # A local Ray started by the job: the CPU engine threads need the cores, not Ray's workers.
        ray.init(include_dashboard=False, log_to_driver=True)
    else:
        ray.init(address=address)


def _actor_resources(config: JobConfig) -> dict[str, Any]:
    engine = config.engine
    if engine.resolved_device() == "gpu":
        # One GPU per tensor-parallel rank. With TP > 1 vLLM starts its own workers; they share the
        # actor's placement, so the actor reserves them all.
        return {"num_gpus": engine.tensor_parallel_size, "num_cpus": 1}
    return {"num_cpus": engine.cpus_per_actor}


def run(config: JobConfig) -> JobSummary:
    """Run the job end to end and return its summary (also written beside the output)."""
    import ray
    from ray.data import ActorPoolStrategy
    from ray.data._internal.savemode import SaveMode

    started = time.time()
    input_schema, rows_in = datasets.check_input(config.input)  # raises InputError before Ray starts
    schema = output_schema(input_schema)
    _init_ray(config)
    ray.data.DataContext.get_current().enable_progress_bars = os.environ.get("CI") != "true"
    stats = _stats_actor()

    rows = datasets.read(config.input.path)
    results = rows.map_batches(
        EngineActor,
        fn_constructor_args=(config, schema, stats),
        batch_format="pyarrow",
        batch_size=config.engine.batch_size,
        compute=ActorPoolStrategy(size=config.engine.num_actors,
                                  max_tasks_in_flight_per_actor=config.engine.max_batches_in_flight),
        **_actor_resources(config),
    )
    data_dir = datasets.data_dir(config.output)
    results.write_parquet(data_dir, schema=schema, mode=SaveMode.OVERWRITE)

    engine_starts = ray.get(stats.get.remote()).get("engine_startup_s", [])
    summary = summarize_output(data_dir, rows_in=rows_in, wall_s=time.time() - started, engine_startup_s=engine_starts)
    summary.output = data_dir
    datasets.write_text(datasets.summary_path(config.output), json.dumps(summary.model_dump(), indent=2))
    ray.kill(stats)
    return summary
