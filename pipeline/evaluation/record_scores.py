"""What the flow calls (see the package docstring): `request_builder` and `with_scores` in the engine
actors, `score_schema` when the output's schema is planned, before Ray starts."""

from __future__ import annotations

import importlib
import logging
from typing import Any, Callable

import pyarrow as pa

from pipeline.io.plan import INPUT_ERROR, ROW_KEY, InputError
from pipeline.protocol import RequestBuilder
from pipeline.io.records import SCORE, score_type
from pipeline.config.scoring import MultipleChoice, PythonScorer, ScoringConfig
from pipeline.evaluation.multiple_choice import LoglikelihoodRequests, choice_score
from pipeline.evaluation.text import extract, text_score

log = logging.getLogger(__name__)


def request_builder(builder: RequestBuilder, scoring: ScoringConfig | None) -> Any:
    """The builder the engine actors use: the job's own, or the multiple-choice expansion of it."""
    choice = scoring.multiple_choice() if scoring is not None else None
    return builder if choice is None else LoglikelihoodRequests(builder, choice)


def _python_function(scorer: PythonScorer) -> Callable[..., Any]:
    """The one place user code is imported, and only for a `python` scorer the config names."""
    try:
        module = importlib.import_module(scorer.module)
    except ImportError as exc:
        raise InputError(f"scorer {scorer.output()}: cannot import module {scorer.module!r} ({exc}); it must be "
                         "on the job's path (PYTHONPATH, or the Ray job's working_dir)") from None
    function = getattr(module, scorer.function, None)
    if not callable(function):
        raise InputError(f"scorer {scorer.output()}: module {scorer.module!r} has no function {scorer.function!r}")
    return function


def _call(function: Callable[..., Any], name: str, answer: str, reference: Any, row: dict[str, Any]) -> float | None:
    """A python scorer's value for one row; its failure on a row leaves that row unscored (null), logged."""
    try:
        value = function(answer, reference, row)
        return None if value is None else float(value)
    except Exception:  # noqa: BLE001 - user code: one row's failure must not fail the shard
        log.warning("scorer %s failed on row %s; the row is not scored", name, row.get(ROW_KEY), exc_info=True)
        return None


def score_schema(scoring: ScoringConfig, input_columns: list[str]) -> pa.DataType:
    """The `score` column's type; raises InputError (before any work) when a named column is missing
    or a python scorer cannot be imported."""
    needed = [scoring.reference_column] + [s.choices_column for s in scoring.scorers if isinstance(s, MultipleChoice)]
    missing = [c for c in needed if c not in input_columns]
    if missing:
        raise InputError(f"scoring names columns {missing}, which the input does not have; its columns: "
                         f"{', '.join(input_columns)}")
    for scorer in scoring.scorers:
        if isinstance(scorer, PythonScorer):
            _python_function(scorer)
    return score_type(scoring.outputs(), scoring.multiple_choice() is not None)


def with_scores(scoring: ScoringConfig | None, records: pa.Table) -> pa.Table:
    """A shard's answered records, with their `score` column when the job is scored."""
    return records if scoring is None else records.append_column(SCORE, score_column(scoring, records))


def score_column(scoring: ScoringConfig, records: pa.Table) -> pa.Array:
    """The `score` of each record (all input columns, `response`, `error`): null where the row errored,
    null values where it has no reference."""
    responses = records.column("response").to_pylist()
    references = records.column(scoring.reference_column).to_pylist()
    choice = scoring.multiple_choice()
    scores: list[dict[str, Any] | None] = []
    if choice is not None:
        options = records.column(choice.choices_column).to_pylist()
        for response, reference, choices in zip(responses, references, options):
            scores.append(None if response is None else choice_score(choice, response, choices, reference))
    else:
        functions = {s.output(): _python_function(s) for s in scoring.scorers if isinstance(s, PythonScorer)}
        inputs = [c for c in records.column_names if c not in ("response", "error", INPUT_ERROR)]
        rows = records.select(inputs).to_pylist() if functions else [None] * len(responses)
        for response, reference, row in zip(responses, references, rows):
            if response is None:
                scores.append(None)
                continue
            text = response["choices"][0]["text"] if response["choices"] else ""
            score = {}
            for scorer in scoring.scorers:
                name = scorer.output()
                if reference is None:
                    score[name] = None
                elif name in functions:
                    score[name] = _call(functions[name], name, extract(text, scorer.extract), reference, row)
                else:
                    score[name] = text_score(scorer, text, reference)
            scores.append(score)
    return pa.array(scores, type=score_type(scoring.outputs(), choice is not None))
