"""Planning time and driver peak memory: the driver plans the input before any engine starts.

Two cases, each planned by two trees of the code (`--before`, e.g. main's checkout, and this one), each
run in a fresh subprocess that plans the input once and reports its wall time and peak RSS (the
process's VmHWM, its resident high-water mark, and its RSS before planning: imports included). Each is
planned --repeat times, alternating trees; the fastest time is reported (the machine may be shared),
with the CPU time (user + system, all threads) of that run:

    parquet-s3   --files small Parquet files on an S3 endpoint (moto's server on 127.0.0.1)
    jsonl        one OpenAI batch JSONL file of --jsonl-gb GB on local disk (a few repeated custom_ids)

Both trees must plan the same shards (ids, rows, byte ranges, duplicates) and schema: the script checks it.

    PYTHONPATH=$PWD python bench/planning.py --before /work/main
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.s3_server import admin_filesystem, environment, s3_server  # noqa: E402

HERE = Path(__file__).resolve().parents[1]

# Runs in the subprocess, with the tree under test first on PYTHONPATH.
CHILD = r"""
import hashlib, json, os, sys, time
import psutil
from pipeline.io.plan import plan_input
from pipeline.config import InputConfig
config = InputConfig(path=sys.argv[1])
baseline = psutil.Process().memory_info().rss
started, cpu_started = time.perf_counter(), sum(os.times()[:2])
plan = plan_input(config, int(sys.argv[2]))
seconds, cpu_seconds = time.perf_counter() - started, sum(os.times()[:2]) - cpu_started
# the high-water mark of this process's memory (VmHWM; unlike ru_maxrss, not inherited from the parent)
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) * 1024
digest = hashlib.sha256(repr([(s.id, s.start, s.stop, s.byte_start, s.byte_stop, tuple(s.duplicates))
                              for s in plan.shards] + [str(plan.schema)]).encode()).hexdigest()[:16]
print(json.dumps({"seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
                  "peak_rss_mb": round(peak / 2**20, 1),
                  "rss_before_planning_mb": round(baseline / 2**20, 1), "rows": plan.rows,
                  "shards": len(plan.shards), "shards_digest": digest}))
"""


def plan_in_subprocess(tree: Path, uri: str, rows_per_shard: int, env: dict[str, str]) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, uri, str(rows_per_shard)], capture_output=True, text=True,
                            env={**os.environ, **env, "PYTHONPATH": str(tree)}, cwd=tree, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"planning with {tree} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def plan_repeatedly(trees: dict[str, Path], uri: str, rows_per_shard: int, env: dict[str, str],
                    repeat: int) -> dict[str, dict]:
    """Each tree `repeat` times, alternating: the fastest time (the least disturbed by other work on the
    machine), every time, and the highest peak."""
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(repeat):
        for name, tree in trees.items():
            runs[name].append(plan_in_subprocess(tree, uri, rows_per_shard, env))
    return {name: {**min(found, key=lambda r: r["seconds"]), "seconds_each": [r["seconds"] for r in found],
                   "cpu_seconds_each": [r["cpu_seconds"] for r in found],
                   "peak_rss_mb": max(r["peak_rss_mb"] for r in found)}
            for name, found in runs.items()}


def upload_parquet_files(endpoint: str, count: int, rows: int) -> str:
    fs = admin_filesystem(endpoint)
    fs.create_dir("plan-bench")

    def put(i: int) -> None:
        table = pa.table({"id": [f"f{i}-{r}" for r in range(rows)],
                          "prompt": [f"Question {i}.{r}: what is the colour of the sky?" for r in range(rows)]})
        pq.write_table(table, f"plan-bench/in/part-{i:05d}.parquet", filesystem=fs)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(count)))
    return "s3://plan-bench/in"


def write_jsonl(path: Path, gigabytes: float) -> int:
    """Lines of about 1 KB (a prompt of a few paragraphs); every 100,000th line repeats a custom_id."""
    paragraph = ("The harbour master counted the boats that came in with the tide, and wrote each name in "
                 "the ledger beside the weather and the catch. ") * 6
    lines, size = 0, 0
    with open(path, "w") as out:
        while size < gigabytes * 1e9:
            custom_id = f"req-{lines - 1}" if lines % 100_000 == 99_999 else f"req-{lines}"
            line = json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
                               "body": {"model": "tiny-llama", "prompt": f"{lines}: {paragraph}",
                                        "max_tokens": 64}}) + "\n"
            out.write(line)
            size += len(line)
            lines += 1
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="the tree of the code before (e.g. /work/main)")
    parser.add_argument("--after", type=Path, default=HERE, help="the tree of the code after (default: this one)")
    parser.add_argument("--files", type=int, default=2000, help="Parquet files on the S3 endpoint")
    parser.add_argument("--rows-per-file", type=int, default=10)
    parser.add_argument("--jsonl-gb", type=float, default=1.0)
    parser.add_argument("--rows-per-shard", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3, help="plans per tree and case; the fastest is reported")
    parser.add_argument("--out", default=str(HERE / "bench/results/planning.json"))
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    load_at_start = round(os.getloadavg()[0], 1)  # other work on the machine slows the figures down
    results: dict[str, dict] = {}
    work = Path(tempfile.mkdtemp(prefix="plan-bench-"))
    try:
        with s3_server(str(work / "moto.log")) as endpoint:
            uri = upload_parquet_files(endpoint, args.files, args.rows_per_file)
            results["parquet-s3"] = {"what": f"{args.files} Parquet files of {args.rows_per_file} rows on moto's "
                                             "S3 server (127.0.0.1)"}
            results["parquet-s3"].update(plan_repeatedly(trees, uri, args.rows_per_shard, environment(endpoint),
                                                         args.repeat))
        jsonl = work / "batch.jsonl"
        lines = write_jsonl(jsonl, args.jsonl_gb)
        results["jsonl"] = {"what": f"one OpenAI batch JSONL file of {jsonl.stat().st_size / 1e9:.2f} GB, "
                                    f"{lines} lines, local disk"}
        results["jsonl"].update(plan_repeatedly(trees, str(jsonl), args.rows_per_shard, {}, args.repeat))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{'case':<12} {'tree':<7} {'seconds':>8} {'CPU s':>6} {'peak RSS MB':>12} {'RSS before MB':>14} "
          f"{'rows':>9} {'shards':>7}")
    for case, figures in results.items():
        for name in trees:
            f = figures[name]
            print(f"{case:<12} {name:<7} {f['seconds']:>8} {f['cpu_seconds']:>6} {f['peak_rss_mb']:>12} "
                  f"{f['rss_before_planning_mb']:>14} {f['rows']:>9} {f['shards']:>7}")
        before, after = figures["before"], figures["after"]
        same = before["shards_digest"] == after["shards_digest"]
        figures["same_shards"] = same
        figures["time_ratio_before_over_after"] = round(before["seconds"] / after["seconds"], 2)
        figures["planning_memory_mb"] = {k: round(figures[k]["peak_rss_mb"] - figures[k]["rss_before_planning_mb"], 1)
                                         for k in trees}
        print(f"  {case}: {figures['time_ratio_before_over_after']}x faster; memory added by planning "
              f"{figures['planning_memory_mb']['before']} MB -> {figures['planning_memory_mb']['after']} MB; "
              f"same shards: {same}")
    report = {"measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, shared with other jobs",
              "load_average_1min": {"start": load_at_start, "end": round(os.getloadavg()[0], 1)},
              "trees": {k: str(v) for k, v in trees.items()}, "rows_per_shard": args.rows_per_shard, **results}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
