"""Input and output on an S3 endpoint: moto's S3 server on 127.0.0.1, pyarrow's S3 filesystem, the real
engine and a real local Ray, reached the way a cluster reaches a bucket.

Run 1 reads the prompts from `s3://jobs/in/` and writes the records to `s3://jobs/out/`, with the
endpoint and the credentials in the job's environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY), which the Ray workers the job starts inherit. Then an interruption is simulated:
two shards' data files and `_SUCCESS` are deleted from the bucket, as a run stopped after four shards
leaves them. Run 2 names the endpoint in the URIs instead (`?endpoint_override=...&scheme=http`) and
resumes: only the two missing shards run, each row is answered once, and `_SUCCESS` is the last object
written (moto's request log keeps the order of the writes). The credentials are in no line the jobs
print and in no object they wrote.

Each run is `python -m pipeline run` in its own process (its own local Ray), so the environment it runs
with is exactly the one given here, whatever Ray other tests of the session started.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from tests.s3_server import ACCESS_KEY, SECRET_KEY, admin_filesystem, environment, s3_server

pytestmark = [pytest.mark.engine, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
FILES, ROWS_PER_FILE, PER_SHARD = 2, 30, 10  # 60 rows, 6 shards
DELETED = 2  # shards whose data files the "interruption" removes


def job_config(tmp_path: Path, input_uri: str, output_uri: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({
        "input": {"path": input_uri, "id_column": "id"},
        "output": {"path": output_uri, "rows_per_file": PER_SHARD},
        "engine": {"device": "cpu", "dtype": "float32", "max_model_len": 256, "gpu_memory_utilization": 0.5,
                   "cpu_kvcache_space_gb": 1, "num_actors": 1},
        "defaults": {"max_tokens": 8, "temperature": 0.0},
    }))
    return path


def run_job(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    result = subprocess.run([sys.executable, "-m", "pipeline", "run", "--config", str(config)], cwd=ROOT,
                            env={**clean, "PYTHONPATH": str(ROOT), "CI": "true",
                                 "PIPELINE_LOG_DIR": str(config.parent / "logs"), **env},
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def job_log(run: subprocess.CompletedProcess) -> str:
    """The job's log file (where its INFO lines go; the terminal's last line names it)."""
    (line,) = [line for line in run.stdout.splitlines() if line.startswith("log: ")]
    return Path(line.split()[1]).read_text()


def objects(fs: pafs.FileSystem, prefix: str) -> dict[str, pafs.FileInfo]:
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True))
    return {i.path: i for i in infos if i.type == pafs.FileType.File}


def writes(log: Path, start: int = 0) -> list[str]:
    """The objects written, in order, from moto's request log: the PUTs (the pipeline uploads a file under
    a temporary name, then copies it to its own), without the empty `folder/` markers pyarrow keeps."""
    return [p for p in re.findall(r'"PUT /([^ ?]+)[^ ]* HTTP', log.read_text()[start:]) if not p.endswith("/")]


def test_job_reads_and_writes_s3_resumes_there_and_keeps_credentials_out(tmp_path):
    log = tmp_path / "moto.log"
    with s3_server(str(log)) as endpoint:
        fs = admin_filesystem(endpoint)
        fs.create_dir("jobs")
        ids = []
        for f in range(FILES):
            rows = [f"p{f}-{i:02d}" for i in range(ROWS_PER_FILE)]
            ids += rows
            pq.write_table(pa.table({"id": rows, "prompt": [f"Item {r} of the list is" for r in rows]}),
                           f"jobs/in/prompts-{f}.parquet", filesystem=fs)

        first = run_job(job_config(tmp_path, "s3://jobs/in", "s3://jobs/out"), environment(endpoint))
        written = objects(fs, "jobs/out")
        data = sorted(p for p in written if p.startswith("jobs/out/data/"))
        assert len(data) == FILES * ROWS_PER_FILE // PER_SHARD
        assert "jobs/out/_SUCCESS" in written

        # the interruption: the last shards never finished, so there is no _SUCCESS either
        lost = data[-DELETED:]
        for path in lost + ["jobs/out/_SUCCESS"]:
            fs.delete_file(path)
        kept = {p: written[p].mtime for p in data[:-DELETED]}
        log_offset = len(log.read_text())

        query = f"?endpoint_override={endpoint}&scheme=http"
        env = {k: v for k, v in environment(endpoint).items() if k != "AWS_ENDPOINT_URL"}
        second = run_job(job_config(tmp_path, f"s3://jobs/in{query}", f"s3://jobs/out{query}"), env)

        written = objects(fs, "jobs/out")
        summary = json.loads(fs.open_input_stream("jobs/out/summary.json").read())
        assert (summary["shards"], summary["shards_kept"], summary["shards_run"]) == (6, 6 - DELETED, DELETED)
        assert summary["rows_run"] == DELETED * PER_SHARD and summary["rows_out"] == len(ids) == 60
        assert f"{DELETED} of 6 shards to run" in job_log(second)
        assert {p: written[p].mtime for p in kept} == kept  # the kept shards were not written again
        run2 = writes(log, log_offset)
        rewritten = {p for p in run2 if p.startswith("jobs/out/data/") and p.endswith(".parquet")
                     and not p.rsplit("/", 1)[-1].startswith(".")}  # not the temporary names
        assert rewritten == set(lost)  # only the missing shards ran
        assert run2[-1] == "jobs/out/_SUCCESS" and run2.count("jobs/out/_SUCCESS") == 1  # the last write

        table = pq.read_table("jobs/out/data", filesystem=fs)
        assert sorted(table.column("id").to_pylist()) == sorted(ids)  # every row once
        assert table.column("row_key").to_pylist() == table.column("id").to_pylist()
        answers = table.column("response").to_pylist()
        assert all(a is not None and a["usage"]["completion_tokens"] <= 8 for a in answers)
        assert summary["input"] == "s3://jobs/in" and summary["output"] == "s3://jobs/out"  # no query, no keys

        for secret in (SECRET_KEY, ACCESS_KEY):
            for run in (first, second):
                assert secret not in run.stdout + run.stderr + job_log(run)
            for path in written:
                assert secret.encode() not in fs.open_input_stream(path).read(), path
