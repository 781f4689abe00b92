"""Generated hostile input through the readers, the body builder and `validate`'s checker (no engine).

Whatever a row holds, reading it, building its body and checking it end in exactly one verdict: a
valid request, or a 4xx error body naming its field. Nothing raises. See docs/hostile-input.md.
"""

from __future__ import annotations

import asyncio
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import InputConfig, JobConfig
from pipeline.io.plan import INPUT_ERROR, ROW_KEY, plan_input
from pipeline.io.read import python_rows, read_shard
from pipeline.protocol import BodyError, RequestBuilder
from tests.hostile import (FIELDS, SCALE, SERVED, batch_lines, bodies, raw_bodies, struct_bodies, values,
                           verdict_problem)

# Bodies per property in CI; HYPOTHESIS_PROFILE=long multiplies them by ten.
BODIES, ROWS, FILES = 1500 * SCALE, 300 * SCALE, 100 * SCALE


@pytest.fixture(scope="module")
def checker():
    from pipeline.job.validate import RequestChecker

    config = JobConfig.model_validate({
        "input": {"path": "unused.parquet"}, "output": {"path": "unused"},
        "model": {"path": "builtin:tiny-llama", "served_name": SERVED},
        "engine": {"device": "cpu", "dtype": "float32", "max_model_len": 256, "gpu_memory_utilization": 0.5}})
    return RequestChecker(config)


@pytest.fixture(scope="module")
def verdict(checker):
    """The verdict `validate` gives a row: the builder's 400, or the checker's answer to the body."""
    loop = asyncio.new_event_loop()

    def _verdict(builder: RequestBuilder, row: dict) -> dict | None:
        try:
            body = builder.body(row)
        except BodyError as exc:
            return exc.error
        error, _, _ = loop.run_until_complete(checker.check(body))
        return error

    yield _verdict
    loop.close()


BODY_COLUMN = RequestBuilder(served_name=SERVED, body_column="body")
FIELD_COLUMNS = RequestBuilder(served_name=SERVED)


@settings(max_examples=BODIES)
@given(raw=st.one_of(bodies(), raw_bodies))
def test_any_body_column_value_gets_one_verdict(verdict, raw):
    """A string body column (any JSON, or not JSON at all) or a dict of fields with any values."""
    assert verdict_problem(verdict(BODY_COLUMN, {"body": raw})) is None


@settings(max_examples=ROWS)
@given(row=st.dictionaries(st.sampled_from(FIELDS), values, min_size=1, max_size=4))
def test_any_field_columns_get_one_verdict(verdict, row):
    """Request fields as columns of their own, with values of any type."""
    assert verdict_problem(verdict(FIELD_COLUMNS, row)) is None


def _read(path, **input_config) -> tuple[pa.Table, list, list]:
    # hostile files repeat keys too: each repeat is its row's error record (keep_first)
    plan = plan_input(InputConfig.model_validate({"path": str(path), "repeated_keys": "keep_first", **input_config}),
                      2048)
    tables = [read_shard(plan, shard) for shard in plan.shards]
    table = pa.concat_tables(tables)
    problems = table.column(INPUT_ERROR).to_pylist()
    return table, problems, python_rows(table.drop_columns([INPUT_ERROR]), problems)


@settings(max_examples=FILES)
@given(lines=st.lists(batch_lines(), min_size=1, max_size=8), repeat=st.booleans())
def test_any_batch_jsonl_lines_get_one_verdict_each(tmp_path_factory, verdict, lines, repeat):
    if repeat:  # a custom_id that appears twice: the first line keeps it
        lines.append(lines[0])
    path = tmp_path_factory.mktemp("jsonl") / "requests.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    table, problems, rows = _read(path)
    assert table.num_rows == len(lines)
    keys = table.column(ROW_KEY).to_pylist()
    assert len(set(keys)) == len(keys), keys
    builder = RequestBuilder(served_name=SERVED, body_column="body", field_columns=False)
    for problem, row in zip(problems, rows):
        assert verdict_problem(problem if problem is not None else verdict(builder, row)) is None
    if repeat:
        first, last = problems[0], problems[-1]
        assert first is not None or (last["param"], last["type"]) == ("custom_id", "InvalidBatchLine")


@settings(max_examples=FILES)
@given(body_values=st.lists(struct_bodies, min_size=1, max_size=6))
def test_any_struct_body_column_gets_one_verdict_per_row(tmp_path_factory, verdict, body_values):
    path = tmp_path_factory.mktemp("structs") / "input.parquet"
    # a column Python cannot hold for some rows (a timestamp past the year 9999) rides along
    when = pa.array([2**62 if i % 3 == 0 else i for i in range(len(body_values))], pa.timestamp("us"))
    pq.write_table(pa.table({"body": pa.array(body_values), "when": when}), path)
    table, problems, rows = _read(path, body_column="body")
    assert table.num_rows == len(body_values)
    for i, (problem, row) in enumerate(zip(problems, rows)):
        if i % 3 == 0:
            assert (problem["code"], problem["param"]) == (400, "when"), problem
        else:
            assert verdict_problem(problem if problem is not None else verdict(BODY_COLUMN, row)) is None


def test_known_holes_stay_closed(verdict):
    """The hostile bodies that failed a job, or answered a 400 naming no field, before issue 11."""
    deep = '{"prompt": "x", "stop": ' + "[" * 3000 + "]" * 3000 + "}"
    assert verdict(BODY_COLUMN, {"body": deep})["param"] == "body"  # was: RecursionError, the job failed
    assert verdict(BODY_COLUMN, {"body": "1" * 5000})["param"] == "body"  # was: ValueError, the job failed
    surrogate = verdict(BODY_COLUMN, {"body": json.dumps({"prompt": "a\ud800"})})
    assert surrogate["param"] == "prompt" and "lone surrogate" in surrogate["message"]  # was: param null
    for field in ("stop", "bad_words", "request_id"):  # were: 500s from the engine
        assert verdict(FIELD_COLUMNS, {"prompt": "hi", field: ["\udfff"]})["param"] == field
    assert verdict(FIELD_COLUMNS, {"prompt": "hi", "structured_outputs": "x"})["code"] == 400  # was: 500
    assert verdict(FIELD_COLUMNS, {"prompt": "hi", "structured_outputs": {}})["param"] == "structured_outputs"
    assert verdict(FIELD_COLUMNS, {"prompt": [1, 2, 10**6]})["param"] == "prompt"  # was: valid, then a 400
    grammar = verdict(FIELD_COLUMNS, {"prompt": "hi", "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}})
    assert grammar["param"] == "response_format", grammar  # was: valid, then a 400 naming no field
    assert verdict(FIELD_COLUMNS, {"prompt": "word " * 5000})["param"] == "prompt"  # was: "input_text"
