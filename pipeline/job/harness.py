"""lm-evaluation-harness tasks answered by the pipeline: `python -m pipeline eval --config FILE --tasks ...`.

The harness does what it always does: it loads its tasks (built-in names, or task YAMLs with
`--include_path`), builds their requests (prompts, few-shot examples, delimiters), and computes its
metrics and standard errors from the answers. What it would send to a `/v1/completions` server, one
request at a time, goes to the pipeline instead: every request of a kind as one job, on as many engine
actors as the config's cluster gives.

`PipelineLM` (harness_model.py) is the harness's own `local-completions` model with the HTTP call replaced: the request
bodies are those that model builds (`_create_payload`, from its tokenizer's token ids: the same
truncation, seed, stop sequences), and the answers are parsed by its own `parse_logprobs` and
`parse_generations`. So the harness's results are those `lm_eval --model local-completions` computes
against vLLM's server, while the requests and answers are records like any job's:

    <output>/<kind>-<digest>/requests/          one row per request: id, task, doc_id, kind, body (request_groups.py)
    <output>/<kind>-<digest>/records/           the job's output folder (data/, summary.json, ...)

The digest is of the requests themselves, so a stopped evaluation run again with the same arguments
finds its records and resumes (only the shards not yet written run), and a finished one re-reads them.

`python -m pipeline eval` (eval_command.py) starts the engine actors (`start`: they start their engines
while the harness builds its requests, and answer all its jobs), registers this model with the
harness and runs the harness's own command line.
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import ConfigError, JobConfig, OutputConfig, Variant, load_config
from pipeline.io import outputs, storage
from pipeline.io.plan import ROW_KEY
from pipeline.job.early_engines import EarlyEngines
from pipeline.pool.attached import PoolEngines
from pipeline.job.run import pool_engines, ray_started, start_engines

log = logging.getLogger(__name__)
MODEL_NAME = "pipeline"  # the name the harness knows this model by (`--model pipeline`)
PLACEHOLDER_INPUT = "(the harness's requests)"  # each kind's requests file replaces it
REQUESTS = pa.schema([("id", pa.string()), ("task", pa.string()), ("doc_id", pa.int64()),
                      ("kind", pa.string()), ("body", pa.string())])


# Engine actors started before the harness (`start`); every job passes them on to run(), which uses
# them for the shards of their model. `_ray`: whether `start` started Ray (`stop` shuts it down).
_engines: EarlyEngines | PoolEngines | None = None
_ray = False


def start(job: JobConfig) -> None:
    """Start the engine actors of the evaluation's first variant now: they start their engines while
    the harness imports itself and builds its requests, and answer every request kind (and every
    variant of the same model). Starts Ray: call it from the main thread."""
    global _engines, _ray
    first = job.variants()[0]
    config = job.model_copy(update={"model": first.model, "sweep": None})
    _ray = not ray_started()
    config, pool = pool_engines(config)  # engine.pool: the standing pool's engines (PoolError: exit 2)
    # else: starts Ray as a job does (the actors' output stays in Ray's logs)
    _engines = pool if pool is not None else start_engines(config)


# How far the harness's thread lowers its CPU priority while the engines start (`yield_to_engines`).
HARNESS_NICENESS = 5


def yield_to_engines() -> None:
    """Lower this thread's CPU priority (nice +5) for the rest of the evaluation, so that engines
    starting on the same machine come first. The harness's requests are not needed before an engine
    can answer them, but at equal priority the harness's work (importing itself, building requests)
    took its share of the CPU the engine was starting with: on the 2-core development machine the
    requests were ready 10-15 s before the engine, and the first job waited for it. The priority
    cannot be raised back without privileges, and need not be: after this the thread only waits for
    jobs and reads their records. Engines on other machines are not affected, nor are Ray's threads in
    this process (on Linux a thread's priority is its own)."""
    import os

    try:
        os.nice(HARNESS_NICENESS)  # the calling thread's, on Linux
    except (AttributeError, OSError):  # not on this platform: the harness runs as it is
        pass


def started_engines() -> EarlyEngines | PoolEngines | None:
    """The engine actors `start` started (None: none; each job starts its own)."""
    return _engines


def stop() -> None:
    """Stop the engine actors `start` started, and Ray if it started it (inside the evaluation's
    session, so that Ray's last lines go to its log file)."""
    global _engines, _ray
    if _engines is not None:
        _engines.stop()
        _engines = None
    if _ray:
        import ray

        ray.shutdown()
        _ray = False


class HarnessError(RuntimeError):
    """Requests the pipeline could not answer; the harness cannot compute its metrics without them."""


def job_config(config: str, output: str | None = None) -> JobConfig:
    """The pipeline config an evaluation runs with; ConfigError if it cannot."""
    job = load_config(config, input=PLACEHOLDER_INPUT, output=output)
    if job.scoring is not None:
        raise ConfigError(f"{config}: an evaluation's metrics are the harness's; remove the `scoring` section")
    return job


def variant_of(job: JobConfig, name: str | None) -> Variant:
    """The variant an evaluation runs (a sweep's, by name; a plain job's only one)."""
    variants = {v.name: v for v in job.variants()}
    if name is None and len(variants) == 1:
        return next(iter(variants.values()))
    if name not in variants:
        raise ConfigError(f"variant {name!r} is not one of the sweep's: {', '.join(variants)}")
    return variants[name]


class RecordsByRequest:
    """A job's records by request id: each shard's read in a thread as soon as the job has written it,
    while the engines answer the others (8,048 log-likelihood records took 2-3 s to read after the job
    on the 2-core development machine), and at the end those an earlier run wrote."""

    def __init__(self, output: OutputConfig, keep_from: dict[str, int] | None = None) -> None:
        """`keep_from`: request id -> the first position of its logprobs lists the caller reads (a
        log-likelihood's context is read by nobody: its records hold it, the harness reads the
        continuation); the records' lists are cut there before they become Python objects."""
        self._output = output
        self._keep_from = keep_from
        self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="records")
        self._shards: dict[str, concurrent.futures.Future] = {}

    def __enter__(self) -> "RecordsByRequest":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._reader.shutdown(cancel_futures=True)

    def written(self, shard: str) -> None:
        """Read this shard's records (its data file is in place), in the background."""
        self._shards[shard] = self._reader.submit(self._read, shard)

    def _read(self, shard: str) -> dict[str, dict[str, Any]]:
        fs, path = storage.filesystem(outputs.data_path(self._output, shard))
        table = pq.read_table(path, filesystem=fs, columns=[ROW_KEY, "response", "error"])
        if self._keep_from:
            table = logprobs_from(table, self._keep_from)
        return {row[ROW_KEY]: row for row in table.to_pylist()}

    def all(self) -> dict[str, dict[str, Any]]:
        """Every record of the job's output (each shard's data file, read once)."""
        for shard in sorted(outputs.done_shards(self._output) - set(self._shards)):
            self.written(shard)
        records: dict[str, dict[str, Any]] = {}
        for read in self._shards.values():
            records.update(read.result())
        return records


