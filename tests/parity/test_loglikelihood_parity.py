"""The multiple-choice scorer's log-likelihoods equal a direct computation from the reference server's
answers to the same requests (echo + logprobs, max_tokens 0).

The pipeline job scores the rows; the same request bodies (built by the job's own builder: one list
prompt per row, context + each choice) go to the reference server, and each choice's log-likelihood is
computed from the server's answer by the tokenizer (lm-evaluation-harness's split: the context's
trailing spaces move to the continuation; the continuation's tokens are those of context + choice after
the context's tokens), and, separately, one single-prompt request per choice.
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.config import JobConfig
from pipeline.job.run import request_builder

pytestmark = [pytest.mark.engine, pytest.mark.slow]

ROWS = [  # (context, choices): spaces on either side of the boundary, digits, punctuation, no space
    ("Question: What is the capital of France?\nAnswer:", [" Paris", " Rome", " Berlin", " Madrid"]),
    ("Answer: ", ["Paris", "Rome", "New Delhi"]),  # the context's trailing space joins the choice's token
    ("The quick brown fox jumps over the lazy", [" dog", " cat", " dogs and cats."]),
    ("Question: What is 3 plus 38?\nAnswer:", [" 41", " 45", " 38", " 40"]),
    ("2+2=", ["4", "5", "22"]),
    ("Once upon a time there was a", [" small dragon", " lighthouse keeper", " x"]),
    ("List five facts about volcanoes:\n", ["1.", "Volcanoes erupt.", "\n"]),
]
SCORING = {"reference_column": "answer", "scorers": [{"kind": "multiple_choice", "name": "mc"}]}
TOLERANCE = 1e-4


def harness_tokens(tokenizer, context: str, choice: str) -> int | None:
    """lm-evaluation-harness's continuation length in tokens, or None where its split is not a prefix."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, choice = context[:-spaces], context[-spaces:] + choice
    whole = tokenizer(context + choice).input_ids
    ctx = tokenizer(context).input_ids
    return len(whole) - len(ctx) if whole[:len(ctx)] == ctx and len(whole) > len(ctx) else None


@pytest.fixture(scope="module")
def scored(run_job):
    table = pa.table({"id": [f"mc{i}" for i in range(len(ROWS))], "prompt": [c for c, _ in ROWS],
                      "choices": [list(ch) for _, ch in ROWS], "answer": [0] * len(ROWS)})
    return table, run_job(table, input={"id_column": "id"}, scoring=SCORING)


def test_scorer_equals_direct_computation_from_reference_answers(scored, reference, tokenizer):
    table, job = scored
    config = JobConfig.model_validate({"input": "x", "output": "y", "scoring": SCORING})
    builder = request_builder(config, "parquet")
    differences, single_differences, harness_agrees, cases = [], [], 0, 0
    for row in table.to_pylist():
        record = job.rows[row["id"]]
        assert record["error"] is None, record["error"]
        body = builder.body(row)
        assert body["prompt"] == [row["prompt"] + c for c in row["choices"]] and body["max_tokens"] == 0
        status, answer = reference.complete(body)
        assert status == 200, answer
        assert [c["text"] for c in answer["choices"]] == body["prompt"]
        score = record["score"]
        for i, choice in enumerate(row["choices"]):
            cases += 1
            tokens = harness_tokens(tokenizer, row["prompt"], choice)
            count = score["choice_tokens"][i]
            harness_agrees += tokens == count
            # direct: the server's logprobs of the continuation's last `count` tokens, by the tokenizer's split
            # where it is defined, else by the scorer's count
            server = answer["choices"][i]["logprobs"]["token_logprobs"]
            direct = sum(server[-(tokens or count):])
            differences.append(abs(score["choice_logprobs"][i] - direct))
            status, single = reference.complete({**body, "prompt": body["prompt"][i]})
            assert status == 200
            single_differences.append(abs(score["choice_logprobs"][i] - sum(single["choices"][0]["logprobs"]["token_logprobs"][-count:])))
        totals = score["choice_logprobs"]
        assert score["prediction"] == max(range(len(totals)), key=lambda k: (totals[k], -k))
        assert score["mc"] == float(score["prediction"] == 0)
    print(f"log-likelihood parity: {cases} choices in {len(ROWS)} rows; max |scorer - direct from the server's "
          f"list-prompt answers| = {max(differences):.2e}; from single-prompt answers = {max(single_differences):.2e}; "
          f"token split equal to lm-evaluation-harness's in {harness_agrees} of {cases}")
    assert max(differences) < TOLERANCE and max(single_differences) < TOLERANCE
    assert harness_agrees == cases
