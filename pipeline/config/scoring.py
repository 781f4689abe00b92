"""The `scoring` section of a job config: the reference column and the scorers, as data.

Every scorer is a value of this module's models; nothing in a config runs, except a `python` scorer,
which imports the module the config names (see docs/evaluation.md, Security).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Union

from pydantic import Field, field_validator, model_validator

from pipeline.config.sections import Strict

# The request fields a multiple-choice row's request sets (evaluation/multiple_choice.py); a sweep may not vary them.
CHOICE_REQUEST_FIELDS = ("prompt", "echo", "max_tokens", "logprobs", "n")
# Fields a multiple-choice score carries besides its two values (see records.score_type).
CHOICE_DETAILS = ("prediction", "prediction_norm", "choice_logprobs", "choice_tokens")


class Normalize(Strict):
    """What is ignored when two answers are compared (applied to the prediction and the reference)."""

    case: bool = Field(True, description="Ignore upper/lower case.")
    whitespace: bool = Field(True, description="Strip the ends and collapse inner runs of whitespace to one space.")
    punctuation: bool = Field(False, description=(
        "Drop punctuation (string.punctuation). Off by default: it would turn -3 into 3."))
    articles: bool = Field(False, description="Drop the words a, an and the.")


class _Scorer(Strict):
    name: str | None = Field(None, description=(
        "The scorer's field in the records' `score` struct and its line in the comparison. Default: its kind."))

    @field_validator("name")
    @classmethod
    def _identifier(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
            raise ValueError("must be letters, digits and underscores, not starting with a digit")
        return v

    def output(self) -> str:
        return self.name or self.kind  # type: ignore[attr-defined]


class _TextScorer(_Scorer):
    extract: str | None = Field(None, description=(
        "A regular expression applied to the completion first: its first group (or the whole match) is "
        "the answer, e.g. 'answer is\\s*(-?[0-9.]+)'. No match: the answer is empty (scored wrong)."))

    @field_validator("extract")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"is not a regular expression: {exc}") from None
        return v


class ExactMatch(_TextScorer):
    kind: Literal["exact_match"] = Field(description="1 when the answer equals the reference after normalising.")
    normalize: Normalize = Field(default_factory=Normalize, description="What the comparison ignores.")


class Contains(_TextScorer):
    kind: Literal["contains"] = Field(description="1 when the normalised reference occurs in the normalised answer.")
    normalize: Normalize = Field(default_factory=Normalize, description="What the comparison ignores.")


class Numeric(_TextScorer):
    kind: Literal["numeric"] = Field(description=(
        "1 when the answer's number is within the tolerance of the reference's. Without `extract`, the "
        "answer is the first number in the completion (commas between digits ignored)."))
    tolerance: float = Field(1e-6, ge=0, description="Largest absolute difference still counted right.")
    relative: float = Field(0.0, ge=0, description="Also right when |a - b| <= relative * |reference|.")


class MultipleChoice(_Scorer):
    kind: Literal["multiple_choice"] = Field(description=(
        "Scores each of the row's choices as a continuation of the prompt (echo + logprobs, max_tokens 0) "
        "and predicts the one with the highest total log-likelihood (`<name>`) and with the highest "
        "log-likelihood per character of the choice (`<name>_norm`)."))
    choices_column: str = Field("choices", description="The column listing the row's choices (a list of strings).")


class PythonScorer(_TextScorer):
    kind: Literal["python"] = Field(description=(
        "Imports `module` (from the job's path) and calls `function(answer, reference, row)`, which returns "
        "a float or None. The only scorer that runs user code; a config must name it explicitly."))
    module: str = Field(description="A module importable on the job's path, e.g. `my_scorers`.")
    function: str = Field(description="A function of that module.")

    @field_validator("module", "function")
    @classmethod
    def _dotted(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", v):
            raise ValueError("must be a Python name (dotted for a module), not a path")
        return v


Scorer = Annotated[Union[ExactMatch, Contains, Numeric, MultipleChoice, PythonScorer], Field(discriminator="kind")]
GENERATIVE = (ExactMatch, Contains, Numeric, PythonScorer)


class ScoringConfig(Strict):
    """Scores each record against its row's reference answer; a sweep's comparison gains the means."""

    reference_column: str = Field("answer", description=(
        "The column holding each row's reference: a string, a number, or a list of acceptable answers "
        "(any one counts). Multiple choice: the right choice's index or its text. Null: the row is not scored."))
    scorers: list[Scorer] = Field(min_length=1, description=(
        "The scorers: exact_match, contains, numeric (each with an optional `extract` regex), "
        "multiple_choice (alone: its rows are answered by log-likelihood), or python (user code, opt-in)."))
    baseline: str | None = Field(None, description=(
        "The sweep variant the others are compared with (paired differences). Default: the first variant."))

    @model_validator(mode="after")
    def _consistent(self) -> "ScoringConfig":
        choice = [s for s in self.scorers if isinstance(s, MultipleChoice)]
        if choice and len(self.scorers) > 1:
            raise ValueError("multiple_choice answers rows by log-likelihood (no generated text), so it must be "
                             "the only scorer; score generations in another job")
        names = self.outputs()
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"scorers {repeated} share a name; give them distinct `name`s")
        clashes = sorted(set(names) & set(CHOICE_DETAILS))
        if clashes:
            raise ValueError(f"scorer names {clashes} are reserved for multiple choice details")
        return self

    def multiple_choice(self) -> MultipleChoice | None:
        return next((s for s in self.scorers if isinstance(s, MultipleChoice)), None)

    def outputs(self) -> list[str]:
        """The score values each record carries, in order: one per scorer, two for multiple choice."""
        names: list[str] = []
        for scorer in self.scorers:
            names.append(scorer.output())
            if isinstance(scorer, MultipleChoice):
                names.append(scorer.output() + "_norm")
        return names
