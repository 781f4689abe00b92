"""Chaos on a real two-node Ray cluster: no lost process can fail the job.

The test starts a Ray head and a second node on this machine (`ray start`, one CPU each, a temp dir and
an auth token of their own), and runs the job against it with two engine actors, so one actor runs on
each node. While the job runs it kills, one after another:

  1. the vLLM engine core process under the head node's actor (the actor starts a new engine),
  2. the engine actor's process on the second node (Ray starts it again, Ray Data re-sends its shards),
  3. once that actor is back, the second node's raylet, with every process it started (the node is lost).

The kills follow each other within seconds of both engines answering (the first progress line that
shows them), so they land on every machine however fast; the head's actor then answers the rest.

The job must still exit 0 with every row answered exactly once, `summary.json` and `_SUCCESS`. The
cluster is stopped at the end whatever happens, by killing the processes it started (`ray stop` would
stop every Ray on the machine).
"""

from __future__ import annotations

import json
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

from tests.ray_cluster import RayCluster, cmdline

pytestmark = [pytest.mark.engine, pytest.mark.slow]
ROWS, MAX_TOKENS = 1280, 200
ACTOR, CORE = "MapWorker(MapBatches(EngineActor))", "VLLM::EngineCore"


def under(root: psutil.Process, name: str, direct: bool = False) -> list[psutil.Process]:
    """The live processes below `root` (its children only, if `direct`) whose command line holds `name`."""
    try:
        return [p for p in root.children(recursive=not direct) if name in cmdline(p) and p.status() != "zombie"]
    except psutil.NoSuchProcess:
        return []


def actors(raylet: psutil.Process) -> list[psutil.Process]:
    """The engine actors' worker processes of a node: the raylet's own children (a process the actor
    forks carries the actor's title too)."""
    return under(raylet, ACTOR, direct=True)


def engines_up(log: Path) -> int:
    """Engines answering rows, from the job's latest progress line (printed every 5 s)."""
    found = re.findall(r"progress: .*\| (\d+) engines? \d+% busy \|", log.read_text(errors="replace"))
    return int(found[-1]) if found else 0


def test_engine_actor_and_node_deaths_in_one_job(tmp_path):
    ids = [f"row-{i:04d}" for i in range(ROWS)]
    pq.write_table(pa.table({"id": ids, "prompt": [f"Row {i} says" for i in range(ROWS)]}), tmp_path / "in.parquet")
    cluster = RayCluster()
    log = tmp_path / "job.log"
    killed: list[str] = []
    try:
        cluster.start_head()
        cluster.node2 = cluster.add_node()
        cluster.head = cluster.raylet()
        command = [sys.executable, "-m", "pipeline", "run", "--config", "configs/local-cpu.yaml",
                   "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
                   "--set", f"ray_address=127.0.0.1:{cluster.port}", "--set", "engine.num_actors=2",
                   "--set", "engine.max_model_len=512", "--set", "input.id_column=id",
                   "--set", f"defaults.max_tokens={MAX_TOKENS}", "--set", "defaults.temperature=0",
                   "--set", "defaults.ignore_eos=true"]
        with open(log, "w") as out:
            job = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=cluster.env)
        deadline = time.monotonic() + 600
        node2_actor = None
        while job.poll() is None and time.monotonic() < deadline and len(killed) < 3:
            time.sleep(0.5)
            if not killed:  # 1. once both engines have their rows: the head's engine core (its actor replaces it)
                cores = under(cluster.head, CORE)
                if engines_up(log) == 2 and cores:
                    cores[0].kill()
                    killed.append(f"engine core on the head (pid {cores[0].pid})")
            elif len(killed) == 1:  # 2. the second node's engine actor (Ray starts it again there)
                on_node2 = actors(cluster.node2)
                if on_node2:
                    node2_actor = on_node2[0]
                    node2_actor.kill()
                    killed.append(f"engine actor on node 2 (pid {node2_actor.pid})")
            elif [a for a in actors(cluster.node2) if a.pid != node2_actor.pid]:
                # 3. once Ray has started that actor again: the second node, raylet and all
                node = [cluster.node2] + cluster.node2.children(recursive=True)
                cluster.node2.send_signal(signal.SIGKILL)
                time.sleep(1)
                for proc in node:  # the node's machine is gone: so are its processes
                    try:
                        proc.kill()
                    except psutil.NoSuchProcess:
                        pass
                killed.append("node 2 (raylet and its processes)")
        assert len(killed) == 3, f"the job ended (or timed out) after only these kills: {killed}; raise ROWS"
        job.wait(timeout=600)
    finally:
        if "job" in locals() and job.poll() is None:
            job.kill()
        cluster.stop()
    text = log.read_text(errors="replace")
    assert job.returncode == 0, text[-4000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (tmp_path / "out" / "_SUCCESS").exists()
    table = pq.read_table(tmp_path / "out" / "data", columns=["row_key", "response", "error"])
    assert sorted(table.column("row_key").to_pylist()) == ids  # each row exactly once: 0 lost, 0 duplicated
    assert table.column("error").null_count == ROWS  # every row answered
    assert summary["rows_out"] == ROWS and summary["errors"] == 0
    assert len({e["node"] for e in summary["engines"]}) == 2  # the actors ran on both nodes
    assert summary["engine_restarts"] >= 1  # the head's killed engine core was replaced in its actor
    assert summary["shards_redone"] >= 1  # the killed actor's and the lost node's shards ran again
    print(f"\ntwo-node chaos: {ROWS} rows, {table.num_rows} records, 0 lost, 0 duplicated, 0 errors; kills: "
          f"{', '.join(killed)}; {summary['shards']} shards, {summary['shards_redone']} shard attempts redone, "
          f"{len(summary['engines'])} engines started on {len({e['node'] for e in summary['engines']})} nodes "
          f"({summary['engine_restarts']} in-actor restarts); utilisation {summary['engine_utilisation']:.0%}; "
          f"wall {summary['wall_s']:.0f}s; exit {job.returncode}")
