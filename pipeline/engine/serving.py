"""vLLM's OpenAI completion handler, as a batch uses it: the request class with the spec's default
`max_tokens`, the serving class that answers one body without HTTP, and errors that name their field.
Validation, defaults, sampling, stop handling, logprobs, echo and usage stay the reference server's."""

from __future__ import annotations

import functools
from http import HTTPStatus
from typing import Any, Callable

from pydantic import PrivateAttr, ValidationError, model_validator

from pipeline.models.adapters import unknown_model_message
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


@functools.cache
def batch_request_class() -> type:
    """vLLM's CompletionRequest, with the spec's meaning of an omitted `max_tokens`.

    vLLM's server turns an omitted or null max_tokens into 16. The spec's default is 1024, and the
    product's rule is min(default, context length - prompt tokens), never a context-length error for
    a value the user did not ask for. vLLM's scheduling (`get_max_tokens`) already takes that
    minimum; only the tokenizer-side check must not see the default as a request.
    """
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import StructuredOutputsParams

    class _PlainValidationError(VLLMValidationError):
        def __str__(self) -> str:  # the message alone, as the server words this error
            return Exception.__str__(self)

    class BatchCompletionRequest(CompletionRequest):
        _max_tokens_defaulted: bool = PrivateAttr(False)

        @model_validator(mode="before")
        @classmethod
        def _structured_outputs_is_an_object(cls, data: Any) -> Any:
            # The server's own before-check calls `.get` on it and so answers a string or a list with
            # a 500 AttributeError; the type check proper comes later, too late to prevent that.
            value = data.get("structured_outputs") if isinstance(data, dict) else None
            if value is not None and not isinstance(value, (dict, StructuredOutputsParams)):
                raise VLLMValidationError(
                    f"structured_outputs must be an object (e.g. {{\"regex\": \"...\"}}), not "
                    f"{type(value).__name__}", parameter="structured_outputs")
            return data

        @model_validator(mode="after")
        def _no_echo_with_stream(self) -> "BatchCompletionRequest":
            # NIM documents that echo and stream cannot be combined; the pinned server allows it.
            if self.echo and self.stream:
                raise VLLMValidationError("echo is not supported with stream; set one of them to false.",
                                          parameter="echo", value=True)
            return self

        @model_validator(mode="after")
        def _no_empty_prompts(self) -> "BatchCompletionRequest":
            # The pinned server accepts [""] (a BOS-only prompt); the spec's rule is a non-empty list
            # of non-empty strings.
            if isinstance(self.prompt, list):
                if not self.prompt:  # the server's words, with `param` naming the field
                    raise _PlainValidationError("You must pass at least one prompt", parameter="prompt")
                empty = [i for i, p in enumerate(self.prompt) if isinstance(p, str) and not p]
                if empty:
                    raise VLLMValidationError(
                        f"prompt must not contain empty strings (empty at index {empty[0]}).",
                        parameter="prompt", value="")
            return self

        def use_default_max_tokens(self, default: int) -> None:
            self.max_tokens = default
            self._max_tokens_defaulted = True

        def build_tok_params(self, model_config: Any) -> Any:
            if not self._max_tokens_defaulted:
                return super().build_tok_params(model_config)
            requested, self.max_tokens = self.max_tokens, None
            try:
                return super().build_tok_params(model_config)
            finally:
                self.max_tokens = requested

    return BatchCompletionRequest


@functools.cache
def batch_serving_class() -> type:
    """vLLM's completion handler, rejecting an explicit max_tokens that does not fit the context.

    The pinned server silently shortens such a request to the context left; the product's rule
    (completions-semantics.md, which wins where the server and NIM's documents disagree) is a 400.
    An omitted max_tokens is a default and is still shortened, never rejected.
    """
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
    from vllm.exceptions import VLLMValidationError

    class BatchServingCompletion(OpenAIServingCompletion):
        async def _check_model(self, request: Any) -> Any:
            error = await super()._check_model(request)
            adapters = list(self.models.lora_requests)
            if error is not None and error.error.code == HTTPStatus.NOT_FOUND and adapters:
                # The server lists only the base model; the product lists what a row may name.
                error.error.message = unknown_model_message(request.model, self.models.model_name(), adapters)
            return error

        async def render_completion_request(self, request: Any) -> Any:
            inputs = await super().render_completion_request(request)
            if isinstance(inputs, list):
                lengths = [self._extract_prompt_len(engine_input) for engine_input in inputs]
                problem = self.context_error(request, lengths, self.model_config.max_model_len)
                if problem is not None:
                    return self.create_error_response(problem)
            return inputs

        @staticmethod
        def context_error(request: Any, prompt_lengths: list[int], context: int) -> Exception | None:
            """The 400 for an explicit max_tokens that does not fit beside a prompt, else None."""
            if getattr(request, "_max_tokens_defaulted", False) or not request.max_tokens:
                return None
            for prompt_len in prompt_lengths:
                if prompt_len + request.max_tokens > context:
                    return VLLMValidationError(
                        f"You passed {prompt_len} input tokens and requested {request.max_tokens} "
                        f"output tokens. However, the model's context length is only {context} "
                        f"tokens, resulting in a maximum input length of "
                        f"{max(context - request.max_tokens, 0)} tokens. Please reduce the length of "
                        "the input prompt or the number of requested output tokens.",
                        parameter="max_tokens", value=request.max_tokens)
            return None

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
