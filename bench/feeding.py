"""Engine feeding whatever the shard size: one actor, the same rows, small shards vs one shard.

    .venv/bin/python bench/feeding.py [--rows 1920] [--small 40] [--max-tokens 48]

Runs the same job twice on one engine actor (the tiny model, short prompts, `max_tokens` 48): once cut
into shards of `--small` rows, once as a single shard. Prints wall time (whole job, and after the engine
was ready), the most rows that were in the engine's hands at once (from the shards' intervals), and the
ratio small/one. Writes bench/results/feeding.json. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import JobConfig
from pipeline.job.run import run
from pipeline.io.tally import Tally


def most_rows_at_once(tallies: list[Tally]) -> int:
    events = sorted([(t.intervals[0][0], t.rows) for t in tallies] + [(t.intervals[0][1], -t.rows) for t in tallies])
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


def one_run(work: Path, name: str, rows_per_file: int, max_tokens: int) -> dict:
    config = JobConfig.model_validate({
        "input": str(work / "in.parquet"), "output": {"path": str(work / name), "rows_per_file": rows_per_file},
        "engine": {"device": "cpu", "dtype": "float32", "max_model_len": 512, "gpu_memory_utilization": 0.5},
        "defaults": {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True},
    })
    started = time.time()
    summary = run(config)
    wall = time.time() - started
    tallies = [Tally.model_validate_json(p.read_text()) for p in (work / name / "shards").glob("*.json")]
    (engine,) = summary.engines
    return {"rows_per_file": rows_per_file, "shards": summary.shards, "wall_s": round(wall, 2),
            "after_engine_ready_s": round(wall - summary.first_engine_ready_s, 2),
            "most_rows_in_flight": most_rows_at_once(tallies), "engine_busy_share": engine.busy_share,
            "completion_tokens": summary.completion_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1920)
    parser.add_argument("--small", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        words = "the quick brown fox jumps over a lazy dog near the river bank".split()
        prompts = [" ".join(words[(i + j) % len(words)] for j in range(8 + i % 32)) for i in range(args.rows)]
        pq.write_table(pa.table({"prompt": prompts}), work / "in.parquet")
        small = one_run(work, "small", args.small, args.max_tokens)
        whole = one_run(work, "whole", args.rows, args.max_tokens)
    import ray

    ray.shutdown()
    result = {
        "machine": {"platform": platform.platform(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
        "rows": args.rows, "max_tokens": args.max_tokens, "small_shards": small, "one_shard": whole,
        "ratio_wall": round(small["wall_s"] / whole["wall_s"], 3),
        "ratio_after_engine_ready": round(small["after_engine_ready_s"] / whole["after_engine_ready_s"], 3),
    }
    out = Path(__file__).parent / "results" / "feeding.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    for label, r in (("small shards", small), ("one shard", whole)):
        print(f"{label:>13}: {r['shards']:>3} shards of {r['rows_per_file']:>5} rows  wall {r['wall_s']:6.1f}s  "
              f"after engine ready {r['after_engine_ready_s']:6.1f}s  most rows in flight {r['most_rows_in_flight']:>5}  "
              f"engine busy {r['engine_busy_share']:.0%}")
    print(f"ratio small/one: wall {result['ratio_wall']:.3f}, after engine ready {result['ratio_after_engine_ready']:.3f}")


if __name__ == "__main__":
    main()
