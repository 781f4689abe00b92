"""The driver killed in the middle of a job, then the same command again: the job resumes.

Run 1 is `python -m pipeline run` in its own process group (its local Ray included), killed with SIGKILL
once some shards are written. Run 2, the same command, keeps those shards and runs only the rest. Run 3
finds nothing to do. The output holds each row key once, and its records' ids are the same as if the
rows had been answered in one run.
"""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow]
ROWS, PER_SHARD, MAX_TOKENS = 480, 60, 100


def command(tmp_path) -> list[str]:
    return [sys.executable, "-m", "pipeline", "run", "--config", "configs/local-cpu.yaml",
            "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
            "--set", "engine.max_model_len=512", "--set", f"output.rows_per_file={PER_SHARD}",
            # two shards at a time (an actor would take all 8 at once): they finish in waves, so the
            # kill lands between waves with some shards written and some not
            "--set", "engine.shards_in_flight=2",
            "--set", f"defaults.max_tokens={MAX_TOKENS}", "--set", "defaults.temperature=0",
            "--set", "defaults.ignore_eos=true"]


def test_killed_driver_then_rerun_resumes(tmp_path):
    (tmp_path / "in").mkdir()
    ids = [f"row-{i:04d}" for i in range(ROWS)]
    pq.write_table(pa.table({"id": ids, "prompt": [f"Item {i} is" for i in range(ROWS)]}),
                   tmp_path / "in" / "prompts.parquet")
    data = tmp_path / "out" / "data"

    first = subprocess.Popen(command(tmp_path) + ["--set", "input.id_column=id"], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:
        if data.exists() and len(list(data.glob("*.parquet"))) >= 2:
            break
        time.sleep(0.2)
    assert first.poll() is None, "run 1 ended before it could be killed"
    # the driver and the Ray it started: a lost machine. vLLM's engine processes run in process groups
    # of their own, and a lost machine loses them too: every process below the driver dies.
    below = psutil.Process(first.pid).children(recursive=True)
    os.killpg(first.pid, signal.SIGKILL)
    for proc in below:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    first.wait()
    time.sleep(1)
    kept = sorted(p.name for p in data.glob("*.parquet"))
    assert 2 <= len(kept) < ROWS // PER_SHARD
    assert not (tmp_path / "out" / "_SUCCESS").exists()

    second = subprocess.run(command(tmp_path) + ["--set", "input.id_column=id"], capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["shards_kept"] == len(kept)  # finished work was kept ...
    assert summary["rows_run"] == ROWS - len(kept) * PER_SHARD  # ... and only the rest ran
    table = pq.read_table(data)
    assert sorted(table.column("row_key").to_pylist()) == ids  # each row key exactly once
    assert table.column("error").null_count == ROWS
    assert all(r["usage"]["completion_tokens"] == MAX_TOKENS for r in table.column("response").to_pylist())
    assert (tmp_path / "out" / "_SUCCESS").exists()
    # the answer store (on by default; greedy rows): each row's answer stored once, whichever run answered it
    stored = pq.read_table(tmp_path / "out" / "answers").column("key").to_pylist()
    assert len(stored) == len(set(stored)) == ROWS
    print(f"\ndriver killed after {len(kept)} of {ROWS // PER_SHARD} shards: rerun kept {len(kept) * PER_SHARD} "
          f"rows, ran {summary['rows_run']}; rows lost 0, duplicated 0")

    # a record's id depends on its row key and request only: any run of these rows gives these ids
    from pipeline.job.cli import parser
    from pipeline.config import load_config
    from pipeline.protocol import completion_id
    from pipeline.job.run import request_builder

    args = parser().parse_args(command(tmp_path)[3:] + ["--set", "input.id_column=id"])
    builder = request_builder(load_config(args.config, args.overrides, input=args.input, output=args.output),
                              "parquet")
    for row in table.to_pylist():
        assert row["response"]["id"] == completion_id(row["row_key"], builder.body(row))

    third = subprocess.run(command(tmp_path) + ["--set", "input.id_column=id"], capture_output=True,
                           text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "nothing to do" in third.stdout
    assert pq.read_table(data).num_rows == ROWS
    assert len(list((tmp_path / "out" / "runs").glob("*.json"))) == 1  # run 2's log; run 3 changed nothing
