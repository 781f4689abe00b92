"""The whole flow on the real engine: every record checked against the spec's semantics."""

from __future__ import annotations

import pyarrow as pa
import pytest

from tests.integration.conftest import CONTEXT

pytestmark = pytest.mark.engine

STRING_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("max_tokens", pa.int64()),
    ("temperature", pa.float64()), ("top_p", pa.float64()), ("n", pa.int64()), ("seed", pa.int64()),
    ("stop", pa.list_(pa.string())), ("model", pa.string()), ("stream", pa.bool_()), ("echo", pa.bool_()),
    ("note", pa.struct([("tag", pa.string()), ("weight", pa.float64())])),
])
LONG_PROMPT = " ".join(["the river runs past the old mill"] * 18)  # 164 tokens of a 256 context

# id -> request fields (columns not named stay null: "not given")
CASES: dict[str, dict] = {
    "greedy-a": {"prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0.0},
    "greedy-b": {"prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0.0},
    "seed-a": {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 1.0, "seed": 42},
    "seed-b": {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 1.0, "seed": 42},
    "seed-c": {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 1.0, "seed": 43},
    "n3-seeded": {"prompt": "Write a poem", "max_tokens": 8, "temperature": 1.0, "n": 3, "seed": 5},
    "defaults": {"prompt": "Hello there"},
    "default-shrinks": {"prompt": LONG_PROMPT},
    "top-p": {"prompt": "Numbers in a table", "max_tokens": 6, "top_p": 0.5, "seed": 1},
    "served-model": {"prompt": "Hi", "max_tokens": 3, "model": "tiny-llama"},
    "bad-temperature": {"prompt": "Hi", "temperature": 2.5},
    "bad-top-p": {"prompt": "Hi", "top_p": 0.0},
    "bad-n": {"prompt": "Hi", "n": 0},
    "greedy-n": {"prompt": "Hi", "n": 2, "temperature": 0.0},
    "bad-max-tokens": {"prompt": "Hi", "max_tokens": -1},
    "over-context": {"prompt": LONG_PROMPT, "max_tokens": 200},
    "empty-prompt": {"prompt": "", "max_tokens": 4},
    "empty-stop": {"prompt": "Hi", "max_tokens": 4, "stop": [""]},
    "unknown-model": {"prompt": "Hi", "max_tokens": 4, "model": "gpt-nope"},
    "stream": {"prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0.0, "stream": True},
    "echo-stream": {"prompt": "Hi", "max_tokens": 4, "echo": True, "stream": True},
}


def string_table(cases: dict[str, dict]) -> pa.Table:
    rows = [{"id": k, **v, "note": {"tag": k, "weight": float(i)}} for i, (k, v) in enumerate(cases.items())]
    return pa.Table.from_pylist(rows, schema=STRING_SCHEMA)


@pytest.fixture(scope="module")
def job(run_job):
    return run_job(string_table(CASES))


def test_one_record_per_row_and_input_columns_unchanged(job):
    assert job.table.num_rows == job.input.num_rows == len(CASES)
    assert job.table.schema.names == ["row_key"] + STRING_SCHEMA.names + ["response", "error"]
    assert sorted(job.table.column("row_key").to_pylist()) == sorted(f"input.parquet:{i}" for i in range(len(CASES)))
    assert job.table.select(STRING_SCHEMA.names).sort_by("id").equals(job.input.sort_by("id"))
    for row in job.rows.values():
        assert (row["response"] is None) != (row["error"] is None), row["id"]
    s = job.summary
    assert (s.rows_in, s.rows_out) == (len(CASES), len(CASES))
    assert s.completions + s.errors == len(CASES)
    assert s.completion_tokens == sum(r["response"]["usage"]["completion_tokens"]
                                      for r in job.rows.values() if r["response"])


def test_response_body_shape_and_usage(job, tokenizer):
    for row_id, case in CASES.items():
        row = job.rows[row_id]
        if row["response"] is None:
            continue
        body = job.response(row_id)
        assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
        assert body["model"] == "tiny-llama" and body["created"] > 1_700_000_000
        prompt_tokens = len(tokenizer(case["prompt"]).input_ids)  # BOS included
        usage = body["usage"]
        assert usage["prompt_tokens"] == prompt_tokens, row_id
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert [c["index"] for c in body["choices"]] == list(range(case.get("n") or 1))
        for choice in body["choices"]:
            assert choice["finish_reason"] in ("stop", "length")
            if choice["finish_reason"] == "length":
                assert choice["stop_reason"] is None


def test_max_tokens_is_honoured_and_length_finishes(job):
    body = job.response("greedy-a")
    assert body["usage"]["completion_tokens"] == 12
    assert body["choices"][0]["finish_reason"] == "length"


def test_omitted_max_tokens_is_spec_default_shrunk_to_context(job, tokenizer):
    # context 256 < 1024: an omitted max_tokens generates up to the end of the context, never a 400
    for row_id in ("defaults", "default-shrinks"):
        body = job.response(row_id)
        left = CONTEXT - len(tokenizer(CASES[row_id]["prompt"]).input_ids)
        choice = body["choices"][0]
        if choice["finish_reason"] == "length":
            assert body["usage"]["completion_tokens"] == left, row_id
        else:
            assert body["usage"]["completion_tokens"] <= left


def test_greedy_and_same_seed_reproduce_different_seed_differs(job):
    text = lambda i: [c["text"] for c in job.response(i)["choices"]]  # noqa: E731
    assert text("greedy-a") == text("greedy-b")
    assert text("seed-a") == text("seed-b")
    assert text("seed-a") != text("seed-c")


def test_n_choices_are_seeded_and_counted(job):
    body = job.response("n3-seeded")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert len({c["text"] for c in body["choices"]}) > 1  # choice i samples with seed + i
    assert body["usage"]["completion_tokens"] == 3 * 8


@pytest.mark.parametrize("row_id,param,code", [
    ("bad-temperature", "temperature", 400),
    ("bad-top-p", "top_p", 400),
    ("bad-n", "n", 400),
    ("bad-max-tokens", "max_tokens", 400),
    ("over-context", "max_tokens", 400),
    ("empty-prompt", "prompt", 400),
    ("empty-stop", "stop", 400),
    ("unknown-model", "model", 404),
    ("greedy-n", "n", 400),
    ("echo-stream", "echo", 400),
])
def test_invalid_rows_become_error_records(job, row_id, param, code):
    error = job.error(row_id)
    assert error["code"] == code, error
    if param is not None:
        assert param in (error["param"] or ""), error
    assert error["message"]


def test_error_messages_say_what_is_wrong(job):
    assert job.error("unknown-model")["message"].startswith("The model `gpt-nope` does not exist.")
    assert job.error("unknown-model")["type"] == "NotFoundError"
    over = job.error("over-context")
    assert over["param"] == "max_tokens" and over["type"] == "BadRequestError"
    assert over["message"].startswith("You passed 164 input tokens and requested 200 output tokens. "
                                      "However, the model's context length is only 256 tokens")
    assert "greedy" in job.error("greedy-n")["message"]


def test_summary_counts_errors_by_type(job):
    errors = [r["error"] for r in job.rows.values() if r["error"]]
    assert job.summary.errors == len(errors)
    assert sum(job.summary.errors_by_type.values()) == len(errors)
    assert job.summary.errors_by_type.get("NotFoundError (404)") == 1
    assert job.summary.engine_startup_s and job.summary.engine_startup_s[0] > 0


def test_stop_strings_cut_generated_text(job, run_job):
    """Stop on a piece of a known greedy completion: the text ends before it, finish_reason stop."""
    full = job.response("greedy-a")["choices"][0]["text"]
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip(), f"greedy text too short to cut: {full!r}"
    cut = full[: full.index(stop)]
    prompt = CASES["greedy-a"]["prompt"]
    in_prompt = prompt.split()[1]  # a stop string found only in the prompt never matches
    stops = run_job(string_table({
        "hit": {"prompt": prompt, "max_tokens": 12, "temperature": 0.0, "stop": [stop]},
        "hit-list": {"prompt": prompt, "max_tokens": 12, "temperature": 0.0, "stop": ["\u2603", stop]},
        "miss": {"prompt": prompt, "max_tokens": 12, "temperature": 0.0, "stop": ["\u2603"]},
        "prompt-only": {"prompt": prompt, "max_tokens": 12, "temperature": 0.0, "stop": [in_prompt]}
        if in_prompt not in full else {"prompt": prompt, "max_tokens": 12, "temperature": 0.0},
    }))
    for row_id in ("hit", "hit-list"):
        choice = stops.response(row_id)["choices"][0]
        assert choice["text"] == cut
        assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    miss = stops.response("miss")["choices"][0]
    assert miss["text"] == full and miss["finish_reason"] == "length" and miss["stop_reason"] is None
    assert stops.response("prompt-only")["choices"][0]["text"] == full


def test_stream_gives_the_complete_body(job):
    assert job.response("stream")["choices"] == job.response("greedy-a")["choices"]
