"""`python -m pipeline eval`: lm-evaluation-harness tasks answered by the pipeline (harness.py).

    python -m pipeline eval --config PIPELINE.yaml --tasks TASKS [any argument of `lm_eval run`]

`--config` is the pipeline's config (model, adapters, engine, cluster, and a sweep); the harness's own
YAML config, if any, is `--harness_config`; `--verbose` is the pipeline's, as `run`'s. Every other
argument goes to the harness's command line as it is (`--tasks`, `--include_path`, `--num_fewshot`,
`--limit`, `--output_path`, `--log_samples`, `--seed`, `--gen_kwargs`, ...), with `--model pipeline` and
`--model_args config=...` added. The harness
has no plugin entry point for models (its registry is a table in its own source), so `lm_eval --model
pipeline` cannot find the model; this command registers it, then runs `lm_eval run`.

With a sweep, each variant (a model, an adapter, request fields) is evaluated in turn, its results in
`<output_path>/<variant>/` as the harness writes them, and then the variants are compared per task and
metric: the mean with its 95% interval and the paired difference from the first variant over the
documents both scored (evaluation/stats.py), printed and written to `<output_path>/comparison.json`.

The terminal, as `run`'s (reporting/console.py): the evaluation's own lines (each request kind's job,
its progress), the harness's results table, errors, and at the end where the log file is. The engine
actors' output (forwarded by Ray), the harness's logging, the `datasets` library's progress bars and
whatever else is written on stderr go to the log file; `--verbose` shows them all.
"""

from __future__ import annotations

import json
import logging
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError
from pipeline.evaluation.compare import render_scores
from pipeline.evaluation.stats import paired_difference, summarize
from pipeline.io import storage
from pipeline.io.plan import InputError
from pipeline.job import harness, task_index
from pipeline.job.harness import MODEL_NAME, job_config
from pipeline.reporting import console

log = logging.getLogger(__name__)
EXIT_OK, EXIT_BAD_INPUT = 0, 2


def _take(args: list[str], flag: str) -> str | None:
    """Remove `flag VALUE` from args; return VALUE (the last one given)."""
    value = None
    while flag in args:
        at = args.index(flag)
        value = args[at + 1] if at + 1 < len(args) else None
        del args[at:at + 2]
    return value


def _take_flag(args: list[str], flag: str) -> bool:
    """Remove every `flag` (without a value) from args; return whether there was one."""
    found = flag in args
    args[:] = [arg for arg in args if arg != flag]
    return found


def _take_model_args(args: list[str]) -> dict[str, str]:
    """Remove `--model_args` and its `k=v` values (comma- or space-separated); return them."""
    given: dict[str, str] = {}
    while "--model_args" in args:
        at = args.index("--model_args")
        end = at + 1
        while end < len(args) and not args[end].startswith("--"):
            end += 1
        for token in args[at + 1:end]:
            given.update(part.split("=", 1) for part in token.split(",") if "=" in part)
        del args[at:end]
    return given


