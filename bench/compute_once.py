"""Compute once: a workload whose requests repeat, this pipeline against plain vLLM `LLM.generate`.

    .venv/bin/python bench/compute_once.py [--rows 2000] [--repeat-share 0.3] [--new-rows 1000]

Job 1: `--rows` rows, a `--repeat-share` of them repeats of other rows' requests (the same body), half
greedy (temperature 0), half sampled with a `seed` (temperature 0.8), max_tokens 24..64, a third of
them with `logprobs: 2`. Job 2: the same rows again under new ids, plus `--new-rows` new requests, in a
new file (a scheduled run over a dataset that grew). Each is run three ways, each way a process of its
own, end to end, one engine each:

  vllm      `LLM.generate` over every row, in order (what plain vLLM, ray.data.llm or `lm_eval --model
            vllm` do: every row to the engine);
  nothing reused  `python -m pipeline run` with `answer_store: {mode: off, merge_repeats: false}`:
            every row to the engine (the pipeline before compute-once);
  pipeline  `python -m pipeline run` as it runs by default, the answer store shared between its two
            jobs (a folder of the benchmark's own), repeated requests answered once.

Prints per job: the wall times and their ratios (vLLM / pipeline; targets 1.7 for job 1 and 2.4 for
job 2), the engine's prompt and completion tokens against the distinct requests' (from vLLM's own
answers; target within 1%), how many rows' answers differ from vLLM's to the same request (text and
token counts) and how many records differ from the nothing-reused run's (choices with text, logprobs
and finish reason, usage, model; each row's response `id` is its own; target 0). Writes
bench/results/compute-once.json. The 2-core development machine: run it when nothing else runs.
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

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "pipeline" / "models" / "assets" / "corpus.txt"
ENGINE = {"device": "cpu", "num_actors": 1, "cpus_per_actor": 1, "dtype": "float32", "max_model_len": 1024,
          "gpu_memory_utilization": 0.5, "cpu_kvcache_space_gb": 1}
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}


def requests(count: int, seed: int) -> list[dict[str, Any]]:
    """`count` distinct requests: a window of corpus words, a budget, greedy or seeded."""
    words = CORPUS.read_text(encoding="utf-8").split()
    rng = random.Random(seed)
    out = []
    for i in range(count):
        start, length = rng.randrange(len(words)), rng.randint(6, 30)
        prompt = " ".join(words[(start + j) % len(words)] for j in range(length)) + f" ({seed}.{i})"
        greedy = i % 2 == 0
        out.append({"prompt": prompt, "max_tokens": rng.randint(24, 64), "temperature": 0.0 if greedy else 0.8,
                    "seed": None if greedy else rng.randrange(1 << 30), "logprobs": 2 if i % 3 == 0 else None})
    return out


def workload(rows: int, repeat_share: float, new_rows: int) -> tuple[list[dict], list[dict]]:
    """Job 1's rows (a share of them repeats) and job 2's (job 1's again, new ids, and new requests)."""
    distinct = requests(rows - int(rows * repeat_share), seed=1)
    rng = random.Random(2)
    first = distinct + [rng.choice(distinct) for _ in range(rows - len(distinct))]
    rng.shuffle(first)
    second = first + requests(new_rows, seed=3)
    return ([{"id": f"one-{i}", **r} for i, r in enumerate(first)],
            [{"id": f"two-{i}", **r} for i, r in enumerate(second)])


def write(rows: list[dict], path: Path) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([
        ("id", pa.string()), ("prompt", pa.string()), ("max_tokens", pa.int64()), ("temperature", pa.float64()),
        ("seed", pa.int64()), ("logprobs", pa.int64())])), path)


def run_vllm(source: Path, result: Path) -> None:
    """The `vllm` way, in this process (`--vllm`): LLM.generate over every row."""
    started = time.monotonic()
    from pipeline.config import EngineConfig
    from pipeline.engine.engine_args import engine_args
    from pipeline.models.tiny_model import resolve_model
    from vllm import LLM, SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = engine_args(EngineConfig(**ENGINE), resolve_model("builtin:tiny-llama"), "tiny-llama", {})
    defaults = AsyncEngineArgs()
    import dataclasses

    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(args)
              if getattr(args, f.name) != getattr(defaults, f.name)}
    llm = LLM(**kwargs)
    rows = pq.read_table(source).to_pylist()
    params = [SamplingParams(max_tokens=r["max_tokens"], temperature=r["temperature"], top_p=0.7, seed=r["seed"],
                             logprobs=r["logprobs"]) for r in rows]
    outputs = llm.generate([r["prompt"] for r in rows], params, use_tqdm=False)
    answers = {r["id"]: {"text": o.outputs[0].text, "prompt_tokens": len(o.prompt_token_ids),
                         "completion_tokens": len(o.outputs[0].token_ids)} for r, o in zip(rows, outputs)}
    result.write_text(json.dumps({"wall_s": time.monotonic() - started, "answers": answers}))


def timed(command: list[str], log: Path) -> float:
    started = time.monotonic()
    with log.open("w") as out:
        code = subprocess.run(command, cwd=ROOT, env={**os.environ, **ENV}, stdout=out,
                              stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"{command} failed ({code}); its log: {log.read_text()[-3000:]}")
    return time.monotonic() - started


