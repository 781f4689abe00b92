"""Every request through the pipeline equals the reference server's answer, field by field.

One case per line: (name, request body[, what the product deliberately does differently]). The same
bodies go to the reference server over HTTP and through a pipeline job (as a JSON body column); the
records are turned back into JSON bodies and compared with everything but `id` and `created`, floats
to 1e-5. Differences are the product's rules (completions-semantics.md), listed in docs/request-semantics.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import pyarrow as pa
import pytest

from tests.integration.conftest import CONTEXT

pytestmark = pytest.mark.engine

P1 = "The quick brown fox jumps over the lazy dog"
P2 = "Question: What is the largest planet? Answer:"
P3 = "Once upon a time there was a small dragon"


@dataclass
class Case:
    name: str
    body: dict
    param: str | None = None        # the product names the field where the server leaves param null
    server_differs: bool = False    # the product answers 400 where the server answers 200
    # max_tokens omitted: the product's default is min(1024, context - prompt tokens) where the server's
    # is 16, so the server is asked for that number explicitly
    default_max_tokens: bool = False
    kind: str = field(default="")


def c(name: str, **body) -> Case:
    return Case(name, body)


def greedy(name: str, **body) -> Case:
    return Case(name, {"temperature": 0.0, "max_tokens": 8, **body}, kind="greedy")


def seeded(name: str, **body) -> Case:
    return Case(name, {"temperature": 0.9, "seed": 1234, "max_tokens": 8, **body}, kind="seeded")


def bad(name: str, body: dict, param: str | None = None, server_differs: bool = False) -> Case:
    return Case(name, body, param=param, server_differs=server_differs, kind="error")


STOP_TOKENS = list(range(3, 440))  # about half the tiny vocabulary: a stop token comes early

CASES = [
    # greedy: prompts, lengths, echo, logprobs, stop
    greedy("greedy", prompt=P1, max_tokens=16),
    greedy("greedy-list", prompt=[P1, P2, P3]),
    greedy("greedy-token-ids", prompt=[1, 50, 60, 70, 80]),
    greedy("greedy-token-id-lists", prompt=[[1, 50, 60], [1, 70, 80, 90]]),
    greedy("max-tokens-1", prompt=P2, max_tokens=1),
    greedy("echo", prompt=P1, echo=True),
    greedy("echo-list", prompt=[P1, P2], echo=True),
    greedy("logprobs-0", prompt=P1, logprobs=0),
    greedy("logprobs-5", prompt=P2, logprobs=5),
    greedy("logprobs-20", prompt=P2, logprobs=20, max_tokens=3),
    greedy("echo-logprobs", prompt=P1, echo=True, logprobs=3),
    greedy("echo-max-tokens-0", prompt=P1, echo=True, max_tokens=0, logprobs=2),
    greedy("echo-max-tokens-0-nolp", prompt=P3, echo=True, max_tokens=0),
    greedy("echo-list-logprobs", prompt=[P2, P3], echo=True, logprobs=1),
    greedy("stop-space", prompt=P1, max_tokens=16, stop=" "),
    greedy("stop-list", prompt=P1, max_tokens=16, stop=["e", "a", "o"]),
    greedy("stop-miss", prompt=P1, max_tokens=16, stop=["\u2603"]),
    greedy("stop-in-prompt-only", prompt=P1, max_tokens=16, stop=["quick brown"]),
    greedy("stop-include", prompt=P1, max_tokens=16, stop=["e"], include_stop_str_in_output=True),
    greedy("stop-logprobs", prompt=P1, max_tokens=16, stop=["e"], logprobs=2),
    greedy("stop-token-ids", prompt=P2, max_tokens=16, stop_token_ids=STOP_TOKENS),
    greedy("stop-token-ids-min-tokens", prompt=P2, max_tokens=16, stop_token_ids=STOP_TOKENS, min_tokens=4),
    greedy("ignore-eos", prompt=P3, max_tokens=24, ignore_eos=True),
    greedy("frequency-penalty", prompt=P1, max_tokens=24, frequency_penalty=1.5),
    greedy("presence-penalty", prompt=P1, max_tokens=24, presence_penalty=-1.0),
    greedy("repetition-penalty", prompt=P1, max_tokens=24, repetition_penalty=1.3),
    greedy("logit-bias", prompt=P1, logit_bias={"50": 100}),
    greedy("eos", prompt=P1, logit_bias={"2": 100}),  # EOS (id 2) forced: finish "stop", stop_reason null
    greedy("eos-ignored", prompt=P1, logit_bias={"2": 100}, ignore_eos=True),
    greedy("eos-echo-logprobs", prompt=P2, logit_bias={"2": 100}, echo=True, logprobs=1),
    greedy("special-tokens", prompt=P2, skip_special_tokens=False, stop_token_ids=STOP_TOKENS),
    greedy("served-model", prompt=P1, model="tiny-llama"),
    greedy("user-field", prompt=P1, user="someone"),
    greedy("unknown-field", prompt=P1, not_a_field=3),
    greedy("stream", prompt=P1, stream=True),
    # seeded sampling
    seeded("seed", prompt=P1),
    seeded("seed-n3", prompt=P1, n=3),
    seeded("seed-list-n2", prompt=[P1, P3], n=2),
    seeded("seed-top-p", prompt=P2, top_p=0.5, max_tokens=16),
    seeded("seed-top-k", prompt=P2, top_k=5, max_tokens=16),
    seeded("seed-min-p", prompt=P2, min_p=0.2, max_tokens=16),
    seeded("seed-logprobs", prompt=P3, logprobs=2),
    seeded("seed-echo-logprobs-n2", prompt=P3, echo=True, logprobs=1, n=2),
    seeded("seed-penalties", prompt=P1, frequency_penalty=0.5, presence_penalty=0.5, max_tokens=16),
    seeded("seed-negative", prompt=P1, seed=-5),
    seeded("seed-int64-max", prompt=P1, seed=2**63 - 1),
    Case("seed-spec-defaults", {"prompt": P1, "seed": 7, "max_tokens": 16}, kind="seeded"),
    Case("default-max-tokens", {"prompt": P2, "temperature": 0.0}, kind="greedy", default_max_tokens=True),
    Case("default-max-tokens-null", {"prompt": P3, "seed": 3, "max_tokens": None}, kind="seeded",
         default_max_tokens=True),
    # validation: the server's status, type, param and message
    bad("unknown-model", {"prompt": P1, "max_tokens": 4, "model": "gpt-nope"}),
    bad("temperature-high", {"prompt": P1, "temperature": 2.5}),
    bad("temperature-negative", {"prompt": P1, "temperature": -0.1}),
    bad("temperature-string", {"prompt": P1, "temperature": "hot"}),
    bad("top-p-zero", {"prompt": P1, "top_p": 0.0}),
    bad("top-p-high", {"prompt": P1, "top_p": 1.5}),
    bad("n-zero", {"prompt": P1, "n": 0}, param="n"),
    bad("n-float", {"prompt": P1, "n": 1.5}),
    bad("n-greedy", {"prompt": P1, "n": 2, "temperature": 0.0}, param="n"),
    bad("max-tokens-negative", {"prompt": P1, "max_tokens": -1}),
    bad("max-tokens-zero", {"prompt": P1, "max_tokens": 0}),
    bad("max-tokens-string", {"prompt": P1, "max_tokens": "ten"}),
    bad("max-tokens-over-model", {"prompt": P1, "max_tokens": 5000}),
    bad("logprobs-over-limit", {"prompt": P1, "max_tokens": 4, "logprobs": 21}),
    bad("logprobs-negative", {"prompt": P1, "max_tokens": 4, "logprobs": -1}),
    bad("frequency-penalty-high", {"prompt": P1, "frequency_penalty": 3.0}, param="frequency_penalty"),
    bad("presence-penalty-low", {"prompt": P1, "presence_penalty": -3.0}, param="presence_penalty"),
    bad("stop-empty-string", {"prompt": P1, "max_tokens": 4, "stop": ""}, param="stop"),
    bad("stop-empty-in-list", {"prompt": P1, "max_tokens": 4, "stop": ["a", ""]}, param="stop"),
    bad("stop-wrong-type", {"prompt": P1, "max_tokens": 4, "stop": 5}),
    bad("seed-over-int64", {"prompt": P1, "max_tokens": 4, "seed": 2**64}),
    bad("prompt-empty", {"prompt": "", "max_tokens": 4}),
    bad("prompt-missing", {"max_tokens": 4}),
    bad("prompt-wrong-type", {"prompt": {"text": "x"}, "max_tokens": 4}),
    bad("suffix", {"prompt": P1, "max_tokens": 4, "suffix": "end"}),
    bad("top-k-invalid", {"prompt": P1, "max_tokens": 4, "top_k": -5}, param="top_k"),
    bad("min-p-invalid", {"prompt": P1, "max_tokens": 4, "min_p": 1.5}, param="min_p"),
    bad("min-tokens-over-max", {"prompt": P1, "max_tokens": 4, "min_tokens": 9}, param="min_tokens"),
    # the product's rules where the server differs
    bad("prompt-empty-list", {"prompt": [], "max_tokens": 4}, param="prompt"),
    bad("prompt-empty-in-list", {"prompt": [P1, ""], "max_tokens": 4}, param="prompt", server_differs=True),
    bad("echo-with-stream", {"prompt": P1, "max_tokens": 4, "echo": True, "stream": True}, param="echo",
        server_differs=True),
    bad("over-context", {"prompt": P1, "max_tokens": 250}, param="max_tokens", server_differs=True),
]
for case in CASES:
    case.kind = case.kind or "other"
IGNORED = {"id", "created"}
# vLLM-only members of the server's body, outside the spec and OpenAI's shape; the records drop them.
# All are null for every request here except a choice's `prompt_logprobs` with echo + logprobs, vLLM's
# own copy of the prompt positions that the legacy `logprobs` object already carries.
VLLM_EXTRAS = {"service_tier", "kv_transfer_params", "ec_transfer_params", "metrics", "token_ids",
               "prompt_logprobs", "prompt_token_ids", "routed_experts", "prompt_tokens_details",
               "completion_tokens_details"}


def close(a, b, path: str = "") -> None:
    """Assert equal JSON values, floats within 1e-5."""
    if isinstance(a, float) or isinstance(b, float):
        assert a is not None and b is not None and math.isclose(a, b, abs_tol=1e-5), f"{path}: {a} != {b}"
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def strip(body: dict) -> dict:
    """The server body without the fields that legitimately differ or that records do not keep."""
    out = {k: v for k, v in body.items() if k not in IGNORED}
    for k in VLLM_EXTRAS & out.keys():
        assert out.pop(k) is None, k
    out["choices"] = [{k: v for k, v in ch.items()
                       if not (k in VLLM_EXTRAS and (v is None or k == "prompt_logprobs"))}
                      for ch in out["choices"]]
    out["usage"] = {k: v for k, v in out["usage"].items() if not (k in VLLM_EXTRAS and v is None)}
    return out


@pytest.fixture(scope="module")
def answers(reference, run_job, tokenizer):
    """(server status, server body, pipeline record) per case."""
    table = pa.table({"id": [case.name for case in CASES],
                      "body": [json.dumps(case.body) for case in CASES]})
    job = run_job(table, input={"body_column": "body"})
    out = {}
    for case in CASES:
        # a batch record is the complete body: compare with the server's non-streamed answer
        server_body = {k: v for k, v in case.body.items() if k != "stream"}
        if case.default_max_tokens:
            server_body["max_tokens"] = min(1024, CONTEXT - len(tokenizer(case.body["prompt"]).input_ids))
        out[case.name] = (*reference.complete(server_body), job.rows[case.name])
    return out


def test_case_count_by_kind():
    kinds = {}
    for case in CASES:
        kinds[case.kind] = kinds.get(case.kind, 0) + 1
    print("parity cases by kind:", kinds)
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_record_equals_reference(case, answers):
    from pipeline.io.records import response_body

    status, server, record = answers[case.name]
    if case.kind != "error":
        assert status == 200, server
        assert record["error"] is None, record["error"]
        ours = {k: v for k, v in response_body(record["response"]).items() if k not in IGNORED}
        server = strip(server)
        # the fingerprint names the vLLM build and a per-process hash: same build, own process
        assert ours.pop("system_fingerprint").split("-")[:2] == server.pop("system_fingerprint").split("-")[:2]
        close(ours, server)
        return
    assert record["response"] is None, record["response"]
    if case.server_differs:
        assert status == 200, server
        assert record["error"]["code"] == 400 and record["error"]["param"] == case.param
        return
    expected = dict(server["error"])
    assert status == expected["code"]
    if case.param is not None:
        assert expected["param"] is None, "the server names the field now: drop the case's param"
        expected["param"] = case.param
    close(record["error"], expected)


def test_records_parse_as_openai_completions(answers):
    from openai.types import Completion

    from pipeline.io.records import response_body

    from pydantic import ValidationError

    parsed = 0
    for status, server, record in answers.values():
        if record["response"] is not None:
            body = response_body(record["response"])
            try:
                completion = Completion.model_validate(body)
            except ValidationError as exc:
                # With echo + logprobs, position 0 (the first prompt token) has no logprob: null, as the
                # spec and the server say, where OpenAI's type wants a number. Nothing else may fail.
                locs = {e["loc"][3:] for e in exc.errors()}
                assert locs <= {("token_logprobs", 0), ("top_logprobs", 0)}, exc
                assert all(c["logprobs"]["token_logprobs"][0] is None for c in body["choices"])
                completion = Completion.model_construct(**body)
            assert completion.object == "text_completion" and completion.usage is not None
            parsed += 1
        else:
            assert set(record["error"]) == {"message", "type", "param", "code"}
            assert isinstance(record["error"]["message"], str) and isinstance(record["error"]["code"], int)
    assert parsed == sum(1 for case in CASES if case.kind != "error")


def test_cases_reach_every_finish(answers):
    """The cases really end every way the endpoint can end: EOS, stop string, stop token, length."""
    from pipeline.io.records import response_body

    seen = set()
    for _, _, record in answers.values():
        for choice in (response_body(record["response"])["choices"] if record["response"] else []):
            reason = choice["stop_reason"]
            kind = "int" if isinstance(reason, int) else "str" if isinstance(reason, str) else None
            seen.add((choice["finish_reason"], kind))
    assert {("stop", None), ("stop", "str"), ("stop", "int"), ("length", None)} <= seen, seen


def test_validate_finds_the_same_errors_without_an_engine(answers, tmp_path):
    """The `validate` command, on the same requests, rejects exactly the rows the job rejected."""
    import pyarrow.parquet as pq

    from pipeline.config import JobConfig
    from pipeline.job.validate import check_rows

    pq.write_table(pa.table({"id": [case.name for case in CASES],
                             "body": [json.dumps(case.body) for case in CASES]}), tmp_path / "in.parquet")
    config = JobConfig.model_validate({
        "input": {"path": str(tmp_path / "in.parquet"), "body_column": "body", "id_column": "id"},
        "output": str(tmp_path / "out"),
        "engine": {"device": "cpu", "dtype": "float32", "max_model_len": CONTEXT}})
    for check in check_rows(config):
        record = answers[check.key][2]
        if record["error"] is None:
            assert check.error is None, (check.key, check.error)
        else:
            assert check.error is not None, check.key
            assert (check.error["type"], check.error["code"], check.error["param"]) == \
                (record["error"]["type"], record["error"]["code"], record["error"]["param"]), check.key
