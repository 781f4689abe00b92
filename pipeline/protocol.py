"""The wire format of `POST /v1/completions`: request fields, defaults, and how a row becomes a body.

The bodies themselves are validated and answered by vLLM's own OpenAI server code (see engine/);
this module holds what the pipeline needs without an engine: which columns are request fields, the
spec's defaults, and the error body shape.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# The spec's request fields (nim-completions-api.txt), then the extra fields vLLM's server (and so
# NIM 2.x) accepts. tests/unit/test_protocol.py checks this list against the installed vLLM.
SPEC_FIELDS = (
    "model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stop", "seed",
    "frequency_penalty", "presence_penalty", "echo", "logprobs",
)
EXTRA_FIELDS = (
    "suffix", "user", "logit_bias", "stream_options", "use_beam_search", "top_k", "min_p",
    "repetition_penalty", "length_penalty", "stop_token_ids", "include_stop_str_in_output",
    "ignore_eos", "min_tokens", "skip_special_tokens", "spaces_between_special_tokens",
    "truncate_prompt_tokens", "truncation_side", "allowed_token_ids", "prompt_logprobs",
    "logprob_token_ids", "bad_words", "prompt_embeds", "add_special_tokens", "response_format",
    "structured_outputs", "priority", "request_id", "session_id",
    "return_tokens_as_token_ids", "return_token_ids", "return_token_offsets", "cache_salt",
    "ec_transfer_params", "return_mm_kwargs", "stream_interval", "mm_payload",
    "kv_transfer_params", "vllm_xargs", "repetition_detection", "routed_experts_prompt_start",
    "thinking_token_budget", "watermarking",
)
REQUEST_FIELDS = frozenset(SPEC_FIELDS + EXTRA_FIELDS)

# The spec's defaults. max_tokens is a default, not a cap: an omitted max_tokens becomes
# min(default, context length - prompt tokens); an explicit one is honoured or rejected.
SPEC_DEFAULTS: dict[str, Any] = {"max_tokens": 1024, "temperature": 0.2, "top_p": 0.7}


class BodyError(ValueError):
    """A row whose request body cannot be read; `error` is its 400 error body."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.error = error_body(message, "BadRequestError", 400, param)


# How deep lists and objects may nest in a request body. The deepest legitimate bodies (JSON schemas
# in `response_format`) are a few dozen levels; past about a thousand, Python's JSON reader and writer
# (and the engine's request handling) fail with RecursionError instead of answering.
MAX_BODY_DEPTH = 100


def value_problem(value: Any, name: str, *, text: bool = True) -> str | None:
    """What makes `value` (the field `name`) unfit for a request body, or None if nothing does.

    Nesting deeper than MAX_BODY_DEPTH, and (with `text`) a string or key holding a lone surrogate:
    JSON's `\\ud800` escapes decode to one, but it is not Unicode text, so neither the tokenizer, nor
    the engine, nor a UTF-8 output file can take it. Walks without recursion, so any depth is safe.
    """
    stack: list[tuple[Any, str, int]] = [(value, name, 0)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, str):
            if text and (problem := _not_unicode(item)):
                return f"`{printable(where)}` {problem}"
        elif isinstance(item, (dict, list, tuple)):
            if depth >= MAX_BODY_DEPTH:
                return (f"`{printable(name)}` is nested more than {MAX_BODY_DEPTH} levels deep (lists and "
                        "objects inside each other); flatten it")
            if isinstance(item, dict):
                for key, element in item.items():
                    if text and isinstance(key, str) and (problem := _not_unicode(key)):
                        return f"a key of `{printable(where)}` {problem}"
                    if isinstance(element, _WALKED):
                        stack.append((element, f"{where}.{key}", depth + 1))
            else:  # numbers are never a problem: skip them (a prompt of token ids can be long)
                stack.extend((element, f"{where}[{i}]", depth + 1) for i, element in enumerate(item)
                             if isinstance(element, _WALKED))
    return None


_WALKED = (str, dict, list, tuple)


