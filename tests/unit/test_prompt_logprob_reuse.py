"""Which earlier answer gives a prompt the logprobs of the positions it read from the prefix cache
(engine/prompt_logprob_reuse.py), without an engine: vLLM's RequestOutput as far as the memory reads it."""

from __future__ import annotations

from types import SimpleNamespace

from pipeline.engine.prompt_logprob_reuse import PromptLogprobMemory

BLOCK = 4


def output(tokens: list[int], cached: int = 0, adapter: str | None = None, tag: str = "") -> SimpleNamespace:
    """An answer whose position p holds {token p: ("<tag>", token p)}, or None where it was read from the cache."""
    logprobs = [None] + [None if p <= cached else {tokens[p]: (tag, tokens[p])} for p in range(1, len(tokens))]
    lora = SimpleNamespace(lora_name=adapter) if adapter else None
    return SimpleNamespace(prompt_token_ids=tokens, prompt_logprobs=logprobs, num_cached_tokens=cached,
                           lora_request=lora)


def test_cached_positions_come_from_an_answer_with_the_same_tokens_up_to_them():
    memory = PromptLogprobMemory(BLOCK)
    first = output([1, 2, 3, 4, 5, 6, 7, 8, 9, 50], tag="first")
    memory.add(first)
    later = output([1, 2, 3, 4, 5, 6, 7, 8, 9, 60], cached=8)  # two blocks read; tokens 1..8 unset
    assert memory.fill(later)
    assert later.prompt_logprobs[1:9] == first.prompt_logprobs[1:9]
    assert later.prompt_logprobs[9] == {60: ("", 60)}  # computed: its own
    assert memory.fill(output([1, 2, 3], cached=0))  # nothing read: nothing to fill


def test_no_earlier_answer_has_the_token_after_the_cached_blocks_when_prompts_part_at_a_block_boundary():
    memory = PromptLogprobMemory(BLOCK)
    memory.add(output([1, 2, 3, 4, 5, 6, 7, 8, 50]))
    # the same 8 tokens, then another: token 8's logprob (from position 7) is not in the first answer
    assert not memory.fill(output([1, 2, 3, 4, 5, 6, 7, 8, 60], cached=8))
    assert memory.fill(output([1, 2, 3, 4, 5, 6, 7, 8, 60], cached=4))  # one block: token 4 is the same
    assert not memory.fill(output([1, 2, 3, 4, 5, 6, 7, 8, 60], cached=6))  # not whole blocks: not vLLM's


def test_an_adapter_takes_logprobs_only_from_its_own_answers():
    memory = PromptLogprobMemory(BLOCK)
    memory.add(output([1, 2, 3, 4, 5, 6], tag="base"))
    assert not memory.fill(output([1, 2, 3, 4, 5, 7], cached=4, adapter="tuned"))
    memory.add(output([1, 2, 3, 4, 5, 6], adapter="tuned", tag="tuned"))
    again = output([1, 2, 3, 4, 5, 7], cached=4, adapter="tuned")
    assert memory.fill(again) and again.prompt_logprobs[2] == {3: ("tuned", 3)}


def test_the_oldest_answers_are_forgotten_and_only_theirs():
    memory = PromptLogprobMemory(BLOCK, max_answers=2)
    memory.add(output([1, 2, 3, 4, 5, 6], tag="a"))
    memory.add(output([9, 9, 9, 9, 9, 9], tag="b"))
    memory.add(output([1, 2, 3, 4, 5, 8], tag="c"))  # the newest with prefix 1..5: c
    memory.add(output([7, 7, 7, 7, 7, 7], tag="d"))  # a and b are forgotten
    later = output([1, 2, 3, 4, 5, 0], cached=4)
    assert memory.fill(later) and later.prompt_logprobs[1] == {2: ("c", 2)}
    assert not memory.fill(output([9, 9, 9, 9, 9, 0], cached=4))
