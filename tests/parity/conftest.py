"""The reference server: vLLM's OpenAI server of the pinned version, on the tiny model, on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from pipeline.models.tiny_model import resolve_model
from tests.integration.conftest import CONTEXT, run_job, tokenizer  # noqa: F401 - shared fixtures

SERVED = "tiny-llama"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ReferenceServer:
    def __init__(self, url: str) -> None:
        self.url = url

    def complete(self, body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(f"{self.url}/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())


def _serve(log, extra_args: list[str]):
    """Start the reference server with the parity job's engine settings; yield it, then stop it."""
    port = _free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", resolve_model("builtin:tiny-llama"), "--served-model-name", SERVED,
        "--max-model-len", str(CONTEXT), "--dtype", "float32", "--enforce-eager",
        "--gpu-memory-utilization", "0.5", "--no-enable-chunked-prefill", "--seed", "0",
        "--generation-config", "vllm",
        "--override-generation-config", json.dumps({"temperature": 0.2, "top_p": 0.7}),
        "--host", "127.0.0.1", "--port", str(port), "--disable-log-stats", *extra_args,
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"reference server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"reference server did not start:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield ReferenceServer(url)
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """Started once per session with the same engine settings as the pipeline's parity job."""
    yield from _serve(tmp_path_factory.mktemp("reference") / "server.log", [])


ADAPTERS = {"tiny-lora-a": "builtin:tiny-lora-a", "tiny-lora-b": "builtin:tiny-lora-b"}


@pytest.fixture(scope="session")
def adapter_reference(tmp_path_factory):
    """The reference server serving the tiny adapters as `--lora-modules`, with the LoRA settings the
    pipeline derives from them: rank 8, LoRA on the layers the adapters adapt. (Its two slots are one
    fewer than the pipeline's CPU engine keeps; requests come one at a time, where the slot count does
    not matter.)"""
    from pipeline.models.tiny_adapter import LINEAR_LAYERS, ensure_built

    modules = [f"{name}={ensure_built(path.split(':', 1)[1])}" for name, path in ADAPTERS.items()]
    yield from _serve(tmp_path_factory.mktemp("adapter-reference") / "server.log",
                      ["--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
                       "--lora-target-modules", *sorted(LINEAR_LAYERS), "--lora-modules", *modules])
