"""Generated hostile input through whole jobs on the real engine, and `validate` on the same input.

One job per input shape (a Parquet string body column, OpenAI batch JSONL, a Parquet struct body
column), a few hundred generated rows in all. Every job must end normally with one record per row,
each a 200 or a 4xx (none of these rows is poison), and `validate` must give every row the verdict
the job gave it. See docs/hostile-input.md.
"""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from pipeline.config import JobConfig
from tests.hostile import SCALE, batch_lines, bodies, dumps, raw_bodies, struct_bodies, verdict_problem
from tests.integration.conftest import CONTEXT

pytestmark = pytest.mark.engine

# Rows per job in CI (HYPOTHESIS_PROFILE=long: ten times as many).
BODY_ROWS, BATCH_LINES, STRUCT_ROWS = 240 * SCALE, 100 * SCALE, 40 * SCALE
# Work, not validity: a valid body may ask for thousands of sequences or tokens; the job answers it
# with at most 8, so the test stays fast. Values outside this window (huge, negative) stay as drawn.
BOUNDED = ("n", "best_of", "max_tokens", "min_tokens")


def _bounded(body: object) -> object:
    if isinstance(body, dict):
        body = {k: 8 if k in BOUNDED and type(v) is int and 8 < v <= 100_000 else v for k, v in body.items()}
        body.pop("use_beam_search", None)
    return body


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# A Parquet string column holds UTF-8 only: a lone surrogate reaches it as a JSON escape, never raw.
string_bodies = st.one_of(bodies().map(_bounded).map(dumps), raw_bodies.filter(_utf8))


def _config(tmp_path, path: str, **input_config) -> JobConfig:
    return JobConfig.model_validate({
        "input": {"path": path, "repeated_keys": "keep_first", **input_config},
        "output": {"path": str(tmp_path / "unused")},
        "engine": {"device": "cpu", "dtype": "float32", "max_model_len": CONTEXT, "gpu_memory_utilization": 0.5},
        "defaults": {"max_tokens": 4}})


def _draw(strategy: st.SearchStrategy, count: int) -> list:
    """`count` examples of `strategy`, drawn as hypothesis draws a test's examples (the profile's seed),
    for one job over all of them: a job per example would take hours. No shrinking: a failure shows
    its row's key and record instead."""
    drawn: list = []

    @settings(max_examples=count, phases=[Phase.generate])
    @given(strategy)
    def collect(value: object) -> None:
        drawn.append(value)

    collect()
    return drawn


def _check_job(table: pa.Table, config: JobConfig, keys: list[str]) -> None:
    """One record per row, each a 200 or a named 4xx, and `validate`'s verdict on every row the same."""
    from pipeline.job.validate import check_rows

    records = {row["row_key"]: row for row in table.to_pylist()}
    assert sorted(records) == sorted(keys), "not one record per row"
    outcomes = Counter("200" if r["error"] is None else f"{r['error']['code']} {r['error']['type']}"
                       for r in records.values())
    print(f"{config.input.path}: {len(records)} records, {dict(outcomes)}")  # shown with pytest -s
    verdicts = {check.key: check.error for check in check_rows(config)}
    assert verdicts.keys() == records.keys()
    for key, record in records.items():
        assert (record["response"] is None) != (record["error"] is None), record
        assert verdict_problem(record["error"]) is None, (key, record["error"])
        if record["error"] is None:
            assert verdicts[key] is None, (key, verdicts[key])
        else:
            assert verdicts[key] is not None, (key, record["error"])
            assert {k: verdicts[key][k] for k in ("type", "code", "param")} == \
                {k: record["error"][k] for k in ("type", "code", "param")}, key


def test_a_job_over_generated_string_bodies(run_job, tmp_path_factory):
    import pyarrow.parquet as pq

    raw = _draw(string_bodies, BODY_ROWS)
    table = pa.table({"id": [f"r{i}" for i in range(len(raw))], "body": pa.array(raw, pa.string())})
    result = run_job(table, input={"body_column": "body", "id_column": "id"}, defaults={"max_tokens": 4})
    folder = tmp_path_factory.mktemp("validate")
    pq.write_table(table, folder / "input.parquet")
    _check_job(result.table, _config(folder, str(folder / "input.parquet"), body_column="body", id_column="id"),
               table.column("id").to_pylist())
    assert result.summary.rows_out == len(raw)


@pytest.mark.slow  # the suite keeps the string bodies' job; the same rules, another input form
def test_a_job_over_generated_struct_bodies(run_job, tmp_path_factory):
    import pyarrow.parquet as pq

    body_values = _draw(struct_bodies.map(_bounded), STRUCT_ROWS)
    table = pa.table({"id": [f"s{i}" for i in range(len(body_values))], "body": pa.array(body_values)})
    result = run_job(table, input={"body_column": "body", "id_column": "id"}, defaults={"max_tokens": 4})
    folder = tmp_path_factory.mktemp("validate")
    pq.write_table(table, folder / "input.parquet")
    _check_job(result.table, _config(folder, str(folder / "input.parquet"), body_column="body", id_column="id"),
               table.column("id").to_pylist())


@pytest.mark.slow  # the suite keeps the string bodies' job; the same rules, another input form
def test_a_job_over_generated_batch_lines(run_job, tmp_path_factory):
    import pyarrow.parquet as pq

    from pipeline.job.run import run

    lines = _draw(batch_lines(), BATCH_LINES)
    lines += lines[:5]  # repeated custom_ids: the first line keeps each
    folder = tmp_path_factory.mktemp("batch")
    (folder / "requests.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    config = _config(folder, str(folder / "requests.jsonl"))
    config = config.model_copy(update={"output": config.output.model_copy(update={"path": str(folder / "out")})})
    run(config)  # run_job's shared Ray; a JSONL input, so not run_job itself
    table = pq.read_table(folder / "out" / "data")
    keys = table.column("row_key").to_pylist()
    assert len(keys) == len(lines) == len(set(keys))
    _check_job(table, config, keys)
