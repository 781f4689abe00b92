"""The Grafana dashboard's panels, rendered from a real run without Grafana (none installs here).

    .venv/bin/python bench/dashboard.py [--rows 1280] [--out docs/dashboard.png]

Starts a Ray head on this machine with a metrics port (tests/ray_cluster.py: its own temp dir, ports
and token), a real Prometheus scraping it through Ray's service-discovery file (tests/prometheus.py,
Debian's `prometheus`), runs the job on the sample prompts (repeated) with one CPU engine, then asks
Prometheus each panel's queries of configs/grafana/batch-completions.json over the run (`$output` set
to the job's) and draws them where the dashboard places them: time series as lines, stat and gauge
panels as their last value. Everything it started is stopped by its own process id.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import prometheus  # noqa: E402
from tests.ray_cluster import RayCluster  # noqa: E402

DASHBOARD = ROOT / "configs" / "grafana" / "batch-completions.json"


def run_job(cluster: RayCluster, work: Path, rows: int) -> str:
    sample = pq.read_table(ROOT / "data" / "sample_prompts.parquet")
    copies = [sample.set_column(sample.schema.get_field_index("id"), "id",
                                pa.array([f"{n}-{i}" for i in sample.column("id").to_pylist()]))
              for n in range(-(-rows // sample.num_rows))]  # the sample again, under other ids, for a longer job
    pq.write_table(pa.concat_tables(copies).slice(0, rows), work / "in.parquet")
    out = str(work / "out")
    command = [sys.executable, "-m", "pipeline", "run", "--config", "configs/local-cpu.yaml",
               "--input", str(work / "in.parquet"), "--output", out, "--set", f"ray_address=127.0.0.1:{cluster.port}",
               "--set", "output.rows_per_file=20", "--set", "engine.engine_metrics=true"]
    done = subprocess.run(command, cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"the job failed:\n{(done.stdout + done.stderr)[-3000:]}")
    print(done.stdout[-1200:])
    return out


def draw(panels: list[dict], data: dict[int, list[list[dict]]], start: float, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(20, height * 0.42))
    fig.suptitle(title, fontsize=13)
    for panel in panels:
        grid = panel["gridPos"]
        ax = fig.add_axes([grid["x"] / 24 + 0.035, 1 - (grid["y"] + grid["h"]) / height + 0.035,
                           grid["w"] / 24 - 0.05, grid["h"] / height - 0.075])
        ax.set_title(panel["title"], fontsize=9, loc="left")
        unit = panel["fieldConfig"]["defaults"]["unit"]
        scale = 100 if unit == "percentunit" else 1
        if panel["type"] in ("stat", "gauge"):
            values = [float(s["values"][-1][1]) for target in data[panel["id"]] for s in target if s["values"]]
            text = "no data" if not values else f"{values[0] * scale:,.1f}" + ("%" if scale == 100 else
                                                                           " s" if unit == "s" else "")
            ax.text(0.5, 0.45, text, ha="center", va="center", fontsize=22)
            ax.set_axis_off()
            continue
        for target, series_list in zip(panel["targets"], data[panel["id"]]):
            for series in series_list:
                legend = target["legendFormat"]
                for key, value in series["metric"].items():
                    legend = legend.replace("{{" + key + "}}", value[:20])
                t = [(float(ts) - start) / 60 for ts, _ in series["values"]]
                y = [float(v) * scale for _, v in series["values"]]
                ax.plot(t, y, label=legend, linewidth=1.2)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("minutes since the job started", fontsize=7)
        if ax.lines:
            ax.legend(fontsize=6, loc="upper left")
    fig.savefig(path, dpi=80)
    print(f"written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1280)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    args = parser.parse_args()
    if not prometheus.available():
        raise SystemExit("no `prometheus` binary: apt-get install prometheus (Debian's package)")
    panels = json.loads(DASHBOARD.read_text())["panels"]
    cluster = RayCluster()
    scraper = None
    try:
        cluster.start_head(dashboard=True)
        scraper = prometheus.Prometheus(f"{cluster.temp_dir}/prom_metrics_service_discovery.json")
        with tempfile.TemporaryDirectory(prefix="dashboard-") as tmp:
            start = time.time()
            output = run_job(cluster, Path(tmp), args.rows)
            time.sleep(15)  # the last export and scrape
            end = time.time()
            data = {p["id"]: [scraper.query_range(t["expr"].replace("$output", output), start, end, 5)
                              for t in p["targets"]] for p in panels}
    finally:
        if scraper is not None:
            scraper.stop()
        cluster.stop()
    silent = [p["title"] for p in panels if not any(s["values"] for target in data[p["id"]] for s in target)]
    when = datetime.fromtimestamp(start).strftime("%Y-%m-%d %H:%M")
    draw(panels, data, start, f"Batch completions dashboard, rendered from Prometheus for a {args.rows}-row job "
         f"on one CPU engine (one Ray node, tiny model) ({when}); panels without data: {silent or 'none'}", args.out)


if __name__ == "__main__":
    main()
