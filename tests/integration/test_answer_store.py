"""The answer store (io/answer_store.py): a later job's greedy and seeded rows answered from it, the
same records as the engine's; never a stored answer for another model, engine setting or an error."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

pytestmark = pytest.mark.engine


def rows(prefix: str, n: int, **columns) -> pa.Table:
    return pa.table({"id": [f"{prefix}-{i}" for i in range(n)],
                     "prompt": [f"Line {i} of the old ledger reads" for i in range(n)],
                     "max_tokens": [10] * n, **columns})


def answers(result) -> dict[str, tuple]:
    out = {}
    for key in result.table.column("row_key").to_pylist():
        r = result.response(key)
        out[key.split("-", 1)[1]] = (r["choices"], r["usage"])
    return out


def test_a_later_job_is_answered_from_the_store_and_only_there(run_job, tmp_path):
    store = {"path": str(tmp_path / "store")}
    greedy = {"temperature": [0.0] * 6}
    first = run_job(rows("a", 6, **greedy), input={"id_column": "id"}, answer_store=store)
    assert first.summary.rows_run == 6 and first.summary.rows_from_store == 0
    second = run_job(rows("b", 6, **greedy), input={"id_column": "id"}, answer_store=store)
    assert second.summary.rows_from_store == 6  # new row keys, the same requests: no engine work
    assert answers(second) == answers(first)
    assert second.summary.cost is None or second.summary.cost.output_tokens == 0
    ids = {second.response(f"b-{i}")["id"] for i in range(6)} | {first.response(f"a-{i}")["id"] for i in range(6)}
    assert len(ids) == 12  # each row its own response id

    # unseeded sampled rows are neither stored nor read; another engine setting is another key
    sampled = run_job(rows("c", 6, temperature=[0.9] * 6), input={"id_column": "id"}, answer_store=store)
    assert sampled.summary.rows_from_store == 0
    other = run_job(rows("d", 6, **greedy), input={"id_column": "id"}, answer_store=store,
                    engine={"max_logprobs": 5})
    assert other.summary.rows_from_store == 0


def test_a_damaged_store_file_is_skipped_and_its_rows_answered_again(run_job, tmp_path):
    store = {"path": str(tmp_path / "store")}
    greedy = {"temperature": [0.0] * 4}
    run_job(rows("a", 4, **greedy), input={"id_column": "id"}, answer_store=store)
    (part,) = Path(store["path"]).rglob("part-*.parquet")
    part.write_bytes(part.read_bytes()[:50])  # cut short
    again = run_job(rows("b", 4, **greedy), input={"id_column": "id"}, answer_store=store)
    assert again.summary.rows_from_store == 0 and again.summary.completions == 4
    third = run_job(rows("c", 4, **greedy), input={"id_column": "id"}, answer_store=store)
    assert third.summary.rows_from_store == 4  # rebuilt: the second job stored them anew
