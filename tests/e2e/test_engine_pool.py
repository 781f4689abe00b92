"""Standing engine pools, as their users run them: `python -m pipeline engines start`, then jobs with
`--pool`, each a process of its own, on the local Ray head the pool started (a head file of the
test's own: PIPELINE_LOCAL_HEAD). One pool for the module; the idle-stop test starts a second."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
POOL = "testpool"


def _config(tmp: Path) -> Path:
    config = {
        "input": {"path": "unused", "id_column": "id"},
        "output": {"path": "unused"},
        "model": {"path": "builtin:tiny-llama", "served_name": "tiny-llama",
                  "adapters": {"tiny-lora-a": "builtin:tiny-lora-a"}},
        "engine": {"device": "cpu", "num_actors": 1, "cpus_per_actor": 1, "dtype": "float32", "max_model_len": 512,
                   "gpu_memory_utilization": 0.5, "cpu_kvcache_space_gb": 1},
        "defaults": {"max_tokens": 16, "temperature": 0.2, "top_p": 0.7},
    }
    path = tmp / "pool.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Pools:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.config = _config(tmp)
        self.env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")},
                    "PIPELINE_LOCAL_HEAD": str(tmp / "head.json")}

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                              env=self.env, cwd=ROOT, timeout=timeout)

    def start_job(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "pipeline", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=self.env, cwd=ROOT)

    def run(self, rows: pa.Table, name: str, *extra: str) -> subprocess.CompletedProcess:
        return self.cli("run", *self.job_args(rows, name), *extra)

    def job_args(self, rows: pa.Table, name: str) -> list[str]:
        source = self.tmp / f"{name}.parquet"
        pq.write_table(rows, source)
        return ["--config", str(self.config), "--input", str(source), "--output", str(self.tmp / name)]

    def status(self, name: str = POOL) -> str:
        done = self.cli("engines", "status", name)
        return done.stdout + done.stderr

    def engine_pids(self, name: str = POOL) -> list[int]:
        return [int(p) for p in re.findall(r"\(pid (\d+)\)", self.status(name))]

    def ready_engine_pids(self, name: str = POOL, timeout: float = 120) -> list[int]:
        """The engines' processes once every engine answers (a restarted one may still be starting)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status(name)
            if "starting" not in status and (pids := [int(p) for p in re.findall(r"\(pid (\d+)\)", status)]):
                return pids
            time.sleep(2)
        raise AssertionError(f"pool {name}'s engines did not all answer in {timeout} s: {self.status(name)}")

    def head(self) -> dict | None:
        path = self.tmp / "head.json"
        return json.loads(path.read_text()) if path.exists() else None


def records(folder: Path) -> dict[str, dict]:
    table = pq.read_table(folder / "data")
    return {r["row_key"]: r for r in table.to_pylist()}


def answers(folder: Path) -> dict[str, object]:
    """Each row's choices, finish reasons and usage (what must not depend on which engine answered)."""
    out = {}
    for key, record in records(folder).items():
        body = record["response"]
        out[key] = (record["error"], body and (body["model"], body["choices"], body["usage"]))
    return out


def prompts(n: int, prefix: str, **columns: list) -> pa.Table:
    return pa.table({"id": [f"{prefix}-{i}" for i in range(n)],
                     "prompt": [f"Item {i} of {prefix}: the weather today is" for i in range(n)], **columns})


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    pools = Pools(tmp_path_factory.mktemp("pools"))
    started = pools.cli("engines", "start", "--config", str(pools.config), "--name", POOL)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert "started a local Ray head" in started.stdout and "1 of 1 engines ready" in started.stdout
        yield pools
    finally:
        pools.cli("engines", "stop", "--all")
        head = pools.head()
        if head is not None:  # the stop above failed: the head by its own process
            try:
                os.kill(head["pid"], signal.SIGTERM)
            except OSError:
                pass


def test_attached_jobs_answer_as_cold_jobs(pools):
    greedy = prompts(8, "greedy", temperature=[0.0] * 8)
    seeded = prompts(8, "seeded", temperature=[0.9] * 8, seed=list(range(8)))
    adapter = prompts(4, "adapter", model=["tiny-lora-a", "tiny-llama", "tiny-lora-a", "tiny-lora-a"],
                      temperature=[0.0] * 4)
    first = pa.concat_tables([greedy, seeded.drop_columns(["seed"]).append_column("seed", seeded["seed"])],
                             promote_options="default")
    second = pa.concat_tables([greedy.slice(0, 2), adapter], promote_options="default")
    for rows, name in ((first, "attached-1"), (second, "attached-2")):
        done = pools.run(rows, name, "--pool", POOL)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert f"pool {POOL}" in done.stdout  # the summary says whose engines answered
    cold = pools.run(pa.concat_tables([first, adapter], promote_options="default"), "cold")
    assert cold.returncode == 0, cold.stdout[-3000:] + cold.stderr[-3000:]
    expected = answers(pools.tmp / "cold")
    got = {**answers(pools.tmp / "attached-1"), **answers(pools.tmp / "attached-2")}
    assert set(got) == set(expected) and len(got) == 20
    assert {k: v for k, v in got.items() if v != expected[k]} == {}
    assert got["adapter-0"][1][0] == "tiny-lora-a" and got["adapter-0"][0] is None


