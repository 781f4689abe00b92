"""Poison rows on a real two-node Ray cluster: each node's engine actor finds its own, alone; and the
job's figures, as Prometheus scraped them from the cluster, equal its summary.

A Ray head and a second node on this machine (`ray start`, one CPU each, metrics export ports), a job
with two engine actors (one per node) over 2 shards that each hold one poison row (tests/poison.py),
a plain shard and a shard with a request the endpoint rejects (400), one shard in an actor at a time. Both
actors meet poison rows; exactly those rows are 500s (and the 400), every other row is answered, and
the job exits 0 with `_SUCCESS`.

A real Prometheus (Debian's package) scrapes the cluster through Ray's service-discovery file while
the job runs; its HTTP API then gives the job's recorded counters, which must equal summary.json's
figures, the engines' live figures with their engine and node labels, and vLLM's own engine metrics
with the same labels; every query of the dashboard returns data for the run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import pyarrow as pa

from tests import prometheus
from tests.poison import POISON_ENGINE, plain_bodies, with_poison
from tests.ray_cluster import RayCluster

pytestmark = [pytest.mark.engine, pytest.mark.slow]
SHARD_ROWS = 4  # 3 plain rows and a poison row per shard: 2 engine deaths per poison row
VLLM_METRICS = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_queries_total",
                "time_to_first_token_seconds_count", "inter_token_latency_seconds_count", "generation_tokens_total")


def test_a_poison_row_on_each_node(tmp_path):
    table = with_poison(plain_bodies(10), [1, 3 + 2])  # one in each of the first two 4-row shards
    assert table.num_rows == 3 * SHARD_ROWS
    rejected = pa.table({"id": ["rejected-0"], "body": [json.dumps({"prompt": "Hi", "max_tokens": -1})]})
    table = pa.concat_tables([table, rejected])  # a fourth shard: a 400
    pq.write_table(table, tmp_path / "in.parquet")
    cluster = RayCluster()
    log = tmp_path / "job.log"
    scraper = None
    try:
        cluster.start_head(dashboard=True)  # the dashboard writes Ray's service-discovery file
        cluster.add_node()
        if prometheus.available():
            scraper = prometheus.Prometheus(f"{cluster.temp_dir}/prom_metrics_service_discovery.json")
        engine = [f"engine.{key}={str(value).lower()}" for key, value in POISON_ENGINE.items()]
        command = [sys.executable, "-m", "pipeline", "run", "--config", "configs/local-cpu.yaml",
                   "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
                   "--set", f"ray_address=127.0.0.1:{cluster.port}", "--set", "engine.num_actors=2",
                   "--set", "engine.max_model_len=256", "--set", "engine.shards_in_flight=1",
                   "--set", f"output.rows_per_file={SHARD_ROWS}", "--set", "input.id_column=id",
                   "--set", "engine.engine_metrics=true",  # vLLM's metrics (off by default on CPU)
                   "--set", "input.body_column=body", *[a for e in engine for a in ("--set", e)]]
        started = time.time()
        with open(log, "w") as out:
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=cluster.env, timeout=900)
        scraped = _scraped(scraper, str(tmp_path / "out"), table.num_rows) if scraper else None
        silent = _dashboard_queries_without_data(scraper, str(tmp_path / "out"), started, time.time()) \
            if scraper else None
    finally:
        if scraper is not None:
            scraper.stop()
        cluster.stop()
    text = log.read_text(errors="replace")
    assert done.returncode == 0, text[-4000:]
    assert (tmp_path / "out" / "_SUCCESS").exists()
    records = pq.read_table(tmp_path / "out" / "data", columns=["row_key", "error"]).to_pylist()
    failed = {r["row_key"] for r in records if r["error"] is not None}
    assert failed == {"poison-0", "poison-1", "rejected-0"}
    assert len(records) == table.num_rows
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    restarted_on = Counter(e["node"] for e in summary["engines"] if not e["engine"].endswith("-1"))
    assert len(restarted_on) == 2, summary["engines"]  # both nodes' actors met poison rows
    print(f"\ntwo-node poison: {len(records)} records, 2 x 500 (the poison rows), engine restarts per node "
          f"{sorted(restarted_on.values())}, wall {summary['wall_s']:.0f}s")

    if scraped is None:
        pytest.skip("no `prometheus` binary (Debian's package; .ci/run installs it): the metrics were not checked")
    recorded, live, vllm = scraped
    # the recorded counters, as Prometheus has them, equal the summary's figures
    codes = {"200": summary["completions"]}
    for kind, rows in summary["errors_by_type"].items():
        codes[kind.rsplit("(", 1)[1].rstrip(")")] = rows
    assert recorded["rows by code"] == codes == {"200": 10, "500": 2, "400": 1}, (recorded, summary)
    for name in ("prompt_tokens", "completion_tokens", "rows_retried", "rows_failed", "rows_recovered"):
        assert recorded[name] == summary[name], (name, recorded, summary)
    assert recorded["shards done"] == summary["shards_run"] == 4
    # the engines' live figures carry the engine and node labels; restarts on both nodes
    assert sorted(live["restarts by node"].values()) == sorted(restarted_on.values()), (live, restarted_on)
    assert sum(live["restarts by node"].values()) == summary["engine_restarts"]
    assert live["answered"] >= 10 and live["engines"] >= 4
    # vLLM's own engine metrics, labelled with the job's engine ids (a subset of the engines that
    # started: one killed before its first step records nothing), from both nodes
    engines = {e["engine"] for e in summary["engines"]}
    for name, labelled in vllm.items():
        assert labelled["engines"] and labelled["engines"] <= engines, (name, labelled, engines)
        assert labelled["nodes"] == set(restarted_on), (name, labelled)
    assert silent == [], f"the dashboard's queries that found no data for the run: {silent}"
    print(f"Prometheus: rows by code {recorded['rows by code']}, tokens {recorded['prompt_tokens']} prompt "
          f"{recorded['completion_tokens']} completion, restarts by node {live['restarts by node']}")


DASHBOARD = Path(__file__).resolve().parents[2] / "configs" / "grafana" / "batch-completions.json"


def _dashboard_queries_without_data(scraper: "prometheus.Prometheus", job: str, start: float, end: float) -> list[str]:
    """The dashboard's PromQL queries (its `output` variable set to this job's) that return nothing over the run."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    queries = [t["expr"] for panel in panels for t in panel["targets"]]
    assert len(queries) >= 10
    return [q for q in queries
            if not any(series["values"] for series in scraper.query_range(q.replace("$output", job), start, end + 60))]


