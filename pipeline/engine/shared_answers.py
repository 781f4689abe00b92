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
"""

from __future__ import annotations

import asyncio
import collections
import copy
import hashlib
import json
from typing import Any

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
