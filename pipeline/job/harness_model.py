"""`PipelineLM`: lm-evaluation-harness's `local-completions` model, its requests answered by pipeline jobs
(harness.py says how). A module of its own because it subclasses the harness's model: importing it
imports lm_eval, which `python -m pipeline eval` does only once it runs the harness (`register`)."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from lm_eval.models.api_models import LMEVAL_MODEL_NONE_ANSWER_PLACEHOLDER
from lm_eval.models.openai_completions import LocalCompletionsAPI
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from pipeline.config import AnswerStoreConfig, InputConfig, JobConfig
from pipeline.engine import sizing
from pipeline.io import storage
from pipeline.io.records import response_body
from pipeline.job.harness import (MODEL_NAME, REQUESTS, HarnessError, RecordsByRequest, job_config, request_owner,
                                  started_engines, variant_of)
from pipeline.job import request_groups
from pipeline.job.run import run
from pipeline.models.tiny_model import resolve_model

log = logging.getLogger(__name__)


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
        self._job = job.model_copy(update={"model": chosen.model, "sweep": None,
                                           "answer_store": _shared_store(job)})
        self._params = chosen.params
        self._records = storage.join(job.output.path, chosen.name) if chosen.name else job.output.path
        self._owners: list[tuple[str, int, str]] = []  # the (task, doc_id, id) of each request in flight

    # -- the three request kinds, as the harness calls them ------------------------------------

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        # the harness's own encoding (TemplateLM.loglikelihood) calls _loglikelihood_tokens with the
        # requests in this order
        self._owners = [request_owner(r) for r in requests]
        return super().loglikelihood(requests, disable_tqdm=True)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """As TemplateAPI.loglikelihood_rolling, every document's windows in one job."""
        windows, owners, whose = [], [], []
        for number, request in enumerate(requests):
            (text,) = request.args
            task, doc_id, key = request_owner(request)
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
        # the harness reads the positions from ctxlen on (parse_logprobs: [ctxlen:-1]); the records are
        # read from the position before, so parse_logprobs sees the same values at ctxlen 1
        skip = [max(ctxlen - 1, 0) for ctxlen in ctxlens]
        answers = self._answers(kind, bodies, owners, {owner[2]: n for owner, n in zip(owners, skip)})
        results = []
        for answer, tokens, ctxlen, cache_key, skipped in zip(answers, inputs, ctxlens, cache_keys, skip):
            result = self.parse_logprobs(outputs=[answer], tokens=[tokens], ctxlens=[ctxlen - skipped])[0]
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
        answers = self._answers("generate_until", bodies, [request_owner(r) for r in requests])
        for request, context, answer in zip(requests, contexts, answers):
            text = self.parse_generations(outputs=[answer], contexts=[context])[0]
            if text is None:
                text = LMEVAL_MODEL_NONE_ANSWER_PLACEHOLDER
            else:
                self.cache_hook.add_partial("generate_until", (context, request.args[1]), text)
            texts.append(text)
        return texts

    # -- answering: one pipeline job per call ----------------------------------------------------

    def _answers(self, kind: str, bodies: list[dict[str, Any]], owners: list[tuple[str, int, str]],
                 keep_from: dict[str, int] | None = None) -> list[dict[str, Any]]:
        """The response body of each request (the (task, doc_id, id) of each in `owners`), answered
        by a pipeline job over all of them; `keep_from`: by id, the first position of its logprobs
        lists the caller reads (harness.RecordsByRequest)."""
        assert len(owners) == len(bodies), "one owner per request"
        if not bodies:
            return []
        rows = {"id": [o[2] for o in owners], "task": [o[0] for o in owners],
                "doc_id": [o[1] for o in owners], "kind": [kind] * len(owners),
                "body": [json.dumps({**b, **self._params}, sort_keys=True) for b in bodies]}
        unique = {key: i for i, key in enumerate(rows["id"])}  # a repeated request is answered once
        # in the order of their prompts (token ids): requests that share a prefix (a document's choices
        # after its context, documents after the same few-shot examples) are neighbours, cut into files
        # (shards) of whole documents that engines with the prefix cached answer (job/request_groups.py).
        # The harness gets its answers in its own order all the same.
        order = sorted(unique.values(), key=lambda i: bodies[i]["prompt"])
        table = pa.table({name: [column[i] for i in order] for name, column in rows.items()}, schema=REQUESTS)
        documents = list(zip(table.column("task").to_pylist(), table.column("doc_id").to_pylist()))
        affinities = [request_groups.prefix_affinity(bodies[i]["prompt"]) for i in order]
        # shards of at most an engine step's rows: while an engine answers one, the shard before is written
        target = min(sizing.shard_rows(len(order), self._job.engine.actor_range()[1]), self._job.engine.max_num_seqs)
        files = request_groups.cut(documents, affinities, target)
        folder, records = self._run(kind, table, files, keep_from)
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
        # the layout too: a job of request files (request_groups.py) is not resumed in a folder an earlier
        # version wrote (one requests.parquet, other shards), whose answers its answer store still holds
        digest = hashlib.sha256(b"request files\0")
        for column in ("id", "body"):
            for value in table.column(column).to_pylist():
                digest.update(value.encode() + b"\0")
        return storage.join(self._records, f"{kind}-{digest.hexdigest()[:16]}")

    def _run(self, kind: str, table: pa.Table, files: list[tuple[int, int, str]],
             keep_from: dict[str, int] | None = None) -> tuple[str, dict[str, dict[str, Any]]]:
        """The folder of the job answering `table`'s requests, written as `files` (request_groups.cut:
        one shard each), and its records by request id."""
        folder = self._folder(kind, table)
        requests, out = storage.join(folder, "requests"), storage.join(folder, "records")
        written = storage.join(requests, "_written")  # once the files are: a rerun reads them as they are
        if not storage.exists(written):
            for number, (start, stop, affinity) in enumerate(files):
                buffer = io.BytesIO()
                pq.write_table(table.slice(start, stop - start), buffer)
                storage.write_bytes(storage.join(requests, request_groups.file_name(number, affinity)),
                                    buffer.getvalue())
            storage.write_bytes(written, b"")
        job = self._job.model_copy(update={
            "input": InputConfig(path=requests, body_column="body", id_column="id"),
            "output": self._job.output.model_copy(update={
                "path": out, "format": "parquet", "columns": None,
                "rows_per_file": max(stop - start for start, stop, _ in files)}),
        })
        log.info("%s: %d requests -> %s", kind, table.num_rows, storage.redact(out))
        with RecordsByRequest(job.output, keep_from) as records:
            summary = run(job, engines=started_engines(), on_written=records.written,
                          affinity=lambda shard: request_groups.affinity_of(shard.file))
            print(f"{kind}: {summary.rows_out} records in {storage.redact(out)} ({summary.rows_run} answered "
                  f"now, {summary.shards_kept} of {summary.shards} shards kept, {summary.errors} errors, "
                  f"{summary.wall_s:.1f}s)", flush=True)
            return folder, records.all()


def _shared_store(job: JobConfig) -> AnswerStoreConfig:
    """The evaluation's answer store: one for all its request kinds, tasks, variants and reruns (each
    kind's job has an output folder of its own, named by its requests), `answers/` in the evaluation's
    output unless the config names one. So tasks over the same documents, a rerun with `--limit`
    raised or a sweep with one more variant send an engine only the requests not answered before."""
    store = job.answer_store
    return store if store.path else store.model_copy(update={"path": storage.join(job.output.path, "answers")})


def register() -> type:
    """Register the pipeline as the harness's model `pipeline`; returns its class."""
    from lm_eval.api.registry import model_registry, register_model

    if MODEL_NAME not in model_registry:
        register_model(MODEL_NAME)(PipelineLM)
    return model_registry.get(MODEL_NAME)
