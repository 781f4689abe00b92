"""Prompt logprobs over a prefix the engine computed before: each shared context computed once.

A request with `echo` and `logprobs` (every log-likelihood request lm-evaluation-harness sends) asks
for a logprob at every prompt position. vLLM computes such a prompt whole, every time: it turns
prefix-cache reads off for requests with prompt logprobs (`SamplingParams.skip_reading_prefix_cache`),
because it returns prompt logprobs only for the positions it computes. A multiple-choice document's
requests are one context followed by each choice, so the context (few-shot examples: hundreds to
thousands of tokens) is computed once per choice.

Here such requests read the prefix cache. vLLM then computes only the positions after the blocks it
found cached (`num_cached_tokens`, a whole number of KV blocks) and leaves the logprobs of the tokens
before them unset. Those are taken from an earlier answer of the same engine whose prompt has the
same tokens up to and including that position: the logprob of token p, its rank and the top
logprobs there depend only on tokens 0..p, so that answer's entries are this prompt's, computed by
the same engine from the same tokens (equal to a whole computation up to the float rounding of
another batch: within 1e-6 on the CPU engine, docs/evaluation.md). When no earlier answer covers the
cached positions (the cached blocks came from a request this memory no longer holds, or the prompts
part exactly at a block boundary, so no earlier prompt has this prompt's next token there) the
request is answered again with cache reads off, as vLLM would have answered it.

`PromptLogprobMemory` keeps the last MAX_ANSWERS answers' prompt logprobs of one engine, found by a
hash of their first `k * block_size + 1` tokens (and the adapter), as the engine's prefix cache finds
blocks. `engine.prompt_logprob_reuse: false` turns all of it off.
"""

from __future__ import annotations

import collections
import hashlib
from array import array
from typing import Any

# An engine's recent answers whose prompt logprobs later prompts may take: at least 4 times the rows in
# flight (engine.rows_in_flight). A document's later choices wait for its first, then queue behind the
# rows in flight: the first's answer must still be here when theirs come (with 325 answers and 684 rows
# in flight, most were not, and the choices were computed again whole: 5.9x the prompt tokens).
MAX_ANSWERS = 4096


def _prefix_keys(adapter: str | None, tokens: Any, lengths: range) -> list[bytes]:
    """The keys of `tokens`' first n tokens for each n in `lengths` (ascending), hashed once through."""
    data = array("q", tokens).tobytes()
    running = hashlib.blake2b((adapter or "").encode() + b"\0", digest_size=16)
    keys, done = [], 0
    for length in lengths:
        running.update(data[done * 8:length * 8])
        done = length
        keys.append(running.copy().digest())
    return keys


class PromptLogprobMemory:
    """One engine's recent prompt logprobs, by token prefix (module docstring)."""

    def __init__(self, block_size: int, max_answers: int = MAX_ANSWERS) -> None:
        self.block_size = block_size
        self._max_answers = max_answers
        self._answers: collections.OrderedDict[int, tuple[list[bytes], Any]] = collections.OrderedDict()
        self._by_prefix: dict[bytes, int] = {}
        self._next = 0

    def fill(self, output: Any) -> bool:
        """Set the prompt logprobs of the positions `output` (a vLLM RequestOutput) read from the
        prefix cache, from an earlier answer with the same tokens up to the last of them. False when
        none has them: the request must be computed whole."""
        cached = output.num_cached_tokens or 0
        logprobs = output.prompt_logprobs
        if cached <= 0 or logprobs is None:
            return True
        if cached % self.block_size or cached >= len(output.prompt_token_ids):
            return False
        (key,) = _prefix_keys(_adapter(output), output.prompt_token_ids, range(cached + 1, cached + 2))
        found = self._by_prefix.get(key)
        if found is None or found not in self._answers:
            return False
        donor = self._answers[found][1]
        self._answers.move_to_end(found)
        for position in range(1, cached + 1):  # the tokens whose logprobs came from cached positions
            logprobs[position] = donor[position]
        return True

    def add(self, output: Any) -> None:
        """Remember `output`'s prompt logprobs (all set: computed, or filled by `fill`)."""
        tokens, logprobs = output.prompt_token_ids, output.prompt_logprobs
        if logprobs is None or tokens is None or len(tokens) < 2:
            return
        adapter = _adapter(output)
        keys = _prefix_keys(adapter, tokens, range(self.block_size + 1, len(tokens) + 1, self.block_size))
        number, self._next = self._next, self._next + 1
        self._answers[number] = (keys, logprobs)
        for key in keys:
            self._by_prefix[key] = number  # the newest answer with this prefix
        while len(self._answers) > self._max_answers:
            _, (old_keys, _) = self._answers.popitem(last=False)
            for key in old_keys:
                if self._by_prefix.get(key) not in self._answers:
                    self._by_prefix.pop(key, None)


