"""Each token's text in a logprobs answer, decoded once per engine process instead of once per position.

vLLM's output processor turns every logprob's token id into text one id at a time
(`convert_ids_list_to_tokens`: a `tokenizer.decode([id])` each, through a pool of tokenizer copies),
and, for a token whose text ends in U+FFFD (a byte-fallback piece of a multi-byte character), decodes
it again with up to four preceding tokens (`LogprobsProcessor._correct_decoded_token`). A request
with `echo` and `logprobs` asks that of every prompt token and its top entries: the requests an
evaluation sends (lm-evaluation-harness's log-likelihoods) spent 75% of the engine actor's time there,
decoding the same few-shot prompt tokens again for every choice (docs/lm-evaluation-harness.md#speed).

Both are functions of their arguments and the tokenizer alone, so `install()` wraps them in caches
keyed by the tokenizer: a token id's text is decoded once (bounded by the vocabulary), a corrected
token once per (id, context) up to CORRECTED_MAX entries. Every answer is unchanged, character for
character (tests/unit/test_token_text.py compares them with vLLM's own functions).
"""

from __future__ import annotations

import functools
from typing import Any

CORRECTED_MAX = 1 << 16  # (token, context) pairs kept per tokenizer; a vocabulary bounds the plain texts


class _Texts:
    """One tokenizer's decoded tokens."""

    def __init__(self) -> None:
        self.plain: dict[int, str] = {}
        self.corrected: dict[tuple[int, tuple[int, ...]], str] = {}


def _texts(tokenizer: Any, cache: dict[int, tuple[Any, _Texts]]) -> _Texts:
    entry = cache.get(id(tokenizer))
    if entry is None or entry[0] is not tokenizer:  # the tokenizer is kept, so its id is never reused
        entry = cache[id(tokenizer)] = (tokenizer, _Texts())
    return entry[1]


@functools.cache
def install() -> None:
    """Wrap vLLM's two decoders in this process (once; idempotent)."""
    from vllm.v1.engine import logprobs

    cache: dict[int, tuple[Any, _Texts]] = {}
    convert = logprobs.convert_ids_list_to_tokens
    correct = logprobs.LogprobsProcessor._correct_decoded_token

    def convert_ids_list_to_tokens(tokenizer: Any, token_ids: list[int]) -> list[str]:
        plain = _texts(tokenizer, cache).plain
        new = [i for i in dict.fromkeys(token_ids) if i not in plain]
        if new:  # each id is decoded on its own, so a batch of the new ones decodes the same
            plain.update(zip(new, convert(tokenizer, new)))
        return [plain[i] for i in token_ids]

    def _correct_decoded_token(self: Any, token_id: int, context_token_ids: list[int]) -> str:
        corrected = _texts(self.tokenizer, cache).corrected
        key = (token_id, tuple(context_token_ids[-4:]))  # vLLM reads at most the last four
        text = corrected.get(key)
        if text is None:
            text = correct(self, token_id, context_token_ids)
            if len(corrected) < CORRECTED_MAX:
                corrected[key] = text
        return text

    logprobs.convert_ids_list_to_tokens = convert_ids_list_to_tokens
    logprobs.LogprobsProcessor._correct_decoded_token = _correct_decoded_token
