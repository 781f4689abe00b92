"""The job as users launch it on a cluster: `ray job submit` to a head started by the test.

It runs before the integration tests (tests/e2e sorts first), while this pytest process has no Ray of
its own; the head (tests/ray_cluster.py: its own temp dir, ports and token) is stopped at the end.
"""

import json
import sys

import pyarrow.parquet as pq
import pytest

from tests.ray_cluster import RayCluster

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def test_ray_job_submit_to_a_local_head(tmp_path):
    sample = pq.read_table("data/sample_prompts.parquet").slice(0, 40)
    pq.write_table(sample, tmp_path / "in.parquet")
    cluster = RayCluster()
    try:
        cluster.start_head(dashboard=True)
        submitted = cluster.submit(
            "--working-dir", ".", "--", sys.executable, "jobs/complete.py", "--config", "configs/local-cpu.yaml",
            "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
            "--set", "defaults.max_tokens=16")
    finally:
        cluster.stop()
    assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-3000:]
    assert "succeeded" in submitted.stdout + submitted.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rows_in"] == summary["rows_out"] == 40
    assert (tmp_path / "out" / "_SUCCESS").exists()
    assert pq.read_table(tmp_path / "out" / "data").num_rows == 40
