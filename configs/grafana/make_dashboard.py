"""Writes batch-completions.json (the dashboard) beside this file: python configs/grafana/make_dashboard.py.
Edit the panels here, not in the JSON. The e2e test tests/e2e/test_two_node_poison.py runs every query."""
import json
from pathlib import Path

J = 'output=~"$output"'
M = "ray_batch_completions_"
V = "ray_vllm_"  # vLLM's own engine metrics, with the job's labels (pipeline/engine/vllm_metrics.py)
panels_spec = [
    # (title, type, [(expr, legend)], unit, w)
    ("Rows recorded / planned", "gauge", [(f'sum({M}rows_recorded_total{{{J}}}) / sum({M}rows_planned_total{{{J}}})', "done")], "percentunit", 6),
    ("ETA (at the last 5 min's pace)", "stat", [(f'(sum({M}rows_planned_total{{{J}}}) - sum({M}rows_recorded_total{{{J}}})) / sum(rate({M}rows_recorded_total{{{J}}}[5m]))', "ETA")], "s", 6),
    ("Engine restarts", "stat", [(f'sum({M}engine_restarts_total{{{J}}})', "restarts")], "short", 6),
    ("Rows in flight", "stat", [(f'sum({M}rows_in_flight{{{J}}})', "in flight")], "short", 6),
    ("Rows/s per engine", "timeseries", [(f'sum by (engine) (rate({M}rows_answered_total{{{J}}}[1m]))', "{{engine}}"), (f'sum(rate({M}rows_answered_total{{{J}}}[1m]))', "all engines")], "reqps", 12),
    ("Output tokens/s per engine", "timeseries", [(f'sum by (engine) (rate({M}output_tokens_total{{{J}}}[1m]))', "{{engine}}"), (f'sum(rate({M}output_tokens_total{{{J}}}[1m]))', "all engines")], "short", 12),
    ("Rows recorded by status code", "timeseries", [(f'sum by (code) ({M}rows_recorded_total{{{J}}})', "{{code}}")], "short", 12),
    ("Engine utilisation (busy share)", "timeseries", [(f'sum by (engine) (rate({M}engine_busy_seconds_total{{{J}}}[1m]))', "{{engine}}")], "percentunit", 12),
    ("Rows in flight per engine", "timeseries", [(f'sum by (engine, node) ({M}rows_in_flight{{{J}}})', "{{engine}} on {{node}}")], "short", 12),
    ("Shards by state", "timeseries", [(f'sum by (state) ({M}shards_total{{{J}}})', "{{state}}")], "short", 12),
    # vLLM's engine metrics (a counter never incremented has no series: `or vector(0)`)
    ("KV-cache use per engine (vLLM)", "timeseries", [(f'max by (engine) ({V}kv_cache_usage_perc{{{J}}})', "{{engine}}")], "percentunit", 12),
    ("Requests running and waiting (vLLM)", "timeseries", [(f'sum by (engine) ({V}num_requests_running{{{J}}})', "running {{engine}}"), (f'sum by (engine) ({V}num_requests_waiting{{{J}}})', "waiting {{engine}}")], "short", 12),
    ("Time to first token p50 / p95 (vLLM)", "timeseries", [(f'histogram_quantile(0.5, sum by (le) (rate({V}time_to_first_token_seconds_bucket{{{J}}}[1m])))', "p50"), (f'histogram_quantile(0.95, sum by (le) (rate({V}time_to_first_token_seconds_bucket{{{J}}}[1m])))', "p95")], "s", 12),
    ("Inter-token latency p50 / p95 (vLLM)", "timeseries", [(f'histogram_quantile(0.5, sum by (le) (rate({V}inter_token_latency_seconds_bucket{{{J}}}[1m])))', "p50"), (f'histogram_quantile(0.95, sum by (le) (rate({V}inter_token_latency_seconds_bucket{{{J}}}[1m])))', "p95")], "s", 12),
    ("Prompt and generation tokens/s per engine (vLLM)", "timeseries", [(f'sum by (engine) (rate({V}prompt_tokens_total{{{J}}}[1m]))', "prompt {{engine}}"), (f'sum by (engine) (rate({V}generation_tokens_total{{{J}}}[1m]))', "generation {{engine}}")], "short", 12),
    ("Prefix-cache hit rate (vLLM)", "timeseries", [(f'(sum(rate({V}prefix_cache_hits_total{{{J}}}[1m])) or vector(0)) / sum(rate({V}prefix_cache_queries_total{{{J}}}[1m]))', "hits / queries")], "percentunit", 12),
]
panels, x, y = [], 0, 0
for i, (title, kind, targets, unit, w) in enumerate(panels_spec):
    h = 5 if kind in ("gauge", "stat") else 8
    if x + w > 24:
        x, y = 0, y + prev_h
    panels.append({
        "id": i + 1, "title": title, "type": kind,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {} if kind == "timeseries" else {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}},
        "targets": [{"refId": chr(65 + n), "expr": expr, "legendFormat": legend,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}} for n, (expr, legend) in enumerate(targets)],
    })
    x += w
    prev_h = h
dash = {
    "title": "Batch completions",
    "uid": "batch-completions",
    "description": "The pipeline's jobs on a Ray cluster: progress, rows/s and tokens/s per engine, errors by code, engine utilisation, restarts, and vLLM's engine metrics: KV-cache use, running and waiting requests, time to first token, inter-token latency, prefix-cache hits (docs/observability.md).",
    "schemaVersion": 39, "version": 1, "editable": True, "refresh": "10s",
    "time": {"from": "now-1h", "to": "now"},
    "tags": ["ray", "vllm", "batch-completions"],
    "templating": {"list": [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus", "current": {}, "hide": 0},
        {"name": "output", "label": "Job (its output)", "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "query": {"query": f"label_values({M}rows_planned_total, output)", "refId": "output"},
         "definition": f"label_values({M}rows_planned_total, output)", "refresh": 2, "includeAll": True, "multi": True,
         "allValue": ".*", "current": {}, "hide": 0, "sort": 1},
    ]},
    "panels": panels,
}
(Path(__file__).parent / "batch-completions.json").open("w").write(json.dumps(dash, indent=2) + "\n")
print(len(panels), "panels")
