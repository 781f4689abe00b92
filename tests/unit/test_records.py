import pyarrow as pa
import pytest

from pipeline.io.records import output_schema, response_body, result_arrays

BODY = {
    "id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
    "system_fingerprint": "fp",
    "choices": [
        {"index": 0, "text": "ab", "finish_reason": "stop", "stop_reason": 7,
         "logprobs": {"text_offset": [0, 1], "token_logprobs": [None, -0.5], "tokens": ["a", "b"],
                      "top_logprobs": [None, {"b": -0.5, "c": -1.0}]}},
        {"index": 1, "text": "x", "finish_reason": "stop", "stop_reason": "\n", "logprobs": None},
        {"index": 2, "text": "y", "finish_reason": "length", "stop_reason": None, "logprobs": None},
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
}
ERROR = {"message": "bad", "type": "BadRequestError", "param": "temperature", "code": 400}


def test_round_trip_through_arrow_keeps_the_body():
    response, error = result_arrays([(BODY, None), (None, ERROR)])
    table = pa.table({"response": response, "error": error})
    rows = table.to_pylist()
    assert response_body(rows[0]["response"]) == BODY
    assert rows[0]["error"] is None
    assert rows[1] == {"response": None, "error": ERROR}


def test_output_schema_appends_result_columns_and_rejects_clashes():
    schema = output_schema(pa.schema([("prompt", pa.string()), ("id", pa.int64())]))
    assert schema.names == ["prompt", "id", "response", "error"]
    with pytest.raises(ValueError, match="rename"):
        output_schema(pa.schema([("prompt", pa.string()), ("error", pa.string())]))


def test_the_private_renderer_tokenizer_prompt_tokens_replaces_is_still_vllms():
    """prompt_tokens.PromptTokens replaces vLLM's private per-prompt tokenizer of the renderer
    (`_tokenize_prompt_async`): with the pinned vLLM the renderer still makes it in its constructor and
    awaits it for each text prompt."""
    import inspect

    from vllm.renderers import base

    source = inspect.getsource(base)
    assert "self._tokenize_prompt_async = make_async(" in source
    assert "await self._tokenize_prompt_async(prompt, params)" in source
