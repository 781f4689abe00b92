"""Scoring on constructed records whose answers are known: the scorers, the log-likelihood rule, the
statistics and the config. Engine-backed scoring is in tests/integration/test_scoring_sweep.py."""

from __future__ import annotations

import math
import sys

import pyarrow as pa
import pytest
from pydantic import ValidationError

from pipeline.config import JobConfig
from pipeline.io.plan import InputError
from pipeline.protocol import BodyError, RequestBuilder
from pipeline.io.records import result_arrays
from pipeline.config.scoring import ScoringConfig
from pipeline.evaluation.multiple_choice import LoglikelihoodRequests, choice_score, continuation_logprob, norm_length
from pipeline.evaluation.record_scores import request_builder, score_column, score_schema
from pipeline.evaluation.stats import paired_difference, summarize, wilson


def scoring(*scorers: dict, **fields) -> ScoringConfig:
    return ScoringConfig.model_validate({"scorers": list(scorers), **fields})


def response(*texts: str) -> dict:
    return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", "system_fingerprint": "fp",
            "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": "length", "stop_reason": None}
                        for i, t in enumerate(texts)],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def records(answers: list[tuple[dict | None, dict | None]], **columns: list) -> pa.Table:
    resp, err = result_arrays(answers)
    return pa.table({**columns, "response": resp, "error": err})


ERROR = {"message": "bad", "type": "BadRequestError", "param": "top_p", "code": 400}


@pytest.mark.parametrize("scorer, text, reference, expected", [
    ({"kind": "exact_match"}, "  Paris \n", "paris", 1.0),
    ({"kind": "exact_match"}, "Paris.", "Paris", 0.0),
    ({"kind": "exact_match", "normalize": {"punctuation": True}}, "Paris.", "Paris", 1.0),
    ({"kind": "exact_match", "normalize": {"case": False}}, "paris", "Paris", 0.0),
    ({"kind": "exact_match", "normalize": {"articles": True}}, "the Eiffel tower", "Eiffel Tower", 1.0),
    ({"kind": "exact_match", "normalize": {"whitespace": False}}, " Paris", "Paris", 0.0),
    ({"kind": "exact_match"}, "Lyon", ["Paris", "lyon"], 1.0),  # any acceptable answer
    ({"kind": "contains"}, "I think it is Paris, France", "paris", 1.0),
    ({"kind": "contains"}, "I think it is Lyon", "Paris", 0.0),
    ({"kind": "exact_match", "extract": r"answer is\s*(-?\d+)"}, "so the answer is 42.", "42", 1.0),
    ({"kind": "exact_match", "extract": r"answer is\s*(-?\d+)"}, "no idea", "42", 0.0),
    ({"kind": "numeric"}, "It is 1,234.50 dollars", "1234.5", 1.0),
    ({"kind": "numeric"}, "-3 and 7", -3, 1.0),
    ({"kind": "numeric"}, "3", "-3", 0.0),
    ({"kind": "numeric", "tolerance": 0.5}, "41.6", 42, 1.0),
    ({"kind": "numeric", "relative": 0.01}, "99.5", 100, 1.0),
    ({"kind": "numeric"}, "no number", 1, 0.0),
    ({"kind": "numeric", "extract": r"answer is (\S+)"}, "7 then the answer is 9", "9", 1.0),
])
def test_text_scorers(scorer, text, reference, expected):
    config = scoring(scorer)
    score = score_column(config, records([(response(text), None)], answer=[reference]))
    assert score.to_pylist() == [{config.outputs()[0]: expected}]


def test_error_rows_are_null_and_rows_without_reference_unscored():
    config = scoring({"kind": "exact_match"}, {"kind": "contains"})
    table = records([(response("7"), None), (None, ERROR), (response("8"), None)], answer=["7", "7", None])
    assert score_column(config, table).to_pylist() == [
        {"exact_match": 1.0, "contains": 1.0}, None, {"exact_match": None, "contains": None}]


def test_python_scorer_imports_only_the_named_module(tmp_path, monkeypatch):
    (tmp_path / "my_scorers.py").write_text(
        "def length_ok(answer, reference, row):\n    return float(len(answer) == int(reference)) if row['id'] else None\n")
    # a scorer failing on a row leaves that row unscored; the other rows are scored
    monkeypatch.syspath_prepend(str(tmp_path))
    config = scoring({"kind": "python", "module": "my_scorers", "function": "length_ok", "name": "length"})
    assert "my_scorers" not in sys.modules  # config validation imports nothing
    table = records([(response("abc"), None), (response("ab"), None), (response("x"), None)], id=["a", "b", "c"],
                    answer=["3", "3", "not a number"])
    assert score_column(config, table).to_pylist() == [{"length": 1.0}, {"length": 0.0}, {"length": None}]
    with pytest.raises(InputError, match="no function 'nope'"):
        score_schema(scoring({"kind": "python", "module": "my_scorers", "function": "nope"}), ["answer"])
    with pytest.raises(ValidationError, match="not a path"):
        scoring({"kind": "python", "module": "../evil", "function": "f"})


