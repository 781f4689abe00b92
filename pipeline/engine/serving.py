"""vLLM's OpenAI completion handler, as a batch uses it: the request class with the spec's default
`max_tokens`, the serving class that answers one body without HTTP, and errors that name their field.
Validation, defaults, sampling, stop handling, logprobs, echo and usage stay the reference server's."""

from __future__ import annotations

from typing import Any, Callable

from pydantic import ValidationError

from pipeline.protocol import REQUEST_FIELDS


def naming_param(create_error_response: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap vLLM's error builder so a validation error names its field in `param`.

    The product's rule (completions-semantics.md) is that every 400 names the field; vLLM's server
    leaves `param` null for some sampling checks ("n must be at least 1, got 0."). vLLM words those
    messages as "<field> must/cannot ...", so a message that starts with a request field's name
    names that field; a 400 raised inside one of the checks in _PARAM_BY_ORIGIN names the field that
    check is about; and a `param` that is no request field (_PARAM_ALIASES) becomes the field.
    Everything else in the body stays the server's.
    """
    from vllm.exceptions import VLLMValidationError

    def create(message: Any, *args: Any, **kwargs: Any) -> Any:
        response = create_error_response(message, *args, **kwargs)
        response.error.param = _PARAM_ALIASES.get(response.error.param, response.error.param)
        if response.error.param is None and isinstance(message, Exception) and response.error.code == 400:
            field = str(message).split(" ", 1)[0]
            if isinstance(message, VLLMValidationError) and field in REQUEST_FIELDS:
                response.error.param = field
            else:
                response.error.param = _param_by_origin(message)
        return response

    return create


# Names vLLM gives `param` that are no request field: the prompt's length checks name what the
# prompt became ("input_text", "input_tokens").
_PARAM_ALIASES = {"input_text": "prompt", "input_tokens": "prompt"}
# vLLM functions that raise 400s naming no field, and the field each one checks.
_PARAM_BY_ORIGIN = {
    "StructuredOutputsParams.__post_init__": "structured_outputs",
    "SamplingParams._validate_structured_outputs": "structured_outputs",
    "BaseRenderer.validate_token_ids": "prompt",
}


def _param_by_origin(exc: BaseException) -> str | None:
    """The field checked by the innermost function of _PARAM_BY_ORIGIN the error was raised in."""
    field, frame = None, exc.__traceback__
    while frame is not None:
        field = _PARAM_BY_ORIGIN.get(frame.tb_frame.f_code.co_qualname, field)
        frame = frame.tb_next
    return field


def param_in_body(error: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """The error, its `param` naming the field the row wrote: vLLM checks `response_format` as the
    `structured_outputs` it becomes, and names that."""
    if error.get("param") == "structured_outputs" and "structured_outputs" not in body \
            and "response_format" in body:
        return {**error, "param": "response_format"}
    return error


def batch_request_class() -> type:
    """vLLM's CompletionRequest with the spec's meaning of an omitted `max_tokens`
    (batch_serving.BatchCompletionRequest; imported when asked for: it imports vLLM)."""
    from pipeline.engine.batch_serving import BatchCompletionRequest

    return BatchCompletionRequest


def batch_serving_class() -> type:
    """vLLM's completion handler, rejecting an explicit max_tokens that does not fit the context
    (batch_serving.BatchServingCompletion; imported when asked for: it imports vLLM)."""
    from pipeline.engine.batch_serving import BatchServingCompletion

    return BatchServingCompletion


def validation_error_body(exc: ValidationError) -> dict[str, Any]:
    """The 400 body vLLM's server answers when FastAPI rejects a request body: vLLM's own handler
    (`validation_exception_handler`) builds it, from the errors as FastAPI reports them (under a
    leading "body" location). The handler awaits nothing, so it runs to its end in one step here, in
    or out of an event loop; the request it is given holds only what it reads (whether to log)."""
    import json
    from types import SimpleNamespace

    from fastapi.exceptions import RequestValidationError
    from vllm.entrypoints.serve.exception_handling.handlers.validation import validation_exception_handler

    errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(args=SimpleNamespace(log_error_stack=False))))
    step = validation_exception_handler(request, RequestValidationError(errors))
    try:
        step.send(None)
    except StopIteration as done:
        return json.loads(done.value.body)["error"]
    step.close()
    raise RuntimeError("vLLM's validation_exception_handler awaited something; answer it in an event loop")

def online_renderer(model_config: Any, renderer: Any) -> Any:
    """vLLM's OpenAI-layer renderer over an engine's (or, for `validate`, a stand-alone) renderer, as
    the completion endpoint builds it: no request logger, no chat template."""
    from vllm.renderers.online_renderer import OnlineRenderer

    return OnlineRenderer(model_config=model_config, renderer=renderer, request_logger=None, chat_template=None,
                          chat_template_content_format="auto")
