"""lm-evaluation-harness tasks answered by the pipeline: `python -m pipeline eval --config FILE --tasks ...`.

The harness does what it always does: it loads its tasks (built-in names, or task YAMLs with
`--include_path`), builds their requests (prompts, few-shot examples, delimiters), and computes its
metrics and standard errors from the answers. What it would send to a `/v1/completions` server, one
request at a time, goes to the pipeline instead: every request of a kind as one job, on as many engine
actors as the config's cluster gives.

`PipelineLM` is the harness's own `local-completions` model with the HTTP call replaced: the request
bodies are those that model builds (`_create_payload`, from its tokenizer's token ids: the same
truncation, seed, stop sequences), and the answers are parsed by its own `parse_logprobs` and
`parse_generations`. So the harness's results are those `lm_eval --model local-completions` computes
against vLLM's server, while the requests and answers are records like any job's:

    <output>/<kind>-<digest>/requests.parquet   one row per request: id, task, doc_id, kind, body
    <output>/<kind>-<digest>/records/           the job's output folder (data/, summary.json, ...)

The digest is of the requests themselves, so a stopped evaluation run again with the same arguments
finds its records and resumes (only the shards not yet written run), and a finished one re-reads them.

`python -m pipeline eval` (evaluate.py) starts the engine actors (`start`: they start their engines
while the harness builds its requests, and answer all its jobs), registers this model with the
harness and runs the harness's own command line.
"""

from __future__ import annotations

import concurrent.futures
import copy
import hashlib
import io
import json
import logging
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import ConfigError, InputConfig, JobConfig, OutputConfig, Variant, load_config
from pipeline.io import outputs, storage
from pipeline.io.plan import ROW_KEY
from pipeline.io.records import response_body
from pipeline.job.engines import EngineActors
from pipeline.job.run import ray_started, run, start_engines
from pipeline.models.tiny_model import resolve_model

log = logging.getLogger(__name__)
MODEL_NAME = "pipeline"  # the name the harness knows this model by (`--model pipeline`)
PLACEHOLDER_INPUT = "(the harness's requests)"  # each kind's requests file replaces it
REQUESTS = pa.schema([("id", pa.string()), ("task", pa.string()), ("doc_id", pa.int64()),
                      ("kind", pa.string()), ("body", pa.string())])


# Engine actors started before the harness (`start`); every job passes them on to run(), which uses
# them for the shards of their model. `_ray`: whether `start` started Ray (`stop` shuts it down).
_engines: EngineActors | None = None
_ray = False


def start(job: JobConfig) -> None:
    """Start the engine actors of the evaluation's first variant now: they start their engines while
    the harness imports itself and builds its requests, and answer every request kind (and every
    variant of the same model). Starts Ray: call it from the main thread."""
    global _engines, _ray
    first = job.variants()[0]
    config = job.model_copy(update={"model": first.model, "sweep": None})
    _ray = not ray_started()
    _engines = start_engines(config)  # starts Ray as a job does: the actors' output stays in Ray's logs


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


