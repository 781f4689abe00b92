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


def test_a_shared_context_is_read_from_the_cache_with_the_same_numbers(run_job):
    table = requests()
    reused = run_job(table, input=BODY_INPUT, output={"rows_per_file": 1000}, answer_store={"mode": "off"},
                     engine={"max_model_len": 1024})
    whole = run_job(table, input=BODY_INPUT, output={"rows_per_file": 1000}, answer_store={"mode": "off"},
                    engine={"max_model_len": 1024, "prompt_logprob_reuse": False})
    assert whole.summary.prompt_tokens_cached == 0
    # the longest context's 2 whole blocks are read from the cache by most of its 8 requests (those
    # scheduled in the same engine step as the first compute them too); the one-block context is
    # cached too, but its first continuation tokens start the second block: no earlier answer has their
    # logprob, and those requests are computed whole
    assert reused.summary.prompt_tokens_cached >= 5 * 256, reused.summary.prompt_tokens_cached
    worst = 0.0
    for key in table.column("id").to_pylist():
        name, kind, index = key.split(":")
        mine, theirs = reused.response(key), whole.response(key)
        a, b = mine["choices"][0]["logprobs"], theirs["choices"][0]["logprobs"]
        assert a["tokens"] == b["tokens"] and a["text_offset"] == b["text_offset"]
        assert [sorted(t) if t else t for t in a["top_logprobs"]] == [sorted(t) if t else t for t in b["top_logprobs"]]
        for x, y in zip(a["token_logprobs"], b["token_logprobs"], strict=True):
            assert (x is None) == (y is None)
            if x is not None:
                worst = max(worst, abs(x - y))
        continuation = CONTINUATIONS[kind][int(index)]
        (ll_a, greedy_a), (ll_b, greedy_b) = loglikelihood(mine, continuation), loglikelihood(theirs, continuation)
        assert abs(ll_a - ll_b) <= 1e-3 and greedy_a == greedy_b, key
        assert mine["usage"] == theirs["usage"]
    print(f"\nprompt tokens read from the cache: {reused.summary.prompt_tokens_cached} of "
          f"{reused.summary.prompt_tokens}; largest logprob difference {worst:.2e}")
    assert worst <= 1e-3