def echoed(tokens: list[str], logprobs: list[float | None]) -> dict:
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {"tokens": tokens, "text_offset": offsets, "token_logprobs": logprobs,
            "top_logprobs": [None] + [[(t, lp)] for t, lp in zip(tokens[1:], logprobs[1:])]}


def test_continuation_tokens_are_found_from_the_end_of_the_echo():
    # position 0 is BOS, not part of the prompt's text: offsets are measured from the end
    lp = echoed(["<s>", "Answer", ":", " Par", "is"], [None, -1.0, -2.0, -3.0, -0.5])
    assert continuation_logprob(lp, "Answer: Paris", " Paris") == (-3.5, 2)
    assert continuation_logprob(lp, "Answer: Paris", "is") == (-0.5, 1)
    # a token straddling the boundary ("Answer: P" + "aris") belongs to the continuation
    assert continuation_logprob(lp, "Answer: Paris", "aris") == (-3.5, 2)
    # the context's trailing whitespace goes with the continuation, as in lm-evaluation-harness
    spaced = echoed(["<s>", "Answer", ":", " ", "Rome"], [None, -1.0, -2.0, -0.25, -4.0])
    assert continuation_logprob(spaced, "Answer: Rome", "Rome") == (-4.25, 2)
    # the continuation may not reach the first position (no logprob), be empty, or not end the text
    assert continuation_logprob(echoed(["Paris"], [None]), "Paris", "Paris") is None
    assert continuation_logprob(lp, "Answer: Paris", "") is None
    assert continuation_logprob(lp, "Answer: Paris", "Rome") is None
    # token texts that do not reproduce the choice (a decoding artefact) are not scored
    assert continuation_logprob(echoed(["<s>", "A", "\ufffd"], [None, -1.0, -1.0]), "Aé", "é") is None


def test_multiple_choice_prediction_total_and_per_character():
    config = scoring({"kind": "multiple_choice", "name": "mc"})
    choices = [" a", " bbbbbbbb"]
    answer = {"choices": [{"index": 0, "text": "Q:" + choices[0], "logprobs": echoed(["<s>", "Q:", " a"], [None, -1, -2.0])},
                          {"index": 1, "text": "Q:" + choices[1], "logprobs": echoed(["<s>", "Q:", " bbbb", "bbbb"], [None, -1, -3.0, -1.0])}]}
    score = choice_score(config.scorers[0], answer, choices, 1)
    # totals -2 vs -4: choice 0; per character -1.0 vs -0.444: choice 1
    assert score == {"mc": 0.0, "mc_norm": 1.0, "prediction": 0, "prediction_norm": 1,
                     "choice_logprobs": [-2.0, -4.0], "choice_tokens": [1, 2]}
    assert choice_score(config.scorers[0], answer, choices, " a")["mc"] == 1.0  # the reference as the choice's text
    assert choice_score(config.scorers[0], answer, choices, 1.0)["mc"] == 0.0  # an index from a float column
    assert choice_score(config.scorers[0], answer, choices, 5)["mc"] is None  # no such choice: not scored


def test_acc_norm_counts_the_choice_without_the_delimiter_in_either_layout():
    # lm-evaluation-harness: argmax(loglikelihood / len(choice)) over context + " " + choice; here "4"
    # (-1.0 per character) loses to "41" (-1.9 / 2 = -0.95). Counting the delimiter's space would flip
    # it (-1.0 / 2 = -0.5 against -1.9 / 3 = -0.63).
    config = scoring({"kind": "multiple_choice", "name": "mc"})
    layouts = {"choices carry the delimiter": ("Q:", [" 4", " 41"], ["Q:", " 4"], ["Q:", " 4", "1"]),
               "context ends with it": ("Q: ", ["4", "41"], ["Q:", " 4"], ["Q:", " 4", "1"])}
    for layout, (context, choices, tokens_a, tokens_b) in layouts.items():
        answer = {"choices": [
            {"index": 0, "text": context + choices[0], "logprobs": echoed(["<s>", *tokens_a], [None, -1, -1.0])},
            {"index": 1, "text": context + choices[1], "logprobs": echoed(["<s>", *tokens_b], [None, -1, -1.0, -0.9])}]}
        score = choice_score(config.scorers[0], answer, choices, 1)
        assert score["choice_logprobs"] == [-1.0, -1.9], layout
        assert (score["prediction"], score["prediction_norm"], score["mc_norm"]) == (0, 1, 1.0), layout
    assert norm_length(" 41") == norm_length("41") == 2 and norm_length(" ") == 1