def _adapter(output: Any) -> str | None:
    lora = getattr(output, "lora_request", None)
    return getattr(lora, "lora_name", None)


_installed = False


def install() -> None:
    """Make the unset positions harmless in this process (once). vLLM leaves the prompt logprobs of
    cached positions as uninitialized memory (`LogprobsTensors.empty_cpu`) and decodes them before
    `fill` replaces them: an id there outside the vocabulary is decoded as token 0 instead, and each
    position's own token (the first column: the prompt's next token, which vLLM reads back as the
    context that corrects a partial UTF-8 token's text at the positions after) is set from the prompt,
    so the computed positions' texts are those of the prompt computed whole."""
    global _installed
    if _installed:
        return
    import torch
    from vllm.logprobs import Logprob
    from vllm.v1.engine import logprobs

    processor = logprobs.LogprobsProcessor
    new_request = processor.from_new_request.__func__
    update = processor._update_prompt_logprobs  # private-internal: vLLM LogprobsProcessor._update_prompt_logprobs
    sizes: dict[int, int] = {}

    update_from_output = processor.update_from_output
    unset = Logprob(logprob=float("nan"), rank=None, decoded_token=None)  # `fill` replaces every one

    def from_new_request(cls: type, tokenizer: Any, request: Any) -> Any:
        made = new_request(cls, tokenizer, request)
        made.prompt_ids_for_reuse = request.prompt_token_ids
        return made

    def update_from_output_(self: Any, output: Any) -> None:
        stats = getattr(output, "prefill_stats", None)
        if stats is not None:  # the positions vLLM did not compute: read from its prefix cache
            self.cached_for_reuse = stats.num_cached_tokens
        update_from_output(self, output)

    def _update_prompt_logprobs(self: Any, tensors: Any) -> None:
        token_ids = tensors[0]
        prompt = getattr(self, "prompt_ids_for_reuse", None)
        if prompt is None or len(prompt) - 1 != token_ids.shape[0]:
            update(self, tensors)
            return
        token_ids[:, 0] = torch.tensor(prompt[1:], dtype=token_ids.dtype)
        if self.tokenizer is not None:
            size = sizes.get(id(self.tokenizer))
            if size is None:
                size = sizes[id(self.tokenizer)] = len(self.tokenizer)
            token_ids.masked_fill_((token_ids < 0) | (token_ids >= size), 0)
        cached = min(getattr(self, "cached_for_reuse", 0) or 0, token_ids.shape[0])
        if cached:  # not decoded: their own token alone (the context later positions read), to be filled
            self.prompt_logprobs.extend({token: unset} for token in prompt[1:cached + 1])
            tensors = type(tensors)(*(t[cached:] for t in tensors[:3]))
        update(self, tensors)

    processor.from_new_request = classmethod(from_new_request)
    processor.update_from_output = update_from_output_
    processor._update_prompt_logprobs = _update_prompt_logprobs  # private-internal: vLLM LogprobsProcessor._update_prompt_logprobs
    _installed = True
