"""vLLM's completion request and handler as a batch uses them (serving.py says how they are used). A
module of its own because it subclasses vLLM's classes: importing it imports vLLM, which the engine
does once it starts (completion_engine.import_vllm_apart), and `validate` once it checks rows."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from pydantic import PrivateAttr, model_validator
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import StructuredOutputsParams

from pipeline.models.adapters import unknown_model_message


class _PlainValidationError(VLLMValidationError):
    def __str__(self) -> str:  # the message alone, as the server words this error
        return Exception.__str__(self)


class BatchCompletionRequest(CompletionRequest):
    """vLLM's CompletionRequest, with the spec's meaning of an omitted `max_tokens`.

    vLLM's server turns an omitted or null max_tokens into 16. The spec's default is 1024, and the
    product's rule is min(default, context length - prompt tokens), never a context-length error for
    a value the user did not ask for. vLLM's scheduling (`get_max_tokens`) already takes that
    minimum; only the tokenizer-side check must not see the default as a request.
    """

    _max_tokens_defaulted: bool = PrivateAttr(False)
    # prompt_logprob_reuse.py: read the prefix cache though the request has prompt logprobs; what came of it
    _read_prefix_cache: bool = PrivateAttr(False)
    _cached_tokens: int = PrivateAttr(0)  # prompt tokens the engine read from its prefix cache
    _unfilled: Any = PrivateAttr(None)  # (outputs, arguments) whose cached positions no earlier answer had yet

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

    # what the engine and the handler tell each other about reading the prefix cache
    def read_prefix_cache(self, on: bool) -> None:
        self._read_prefix_cache = on

    @property
    def reads_prefix_cache(self) -> bool:
        return self._read_prefix_cache

    @property
    def prefix_cached_tokens(self) -> int:
        return self._cached_tokens

    def answered(self, outputs: list, arguments: tuple) -> None:
        """vLLM's outputs for this request, their cached positions not yet filled (`unfilled`)."""
        self._cached_tokens = sum(output.num_cached_tokens or 0 for output in outputs)
        self._unfilled = (outputs, arguments)

    @property
    def unfilled(self) -> tuple | None:
        return self._unfilled

    def filled(self) -> None:
        self._unfilled = None

    def to_sampling_params(self, max_tokens: int, default_sampling_params: dict | None = None) -> Any:
        params = super().to_sampling_params(max_tokens, default_sampling_params)
        if self._read_prefix_cache and params.prompt_logprobs is not None:
            params.skip_reading_prefix_cache = False
        return params

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


class BatchServingCompletion(OpenAIServingCompletion):
    """vLLM's completion handler, rejecting an explicit max_tokens that does not fit the context.

    The pinned server silently shortens such a request to the context left; the product's rule
    (completions-semantics.md, which wins where the server and NIM's documents disagree) is a 400.
    An omitted max_tokens is a default and is still shortened, never rejected.
    """

    prompt_logprob_memory: Any = None  # prompt_logprob_reuse.PromptLogprobMemory: reuse on

    def request_output_to_completion_response(self, final_res_batch: list, request: Any, *args: Any) -> Any:
        memory = self.prompt_logprob_memory
        if memory is not None and request.reads_prefix_cache:
            request.answered(final_res_batch, args)
            return self.filled_response(request)  # None: not yet (CompletionEngine waits, or asks again)
        if memory is not None:
            for output in final_res_batch:  # computed whole: later prompts may take its logprobs
                memory.add(output)
        return super().request_output_to_completion_response(final_res_batch, request, *args)

    def filled_response(self, request: Any) -> Any:
        """The response to a request that read the prefix cache, its cached positions' prompt logprobs
        taken from earlier answers (prompt_logprob_reuse.py); None while no earlier answer has them."""
        final_res_batch, args = request.unfilled
        memory = self.prompt_logprob_memory
        if not all([memory.fill(output) for output in final_res_batch]):
            return None
        request.filled()
        for output in final_res_batch:
            memory.add(output)
        return super().request_output_to_completion_response(final_res_batch, request, *args)

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