def main(argv: list[str]) -> int:
    args = list(argv)
    verbose = _take_flag(args, "--verbose")  # the pipeline's, not lm_eval's (its own is --verbosity)
    config = _take(args, "--config")
    harness_config = _take(args, "--harness_config")
    given = _take_model_args(args)
    config = config or given.pop("config", None)
    if not config:
        print("error: name the pipeline config: --config FILE", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        job = job_config(config, given.get("output"))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from pipeline.pool.attached import join_local_head

    join_local_head(job)  # a pool on this machine's local head: its token, before Ray is imported
    if find_spec("lm_eval") is None:
        print("error: lm-evaluation-harness is not installed: pip install 'batch-completions[harness]'",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    variants = job.variants()
    sweep = len(variants) > 1
    output_path = args[args.index("--output_path") + 1] if "--output_path" in args[:-1] else None
    if sweep and output_path is None:
        print("error: a sweep's evaluation compares the variants' samples: give --output_path", file=sys.stderr)
        return EXIT_BAD_INPUT
    if sweep and "--log_samples" not in args:
        args.append("--log_samples")
    if harness_config:
        args += ["--config", harness_config]
    with console.session(verbose=verbose) as log_file:
        try:  # first: the engines start while the harness imports itself and builds its requests
            harness.start(job)
        except (ConfigError, InputError) as exc:  # the model's adapters, engine.vllm: before Ray starts
            console.say(f"error: {exc}")
            return EXIT_BAD_INPUT
        harness.yield_to_engines()
        try:
            from pipeline.job.harness_model import register  # imports lm_eval's model classes

            register()
            task_index.install()  # the harness's built-in tasks indexed once, not at every evaluation
            for variant in variants:
                model_args = {**given, "config": config, "model": variant.name or variant.served_name}
                if variant.name:
                    model_args["variant"] = variant.name
                    print(f"\n== variant {variant.name}: {variant.served_name} {json.dumps(variant.params)} ==",
                          flush=True)
                _lm_eval(["lm_eval", "run", "--model", MODEL_NAME,
                          "--model_args", ",".join(f"{k}={v}" for k, v in model_args.items()), *args])
        finally:
            harness.stop()
        log.info("request records under %s", storage.redact(job.output.path))
    if sweep:
        lines = compare_variants(Path(output_path), [v.name for v in variants])
        for line, variant in zip(lines, variants):
            line["cost"] = variant_cost(job, variant.name)
        (Path(output_path) / "comparison.json").write_text(json.dumps(lines, indent=2))
        print(f"\n== comparison ({output_path}/comparison.json) ==\n{render_scores(lines)}", flush=True)
        for line in lines:
            cost = line["cost"]
            print(f"cost of {line['variant']}: {cost['accelerator_s']:.1f} {cost['accelerator']}-s"
                  + (f", {cost['total']:.4g} {cost['currency']}" if cost["total"] is not None else ""), flush=True)
    print(f"log: {log_file}", flush=True)
    return EXIT_OK


def _lm_eval(argv: list[str]) -> None:
    """The harness's command line (`lm_eval.__main__.cli_evaluate`) on `argv`, in the session: its
    logger goes through the session's (the log file; its errors on the terminal too), and a mistake in
    its arguments is printed on the terminal, where argparse's message would have been (argparse's
    documented hook for that, `ArgumentParser.error`, for the call)."""
    import argparse
    from unittest import mock

    from lm_eval.__main__ import cli_evaluate
    from lm_eval.utils import setup_logging

    def error_on_terminal(parser: argparse.ArgumentParser, message: str) -> None:
        parser.print_usage(console.terminal())
        console.say(f"{parser.prog}: error: {message}")
        sys.exit(2)

    setup_logging()  # lm-eval's logger set up once (cli_evaluate's call then does nothing), then adopted
    console.adopt("lm_eval")
    sys.argv = argv
    with mock.patch.object(argparse.ArgumentParser, "error", error_on_terminal):
        cli_evaluate()


def variant_cost(job: Any, variant: str) -> dict[str, Any]:
    """What a variant's requests cost in their last runs: the `cost` of each of its jobs' summaries
    (one job per request kind, `<records>/<kind>-<digest>/records/summary.json`), added up."""
    import pyarrow.fs as pafs

    folder = storage.join(job.output.path, variant) if variant else job.output.path
    fs, path = storage.filesystem(folder)
    total: dict[str, Any] = {"accelerator": "", "accelerator_s": 0.0, "input_tokens": 0, "output_tokens": 0,
                             "total": None, "currency": job.cost.currency}
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if info.type != pafs.FileType.Directory:
            continue
        summary = storage.read_json(storage.join(folder, info.base_name, "records", "summary.json"))
        if not summary or not summary.get("cost"):
            continue
        cost = summary["cost"]
        total["accelerator"] = cost["accelerator"]
        for key in ("accelerator_s", "input_tokens", "output_tokens"):
            total[key] += cost[key]
        if cost["total"] is not None:
            total["total"] = (total["total"] or 0.0) + cost["total"]
    return total


def _latest_samples(folder: Path, task: str) -> list[dict[str, Any]]:
    files = sorted(folder.glob(f"samples_{task}_*.jsonl"))
    return [json.loads(line) for line in files[-1].read_text().splitlines()] if files else []


def compare_variants(output_path: Path, names: list[str]) -> list[dict[str, Any]]:
    """Per variant, per task and metric with a number per document: the mean, its 95% interval, and
    the paired difference from the first variant over the documents both have. Metrics whose
    per-document value is not a number (perplexities: a total over the documents) are left out."""
    from lm_eval.utils import sanitize_model_name

    folders = {name: output_path / sanitize_model_name(name) for name in names}
    tasks = sorted({p.name.split("_", 1)[1].rsplit("_", 1)[0] for f in folders.values()
                    for p in f.glob("samples_*.jsonl")})
    per_doc: dict[str, dict[str, dict[str, float]]] = {name: {} for name in names}
    for name, folder in folders.items():
        for task in tasks:
            for sample in _latest_samples(folder, task):
                for metric in sample.get("metrics", []):
                    value = sample.get(metric)
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        per_doc[name].setdefault(f"{task}/{metric}", {})[str(sample["doc_id"])] = float(value)
    baseline = names[0]
    lines = []
    for name in names:
        scores = {}
        for key, values in per_doc[name].items():
            scores[key] = {**summarize(list(values.values())),
                           **paired_difference(values, per_doc[baseline].get(key, {}))}
        lines.append({"variant": name, "baseline": baseline, "errors": 0, "scores": scores})
    return lines