def test_multiple_choice_request_expands_the_row():
    config = scoring({"kind": "multiple_choice"})
    builder = request_builder(RequestBuilder(served_name="m", body_defaults={"max_tokens": 9}), config)
    assert isinstance(builder, LoglikelihoodRequests)
    body = builder.body({"prompt": "Q: 2+2?\nA:", "choices": [" 4", " 5"], "max_tokens": 3})
    assert body == {"model": "m", "prompt": ["Q: 2+2?\nA: 4", "Q: 2+2?\nA: 5"], "echo": True, "max_tokens": 0,
                    "logprobs": 0, "n": 1}
    for bad in (None, [], ["x", ""], "x"):
        with pytest.raises(BodyError) as info:
            builder.body({"prompt": "Q", "choices": bad})
        assert info.value.error["param"] == "choices" and info.value.error["code"] == 400
    assert request_builder(RequestBuilder(served_name="m"), scoring({"kind": "contains"})).__class__ is RequestBuilder


def test_wilson_interval_and_paired_bootstrap():
    low, high = wilson(5, 10)  # textbook values for 5/10
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    assert wilson(0, 10)[0] == 0.0 and round(wilson(0, 10)[1], 4) == 0.2775
    assert summarize([1.0, 0.0, 1.0, 1.0]) == {"mean": 0.75, "ci_low": round(wilson(3, 4)[0], 4),
                                              "ci_high": round(wilson(3, 4)[1], 4), "ci": "wilson", "scored": 4}
    assert summarize([0.5, 1.0])["ci"] == "bootstrap"
    variant = {f"r{i}": float(i % 2) for i in range(40)}
    baseline = {f"r{i}": 0.0 for i in range(30)}  # only 30 rows answered by both
    diff = paired_difference(variant, baseline)
    assert diff["pairs"] == 30 and diff["diff"] == 0.5 and diff["diff_low"] < 0.5 < diff["diff_high"]
    assert diff == paired_difference(variant, baseline)  # fixed seed: the same interval every time
    assert paired_difference(baseline, baseline) == {"diff": 0.0, "diff_low": 0.0, "diff_high": 0.0, "pairs": 30}
    assert math.isnan(wilson(0, 0)[0]) and summarize([])["mean"] is None


def test_scoring_config_is_checked_before_anything_runs():
    base = {"input": "in.parquet", "output": "out"}
    with pytest.raises(ValidationError, match="must be the only scorer"):
        scoring({"kind": "multiple_choice"}, {"kind": "exact_match"})
    with pytest.raises(ValidationError, match="share a name"):
        scoring({"kind": "exact_match"}, {"kind": "exact_match"})
    with pytest.raises(ValidationError, match="not a regular expression"):
        scoring({"kind": "contains", "extract": "("})
    with pytest.raises(ValidationError, match="extra"):
        scoring({"kind": "contains", "ignore_case": True})
    with pytest.raises(ValidationError, match="is not a variant"):
        JobConfig.model_validate({**base, "scoring": {"scorers": [{"kind": "contains"}], "baseline": "x"},
                                  "sweep": {"grid": {"temperature": [0, 1]}}})
    with pytest.raises(ValidationError, match="must not vary"):
        JobConfig.model_validate({**base, "scoring": {"scorers": [{"kind": "multiple_choice"}]},
                                  "sweep": {"grid": {"max_tokens": [1, 2]}}})
    with pytest.raises(ValidationError, match="output.format parquet"):
        JobConfig.model_validate({**base, "output": {"path": "o", "format": "openai_batch"},
                                  "scoring": {"scorers": [{"kind": "contains"}]}})
    with pytest.raises(InputError, match=r"\['answer'\]"):
        score_schema(scoring({"kind": "contains"}), ["prompt"])
    assert score_schema(scoring({"kind": "multiple_choice"}), ["prompt", "answer", "choices"]).names == [
        "multiple_choice", "multiple_choice_norm", "prediction", "prediction_norm", "choice_logprobs", "choice_tokens"]


def test_every_scoring_field_is_described():
    from pipeline.config import scoring as models

    for name in ("ScoringConfig", "Normalize", "ExactMatch", "Contains", "Numeric", "MultipleChoice", "PythonScorer"):
        model = getattr(models, name)
        assert model.model_config["extra"] == "forbid", name
        undescribed = [f for f, info in model.model_fields.items() if not info.description]
        assert not undescribed, (name, undescribed)
    assert JobConfig.model_fields["scoring"].description