def _harness_model() -> type:
    from lm_eval.models.api_models import LMEVAL_MODEL_NONE_ANSWER_PLACEHOLDER
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class PipelineLM(LocalCompletionsAPI):
        """The harness's `local-completions`, answered by pipeline jobs instead of HTTP requests.

        Model arguments (`--model_args config=FILE,variant=NAME,output=URI,max_length=N`): `config` is
        the pipeline config (model, adapters, engine, cluster); `variant` which of its sweep's variants
        answers (a model, an adapter, request fields that override the harness's); `output` where the
        request records go (default: the config's `output.path`); `max_length` the context the harness
        truncates to (default: the engine's `max_model_len`, else the harness's 2048). Other arguments
        are the harness's own (`seed`, `max_gen_toks`, `add_bos_token`, ...).
        """

        def __init__(self, config: str, variant: str | None = None, output: str | None = None,
                     max_length: int | None = None, **kwargs: Any) -> None:
            job = job_config(config, output)
            chosen = variant_of(job, variant)
            for ignored in ("base_url", "tokenizer_backend", "num_concurrent", "batch_size", "pretrained", "model"):
                kwargs.pop(ignored, None)
            super().__init__(model=chosen.served_name, tokenizer=resolve_model(chosen.model.path),
                             tokenizer_backend="huggingface",
                             max_length=int(max_length or job.engine.max_model_len or 2048), **kwargs)
            # each variant is a job of its own: its model, its request fields in every body
            self._job = job.model_copy(update={"model": chosen.model, "sweep": None})
            self._params = chosen.params
            self._records = storage.join(job.output.path, chosen.name) if chosen.name else job.output.path
            self._owners: list[tuple[str, int, str]] = []  # the (task, doc_id, id) of each request in flight

        # -- the three request kinds, as the harness calls them ------------------------------------

        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            # the harness's own encoding (TemplateLM.loglikelihood) calls _loglikelihood_tokens with the
            # requests in this order
            self._owners = [_owner(r) for r in requests]
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            """As TemplateAPI.loglikelihood_rolling, every document's windows in one job."""
            windows, owners, whose = [], [], []
            for number, request in enumerate(requests):
                (text,) = request.args
                task, doc_id, key = _owner(request)
                for index, window in enumerate(map(make_disjoint_window, get_rolling_token_windows(
                        token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length - 1, context_len=1))):
                    windows.append((None, *window))
                    owners.append((task, doc_id, f"{key}:w{index}"))
                    whose.append(number)
            self._owners = owners
            totals = [0.0] * len(requests)
            for (logprob, _), number in zip(self._loglikelihood_tokens(windows), whose):
                totals[number] += logprob
            for request, total in zip(requests, totals):
                self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
            return totals

        def _loglikelihood_tokens(self, requests: list, **kwargs: Any) -> list[tuple[float, bool]]:
            inputs, ctxlens, cache_keys = self.batch_loglikelihood_requests([requests])
            bodies = [self._create_payload(self.create_message([tokens]), generate=False, seed=self._seed)
                      for tokens in inputs]
            kind = "loglikelihood" if cache_keys and cache_keys[0] is not None else "loglikelihood_rolling"
            owners, self._owners = self._owners, []
            results = []
            for answer, tokens, ctxlen, cache_key in zip(self._answers(kind, bodies, owners), inputs, ctxlens,
                                                         cache_keys):
                result = self.parse_logprobs(outputs=[answer], tokens=[tokens], ctxlens=[ctxlen])[0]
                if cache_key is not None:
                    self.cache_hook.add_partial("loglikelihood", cache_key, result)
                results.append(result)
            return results

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            """As TemplateAPI.generate_until with one request per call (its default), all in one job."""
            contexts = [r.args[0] for r in requests]
            encodings = self.tok_encode(contexts, add_special_tokens=self.add_bos_token)
            bodies = []
            for request, tokens in zip(requests, encodings):
                gen_kwargs = copy.deepcopy(request.args[1])
                max_context = self.max_length - gen_kwargs.get("max_gen_toks", self._max_gen_toks)
                bodies.append(self._create_payload(self.create_message([tokens[-max_context:]]), generate=True,
                                                   gen_kwargs=gen_kwargs, seed=self._seed, eos=self.eos_string))
            texts = []
            answers = self._answers("generate_until", bodies, [_owner(r) for r in requests])
            for request, context, answer in zip(requests, contexts, answers):
                text = self.parse_generations(outputs=[answer], contexts=[context])[0]
                if text is None:
                    text = LMEVAL_MODEL_NONE_ANSWER_PLACEHOLDER
                else:
                    self.cache_hook.add_partial("generate_until", (context, request.args[1]), text)
                texts.append(text)
            return texts

        # -- answering: one pipeline job per call ----------------------------------------------------

        def _answers(self, kind: str, bodies: list[dict[str, Any]],
                     owners: list[tuple[str, int, str]]) -> list[dict[str, Any]]:
            """The response body of each request (the (task, doc_id, id) of each in `owners`), answered
            by a pipeline job over all of them."""
            assert len(owners) == len(bodies), "one owner per request"
            if not bodies:
                return []
            rows = {"id": [o[2] for o in owners], "task": [o[0] for o in owners],
                    "doc_id": [o[1] for o in owners], "kind": [kind] * len(owners),
                    "body": [json.dumps({**b, **self._params}, sort_keys=True) for b in bodies]}
            unique = {key: i for i, key in enumerate(rows["id"])}  # a repeated request is answered once
            table = pa.table({name: [column[i] for i in unique.values()] for name, column in rows.items()},
                             schema=REQUESTS)
            folder, records = self._run(kind, table)
            missing = [key for key in unique if key not in records]
            failed = [key for key in unique if key in records and records[key]["error"] is not None]
            if missing or failed:
                first = records[failed[0]]["error"]["message"] if failed else "no record"
                raise HarnessError(f"{len(missing) + len(failed)} of {len(unique)} {kind} requests have no answer "
                                   f"(the first, {(failed or missing)[0]}: {first}); their records are in "
                                   f"{storage.redact(folder)}. Fix the cause and run the same "
                                   "command again: answered requests are kept")
            return [response_body(records[key]["response"]) for key in rows["id"]]

        def _folder(self, kind: str, table: pa.Table) -> str:
            digest = hashlib.sha256()
            for column in ("id", "body"):
                for value in table.column(column).to_pylist():
                    digest.update(value.encode() + b"\0")
            return storage.join(self._records, f"{kind}-{digest.hexdigest()[:16]}")

        def _run(self, kind: str, table: pa.Table) -> tuple[str, dict[str, dict[str, Any]]]:
            """The folder of the job answering `table`'s requests, and its records by request id."""
            folder = self._folder(kind, table)
            requests, out = storage.join(folder, "requests.parquet"), storage.join(folder, "records")
            if not storage.exists(requests):
                buffer = io.BytesIO()
                pq.write_table(table, buffer)
                storage.write_bytes(requests, buffer.getvalue())
            job = self._job.model_copy(update={
                "input": InputConfig(path=requests, body_column="body", id_column="id"),
                "output": self._job.output.model_copy(update={"path": out, "format": "parquet", "columns": None}),
            })
            log.info("%s: %d requests -> %s", kind, table.num_rows, storage.redact(out))
            with _Records(job.output) as records:
                summary = run(job, engines=_engines, on_written=records.written)
                print(f"{kind}: {summary.rows_out} records in {storage.redact(out)} ({summary.rows_run} answered "
                      f"now, {summary.shards_kept} of {summary.shards} shards kept, {summary.errors} errors, "
                      f"{summary.wall_s:.1f}s)", flush=True)
                return folder, records.all()

    return PipelineLM


