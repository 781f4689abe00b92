"""Engine start-up with and without LoRA adapters, on the tiny model, alternating in one run.

    .venv/bin/python bench/adapter_startup.py [--rounds 2]

Each round starts the CPU engine twice, the way a job's actor does: once for the base model alone
(LoRA off) and once with `builtin:tiny-lora-a` and `builtin:tiny-lora-b` (LoRA on), and times
`CompletionEngine.start` (what a job's summary reports as `engine_startup_s`) and, with adapters,
loading them into the engine (at the first request) plus that first greedy request. Prints the medians
and their ratio; writes bench/results/adapter_startup.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

from pipeline.models.adapters import discover, localize
from pipeline.config import JobConfig
from pipeline.engine.completion_engine import CompletionEngine
from pipeline.models.tiny_model import resolve_model

ADAPTERS = {"tiny-lora-a": "builtin:tiny-lora-a", "tiny-lora-b": "builtin:tiny-lora-b"}


def start_once(with_adapters: bool) -> tuple[float, float]:
    """(engine start-up s, first request s: loading the adapters, if any, and one greedy request)."""
    config = JobConfig.model_validate({
        "input": "in", "output": "out", "model": {"adapters": ADAPTERS if with_adapters else {}},
        "engine": {"device": "cpu", "dtype": "float32", "max_model_len": 256, "gpu_memory_utilization": 0.5}})
    adapters = localize(discover(config.model))
    engine = CompletionEngine.start(config.engine, resolve_model(config.model.path), "tiny-llama",
                                    config.defaults.sampling_defaults(), adapters)
    body = {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0.0,
            "model": "tiny-lora-a" if with_adapters else "tiny-llama"}

    async def first() -> float:
        started = time.monotonic()
        answer = await engine.complete(body)
        assert answer.response is not None, answer.error
        return time.monotonic() - started

    try:
        return engine.startup_s, asyncio.run(first())
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    runs: dict[str, list[tuple[float, float]]] = {"base": [], "adapters": []}
    for _ in range(args.rounds):
        for kind in runs:
            runs[kind].append(start_once(kind == "adapters"))
            print(kind, [round(x, 2) for x in runs[kind][-1]], flush=True)
    result = {kind: {"startup_s": round(statistics.median(s for s, _ in r), 2),
                     "first_request_s": round(statistics.median(f for _, f in r), 2),
                     "runs": [[round(s, 2), round(f, 2)] for s, f in r]} for kind, r in runs.items()}
    result["startup_ratio_adapters_over_base"] = round(result["adapters"]["startup_s"] / result["base"]["startup_s"], 2)
    print(json.dumps(result, indent=2))
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    Path("bench/results/adapter_startup.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