def logprobs_from(table: pa.Table, keep_from: dict[str, int]) -> pa.Table:
    """`table`'s records (ROW_KEY, response, ...) with each choice's logprobs lists (text_offset,
    token_logprobs, tokens, top_logprobs) starting at position `keep_from[row key]` (0 for a row not in
    it), in Arrow: a 5-shot context's 1,000 positions never become Python objects."""
    import numpy as np

    response = table.column("response").combine_chunks()
    rows = table.column(ROW_KEY).to_pylist()
    choices = response.field("choices")
    choice = choices.values  # every row's choices, one after another (offsets: choices.offsets)
    row_of_choice = np.repeat(np.arange(len(rows)), np.diff(choices.offsets.to_numpy()))
    start = np.array([keep_from.get(key, 0) for key in rows], dtype=np.int64)[row_of_choice]
    logprobs = choice.field("logprobs")
    first = logprobs.field("tokens").offsets.to_numpy()  # the four lists have the same lengths
    begin = np.minimum(first[:-1] + start, first[1:])
    lengths = first[1:] - begin
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    positions = np.repeat(begin - offsets[:-1], lengths) + np.arange(offsets[-1])
    lists = [pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), logprobs.field(name).values.take(positions),
                                      mask=logprobs.field(name).is_null())
             for name in ("text_offset", "token_logprobs", "tokens", "top_logprobs")]
    logprobs = pa.StructArray.from_arrays(lists, fields=list(logprobs.type), mask=logprobs.is_null())
    choice = pa.StructArray.from_arrays([logprobs if f.name == "logprobs" else choice.field(f.name)
                                         for f in choice.type], fields=list(choice.type), mask=choice.is_null())
    choices = pa.ListArray.from_arrays(choices.offsets, choice, mask=choices.is_null())
    response = pa.StructArray.from_arrays([choices if f.name == "choices" else response.field(f.name)
                                           for f in response.type], fields=list(response.type),
                                          mask=response.is_null())
    return table.set_column(table.schema.get_field_index("response"), "response", response)


def request_owner(request: Any) -> tuple[str, int, str]:
    """A harness request's task, document and record id (`<task>:<doc_id>:<idx>`)."""
    return request.task_name, request.doc_id, f"{request.task_name}:{request.doc_id}:{request.idx}"
