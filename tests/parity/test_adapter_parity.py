"""Rows addressing LoRA adapters equal the reference server started with the same adapters.

The server runs `--enable-lora --max-loras 2 --max-lora-rank 8 --lora-modules tiny-lora-a=... tiny-lora-b=...`;
the pipeline job declares the same adapters in `model.adapters` and derives the same LoRA settings.
Each case goes to both, for the base model and each adapter; records are compared as in
test_reference_parity.py (everything but `id` and `created`, floats to 1e-5).
"""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from pipeline.models.adapters import unknown_model_message
from tests.parity.conftest import ADAPTERS, SERVED
from tests.parity.test_reference_parity import IGNORED, close, strip

pytestmark = [pytest.mark.engine, pytest.mark.slow]

P1 = "The quick brown fox jumps over the lazy dog"
P2 = "Question: What is the largest planet? Answer:"
P3 = "Once upon a time there was a small dragon"
MODELS = [SERVED, *ADAPTERS]
GREEDY = {"temperature": 0.0, "max_tokens": 8}
SEEDED = {"temperature": 0.9, "seed": 1234, "max_tokens": 8}
BODIES = {
    "greedy": {**GREEDY, "prompt": P1, "max_tokens": 16},
    "greedy-list": {**GREEDY, "prompt": [P1, P2, P3]},
    "greedy-logprobs-5": {**GREEDY, "prompt": P2, "logprobs": 5},
    "greedy-echo-logprobs": {**GREEDY, "prompt": P1, "echo": True, "logprobs": 3},
    "greedy-stop": {**GREEDY, "prompt": P1, "max_tokens": 16, "stop": ["e", "a"]},
    "seed": {**SEEDED, "prompt": P1},
    "seed-n3": {**SEEDED, "prompt": P3, "n": 3},
    "seed-list-n2": {**SEEDED, "prompt": [P1, P3], "n": 2},
    "seed-echo-logprobs-n2": {**SEEDED, "prompt": P3, "echo": True, "logprobs": 1, "n": 2},
}
CASES = {f"{model}/{name}": {**body, "model": model} for model in MODELS for name, body in BODIES.items()}
UNKNOWN = {"prompt": P1, "max_tokens": 4, "model": "gpt-nope"}


@pytest.fixture(scope="module")
def answers(adapter_reference, run_job):
    """(server status, server body, pipeline record) per case, and the job's summary."""
    cases = {**CASES, "unknown-model": UNKNOWN}
    server = {name: adapter_reference.complete(body) for name, body in cases.items()}  # one at a time
    table = pa.table({"id": list(cases), "body": [json.dumps(body) for body in cases.values()]})
    job = run_job(table, input={"body_column": "body"}, model={"adapters": ADAPTERS})
    return {name: (*server[name], job.rows[name]) for name in cases}


def test_adapters_change_the_answer(answers):
    from pipeline.io.records import response_body

    for name in BODIES:
        texts = {model: tuple(c["text"] for c in response_body(answers[f"{model}/{name}"][2]["response"])["choices"])
                 for model in MODELS}
        if name.startswith("greedy") and "echo" not in name:
            assert len(set(texts.values())) == len(MODELS), (name, texts)


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_record_equals_reference(case, answers):
    from pipeline.io.records import response_body

    status, server, record = answers[case]
    assert status == 200, server
    assert record["error"] is None, record["error"]
    ours = {k: v for k, v in response_body(record["response"]).items() if k not in IGNORED}
    server = strip(server)
    assert ours["model"] == CASES[case]["model"]
    assert ours.pop("system_fingerprint").split("-")[:2] == server.pop("system_fingerprint").split("-")[:2]
    close(ours, server)


def test_unknown_model_is_the_servers_404_listing_the_adapters_too(answers):
    status, server, record = answers["unknown-model"]
    assert status == 404 and record["response"] is None
    expected = dict(server["error"])
    # the server lists the base model only; the product's message names the adapters a row may use
    assert expected["message"] == unknown_model_message("gpt-nope", SERVED, [])
    expected["message"] = unknown_model_message("gpt-nope", SERVED, list(ADAPTERS))
    close(record["error"], expected)
