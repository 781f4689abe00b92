"""Rows of one job whose requests are the same, and whose answer the request decides, answered once.

A request's answer is decided by its body when it is greedy (temperature 0) or carries a `seed`
(docs/observability.md#determinism: on the CPU engine such a row's answer does not depend on the rows
it shares an engine step with). Rows whose bodies are equal (after the job's defaults and a sweep's
variant fields, so a body that leaves out `temperature` takes the job's default) share one engine
answer: the first such row on an engine actor leads, it goes to the engine; every other waits for the
leader's answer and gets a copy with its own response `id`. A row that samples without a seed never
shares: each such row is its own draw, as the endpoint's users expect.

Within an actor and a job, shared across the job's shards on the actor (the last MAX_KEPT distinct
requests' answers are kept). A leader that got no answer (its engine could not start, its shard was
cancelled) leads no one: the next row with that body leads again.

Across jobs, the same rows' answers are kept in the answer store (io/answer_store.py): a shard's rows
found there are answered from it before any goes to the engine, and the engine's new answers to such
rows are stored once the shard is written (never an error record).
"""

from __future__ import annotations

import asyncio
import collections
import copy
import hashlib
import json
import logging
from typing import Any

import pyarrow as pa

from pipeline.engine.work import EngineJob
from pipeline.protocol import completion_id

log = logging.getLogger(__name__)

MAX_KEPT = 20_000  # distinct answered requests an actor keeps per job, for rows that repeat them later


def share_key(body: dict[str, Any], default_temperature: float) -> str | None:
    """The key rows with the same answer share, or None for a row that samples without a seed."""
    temperature = body.get("temperature", default_temperature)
    if body.get("seed") is None and temperature != 0:
        return None
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


class SharedAnswers:
    """One job's answers on one actor, by `share_key`."""

    def __init__(self, max_kept: int = MAX_KEPT) -> None:
        self._answers: collections.OrderedDict[str, asyncio.Future] = collections.OrderedDict()
        self._max_kept = max_kept

    def claim(self, key: str) -> tuple[bool, asyncio.Future]:
        """(True, the future to settle) for the row that leads `key`; (False, the leader's future) for one
        that repeats it."""
        known = self._answers.get(key)
        if known is not None and not (known.done() and (known.cancelled() or known.exception() is not None)):
            self._answers.move_to_end(key)
            return False, known
        future = asyncio.get_running_loop().create_future()
        self._answers[key] = future
        while len(self._answers) > self._max_kept:
            oldest = next(iter(self._answers))
            if not self._answers[oldest].done():
                break  # every kept answer is still awaited: keep them
            del self._answers[oldest]
        return True, future


def copied(answer: tuple[dict | None, dict | None], response_id: str) -> tuple[dict | None, dict | None]:
    """A repeating row's record: the leader's answer, with the row's own response `id`."""
    response, error = copy.deepcopy(answer)
    if response is not None:
        response["id"] = response_id
    return response, error


async def repeated(key: str, body: dict[str, Any], shared: asyncio.Future,
                   counts: Any) -> tuple[dict | None, dict | None]:
    """A row whose request an earlier row of the job asked: that row's answer, its own response id;
    `counts` (the shard's) counts it. A 500 (a request that kills every engine it reaches, run alone
    and given up on) is counted as this row's too: retried and failed, as each such row was before
    repeats were merged, so the summary's failed rows are the rows recorded as 500s."""
    response, error = copied(await asyncio.shield(shared), completion_id(key, body))
    counts.shared += 1
    counts.reused(response)
    if error is not None and (error.get("code") or 0) >= 500:
        counts.retried += 1
        counts.failed += 1
    return response, error


def _store_keys(job: EngineJob, bodies: list[Any]) -> list[str | None]:
    """Each body's answer store key; None for a row whose answer its body does not decide (or no body)."""
    default_temperature = job.config.defaults.temperature
    return [job.store.key(b) if isinstance(b, dict) and share_key(b, default_temperature) is not None else None
            for b in bodies]


def answers_from_store(job: EngineJob, keys: list[str], bodies: list[Any],
                       counts: Any) -> tuple[list[tuple[dict, None] | None], list[str | None]]:
    """Each row's answer from the job's answer store, or None (not there, or no store), and each row's
    store key (for `store_new_answers`: computed once); `counts` (the shard's) counts them. Blocking:
    run it in a thread."""
    if job.store is None:
        return [None] * len(bodies), [None] * len(bodies)
    store_keys = _store_keys(job, bodies)
    try:
        found = job.store.lookup({k for k in store_keys if k})
    except Exception as exc:  # noqa: BLE001 - an unreadable store answers nothing; the engine answers
        log.warning("the answer store could not be read (%s: %s); the engine answers these rows",
                    type(exc).__name__, exc)
        found = {}
    answers: list[tuple[dict, None] | None] = []
    for key, body, store_key in zip(keys, bodies, store_keys):
        if store_key in found:
            response, _ = copied((found[store_key], None), completion_id(key, body))
            counts.from_store += 1
            counts.reused(response)
            answers.append((response, None))
        else:
            answers.append(None)
    return answers, store_keys


def store_new_answers(job: EngineJob, store_keys: list[str | None], bodies: list[Any], stored: list[Any],
                      answers: list[tuple[dict | None, dict | None]], responses: pa.Array) -> None:
    """The engine's new answers to greedy and seeded rows into the answer store, never an error record;
    `responses`: the rows' `response` column (records.result_arrays). Blocking: run it in a thread."""
    if job.store is None or job.store.mode != "read_write":
        return
    rows: dict[str, int] = {}
    recorded = responses.is_valid().to_pylist()  # a response Arrow could not hold is recorded as an error
    for row, (store_key, was_stored, (response, error)) in enumerate(zip(store_keys, stored, answers)):
        if store_key is not None and was_stored is None and response is not None and error is None and recorded[row]:
            rows.setdefault(store_key, row)
    try:
        job.store.write(list(rows), [bodies[row] for row in rows.values()],
                        responses.take(pa.array(list(rows.values()), pa.int64())))
    except Exception as exc:  # noqa: BLE001 - the records are written; the store only saves later work
        log.warning("the answer store could not be written (%s: %s); the records are not affected",
                    type(exc).__name__, exc)