def _scraped(scraper: "prometheus.Prometheus", job: str, rows: int) -> tuple[dict, dict, dict]:
    """The job's figures from Prometheus's HTTP API, once every row's record was scraped (the counters of
    processes that exited are read back with last_over_time)."""

    def value(promql: str, by: str | None = None) -> dict[str, float] | float:
        result = scraper.query(promql)
        if by is None:
            return float(result[0]["value"][1]) if result else 0.0
        return {r["metric"][by]: float(r["value"][1]) for r in result}

    def total(name: str, by: str | None = None):
        group = f" by ({by})" if by else ""
        return value(f'sum{group}(last_over_time(ray_batch_completions_{name}{{output="{job}"}}[15m]))', by)

    deadline = time.monotonic() + 120
    while total("rows_recorded_total") < rows and time.monotonic() < deadline:
        time.sleep(2)
    recorded = {"rows by code": {code: int(n) for code, n in total("rows_recorded_total", "code").items()},
                "shards done": int(value(f'sum(last_over_time(ray_batch_completions_shards_total'
                                         f'{{output="{job}",state="done"}}[15m]))'))}
    for name in ("prompt_tokens", "completion_tokens", "rows_retried", "rows_failed", "rows_recovered"):
        recorded[name] = int(total(f"{name}_total"))
    live = {"restarts by node": {node: int(n) for node, n in total("engine_restarts_total", "node").items() if n},
            "answered": total("rows_answered_total"),
            "engines": len(scraper.query(f'last_over_time(ray_batch_completions_engine_starts_total{{output="{job}"}}[15m])'))}
    vllm = {}
    for name in VLLM_METRICS:
        series = scraper.query(f'last_over_time(ray_vllm_{name}{{output="{job}"}}[15m])')
        vllm[name] = {"engines": {s["metric"]["engine"] for s in series}, "nodes": {s["metric"]["node"] for s in series}}
    return recorded, live, vllm
