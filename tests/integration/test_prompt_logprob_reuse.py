"""Log-likelihood requests (echo + logprobs, lm-evaluation-harness's) that share a context read it from
the prefix cache (engine/prompt_logprob_reuse.py): the same numbers as computing each prompt whole.

Contexts of a whole KV block (128 tokens on the CPU engine: the choices part exactly at a block
boundary, so no earlier answer has the cached positions' logprobs and the request is computed again),
of more than two blocks, and shorter than one block; single-token and multi-token continuations.
It covers the private vLLM method the reuse wraps (`LogprobsProcessor._update_prompt_logprobs`: each
cached position's own token set from the prompt): top_logprobs' texts equal those computed whole.
"""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pytest

from tests.poison import POISON_ENGINE

pytestmark = pytest.mark.engine

CONTEXTS = {"one-block": 128, "two-blocks-and-more": 300, "under-a-block": 40}
CONTINUATIONS = {"single": [[11], [12], [13], [14]], "multi": [[11, 20, 21], [12, 22], [13], [14, 23, 24, 25]]}
BODY_INPUT = {"body_column": "body", "id_column": "id"}


def requests() -> pa.Table:
    rng = random.Random(7)
    ids, bodies = [], []
    for name, length in CONTEXTS.items():
        context = [rng.randrange(3, 870) for _ in range(length)]
        for kind, continuations in CONTINUATIONS.items():
            for index, continuation in enumerate(continuations):
                ids.append(f"{name}:{kind}:{index}")
                bodies.append(json.dumps({"prompt": context + continuation, "echo": True, "logprobs": 1,
                                          "max_tokens": 1, "temperature": 0, "seed": 1234}))
    return pa.table({"id": ids, "body": bodies})


def loglikelihood(response: dict, continuation: list[int]) -> tuple[float, bool]:
    """As lm-evaluation-harness's local-completions reads an answer: the continuation's logprobs summed,
    and whether each continuation token was the top one."""
    logprobs = response["choices"][0]["logprobs"]
    span = slice(-1 - len(continuation), -1)  # the echoed prompt, then the one generated token
    tops = logprobs["top_logprobs"][span]
    greedy = all(max(top, key=top.get) == token for top, token in zip(tops, logprobs["tokens"][span]))
    return sum(logprobs["token_logprobs"][span]), greedy


@pytest.fixture(scope="module")
def whole(run_job):
    """The requests answered with the reuse off: each prompt computed whole, as vLLM does."""
    return run_job(requests(), input=BODY_INPUT, output={"rows_per_file": 1000}, answer_store={"mode": "off"},
                   engine={"max_model_len": 1024, "prompt_logprob_reuse": False})


def difference(mine: dict, theirs: dict, key: str) -> float:
    """Assert two answers to one request are the same answer; their largest logprob difference."""
    name, kind, index = key.split(":")
    a, b = mine["choices"][0]["logprobs"], theirs["choices"][0]["logprobs"]
    assert a["tokens"] == b["tokens"] and a["text_offset"] == b["text_offset"], key
    assert [sorted(t) if t else t for t in a["top_logprobs"]] == [sorted(t) if t else t for t in b["top_logprobs"]]
    worst = 0.0
    for x, y in zip(a["token_logprobs"], b["token_logprobs"], strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            worst = max(worst, abs(x - y))
    continuation = CONTINUATIONS[kind][int(index)]
    (ll_a, greedy_a), (ll_b, greedy_b) = loglikelihood(mine, continuation), loglikelihood(theirs, continuation)
    assert abs(ll_a - ll_b) <= 1e-3 and greedy_a == greedy_b, key
    assert mine["usage"] == theirs["usage"]
    return worst


def test_a_shared_context_is_read_from_the_cache_with_the_same_numbers(run_job, whole):
    table = requests()
    reused = run_job(table, input=BODY_INPUT, output={"rows_per_file": 1000}, answer_store={"mode": "off"},
                     engine={"max_model_len": 1024})
    assert whole.summary.prompt_tokens_cached == 0
    # the longest context's 2 whole blocks are read from the cache by most of its 8 requests (those
    # scheduled in the same engine step as the first compute them too); the one-block context is
    # cached too, but its first continuation tokens start the second block: no earlier answer has their
    # logprob, and those requests are computed whole
    assert reused.summary.prompt_tokens_cached >= 5 * 256, reused.summary.prompt_tokens_cached
    worst = max(difference(reused.response(key), whole.response(key), key) for key in table.column("id").to_pylist())
    print(f"\nprompt tokens read from the cache: {reused.summary.prompt_tokens_cached} of "
          f"{reused.summary.prompt_tokens}; largest logprob difference {worst:.2e}")
    assert worst <= 1e-3


@pytest.mark.slow
def test_a_poison_document_costs_its_requests_only_and_the_others_keep_their_numbers(run_job, whole):
    """A document whose requests kill the engine (tests/poison.py: seeded, longer than one prefill chunk)
    among the others (unseeded: the same answers at temperature 0): its requests are 500s after the
    engine restarts they cost, every other request is answered once, with the numbers of the reuse off."""
    rng = random.Random(11)
    poison_context = [rng.randrange(3, 870) for _ in range(200)]
    rows = [{"id": key, "body": json.dumps({k: v for k, v in json.loads(body).items() if k != "seed"})}
            for key, body in zip(requests().column("id").to_pylist(), requests().column("body").to_pylist())]
    poison = [{"id": f"poison:{index}", "body": json.dumps({"prompt": poison_context + continuation, "echo": True,
                                                             "logprobs": 1, "max_tokens": 1, "seed": 7})}
              for index, continuation in enumerate(CONTINUATIONS["single"])]
    rows[12:12] = poison  # between the documents: a shard's rows go into the engine together
    out = run_job(pa.Table.from_pylist(rows), input=BODY_INPUT, output={"rows_per_file": 1000},
                  answer_store={"mode": "off"}, engine={**POISON_ENGINE, "max_model_len": 1024})
    assert out.summary.rows_out == len(rows) and len(out.rows) == len(rows)  # one record per request
    assert {key for key, row in out.rows.items() if row["error"] is not None} == {r["id"] for r in poison}
    assert all(out.error(r["id"])["code"] == 500 for r in poison)
    assert out.summary.engine_restarts >= 1 and out.summary.rows_failed == len(poison)
    assert out.summary.prompt_tokens_cached > 0
    worst = max(difference(out.response(key), whole.response(key), key) for key in requests().column("id").to_pylist())
    print(f"\na poison document of {len(poison)} requests: {out.summary.engine_restarts} engine restarts, "
          f"{out.summary.rows_retried} rows tried again, the other {len(rows) - len(poison)} requests' largest "
          f"logprob difference from the reuse off {worst:.2e}")
