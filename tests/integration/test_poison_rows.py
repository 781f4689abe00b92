"""Rows that kill every engine they reach, in whole jobs on the real engine (tests/poison.py).

Each job has the default `rows_in_flight` and several shards in the engine at once. Exactly the poison
rows must be recorded as 500s; every other row is answered, and the job ends (exit 0: a poison row is
a row's error, not the job's).
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from tests.integration.test_engine_death import engine_core_of_a_ray_actor, rows_answered, run_and_kill
from tests.poison import POISON_ENGINE, is_poison, plain_bodies, with_poison
from tests.ray_cluster import cmdline

pytestmark = [pytest.mark.engine, pytest.mark.slow]
BODY_INPUT = {"body_column": "body", "id_column": "id"}


def codes(out) -> dict[str, int]:
    return {key: (row["error"] or {}).get("code", 200) for key, row in out.rows.items()}


def engine_deaths(out) -> int:
    return out.summary.engine_restarts


def test_three_poison_rows_in_different_shards_are_the_only_500s(run_job):
    table = with_poison(plain_bodies(330), [40, 170, 300])  # shards of 84 rows: shards 0, 2 and 3
    out = run_job(table, input=BODY_INPUT, engine=POISON_ENGINE)
    failed = {key for key, code in codes(out).items() if code != 200}
    assert failed == {"poison-0", "poison-1", "poison-2"}
    assert out.summary.rows_out == 333 and out.summary.shards_failed == {}
    assert out.summary.shards == 4 and out.summary.rows_per_shard == 84  # several shards in the engine at once
    for key in failed:
        message = out.error(key)["message"]
        assert "kills the engine" in message and "ran alone" in message and "engines died" in message
    assert out.summary.rows_failed == 3
    # the answer store holds every answered row once, never a poison row's 500 (tests/poison.py: one body,
    # so the three are one request: one of them reached an engine, the others got its record)
    stored = pq.read_table(out.output / "answers").to_pylist()
    assert len(stored) == len({r["key"] for r in stored}) == 330
    assert not any(is_poison(json.loads(r["body"])) for r in stored)
    # each poison row costs a handful of engine deaths (halving ~130 rows in flight), not one per row
    assert engine_deaths(out) <= 3 * 9, engine_deaths(out)
    print(f"\n3 poison rows among 330: {out.summary.rows_out} records, 3 x 500, {engine_deaths(out)} engine "
          f"restarts, {out.summary.rows_retried} rows tried again, wall {out.summary.wall_s:.1f}s")


def test_a_poison_row_and_an_engine_killed_from_outside_in_one_job(run_job):
    table = plain_bodies(300, max_tokens=64)
    table = with_poison(table, [290])  # in the last shard: it reaches the engine after the kill
    parents = []

    def answering(core) -> bool:
        parents.append(cmdline(core.parent()))
        return rows_answered() > 0

    out = run_and_kill(run_job, table, engine_core_of_a_ray_actor, answering, input=BODY_INPUT, engine=POISON_ENGINE)
    assert "multiprocessing.forkserver" in parents[-1]  # forked, imported already (pipeline/engine/core_forkserver.py)
    failed = {key for key, code in codes(out).items() if code != 200}
    assert failed == {"poison-0"}
    assert out.summary.rows_out == 301
    assert all(out.response(key)["choices"][0]["finish_reason"] in ("stop", "length")
               for key in table.column("id").to_pylist() if key != "poison-0")
    assert engine_deaths(out) >= 2  # the kill and the poison row's
    print(f"\npoison row + external kill: {out.summary.rows_out} records, 1 x 500, {engine_deaths(out)} engine "
          f"restarts, wall {out.summary.wall_s:.1f}s")
