"""An evaluation sweep through the engine, scored: answers forced with `logit_bias`, so every score is
known; an error row counted as an error, not as wrong; a rerun gives the same scores."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.evaluation.compare import render
from pipeline.config import JobConfig
from pipeline.job.run import run
from tests.integration.conftest import CONTEXT, tokenizer  # noqa: F401 - fixture

pytestmark = pytest.mark.engine
ANSWERS = ["7"] * 6 + ["3"] * 3 + [None, "7"]  # row 9 has no reference; row 10 is an error (top_p 5)
SCORERS = [{"kind": "exact_match"}, {"kind": "contains"}, {"kind": "numeric"},
           {"kind": "exact_match", "name": "after_is", "extract": r"is (\d+)"}]


def scored_config(tmp_path, output: str, tokenizer) -> JobConfig:
    seven, three = (tokenizer.convert_tokens_to_ids(t) for t in ("7", "3"))
    return JobConfig.model_validate({
        "input": {"path": str(tmp_path / "in.parquet"), "id_column": "id"},
        "output": str(tmp_path / output),
        "engine": {"device": "cpu", "dtype": "float32", "max_model_len": CONTEXT, "gpu_memory_utilization": 0.5},
        "defaults": {"max_tokens": 1},
        "sweep": {"variants": [  # greedy, each forced to one digit; and seeded sampling
            {"name": "seven", "temperature": 0.0, "logit_bias": {str(seven): 100}},
            {"name": "three", "temperature": 0.0, "logit_bias": {str(three): 100}},
            {"name": "seeded", "temperature": 1.0, "seed": 5, "max_tokens": 4},
        ]},
        "scoring": {"reference_column": "answer", "scorers": SCORERS},
    })


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tokenizer):
    tmp_path = tmp_path_factory.mktemp("scored")
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(len(ANSWERS))],
                             "prompt": [f"Question {i}: what is the digit? Answer:" for i in range(len(ANSWERS))],
                             "top_p": [None] * (len(ANSWERS) - 1) + [5.0],
                             "answer": ANSWERS}), tmp_path / "in.parquet")
    config = scored_config(tmp_path, "out", tokenizer)
    return tmp_path, config, run(config)


def records(tmp_path, output: str) -> dict[tuple[str, str], dict]:
    return {(r["variant"], r["id"]): r for r in pq.read_table(tmp_path / output / "data").to_pylist()}


def test_forced_answers_score_as_known(scored):
    tmp_path, _, _ = scored
    rows = records(tmp_path, "out")
    for variant, digit in (("seven", "7"), ("three", "3")):
        for i, answer in enumerate(ANSWERS):
            row = rows[(variant, f"r{i}")]
            if i == 10:
                assert row["error"]["param"] == "top_p" and row["score"] is None  # an error, not wrong
                continue
            assert row["response"]["choices"][0]["text"] == digit  # the bias forced it
            right = None if answer is None else float(answer == digit)
            assert row["score"] == {"exact_match": right, "contains": right, "numeric": right,
                                    "after_is": None if answer is None else 0.0}


def test_comparison_has_means_intervals_and_paired_differences(scored):
    tmp_path, _, summary = scored
    lines = {line["variant"]: line for line in json.loads((tmp_path / "out" / "comparison.json").read_text())}
    seven, three = lines["seven"]["scores"]["exact_match"], lines["three"]["scores"]["exact_match"]
    assert lines["three"]["baseline"] == "seven" and lines["seven"]["errors"] == 1
    assert (seven["mean"], seven["scored"], three["mean"], three["scored"]) == (round(6 / 9, 4), 9, round(3 / 9, 4), 9)
    assert seven["ci"] == "wilson" and seven["ci_low"] < seven["mean"] < seven["ci_high"]
    assert three["diff"] == round(-3 / 9, 4) and three["pairs"] == 9 and three["diff_low"] <= three["diff"] <= three["diff_high"]
    assert (seven["diff"], seven["diff_low"], seven["diff_high"]) == (0.0, 0.0, 0.0)
    header = (tmp_path / "out" / "comparison.csv").read_text().splitlines()[0]
    assert "exact_match_mean" in header and "after_is_diff_high" in header
    text = render(summary.comparison)
    assert text.index("diff vs seven") < text.index("tok/s")  # quality first
    assert (tmp_path / "out" / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_scores_are_identical_on_rerun(scored, tokenizer):
    tmp_path, _, _ = scored
    run(scored_config(tmp_path, "again", tokenizer))
    first, second = records(tmp_path, "out"), records(tmp_path, "again")
    assert first.keys() == second.keys()
    assert {k: r["score"] for k, r in first.items()} == {k: r["score"] for k, r in second.items()}
    seeded = [r["response"]["choices"][0]["text"] for k, r in second.items() if k[0] == "seeded" and r["response"]]
    assert len(seeded) == 10 and len(set(seeded)) > 1  # sampled, not forced: still the same on rerun
    assert json.loads((tmp_path / "out" / "comparison.json").read_text())[0]["scores"] == \
        json.loads((tmp_path / "again" / "comparison.json").read_text())[0]["scores"]