def test_two_jobs_at_once_each_row_once(pools):
    jobs = [pools.start_job("run", *pools.job_args(prompts(160, f"job{j}"), f"both-{j}"), "--pool", POOL,
                            "--set", "output.rows_per_file=20") for j in range(2)]
    outputs = [job.communicate(timeout=600)[0] for job in jobs]
    for j, (job, text) in enumerate(zip(jobs, outputs)):
        assert job.returncode == 0, text[-3000:]
        table = pq.read_table(pools.tmp / f"both-{j}" / "data")
        keys = table.column("row_key").to_pylist()
        assert sorted(keys) == sorted(f"job{j}-{i}" for i in range(160))  # each row once
        assert table.column("error").null_count == 160
        summary = json.loads((pools.tmp / f"both-{j}" / "summary.json").read_text())
        assert summary["engines"] and all(e["pool"] == POOL for e in summary["engines"])
        # the job is charged its share of the engine's busy time, which two jobs split
        assert 0 < summary["cost"]["engine_s"] <= summary["wall_s"]


def test_engine_actor_killed_mid_job(pools):
    (before,) = pools.ready_engine_pids()
    job = pools.start_job("run", *pools.job_args(prompts(240, "killed", max_tokens=[48] * 240), "killed"),
                          "--pool", POOL, "--set", "output.rows_per_file=20")
    _wait_for_a_shard(pools.tmp / "killed", job)
    os.kill(before, signal.SIGKILL)
    text = job.communicate(timeout=600)[0]
    assert job.returncode == 0, text[-3000:]
    table = pq.read_table(pools.tmp / "killed" / "data")
    assert sorted(table.column("row_key").to_pylist()) == sorted(f"killed-{i}" for i in range(240))
    assert table.column("error").null_count == 240
    (after,) = pools.ready_engine_pids()  # Ray restarted the actor: a new process serves the next job
    assert after != before
    done = pools.run(prompts(4, "next"), "next", "--pool", POOL)
    assert done.returncode == 0, done.stdout[-3000:]


def test_driver_killed_then_the_same_command_resumes(pools):
    # one shard at a time: the driver dies with most of its shards not handed out yet
    args = ["run", *pools.job_args(prompts(240, "driver", max_tokens=[48] * 240), "driver"), "--pool", POOL,
            "--set", "output.rows_per_file=20", "--set", "engine.shards_in_flight=1"]
    job = pools.start_job(*args)
    _wait_for_a_shard(pools.tmp / "driver", job)
    job.kill()
    job.wait(timeout=60)
    assert not (pools.tmp / "driver" / "_SUCCESS").exists()  # it died mid-job
    assert pools.ready_engine_pids()  # the pool keeps running
    done = pools.cli(*args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"\(([1-9]\d*) of 12 shards kept from earlier runs", done.stdout), done.stdout[-2000:]
    table = pq.read_table(pools.tmp / "driver" / "data")
    assert sorted(table.column("row_key").to_pylist()) == sorted(f"driver-{i}" for i in range(240))


def test_refusals_are_one_line_and_exit_2(pools):
    other = pools.run(prompts(2, "other"), "other", "--pool", POOL, "--set", "engine.max_model_len=256")
    assert other.returncode == 2
    (line,) = [l for l in (other.stdout + other.stderr).splitlines() if l.startswith("error:")]
    assert "engine.max_model_len: the pool's engines have 512, this job asks for 256" in line
    missing = pools.run(prompts(2, "missing"), "missing", "--pool", "nope")
    assert missing.returncode == 2
    (line,) = [l for l in (missing.stdout + missing.stderr).splitlines() if l.startswith("error:")]
    assert f"no pool named 'nope' runs on this Ray cluster (pools: {POOL})" in line
    for name in ("other", "missing"):  # refused before any row was sent: nothing written
        assert not (pools.tmp / name / "data").exists() or not list((pools.tmp / name / "data").iterdir())
    own = pools.run(prompts(2, "own"), "own", "--pool", "nope", "--set", "engine.if_no_pool=own_engines")
    assert own.returncode == 0, own.stdout[-3000:]
    assert "starting this job's own engines" in own.stdout + own.stderr


def test_idle_engine_restarted_and_idle_stop_frees_everything(pools):
    started = pools.cli("engines", "start", "--config", str(pools.config), "--name", "idle", "--idle-stop", "20s")
    assert started.returncode == 0, started.stdout + started.stderr
    (engine,) = pools.ready_engine_pids("idle")
    os.kill(engine, signal.SIGKILL)  # killed while no job runs: Ray restarts it
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and "no pool named 'idle'" not in pools.status("idle"):
        pids = pools.engine_pids("idle")
        if pids:
            assert pids != [engine]
        time.sleep(3)
    assert "no pool named 'idle'" in pools.status("idle")  # stopped itself once idle
    assert not psutil.pid_exists(engine)
    groups = pools.cli("engines", "status")
    assert "pool idle" not in groups.stdout and f"pool {POOL}" in groups.stdout  # the other pool goes on


def _wait_for_a_shard(folder: Path, job: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = folder / "data"
        if data.exists() and any(p.suffix == ".parquet" for p in data.iterdir()):
            return
        assert job.poll() is None, job.stdout.read()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"no shard of {folder} written in {timeout} s")


def test_an_evaluation_on_the_pool_scores_as_one_with_its_own_engines(pools):
    pytest.importorskip("lm_eval")
    sys.path.insert(0, str(ROOT / "data"))
    from make_harness_tasks import make

    include_path = make(pools.tmp / "tasks")
    config = yaml.safe_load(pools.config.read_text())
    del config["input"]
    tables = {}
    for name, pool in (("attached", POOL), ("cold", None)):
        config["output"] = str(pools.tmp / f"eval-{name}")
        config["engine"]["pool"] = pool
        path = pools.tmp / f"eval-{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        done = pools.cli("eval", "--config", str(path), "--include_path", str(include_path), "--tasks", "tiny_qa",
                         "--limit", "4")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        tables[name] = [line for line in done.stdout.splitlines() if line.startswith("|")]
    assert tables["attached"] and tables["attached"] == tables["cold"]
