"""Scorers of generated text: exact match, contains, numeric, each after an optional `extract` regex.

A scorer sees the first choice's `text` and the row's reference (a string, a number, or a list of
acceptable answers: right when any one is). It returns 1.0 or 0.0; the row's missing reference is
handled by the caller (null, not wrong).
"""

from __future__ import annotations

import math
import re
import string
from typing import Any, Callable

from pipeline.config.scoring import Contains, ExactMatch, Normalize, Numeric, _TextScorer

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")


def normalize(text: str, how: Normalize) -> str:
    if how.case:
        text = text.lower()
    if how.punctuation:
        text = _PUNCTUATION.sub("", text)
    if how.articles:
        text = _ARTICLES.sub(" ", text)
    if how.whitespace:
        text = " ".join(text.split())
    return text


def extract(text: str, pattern: str | None) -> str:
    """The answer in a completion: the pattern's first group (or whole match), or "" when it does not match."""
    if pattern is None:
        return text
    match = re.search(pattern, text)
    if match is None:
        return ""
    return match.group(1) if match.re.groups else match.group(0)


def number(text: str) -> float | None:
    """The first number in a text (commas between digit groups ignored), or None."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    match = _NUMBER.search(str(text))
    return float(match.group(0).replace(",", "")) if match else None


def references(reference: Any) -> list[Any]:
    return list(reference) if isinstance(reference, (list, tuple)) else [reference]


def _exact(scorer: ExactMatch, answer: str, reference: Any) -> bool:
    return normalize(answer, scorer.normalize) == normalize(str(reference), scorer.normalize)


def _contains(scorer: Contains, answer: str, reference: Any) -> bool:
    return normalize(str(reference), scorer.normalize) in normalize(answer, scorer.normalize)


def _numeric(scorer: Numeric, answer: str, reference: Any) -> bool:
    got, want = number(answer), number(reference)
    if got is None or want is None or not (math.isfinite(got) and math.isfinite(want)):
        return False
    return abs(got - want) <= max(scorer.tolerance, scorer.relative * abs(want))


MATCHERS: dict[type, Callable[[Any, str, Any], bool]] = {ExactMatch: _exact, Contains: _contains, Numeric: _numeric}


def text_score(scorer: _TextScorer, text: str, reference: Any) -> float:
    """1.0 when the extracted answer matches any of the references, else 0.0."""
    answer = extract(text, scorer.extract)
    match = MATCHERS[type(scorer)]
    return 1.0 if any(match(scorer, answer, ref) for ref in references(reference) if ref is not None) else 0.0
