"""List prompts: choices prompt-major (index = prompt_index * n + j), usage counts each prompt once."""

import pyarrow as pa
import pytest

pytestmark = pytest.mark.engine

SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.list_(pa.string())), ("n", pa.int64()),
                    ("seed", pa.int64()), ("max_tokens", pa.int64()), ("temperature", pa.float64())])
ROWS = [
    {"id": "two-by-three", "prompt": ["The river", "A good engineer"], "n": 3, "seed": 9, "max_tokens": 5,
     "temperature": 1.0},
    {"id": "three-greedy", "prompt": ["Water boils", "Stars are", "The museum"], "n": None, "seed": None,
     "max_tokens": 4, "temperature": 0.0},
    {"id": "same-again", "prompt": ["The river", "A good engineer"], "n": 3, "seed": 9, "max_tokens": 5,
     "temperature": 1.0},
    {"id": "empty-item", "prompt": ["ok", ""], "n": None, "seed": None, "max_tokens": 4,
     "temperature": 0.0},
    {"id": "empty-list", "prompt": [], "n": None, "seed": None, "max_tokens": 4, "temperature": 0.0},
]


@pytest.fixture(scope="module")
def job(run_job):
    return run_job(pa.Table.from_pylist(ROWS, schema=SCHEMA))


def test_choices_are_prompt_major(job, tokenizer):
    body = job.response("two-by-three")
    assert [c["index"] for c in body["choices"]] == list(range(6))
    prompt_tokens = sum(len(tokenizer(p).input_ids) for p in ROWS[0]["prompt"])
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    assert body["usage"]["completion_tokens"] == 6 * 5
    # the same request with the same seed gives the same record, choice for choice
    assert [c["text"] for c in job.response("same-again")["choices"]] == [c["text"] for c in body["choices"]]


def test_greedy_list_one_choice_per_prompt(job, tokenizer):
    body = job.response("three-greedy")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"]["prompt_tokens"] == sum(len(tokenizer(p).input_ids) for p in ROWS[1]["prompt"])


def test_empty_prompts_in_lists_are_400(job):
    for row_id in ("empty-item", "empty-list"):
        error = job.error(row_id)
        assert error["code"] == 400 and "prompt" in (error["param"] or ""), error
