"""A shard's prompts tokenized in batches ahead of their requests, handed to vLLM's renderer on demand.

vLLM's renderer tokenizes each request's prompt on its own, as one call of the tokenizer in a thread
pool: for short requests the hop to the thread and back, per row, costs more than the tokenizing
itself and competes with the event loop for the GIL. A batch encodes thousands of prompts in one
call of the fast tokenizer (in Rust, outside the GIL).

The answer stays vLLM's own: a prompt is looked up by exactly what the renderer would hand the
tokenizer, its text and the keyword arguments (truncation, max_length, special tokens) its request's
parameters give, and the renderer's own code builds the prompt from the ids. A prompt not found (a
retry on a new engine, a prompt whose text the renderer changes first, anything this module did not
foresee) is tokenized by the renderer as before.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)

Key = tuple[str, tuple[tuple[str, Any], ...]]


def encode_key(kwargs: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(kwargs.items()))


class PromptTokens:
    """Token ids of prompts tokenized ahead, each taken once by the request it was made for."""

    def __init__(self, renderer: Any, model_config: Any) -> None:
        self._renderer = renderer
        self._model_config = model_config
        self._ids: dict[Key, list[list[int]]] = defaultdict(list)
        self.taken = 0  # prompts the renderer took from a batch
        self.missed = 0  # prompts the renderer tokenized itself
        # PRIVATE INTERNAL: the renderer's one-prompt tokenizer is where a prompt tokenized ahead is taken;
        # vLLM 0.32 has no public hook there. tests/unit/test_records.py fails if the pinned vLLM changes it.
        self._tokenize_one: Callable[..., Any] = renderer._tokenize_prompt_async  # private-internal: vLLM renderer _tokenize_prompt_async
        renderer._tokenize_prompt_async = self._tokenize_prompt_async  # private-internal: vLLM renderer _tokenize_prompt_async

    def add(self, requests: Iterable[Any]) -> list[Key]:
        """Tokenize the text prompts of validated requests, grouped by their encode arguments, in one
        tokenizer call per group; returns the keys added (for `discard`). Best effort: a request this
        cannot foresee is left to the renderer."""
        texts: dict[tuple[tuple[str, Any], ...], list[str]] = defaultdict(list)
        for request in requests:
            try:
                prompts = self._plain_text_prompts(request)
                if not prompts:
                    continue
                params = request.build_tok_params(self._model_config)
                if params.return_token_offsets:
                    continue  # the renderer asks the tokenizer for offsets too
                texts[encode_key(params.get_encode_kwargs())].extend(prompts)
            except Exception:  # noqa: BLE001 - the renderer will meet (and report) whatever this is
                continue
        added: list[Key] = []
        tokenizer = self._renderer.get_tokenizer()
        for kwargs, group in texts.items():
            try:
                encoded = tokenizer(group, **dict(kwargs))["input_ids"]
            except Exception:  # noqa: BLE001 - then each prompt is tokenized alone, as before
                log.debug("batch tokenization failed; the renderer tokenizes these prompts", exc_info=True)
                continue
            for text, ids in zip(group, encoded):
                self._ids[(text, kwargs)].append(ids)
                added.append((text, kwargs))
        return added

    def discard(self, keys: Iterable[Key]) -> None:
        """Forget what `add` made and no request took (its request failed before tokenizing)."""
        for key in keys:
            self._ids.pop(key, None)

    @staticmethod
    def _plain_text_prompts(request: Any) -> list[str]:
        if request.suffix is not None or request.prompt_embeds is not None:
            return []
        prompt = request.prompt
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return list(prompt)
        return []

    async def _tokenize_prompt_async(self, prompt: Any, params: Any) -> Any:
        """The renderer's `_tokenize_prompt_async`, answered from the batch when the prompt is there."""
        if not self._renderer._wants_offsets(prompt, params):
            key = (prompt["prompt"], encode_key(params.get_encode_kwargs()))
            ready = self._ids.get(key)
            if ready:
                ids = ready.pop()
                if not ready:
                    del self._ids[key]
                self.taken += 1
                return self._renderer._build_tokens_prompt(ids, prompt)
        self.missed += 1
        return await self._tokenize_one(prompt, params)
