"""Peak memory of a job as its input grows: the driver, the engine actor, its vLLM engine process.

    python bench/memory.py                      # 10k, 100k and 1M rows (the 1M run takes a while)
    python bench/memory.py --rows 10000 100000  # fewer sizes

Each size is a fresh job (its own local Ray, the tiny model, `max_tokens` 1, default shard size) over a
generated Parquet file. Every 0.5 s the script reads the resident memory (RSS) of each process of the
job; it prints the peaks and writes them to bench/results/memory.json. A flat column is the goal: the
driver holds shard descriptors, not rows, and an actor holds the rows of the shards it works on.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

ROLES = {"actor": "MapWorker(MapBatches(EngineActor))", "engine": "VLLM::EngineCore",
         "engine forkserver": "multiprocessing.forkserver", "ray (gcs, raylet, ...)": "ray/core/src"}


def make_input(path: Path, rows: int) -> None:
    with pq.ParquetWriter(path, pa.schema([("prompt", pa.string())])) as writer:
        for start in range(0, rows, 100_000):
            stop = min(rows, start + 100_000)
            writer.write_table(pa.table({"prompt": [f"Item {i} of the list is" for i in range(start, stop)]}),
                               row_group_size=65_536)


class Sampler(threading.Thread):
    """Peak RSS per role, over the processes the job started."""

    def __init__(self, driver: psutil.Process) -> None:
        super().__init__(daemon=True)
        self.driver, self.peaks, self.stop = driver, {"driver": 0}, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            totals = {"driver": 0, **{role: 0 for role in ROLES}}
            try:
                totals["driver"] = self.driver.memory_info().rss
                for proc in self.driver.children(recursive=True):
                    line = " ".join(proc.cmdline())
                    role = next((r for r, mark in ROLES.items() if mark in line), None)
                    if role:
                        totals[role] += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
            for role, value in totals.items():
                self.peaks[role] = max(self.peaks.get(role, 0), value)
            time.sleep(0.5)


def measure(rows: int, work: Path) -> dict:
    make_input(work / f"in-{rows}.parquet", rows)
    command = [sys.executable, "-m", "pipeline", "run", "--config", "configs/local-cpu.yaml",
               "--input", str(work / f"in-{rows}.parquet"), "--output", str(work / f"out-{rows}"),
               "--set", "defaults.max_tokens=1", "--set", "engine.max_model_len=256"]
    started = time.monotonic()
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = Sampler(psutil.Process(job.pid))
    sampler.start()
    output = job.communicate()[0]
    sampler.stop.set()
    sampler.join()
    if job.returncode != 0:
        raise SystemExit(f"the {rows}-row job failed:\n{output[-3000:]}")
    summary = json.loads((work / f"out-{rows}" / "summary.json").read_text())
    return {"rows": rows, "wall_s": round(time.monotonic() - started, 1), "rows_out": summary["rows_out"],
            "shards": summary["shards"],
            "peak_rss_mib": {role: round(v / 2**20) for role, v in sampler.peaks.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--out", default="bench/results/memory.json")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as work:
        for rows in args.rows:
            result = measure(rows, Path(work))
            results.append(result)
            print(json.dumps(result), flush=True)
    roles = list(results[0]["peak_rss_mib"])
    print("\n| rows | " + " | ".join(f"{r} peak RSS (MiB)" for r in roles) + " | wall (s) |")
    print("|---:|" + "---:|" * (len(roles) + 1))
    for r in results:
        print(f"| {r['rows']:,} | " + " | ".join(str(r["peak_rss_mib"][role]) for role in roles)
              + f" | {r['wall_s']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": f"{platform.machine()}, {psutil.cpu_count()} CPUs, "
                                          f"{round(psutil.virtual_memory().total / 2**30)} GiB",
                                          "results": results}, indent=2))


if __name__ == "__main__":
    main()
