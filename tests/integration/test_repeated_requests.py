"""Repeated requests in one job: greedy and seeded rows whose bodies are the same are answered once
(engine/shared_answers.py); each row keeps its own record and response id; rows that sample without a
seed are never shared."""

from __future__ import annotations

import pyarrow as pa
import pytest

pytestmark = pytest.mark.engine


def rows(entries: list[tuple[str, str, float | None, int | None, int]]) -> pa.Table:
    ids, prompts, temperatures, seeds, ns = zip(*entries)
    return pa.table({"id": list(ids), "prompt": list(prompts), "temperature": list(temperatures),
                     "seed": pa.array(seeds, pa.int64()), "n": list(ns), "max_tokens": [12] * len(ids)})


def answer(result, row_id: str) -> tuple:
    response = result.response(row_id)
    return response["model"], response["choices"], response["usage"]


def test_repeated_greedy_and_seeded_requests_are_answered_once_each_row_its_own_record(run_job):
    entries = [(f"greedy-{i}", "The river bends past", 0.0, None, 1) for i in range(6)]
    entries += [(f"seeded-{i}", "A lantern in the", 0.9, 7, 2) for i in range(4)]
    entries += [(f"sampled-{i}", "A lantern in the", 0.9, None, 2) for i in range(4)]  # never shared
    entries += [("other-seed", "A lantern in the", 0.9, 8, 2), ("alone", "Snow falls on", 0.0, None, 1)]
    result = run_job(rows(entries), input={"id_column": "id"}, output={"rows_per_file": 4})
    assert result.summary.rows_shared == 5 + 3  # the greedy and seeded repeats; not the unseeded, not seed 8
    for group in ("greedy", "seeded"):
        assert len({str(answer(result, f"{group}-{i}")) for i in range(4 if group == "seeded" else 6)}) == 1
    assert len({result.response(f"sampled-{i}")["choices"][0]["text"] for i in range(4)}) > 1  # own draws
    ids = [result.response(row_id)["id"] for row_id in result.table.column("row_key").to_pylist()]
    assert len(set(ids)) == len(ids)  # every row its own response id

    # each shared answer is the one the row gets asked alone
    alone = run_job(rows([entries[0], entries[6]]), input={"id_column": "id"})
    assert answer(alone, "greedy-0") == answer(result, "greedy-5")
    assert answer(alone, "seeded-0") == answer(result, "seeded-3")
    assert alone.summary.rows_shared == 0
    # the engine's work is counted once: the cost's tokens are the distinct requests'
    assert result.summary.cost.output_tokens < result.summary.run_completion_tokens
