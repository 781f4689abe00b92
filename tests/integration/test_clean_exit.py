"""A job that succeeds prints no ERROR and no traceback: not the driver (its terminal and its log file),
and not the engine actor as it exits.

The job runs as users run it, a subprocess with its own local Ray. Ray's session logs go to a folder of
the test's own (`RAY_TMPDIR`), so the actor's last words are read there too: the driver stops
forwarding them once its job is done, and on a cluster `ray job submit` shows them.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.engine


def test_a_successful_job_prints_no_error_and_no_traceback(tmp_path):
    sample = pq.read_table("data/sample_prompts.parquet").slice(0, 20).drop_columns(["max_tokens"])
    pq.write_table(sample, tmp_path / "in.parquet")  # every row takes the job's max_tokens, 8
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths live below it
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_ID")},
           "RAY_TMPDIR": ray_tmp,  # a Ray of the job's own, as `python -m pipeline run` starts locally
           "PIPELINE_LOG_DIR": str(tmp_path / "logs")}
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pipeline", "run", "--config", "configs/local-cpu.yaml",
             "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
             "--set", "defaults.max_tokens=8"],
            capture_output=True, text=True, timeout=600, env=env)
        worker_logs = {log.name: log.read_text(errors="replace")
                       for log in Path(ray_tmp).glob("ray/session_*/logs/worker-*") if log.suffix in (".out", ".err")}
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "== job summary ==" in result.stdout
    assert any("EngineActor" in text for text in worker_logs.values()), sorted(worker_logs)
    (job_log,) = (tmp_path / "logs").iterdir()  # what the terminal did not show (reporting/console.py)
    logs = {"the job's output": result.stdout + result.stderr, "the job's log": job_log.read_text(), **worker_logs}
    for name, text in logs.items():
        for word in ("ERROR", "Traceback"):
            at = text.find(word)
            assert at < 0, f"{word} in {name}:\n{text[max(at - 500, 0):at + 1500]}"
