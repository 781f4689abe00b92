"""How many greedy and seeded rows change when the same job runs another way.

    .venv/bin/python bench/agreement.py --preset determinism   # batch composition: the determinism table
    .venv/bin/python bench/agreement.py --preset engines       # tensor/pipeline parallel, n-gram speculation
    .venv/bin/python bench/agreement.py --models builtin:tiny-llama --rows 80 --ways again "2 actors"

One dataset (half greedy rows, half seeded rows at temperature 1, or only greedy rows with
`--greedy-only`; every row asks for its tokens' log-probabilities) is answered by the pipeline several ways, each in its own `python -m pipeline run`:

  baseline            1 engine actor, shards of 40 rows, rows_in_flight at its default (2 x max_num_seqs)
 determinism (batch composition):
  again               the baseline once more: what changes between two identical runs
  2 actors            num_actors 2: the rows split over two engines
  shards of 7         output.rows_per_file 7: other rows share an engine step
  rows_in_flight 8    at most 8 rows in the engine at once: small batches
  batch invariant     the baseline with vLLM's batch-invariant mode (engine.batch_invariant), where the
                      engine can run it (GPU only); its cost is its generation time over the baseline's
 engines (vLLM's engine arguments through engine.vllm; 2 cores for the engine):
  tensor parallel 2   engine.tensor_parallel_size 2 (vLLM's multiprocessing executor, the CPU build's)
  pipeline parallel 2 engine.vllm.pipeline_parallel_size 2
  ngram speculation   engine.vllm.speculative_config: n-gram (prompt lookup), 3 tokens, no draft model

Each way is compared with the baseline row by row (by row key): rows whose text differs (greedy and
seeded apart), rows whose token log-probabilities are not bit-identical, and the largest difference of
a token's log-probability over the tokens both generated. Batch composition changes the order of the
floating-point sums in the engine's kernels, so bits can change; whether text changes depends on how
close the top two tokens come. Results: bench/results/determinism.json (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "pipeline" / "models" / "assets" / "corpus.txt"
MODELS = {"builtin:tiny-llama": "float32", "builtin:bench-llama-27m": "bfloat16"}
WAYS: dict[str, tuple[list[str], dict[str, str]]] = {  # way -> (--set overrides, environment)
    "baseline": ([], {}),
    "again": ([], {}),
    "2 actors": (["engine.num_actors=2"], {}),
    "shards of 7": (["output.rows_per_file=7"], {}),
    "rows_in_flight 8": (["engine.rows_in_flight=8"], {}),
    "batch invariant": (["engine.batch_invariant=true"], {}),
    "tensor parallel 2": (["engine.tensor_parallel_size=2", "engine.cpus_per_actor=2"], {}),
    "pipeline parallel 2": (["engine.vllm.pipeline_parallel_size=2", "engine.cpus_per_actor=2"], {}),
    "ngram speculation": (["engine.vllm.speculative_config={method: ngram, num_speculative_tokens: 3, "
                           "prompt_lookup_max: 3, prompt_lookup_min: 1}"], {}),
}
PRESETS = {"determinism": ["again", "2 actors", "shards of 7", "rows_in_flight 8", "batch invariant"],
           "engines": ["tensor parallel 2", "pipeline parallel 2", "ngram speculation"]}


def dataset(rows: int, max_tokens: int, greedy_only: bool = False) -> pa.Table:
    words = CORPUS.read_text().split()
    rng = random.Random(0)
    prompts = []
    for _ in range(rows):
        start, length = rng.randrange(len(words)), rng.randint(3, 80)
        prompts.append(" ".join(words[(start + i) % len(words)] for i in range(length)))
    half = rows if greedy_only else rows // 2
    return pa.table({
        "prompt": prompts,
        "temperature": [0.0] * half + [1.0] * (rows - half),
        "seed": [None] * half + list(range(rows - half)),
        "max_tokens": [max_tokens] * rows,
        "logprobs": [1] * rows,
    })


def job(work: Path, model: str, dtype: str) -> dict[str, Any]:
    return {
        "input": {"path": str(work / "rows.parquet")},
        "output": {"path": str(work / "out"), "mode": "overwrite", "rows_per_file": 40},
        "model": {"path": model},
        "engine": {"device": "cpu", "num_actors": 1, "cpus_per_actor": 1, "dtype": dtype, "max_model_len": 2048,
                   "gpu_memory_utilization": 0.5, "enforce_eager": True, "enable_chunked_prefill": False},
    }


def run_way(work: Path, way: str) -> dict[str, Any]:
    overrides, env = WAYS[way]
    out = work / way.replace(" ", "-")
    command = [sys.executable, "-m", "pipeline", "run", "--config", str(work / "job.yaml"),
               "--set", f"output.path={out}", *(a for o in overrides for a in ("--set", o))]
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode != 0:
        (work.parent / f"agreement-{way.replace(' ', '-')}.log").write_text(done.stdout + done.stderr)
        return {"error": (done.stdout + done.stderr).strip().splitlines()[-1][:300], "exit": done.returncode}
    summary = json.loads((out / "summary.json").read_text())
    table = pq.read_table(out / "data", columns=["row_key", "response"]).to_pylist()
    rows = {}
    for r in table:  # an error record (none expected) counts as changed text
        choice = r["response"]["choices"][0] if r["response"] else {"text": None, "logprobs": None}
        rows[r["row_key"]] = (choice["text"], (choice["logprobs"] or {}).get("token_logprobs") or [])
    return {"rows": rows, "wall_s": round(time.monotonic() - started, 1),
            "generation_s": round(summary["wall_s"] - summary["first_engine_ready_s"], 1)}


def compare(base: dict[str, Any], other: dict[str, Any], greedy: set[str]) -> dict[str, Any]:
    text = {"greedy": 0, "seeded": 0}
    bits, largest, example = 0, 0.0, None
    for key, (words, logprobs) in base["rows"].items():
        their_words, theirs = other["rows"][key]
        if their_words != words:
            text["greedy" if key in greedy else "seeded"] += 1
            if key in greedy and example is None:
                example = {"row": key, "baseline": words, "this way": their_words}
        if theirs != logprobs:
            bits += 1
        for a, b in zip(logprobs, theirs):
            largest = max(largest, abs(a - b))
    return {"greedy_text_changed": text["greedy"], "seeded_text_changed": text["seeded"],
            "logprobs_changed": bits, "largest_logprob_diff": largest, "greedy_example": example,
            "generation_s_vs_baseline": round(other["generation_s"] / base["generation_s"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--preset", choices=list(PRESETS), default="determinism")
    parser.add_argument("--ways", nargs="+", choices=list(WAYS), help="instead of the preset's")
    parser.add_argument("--rows", type=int, default=160)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--greedy-only", action="store_true", help="every row greedy (no seeded rows)")
    parser.add_argument("--out", type=Path, help="default: bench/results/<preset>.json")
    args = parser.parse_args()
    ways = ["baseline"] + [w for w in (args.ways or PRESETS[args.preset]) if w != "baseline"]
    args.out = args.out or ROOT / "bench" / "results" / f"{args.preset if not args.ways else 'agreement'}.json"
    greedy_rows = args.rows if args.greedy_only else args.rows // 2
    results: dict[str, Any] = {"settings": {"rows": args.rows, "greedy_rows": greedy_rows,
                                            "max_tokens": args.max_tokens, "ways": ways}, "models": {}}
    for model in args.models:
        with tempfile.TemporaryDirectory(prefix="determinism-") as folder:
            work = Path(folder)
            pq.write_table(dataset(args.rows, args.max_tokens, args.greedy_only), work / "rows.parquet")
            (work / "job.yaml").write_text(yaml.safe_dump(job(work, model, MODELS[model])))
            runs = {}
            for way in ways:
                print(f"[{model}] {way} ...", flush=True)
                runs[way] = run_way(work, way)
                if "error" in runs["baseline"]:
                    raise SystemExit(f"the baseline failed: {runs['baseline']['error']}")
            greedy = {f"rows.parquet:{i}" for i in range(greedy_rows)}
            table = {}
            for way in ways[1:]:
                if "error" in runs[way]:
                    table[way] = {"error": runs[way]["error"]}
                else:
                    table[way] = compare(runs["baseline"], runs[way], greedy)
            results["models"][model] = {"dtype": MODELS[model], "baseline_generation_s":
                                        runs["baseline"].get("generation_s"), "ways": table}
            print(render(model, table), flush=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")  # after each model
    print(f"written to {args.out}")


def render(model: str, table: dict[str, Any]) -> str:
    lines = [f"{model}: rows changed against the baseline",
             f"  {'way':18} {'greedy text':>11} {'seeded text':>11} {'logprobs':>9} {'max |dlp|':>10} {'time':>5}"]
    for way, r in table.items():
        if "error" in r:
            lines.append(f"  {way:18} does not run here: {r['error']}")
        else:
            lines.append(f"  {way:18} {r['greedy_text_changed']:>11} {r['seeded_text_changed']:>11} "
                         f"{r['logprobs_changed']:>9} {r['largest_logprob_diff']:>10.2e} "
                         f"{r['generation_s_vs_baseline']:>5.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