class _Records:
    """A job's records by request id: each shard's read in a thread as soon as the job has written it,
    while the engines answer the others (8,048 log-likelihood records took 2-3 s to read after the job
    on the 2-core development machine), and at the end those an earlier run wrote."""

    def __init__(self, output: OutputConfig) -> None:
        self._output = output
        self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="records")
        self._shards: dict[str, concurrent.futures.Future] = {}

    def __enter__(self) -> "_Records":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._reader.shutdown(cancel_futures=True)

    def written(self, shard: str) -> None:
        """Read this shard's records (its data file is in place), in the background."""
        self._shards[shard] = self._reader.submit(self._read, shard)

    def _read(self, shard: str) -> dict[str, dict[str, Any]]:
        fs, path = storage.filesystem(outputs.data_path(self._output, shard))
        table = pq.read_table(path, filesystem=fs, columns=[ROW_KEY, "response", "error"])
        return {row[ROW_KEY]: row for row in table.to_pylist()}

    def all(self) -> dict[str, dict[str, Any]]:
        """Every record of the job's output (each shard's data file, read once)."""
        for shard in sorted(outputs.done_shards(self._output) - set(self._shards)):
            self.written(shard)
        records: dict[str, dict[str, Any]] = {}
        for read in self._shards.values():
            records.update(read.result())
        return records


def _owner(request: Any) -> tuple[str, int, str]:
    """A harness request's task, document and record id (`<task>:<doc_id>:<idx>`)."""
    return request.task_name, request.doc_id, f"{request.task_name}:{request.doc_id}:{request.idx}"


def register() -> type:
    """Register the pipeline as the harness's model `pipeline`; returns its class."""
    from lm_eval.api.registry import model_registry, register_model

    if MODEL_NAME not in model_registry:
        register_model(MODEL_NAME)(_harness_model())
    return model_registry.get(MODEL_NAME)
