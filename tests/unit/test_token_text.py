"""engine/token_text.py: vLLM's per-token decoding, cached, gives what vLLM's own functions give.

The tiny model's tokenizer falls back to bytes for letters outside its small vocabulary (`ï`, `日`,
`ё` are several byte tokens each, and each alone decodes to U+FFFD), so both of vLLM's paths run:
the plain text of an id, and the text corrected from the tokens before it.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TEXT = "naïve café 日本語 ёж, a ‘quoted’ word, 🙂 and ẞ"  # 2-, 3- and 4-byte letters


@pytest.fixture(scope="module")
def vllm_parts():
    from vllm.tokenizers import get_tokenizer
    from vllm.v1.engine import logprobs

    from pipeline.engine import token_text
    from pipeline.models.tiny_model import resolve_model

    original = (logprobs.convert_ids_list_to_tokens, logprobs.LogprobsProcessor._correct_decoded_token)
    token_text.install.cache_clear()
    token_text.install()
    yield get_tokenizer(resolve_model("builtin:tiny-llama")), logprobs, original
    logprobs.convert_ids_list_to_tokens, logprobs.LogprobsProcessor._correct_decoded_token = original
    token_text.install.cache_clear()


class _Processor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer


def test_every_token_of_the_vocabulary_decodes_as_vllm_decodes_it(vllm_parts):
    tokenizer, logprobs, (convert, _) = vllm_parts
    assert logprobs.convert_ids_list_to_tokens is not convert  # installed
    ids = list(range(len(tokenizer)))
    # out of order, repeated, twice: the second call reads the cache only
    mixed = ids[::-1] + ids[::3] + [5, 5, 5]
    assert logprobs.convert_ids_list_to_tokens(tokenizer, mixed) == convert(tokenizer, mixed)
    assert logprobs.convert_ids_list_to_tokens(tokenizer, mixed) == convert(tokenizer, mixed)
    assert logprobs.convert_ids_list_to_tokens(tokenizer, []) == []


def test_byte_fallback_tokens_are_corrected_as_vllm_corrects_them(vllm_parts):
    tokenizer, logprobs, (_, correct) = vllm_parts
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    partial = [i for i, t in enumerate(ids) if tokenizer.decode([t]).endswith("�")]
    assert len(partial) >= 10, "the text must exercise the byte-fallback path"
    processor, checked = _Processor(tokenizer), 0
    for _ in range(2):  # the second time from the cache
        for i in range(len(ids)):
            # every length of context vLLM may pass (it reads the last four): 0 to 4, and all before
            for context in [ids[max(0, i - n):i] for n in range(5)] + [ids[:i]]:
                cached = logprobs.LogprobsProcessor._correct_decoded_token(processor, ids[i], list(context))
                assert cached == correct(processor, ids[i], list(context)), (i, context)
                checked += 1
    # and the texts put together are the text (what vLLM relies on for an echoed prompt's tokens)
    texts = [logprobs.LogprobsProcessor._correct_decoded_token(processor, t, ids[max(0, i - 4):i])
             if i in partial else logprobs.convert_ids_list_to_tokens(tokenizer, [t])[0]
             for i, t in enumerate(ids)]
    assert "".join(texts) == tokenizer.decode(ids)
    assert checked == 2 * 6 * len(ids)


def test_a_second_tokenizer_has_its_own_texts(vllm_parts):
    from transformers import AutoTokenizer

    from pipeline.models.tiny_model import resolve_model

    tokenizer, logprobs, (convert, _) = vllm_parts
    other = AutoTokenizer.from_pretrained(resolve_model("builtin:tiny-llama"))
    other.add_tokens(["<extra-token>"])
    new_id = len(other) - 1  # a token only `other` has: the first tokenizer decodes it to ""
    assert logprobs.convert_ids_list_to_tokens(other, [new_id, 5]) == convert(other, [new_id, 5]) == ["<extra-token>", "#"]
    assert logprobs.convert_ids_list_to_tokens(tokenizer, [new_id, 5]) == convert(tokenizer, [new_id, 5]) == ["", "#"]
