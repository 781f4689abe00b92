"""A real engine dies under requests, and is shut down the way an actor replacing it does: do the
requests in it end? (`python tests/dead_engine_probe.py`, run by tests/integration/test_dead_engine.py)

The order is issue 21's hang: vLLM's monitor thread marks the engine dead (`errored`) before its
output handler has read the death, the actor sees `errored`, shuts the engine down (which cancels
the output handler), and the requests in the engine wait on their output queues. The event loop is
held while the death is noticed, so the output handler cannot read it first. Prints one JSON line:
how each request ended within 30 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import psutil

from pipeline.config import EngineConfig
from pipeline.engine.completion_engine import CompletionEngine
from pipeline.models.tiny_model import resolve_model


REQUESTS = 256


async def probe() -> dict:
    cfg = EngineConfig(device="cpu", dtype="float32", max_model_len=256, gpu_memory_utilization=0.5)
    engine = CompletionEngine.start(cfg, resolve_model("builtin:tiny-llama"), "tiny-llama",
                                    {"max_tokens": 16, "temperature": 0.0, "top_p": 1.0})
    body = {"prompt": "Once upon a time", "max_tokens": 240, "temperature": 0.0, "ignore_eos": True}
    requests = [asyncio.ensure_future(engine.complete(dict(body))) for _ in range(REQUESTS)]
    await asyncio.sleep(1)  # the requests are running (240 tokens each)
    in_engine = engine._engine.output_processor.get_num_unfinished_requests()
    core = next(p for p in psutil.Process().children(recursive=True) if "EngineCore" in " ".join(p.cmdline()))
    os.kill(core.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not engine._engine.errored and time.monotonic() < deadline:  # the loop is held: the handler cannot run
        time.sleep(0.01)
    engine.shutdown()  # what the actor did when it saw `errored`
    done, pending = await asyncio.wait(requests, timeout=30)
    return {"errored": engine._engine.errored, "in_engine": in_engine, "ended": len(done), "waiting": len(pending),
            "errors": sorted({type(t.exception()).__name__ for t in done if t.exception() is not None})}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(probe())), flush=True)
    os._exit(0)  # requests still waiting would keep the process alive
