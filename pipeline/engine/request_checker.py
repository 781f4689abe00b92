"""vLLM's request checks for one served model, without an engine: what `validate` runs on every row.

The request model, vLLM's renderer (tokenization, prompt and suffix checks, context length) and the
sampling parameters' own checks, with structured outputs compiled: the code the engine path runs,
built from the job's engine config (engine_args.py) and the same renderer (serving.online_renderer)
without starting an engine process.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from pipeline.config import JobConfig
from pipeline.engine.engine_args import engine_args
from pipeline.engine.serving import (batch_request_class, batch_serving_class, naming_param, online_renderer,
                                     param_in_body, validation_error_body)
from pipeline.models.adapters import discover, unknown_model_message
from pipeline.models.tiny_model import resolve_model
from pipeline.protocol import error_body


# How an engine is laid out over processes and nodes: nothing a request's checks depend on.
LAYOUT = {"pipeline_parallel_size", "distributed_executor_backend", "data_parallel_size", "enable_expert_parallel"}


def _one_process(engine: Any) -> Any:
    """The engine's settings laid out in one process: the request checks are the same, and `validate`
    runs on a machine without the engine's GPUs or cluster (a laptop, the head node)."""
    vllm = {k: v for k, v in engine.vllm.items() if k.replace("-", "_") not in LAYOUT}
    return engine.model_copy(update={"tensor_parallel_size": 1, "vllm": vllm})


class RequestChecker:
    """vLLM's request checks for one served model, without an engine.

    The request model, vLLM's renderer (tokenization, prompt and suffix checks, context length) and
    the sampling parameters' own checks — the code the engine path runs — built from the job's engine
    config without starting an engine process.
    """

    def __init__(self, config: JobConfig, vllm_logs_to_terminal: bool = True) -> None:
        """`vllm_logs_to_terminal` False: vLLM's logging is not set up with a handler of its own on
        stdout, so its lines reach the root logger's handlers (a quiet session's log file)."""
        from vllm.renderers import renderer_from_config
        from vllm.v1.engine.input_processor import InputProcessor

        path = resolve_model(config.model.path)
        sampling = config.defaults.sampling_defaults()
        self.default_max_tokens = sampling.pop("max_tokens")
        self.served = config.model.resolved_served_name()
        self.adapters = sorted(discover(config.model).paths)  # AdapterError for a bad adapter
        args = engine_args(_one_process(config.engine), path, self.served, sampling)
        quiet = not vllm_logs_to_terminal
        if quiet:  # vLLM's logger without its own handler on stdout: its lines go to the session's log file
            from vllm.config.logging import LoggingConfig

            args.logging_config = LoggingConfig(configure_logging=False)
        vllm_config = args.create_engine_config()
        if quiet:  # what vLLM logs once its logging is set up, in the log file too
            from vllm.platforms import current_platform

            current_platform.log_warnings()
        self.model_config = vllm_config.model_config
        self.context = self.model_config.max_model_len
        self.defaults = self.model_config.get_diff_sampling_param()
        self.renderer = online_renderer(self.model_config, renderer_from_config(vllm_config))
        # The engine tokenizes on a thread pool so its event loop stays free; here nothing else waits,
        # and the same tokenizer called inline is several times faster per row.
        base = self.renderer.renderer

        async def tokenize_inline(prompts: Any, params: Any) -> Any:
            return base.tokenize_prompts(prompts, params)

        base.tokenize_prompts_async = tokenize_inline
        self.request_class = batch_request_class()
        self.context_rule = batch_serving_class().context_error
        # The engine's own admission checks (sampling parameters with structured outputs compiled by
        # the configured backend, prompt token ids in the vocabulary), run in this process.
        self.admission = InputProcessor(vllm_config, base)

    async def check(self, body: dict[str, Any]) -> tuple[dict | None, list[int], int]:
        """(error body or None, prompt token counts, max new tokens) for one request body."""
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
        from vllm.entrypoints.serve.utils.api_utils import get_max_tokens
        from vllm.renderers.inputs.preprocess import extract_prompt_len

        create_error = naming_param(create_error_response)
        try:
            request = self.request_class.model_validate(body)
            if request.model and request.model != self.served and request.model not in self.adapters:
                return error_body(unknown_model_message(request.model, self.served, self.adapters),
                                  "NotFoundError", 404, "model"), [], 0
            defaulted = body.get("max_tokens") is None
            if defaulted:
                request.use_default_max_tokens(self.default_max_tokens)
            inputs_ = await self.renderer.render_completion(request)
            if not isinstance(inputs_, list):  # an ErrorResponse
                return inputs_.error.model_dump(), [], 0
            lengths = [extract_prompt_len(self.model_config, i) for i in inputs_]
            problem = self.context_rule(request, lengths, self.context)
            if problem is not None:
                raise problem
            total = 0
            for engine_input, length in zip(inputs_, lengths):
                max_tokens = get_max_tokens(self.context, request.max_tokens, length, self.defaults)
                params = request.to_sampling_params(max_tokens, self.defaults)
                self.admission.process_inputs("validate", engine_input, params, supported_tasks=("generate",))
                total += max_tokens * (request.n or 1)
        except ValidationError as exc:
            return validation_error_body(exc), [], 0
        except Exception as exc:  # noqa: BLE001 - mapped exactly as the engine path maps it
            return param_in_body(create_error(exc).error.model_dump(), body), [], 0
        return None, lengths, total
