"""The output record: every input column, plus `response` and `error` with an explicit Arrow schema
(and `score`, when the job is scored: see `score_type`).

Exactly one of `response` and `error` is non-null per row. `response` is the endpoint's response body
and `error` the `error` object of its error body, field for field, with one exception Parquet forces:
vLLM's `stop_reason` is a string (the matched stop string) or an integer (the matched stop token id),
and a column has one type, so the integer lands in `stop_token_id` and `stop_reason` holds strings
only. `response_body()` turns a record back into the exact JSON body.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

LOGPROBS_TYPE = pa.struct([
    pa.field("text_offset", pa.list_(pa.int64())),
    pa.field("token_logprobs", pa.list_(pa.float64())),
    pa.field("tokens", pa.list_(pa.string())),
    pa.field("top_logprobs", pa.list_(pa.map_(pa.string(), pa.float64()))),
])
CHOICE_TYPE = pa.struct([
    pa.field("index", pa.int64()),
    pa.field("text", pa.string()),
    pa.field("logprobs", LOGPROBS_TYPE),
    pa.field("finish_reason", pa.string()),
    pa.field("stop_reason", pa.string()),
    pa.field("stop_token_id", pa.int64()),
])
USAGE_TYPE = pa.struct([
    pa.field("prompt_tokens", pa.int64()),
    pa.field("completion_tokens", pa.int64()),
    pa.field("total_tokens", pa.int64()),
])
RESPONSE_TYPE = pa.struct([
    pa.field("id", pa.string()),
    pa.field("object", pa.string()),
    pa.field("created", pa.int64()),
    pa.field("model", pa.string()),
    pa.field("choices", pa.list_(CHOICE_TYPE)),
    pa.field("system_fingerprint", pa.string()),
    pa.field("usage", USAGE_TYPE),
])
ERROR_TYPE = pa.struct([
    pa.field("message", pa.string()),
    pa.field("type", pa.string()),
    pa.field("param", pa.string()),
    pa.field("code", pa.int64()),
])
RESULT_FIELDS = (pa.field("response", RESPONSE_TYPE), pa.field("error", ERROR_TYPE))
SCORE = "score"
VARIANT_PARAMS = "variant_params"  # a sweep's records: the variant's request fields, as JSON
RESULT_COLUMNS = tuple(f.name for f in RESULT_FIELDS)


def score_type(outputs: list[str], multiple_choice: bool) -> pa.DataType:
    """The `score` column of a scored job: one float per score value (1.0 right, 0.0 wrong, null when the
    row has no reference), and for multiple choice the predicted choice (by total and by per-character
    log-likelihood) and each choice's log-likelihood and token count. The whole struct is null on a row
    that has an error instead of a response."""
    fields = [pa.field(name, pa.float64()) for name in outputs]
    if multiple_choice:
        fields += [pa.field("prediction", pa.int64()), pa.field("prediction_norm", pa.int64()),
                   pa.field("choice_logprobs", pa.list_(pa.float64())),
                   pa.field("choice_tokens", pa.list_(pa.int64()))]
    return pa.struct(fields)


def output_schema(input_schema: pa.Schema, score: pa.DataType | None = None) -> pa.Schema:
    """The output schema: the input's columns unchanged, then `response` and `error` (and `score`, typed
    by `score_type`, when the job is scored)."""
    reserved = RESULT_COLUMNS + ((SCORE,) if score is not None else ())
    clashes = [name for name in reserved if name in input_schema.names]
    if clashes:
        raise ValueError(f"input columns {clashes} clash with the output's result columns; rename them")
    fields = list(input_schema) + list(RESULT_FIELDS)
    if score is not None:
        fields.append(pa.field(SCORE, score))
    return pa.schema(fields, metadata=input_schema.metadata)


def _record_logprobs(logprobs: dict[str, Any] | None) -> dict[str, Any] | None:
    if logprobs is None:
        return None
    top = [None if t is None else list(t.items()) for t in logprobs["top_logprobs"]]
    return {**logprobs, "top_logprobs": top}


def response_record(body: dict[str, Any]) -> dict[str, Any]:
    """A response body as an Arrow-ready dict (see the module docstring for `stop_reason`)."""
    choices = []
    for choice in body["choices"]:
        reason = choice.get("stop_reason")
        token_stop = isinstance(reason, int) and not isinstance(reason, bool)
        choices.append({
            "index": choice["index"],
            "text": choice["text"],
            "logprobs": _record_logprobs(choice.get("logprobs")),
            "finish_reason": choice.get("finish_reason"),
            "stop_reason": None if token_stop else reason,
            "stop_token_id": reason if token_stop else None,
        })
    return {**{k: body.get(k) for k in RESPONSE_TYPE.names}, "choices": choices}


def response_body(record: dict[str, Any]) -> dict[str, Any]:
    """A record's `response` (as read back with to_pylist) turned into the endpoint's JSON body."""
    body = dict(record)
    choices = []
    for choice in record["choices"]:
        choice = dict(choice)
        token_id = choice.pop("stop_token_id")
        if token_id is not None:
            choice["stop_reason"] = token_id
        if choice["logprobs"] is not None:
            lp = dict(choice["logprobs"])
            lp["top_logprobs"] = [None if t is None else dict(t) for t in lp["top_logprobs"]]
            choice["logprobs"] = lp
        choices.append(choice)
    body["choices"] = choices
    return body


def result_arrays(answers: list[tuple[dict | None, dict | None]]) -> tuple[pa.Array, pa.Array]:
    """Arrow arrays for the `response` and `error` columns of a batch of (response, error) answers.

    A row whose answer Arrow cannot hold (a string that is not valid Unicode, e.g. a lone surrogate an
    error message quotes from the request) is stored with such characters escaped (`\\ud800`); one
    that still cannot be stored becomes a 500 error record. Either way the other rows are untouched.
    """
    responses = [None if r is None else response_record(r) for r, _ in answers]
    errors = [e for _, e in answers]
    try:
        return pa.array(responses, type=RESPONSE_TYPE), pa.array(errors, type=ERROR_TYPE)
    except (pa.ArrowException, UnicodeError, TypeError, ValueError, OverflowError):
        pass
    for i, (response, error) in enumerate(zip(responses, errors)):
        try:
            responses[i], errors[i] = _storable(response, RESPONSE_TYPE), _storable(error, ERROR_TYPE)
        except (pa.ArrowException, UnicodeError, TypeError, ValueError, OverflowError) as exc:
            responses[i] = None
            errors[i] = {"message": f"the answer to this row could not be stored ({type(exc).__name__}: "
                                    f"{_escaped(str(exc))}); this is a bug, please report it with the row",
                         "type": "InternalServerError", "param": None, "code": 500}
    return pa.array(responses, type=RESPONSE_TYPE), pa.array(errors, type=ERROR_TYPE)


def _escaped(value: Any) -> Any:
    """Strings with anything UTF-8 cannot hold escaped (backslashreplace), recursively."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_escaped(k): _escaped(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_escaped(v) for v in value]
    return value


def _storable(value: dict | None, type_: pa.DataType) -> dict | None:
    try:
        pa.array([value], type=type_)
        return value
    except (pa.ArrowException, UnicodeError):
        escaped = _escaped(value)
        pa.array([escaped], type=type_)  # raises if escaping was not enough
        return escaped