def pipeline_job(work: Path, name: str, reuse: bool) -> dict[str, Any]:
    """`reuse`: the answer store shared between the jobs and repeats merged (the defaults); else neither."""
    way = name if reuse else f"{name}-nothing-reused"
    config = {"input": {"path": str(work / f"{name}.parquet"), "id_column": "id"},
              "output": {"path": str(work / f"out-{way}"), "mode": "overwrite"},
              "model": {"path": "builtin:tiny-llama", "served_name": "tiny-llama"}, "engine": ENGINE,
              "defaults": {"temperature": 0.2, "top_p": 0.7},
              "answer_store": {"path": str(work / "store")} if reuse else {"mode": "off", "merge_repeats": False}}
    (work / f"{way}.yaml").write_text(json.dumps(config))
    wall = timed([sys.executable, "-m", "pipeline", "run", "--config", str(work / f"{way}.yaml")],
                 work / f"pipeline-{way}.log")
    summary = json.loads((work / f"out-{way}" / "summary.json").read_text())
    records = pq.read_table(work / f"out-{way}" / "data").to_pylist()
    return {"wall_s": round(wall, 2), "summary": summary,
            "answers": {r["row_key"]: {"text": r["response"]["choices"][0]["text"],
                                       "prompt_tokens": r["response"]["usage"]["prompt_tokens"],
                                       "completion_tokens": r["response"]["usage"]["completion_tokens"]}
                        for r in records},
            "records": {r["row_key"]: _record(r["response"]) for r in records}}


def _record(response: dict[str, Any]) -> dict[str, Any]:
    """What a record's answer is: the choices (text, logprobs, finish reason) and usage; not its id."""
    choices = [{k: c[k] for k in ("index", "text", "logprobs", "finish_reason", "stop_reason") if k in c}
               for c in response["choices"]]
    return {"choices": choices, "usage": response["usage"], "model": response["model"]}


def distinct_tokens(rows: list[dict], answers: dict[str, dict]) -> tuple[int, int]:
    seen: dict[str, dict] = {}
    for row in rows:
        seen.setdefault(json.dumps({k: v for k, v in row.items() if k != "id"}, sort_keys=True), answers[row["id"]])
    return sum(a["prompt_tokens"] for a in seen.values()), sum(a["completion_tokens"] for a in seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--repeat-share", type=float, default=0.3)
    parser.add_argument("--new-rows", type=int, default=1000)
    parser.add_argument("--vllm", nargs=2, metavar=("SOURCE", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.vllm:
        run_vllm(Path(args.vllm[0]), Path(args.vllm[1]))
        return
    work = Path(tempfile.mkdtemp(prefix="bench-once-"))
    first, second = workload(args.rows, args.repeat_share, args.new_rows)
    results: dict[str, Any] = {"rows": args.rows, "repeat_share": args.repeat_share, "new_rows": args.new_rows,
                               "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "jobs": {}}
    for name, rows, new in (("one", first, first), ("two", second, second[len(first):])):
        write(rows, work / f"{name}.parquet")
        vllm_wall = timed([sys.executable, __file__, "--vllm", str(work / f"{name}.parquet"),
                           str(work / f"vllm-{name}.json")], work / f"vllm-{name}.log")
        vllm = json.loads((work / f"vllm-{name}.json").read_text())["answers"]
        plain = pipeline_job(work, name, reuse=False)  # every row to the engine: the product before this
        mine = pipeline_job(work, name, reuse=True)
        cost = mine["summary"].get("cost") or {}
        engine_tokens = (cost.get("input_tokens", 0), cost.get("output_tokens", 0))
        needed = distinct_tokens(new if name == "two" else rows, vllm)
        differ = [k for k in vllm if vllm[k] != mine["answers"][k]]
        differ_plain = [k for k in plain["records"] if plain["records"][k] != mine["records"][k]]
        line = {"vllm_wall_s": round(vllm_wall, 2), "pipeline_wall_s": mine["wall_s"],
                "ratio_vllm_over_pipeline": round(vllm_wall / mine["wall_s"], 3),
                "pipeline_engine_tokens": engine_tokens, "distinct_new_requests_tokens": needed,
                "rows_shared": mine["summary"].get("rows_shared"), "rows_from_store": mine["summary"].get("rows_from_store"),
                "rows_differ_from_vllm": len(differ), "differ_examples": differ[:5],
                "nothing_reused_wall_s": plain["wall_s"],
                "ratio_vllm_over_nothing_reused": round(vllm_wall / plain["wall_s"], 3),
                "records_differ_from_nothing_reused": len(differ_plain), "differ_nothing_reused_examples": differ_plain[:5]}
        results["jobs"][name] = line
        print(f"job {name}: {len(rows)} rows; vLLM {vllm_wall:.1f} s, pipeline {mine['wall_s']:.1f} s "
              f"(ratio {line['ratio_vllm_over_pipeline']}); engine tokens {engine_tokens} vs the distinct new "
              f"requests' {needed}; shared {line['rows_shared']}, from the store {line['rows_from_store']}; "
              f"{len(differ)} rows differ from vLLM's answer; nothing reused: {plain['wall_s']:.1f} s (ratio "
              f"{line['ratio_vllm_over_nothing_reused']}), {len(differ_plain)} records differ from it", flush=True)
    out = ROOT / "bench" / "results" / "compute-once.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
