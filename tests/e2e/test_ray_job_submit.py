"""The job as users launch it on a cluster: `ray job submit` to a head started by the test.

It runs before the integration tests (tests/e2e sorts first), while this pytest process has no Ray of
its own; the head is stopped with `ray stop` at the end.
"""

import json
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.engine
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_to_a_local_head(tmp_path):
    sample = pq.read_table("data/sample_prompts.parquet").slice(0, 40)
    pq.write_table(sample, tmp_path / "in.parquet")
    dashboard = free_port()
    # Token authentication, as Ray 2.60 enables it, with a token of the test's own (not ~/.ray's)
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    started = subprocess.run(
        [RAY, "start", "--head", f"--port={free_port()}", "--num-cpus=2", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--disable-usage-stats"],
        capture_output=True, text=True, env=env, timeout=180)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        submitted = subprocess.run(
            [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", ".",
             "--", sys.executable, "jobs/complete.py", "--config", "configs/local-cpu.yaml",
             "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
             "--set", "defaults.max_tokens=16"],
            capture_output=True, text=True, env=env, timeout=600)
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env, timeout=120)
    assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-3000:]
    assert "succeeded" in submitted.stdout + submitted.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rows_in"] == summary["rows_out"] == 40
    assert (tmp_path / "out" / "_SUCCESS").exists()
    assert pq.read_table(tmp_path / "out" / "data").num_rows == 40
