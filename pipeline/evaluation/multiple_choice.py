"""Multiple choice by log-likelihood, through the endpoint's own echo + logprobs with no new tokens.

A row with a prompt (the context) and a list of choices becomes ONE /v1/completions request whose
`prompt` is the list [context + choice for each choice], with `echo: true`, `logprobs: 0` and
`max_tokens: 0`. The endpoint answers a list prompt with one choice per prompt, in order, so the
record keeps one row per input row and its `response` is exactly that answer: `choices[i].text` is
context + choice i, and `choices[i].logprobs` covers every token of it (position 0, the first prompt
token, has a null logprob).

Which tokens belong to the continuation (the rule): lm-evaluation-harness first moves the context's
trailing whitespace to the continuation ("Answer: " + "Paris" is scored as "Answer:" + " Paris"), then
gives the continuation every token of context + continuation after the context's own tokens. From the
endpoint's answer alone the same split is found by text offsets: the continuation is the choice plus
the context's trailing whitespace, C characters; the echoed `tokens` are the prompt's tokens as text
and `text_offset` their cumulative offsets, so the echoed prompt ends at `text_offset[-1] +
len(tokens[-1])` and the continuation starts C characters before that end (measured from the end,
because position 0 may be a special token such as `<s>` that is not in the prompt text). Its tokens are
those that END after that start, so a token straddling the boundary (a context's last characters merged
with the choice's first) belongs to the continuation, where the harness's tokenizer split would have
cut inside it. The rule is checked on every choice: the continuation's token texts must end with it,
and it must not reach position 0; otherwise (a decoding that does not reproduce the text) the row is not
scored (null). tests/parity/test_loglikelihood_parity.py compares the token counts with the harness's
tokenizer split and the sums with the reference server's answers.

Log-likelihood of a choice = the sum of its tokens' logprobs (−inf is clamped to −9999.0 by the
endpoint); the normalised variant divides by the choice's length in characters without its leading
whitespace. That is lm-evaluation-harness's `acc_norm` in either layout: the harness asks for context +
target delimiter (a space by default) + choice and divides by the length of the choice alone, so " 41"
(the delimiter carried by the choice) and "41" after a context ending in a space both count 2. A choice
that is all whitespace counts its whole length. Ties go to the first choice.
"""

from __future__ import annotations

from typing import Any

from pipeline.protocol import BodyError, RequestBuilder
from pipeline.config.scoring import MultipleChoice


class LoglikelihoodRequests:
    """A RequestBuilder whose bodies ask for the log-likelihood of each of the row's choices."""

    def __init__(self, builder: RequestBuilder, scorer: MultipleChoice) -> None:
        self._builder = builder
        self._column = scorer.choices_column
        self.served_name = builder.served_name

    def body(self, row: dict[str, Any], served_name: str | None = None) -> dict[str, Any]:
        body = self._builder.body(row, served_name)
        context, choices = body.get("prompt"), row.get(self._column)
        if not isinstance(context, str) or not context:
            raise BodyError("multiple choice needs the row's prompt as one non-empty string (the context)", "prompt")
        if not isinstance(choices, (list, tuple)) or not choices or \
                not all(isinstance(c, str) and c for c in choices):
            raise BodyError(f"column `{self._column}` must list the row's choices as non-empty strings, "
                            f"got {choices!r}", self._column)
        body.update(prompt=[context + choice for choice in choices], echo=True, max_tokens=0, logprobs=0, n=1)
        return body


def continuation_logprob(logprobs: dict[str, Any], text: str, choice: str) -> tuple[float, int] | None:
    """(sum of logprobs, token count) of `choice` at the end of the echoed prompt `text`, with the context's
    trailing whitespace, by the rule in the module docstring; None when the echoed tokens do not
    reproduce it."""
    tokens, offsets, values = logprobs["tokens"], logprobs["text_offset"], logprobs["token_logprobs"]
    if not tokens or not choice or not text.endswith(choice):
        return None
    context = text[:len(text) - len(choice)]
    continuation = context[len(context.rstrip()):] + choice
    start = offsets[-1] + len(tokens[-1]) - len(continuation)
    first = next((i for i in range(len(tokens)) if offsets[i] + len(tokens[i]) > start), None)
    if first is None or first == 0 or not "".join(tokens[first:]).endswith(continuation):
        return None
    picked = values[first:]
    if any(v is None for v in picked):
        return None
    return float(sum(picked)), len(picked)


def norm_length(choice: str) -> int:
    """The characters `acc_norm` divides a choice's log-likelihood by: the choice without the target
    delimiter (its leading whitespace), as lm-evaluation-harness counts it."""
    return len(choice.lstrip()) or len(choice)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _right_index(reference: Any, choices: list[str]) -> int | None:
    if isinstance(reference, bool):
        return None
    if isinstance(reference, float) and reference.is_integer():  # an index read from a float column
        reference = int(reference)
    if isinstance(reference, int):
        return reference if 0 <= reference < len(choices) else None
    if isinstance(reference, str) and reference in choices:
        return choices.index(reference)
    return None


def choice_score(scorer: MultipleChoice, response: dict[str, Any], choices: list[str], reference: Any) -> dict[str, Any]:
    """The score fields of one answered multiple-choice row (see records.score_type)."""
    name = scorer.output()
    found = [continuation_logprob(c["logprobs"], c["text"], choice) if c.get("logprobs") else None
             for c, choice in zip(response["choices"], choices)]
    score = {name: None, name + "_norm": None, "prediction": None, "prediction_norm": None,
             "choice_logprobs": [None if f is None else f[0] for f in found],
             "choice_tokens": [None if f is None else f[1] for f in found]}
    if len(found) != len(choices) or any(f is None for f in found):
        return score
    totals = [f[0] for f in found]
    score["prediction"] = _argmax(totals)
    score["prediction_norm"] = _argmax([t / norm_length(c) for t, c in zip(totals, choices)])
    right = _right_index(reference, choices)
    if right is not None:
        score[name] = float(score["prediction"] == right)
        score[name + "_norm"] = float(score["prediction_norm"] == right)
    return score