def _not_unicode(text: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"holds a lone surrogate (U+{ord(text[exc.start]):04X}) at character {exc.start}, which is "
                "not Unicode text; write the character itself or its full surrogate pair")
    return None


def printable(text: str) -> str:
    """`text` with any lone surrogate written as its escape, so a message or `param` can hold it."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _row_body(row: dict[str, Any], body_column: str) -> dict[str, Any]:
    raw = row.get(body_column)
    if raw is None:
        return {}
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BodyError(f"the request body in column `{body_column}` is not valid JSON: {exc}",
                            body_column) from None
        except RecursionError:
            raise BodyError(f"the request body in column `{body_column}` is nested too deeply to read "
                            f"(more than {MAX_BODY_DEPTH} levels of lists and objects are refused)",
                            body_column) from None
        except ValueError as exc:  # e.g. an integer longer than Python reads (4,300 digits)
            raise BodyError(f"the request body in column `{body_column}` cannot be read as JSON: {exc}",
                            body_column) from None
    if not isinstance(raw, dict):
        raise BodyError(f"the request body in column `{body_column}` must be a JSON object, "
                        f"not {type(raw).__name__}", body_column)
    # A struct column has every field of every row; a null field is one this row did not set.
    return {k: v for k, v in raw.items() if v is not None}


class RequestBuilder:
    """Turns a row into its request body.

    Precedence, lowest first: the job's defaults, the row's body column, columns named after request
    fields, columns mapped to fields (`input.columns`), then the prompt (`input.prompt_column` or
    `input.template`). A null anywhere means "not given". A row without `model` addresses the job's
    served model.
    """

    def __init__(self, *, served_name: str, body_defaults: dict[str, Any] | None = None,
                 body_column: str | None = None, prompt_column: str = "prompt",
                 columns: dict[str, str] | None = None, template: str | None = None,
                 field_columns: bool = True) -> None:
        self.served_name = served_name
        self.body_defaults = dict(body_defaults or {})
        self.body_column = body_column
        self.prompt_column = prompt_column
        self.columns = dict(columns or {})
        self.template = template
        self.field_columns = field_columns

    def body(self, row: dict[str, Any], served_name: str | None = None) -> dict[str, Any]:
        """The row's request body; raises BodyError (a 400 record naming the field) when it cannot be
        built or holds what no endpoint can take (see `value_problem`).

        A row without `model` addresses `served_name` (a sweep's base model or adapter), by default
        the job's served model."""
        from pipeline.templates import TemplateError, fill

        body = dict(self.body_defaults)
        if self.body_column is not None:
            body.update(_row_body(row, self.body_column))
        if self.field_columns:
            for name, value in row.items():
                if name in REQUEST_FIELDS and value is not None and name != self.body_column:
                    body[name] = value
        for name, column in self.columns.items():
            if row.get(column) is not None:
                body[name] = row[column]
        if self.template is not None:
            try:
                body["prompt"] = fill(self.template, row)
            except TemplateError as exc:
                raise BodyError(str(exc), "prompt") from None
        elif self.prompt_column != "prompt" and row.get(self.prompt_column) is not None:
            body["prompt"] = row[self.prompt_column]
        body.setdefault("model", served_name or self.served_name)
        for name, value in body.items():
            problem = value_problem(value, name)
            if problem is None and (bad_name := _not_unicode(name)):
                problem = f"the field name `{printable(name)}` {bad_name}"
            if problem is not None:
                raise BodyError(problem, printable(name))
        return body


def error_body(message: str, type_: str, code: int, param: str | None = None) -> dict[str, Any]:
    """The `error` object of the endpoint's error response."""
    return {"message": message, "type": type_, "param": param, "code": code}


def completion_id(row_key: str, body: dict[str, Any]) -> str:
    """A response `id` that depends only on the row's key and its request: the same in every rerun of
    the row, different for another row or another request (a sweep's variants)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    # surrogatepass: a body may hold a lone surrogate (its row then gets a 400, but still an id)
    return "cmpl-" + hashlib.sha256(f"{row_key}\n{canonical}".encode("utf-8", "surrogatepass")).hexdigest()[:32]
