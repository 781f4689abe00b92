"""The engine actor's process is settled for serving once its engine is up (engine.settle_for_serving)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SETTLE = """
import gc, json
from pipeline.engine.completion_engine import GC_YOUNG_THRESHOLD, import_vllm_apart, settle_for_serving
import_vllm_apart()
import vllm.envs as envs
before = {"threshold": gc.get_threshold(), "frozen": gc.get_freeze_count(), "cached": envs._is_envs_cache_enabled()}
settle_for_serving()
after = {"threshold": gc.get_threshold(), "frozen": gc.get_freeze_count(), "cached": envs._is_envs_cache_enabled()}
print(json.dumps({"before": before, "after": after, "young": GC_YOUNG_THRESHOLD}))
"""


def test_settling_freezes_the_start_up_heap_collects_less_often_and_caches_vllm_env():
    # In a process of its own: these settings are the whole process's.
    done = subprocess.run([sys.executable, "-c", SETTLE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads(done.stdout.strip().splitlines()[-1])
    before, after = state["before"], state["after"]
    assert before["threshold"][0] == 700 and not before["cached"]  # Python's and vLLM's defaults
    assert after["threshold"] == [state["young"], *before["threshold"][1:]]  # only the youngest changes
    assert after["frozen"] > 100_000 > before["frozen"]  # torch's and vLLM's objects, out of the collector's way
    assert after["cached"]


def test_a_body_fastapi_would_reject_gets_vllms_own_400_from_its_public_handler():
    """serving.validation_error_body runs vLLM's `validation_exception_handler` itself (no copy of its
    private helpers): the message counts and lists the errors, `param` names the first field."""
    from pydantic import ValidationError
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from pipeline.engine.serving import validation_error_body

    with pytest.raises(ValidationError) as caught:
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "max_tokens": "ten", "temperature": "hot"})
    error = validation_error_body(caught.value)
    assert (error["type"], error["code"]) == ("Bad Request", 400)
    assert error["message"].startswith("2 validation errors:\n  {") and "'ten'" in error["message"]
    assert error["param"] == "body.max_tokens"
