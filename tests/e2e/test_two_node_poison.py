"""Poison rows on a real two-node Ray cluster: each node's engine actor finds its own, alone.

A Ray head and a second node on this machine (`ray start`, one CPU each), a job with two engine actors
(one per node) over 4 shards that each hold one poison row (tests/poison.py), one shard in an actor
at a time. Both actors meet poison rows; exactly those rows are 500s, every other row is answered, and
the job exits 0 with `_SUCCESS`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pyarrow.parquet as pq
import pytest

from tests.poison import POISON_ENGINE, plain_bodies, with_poison
from tests.ray_cluster import RayCluster

pytestmark = pytest.mark.engine
SHARD_ROWS = 4  # 3 plain rows and a poison row per shard: 2 engine deaths per poison row


def test_a_poison_row_on_each_node(tmp_path):
    table = with_poison(plain_bodies(12), [1, 3 + 2, 6 + 0, 9 + 3])  # one in each 4-row shard
    assert table.num_rows == 4 * SHARD_ROWS
    pq.write_table(table, tmp_path / "in.parquet")
    cluster = RayCluster()
    log = tmp_path / "job.log"
    try:
        cluster.start_head()
        cluster.add_node()
        engine = [f"engine.{key}={str(value).lower()}" for key, value in POISON_ENGINE.items()]
        command = [sys.executable, "-m", "pipeline", "run", "--config", "configs/local-cpu.yaml",
                   "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
                   "--set", f"ray_address=127.0.0.1:{cluster.port}", "--set", "engine.num_actors=2",
                   "--set", "engine.max_model_len=256", "--set", "engine.shards_in_flight=1",
                   "--set", f"output.rows_per_file={SHARD_ROWS}", "--set", "input.id_column=id",
                   "--set", "input.body_column=body", *[a for e in engine for a in ("--set", e)]]
        with open(log, "w") as out:
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=cluster.env, timeout=900)
    finally:
        cluster.stop()
    text = log.read_text(errors="replace")
    assert done.returncode == 0, text[-4000:]
    assert (tmp_path / "out" / "_SUCCESS").exists()
    records = pq.read_table(tmp_path / "out" / "data", columns=["row_key", "error"]).to_pylist()
    failed = {r["row_key"] for r in records if r["error"] is not None}
    assert failed == {"poison-0", "poison-1", "poison-2", "poison-3"}
    assert len(records) == table.num_rows
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    restarted_on = Counter(e["node"] for e in summary["engines"] if not e["engine"].endswith("-1"))
    assert len(restarted_on) == 2, summary["engines"]  # both nodes' actors met poison rows
    print(f"\ntwo-node poison: {len(records)} records, 4 x 500 (the poison rows), engine restarts per node "
          f"{sorted(restarted_on.values())}, wall {summary['wall_s']:.0f}s")
