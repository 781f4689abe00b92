"""`validate`: read the whole input, build every row's request and check it, without an engine.

The checks are vLLM's own, run without starting an engine: the request model (types and ranges), the
served model name, tokenization and the context length with the model's tokenizer, and the sampling
parameters (`SamplingParams` and its `verify` against the model config). A row this finds invalid
would get the same error record from a job.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter, defaultdict
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from pipeline import inputs
from pipeline.config import JobConfig
from pipeline.engine import _batch_request_class, _naming_param, validation_error_body
from pipeline.inputs import INPUT_ERROR, ROW_KEY
from pipeline.protocol import BodyError, error_body
from pipeline.runner import _rows, request_builder
from pipeline.tiny_model import resolve_model


class ValidationReport(BaseModel):
    input: str
    rows: int = 0
    valid_rows: int = 0
    errors: dict[str, int] = Field(default_factory=dict, description="'type (code) param': rows")
    examples: dict[str, list[str]] = Field(default_factory=dict, description="a few row keys per error")
    prompt_tokens: dict[str, float] = Field(default_factory=dict, description="min/mean/p50/p95/max")
    max_new_tokens: int = Field(0, description="The most tokens the job could generate (valid rows).")
    setup_s: float = Field(0.0, description="Loading vLLM, the model config and the tokenizer.")
    seconds: float = Field(0.0, description="Reading and checking the rows.")
    rows_per_s: float = 0.0

    def render(self) -> str:
        lines = [f"input:            {self.input}",
                 f"rows:             {self.rows}",
                 f"valid rows:       {self.valid_rows}",
                 f"invalid rows:     {self.rows - self.valid_rows}"]
        for kind, count in sorted(self.errors.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {count:>6}  {kind}   e.g. {', '.join(self.examples[kind])}")
        stats = self.prompt_tokens
        if stats:
            lines.append("prompt tokens:    min {min:.0f}, mean {mean:.1f}, p50 {p50:.0f}, p95 {p95:.0f}, "
                         "max {max:.0f}".format(**stats))
        lines.append(f"max new tokens:   {self.max_new_tokens} (if every valid row ran to its max_tokens)")
        lines.append(f"checked in:       {self.seconds:.2f}s ({self.rows_per_s:.0f} rows/s), after "
                     f"{self.setup_s:.1f}s loading the tokenizer and vLLM's checks")
        return "\n".join(lines)


class RequestChecker:
    """vLLM's request checks for one served model, without an engine."""

    def __init__(self, config: JobConfig) -> None:
        from vllm.config import ModelConfig
        from vllm.entrypoints.openai.models.protocol import BaseModelPath
        from vllm.entrypoints.openai.models.serving import OpenAIModelRegistry
        from vllm.tokenizers import get_tokenizer

        path = resolve_model(config.model.path)
        sampling = config.defaults.sampling_defaults()
        self.default_max_tokens = sampling.pop("max_tokens")
        self.model_config = ModelConfig(
            model=path, tokenizer=path, max_model_len=config.engine.max_model_len,
            max_logprobs=config.engine.max_logprobs, trust_remote_code=config.engine.trust_remote_code,
            generation_config="vllm", override_generation_config=sampling)
        self.context = self.model_config.max_model_len
        self.defaults = self.model_config.get_diff_sampling_param()
        self.tokenizer = get_tokenizer(path, trust_remote_code=config.engine.trust_remote_code)
        self.models = OpenAIModelRegistry(
            self.model_config, [BaseModelPath(name=config.model.resolved_served_name(), model_path=path)])
        self.request_class = _batch_request_class()
        self.served = config.model.resolved_served_name()

    def check(self, body: dict[str, Any]) -> tuple[dict | None, list[int], int]:
        """(error body or None, prompt token counts, max new tokens) for one request body."""
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
        from vllm.entrypoints.serve.utils.api_utils import get_max_tokens
        from vllm.exceptions import VLLMValidationError

        try:
            request = self.request_class.model_validate(body)
        except ValidationError as exc:
            return validation_error_body(exc), [], 0
        except Exception as exc:  # noqa: BLE001 - vLLM's validators raise its own errors
            return _naming_param(create_error_response)(exc).error.model_dump(), [], 0
        if request.model and not self.models.is_base_model(request.model):
            return error_body(f"The model `{request.model}` does not exist. Valid aliases: {self.served}.",
                              "NotFoundError", 404, "model"), [], 0
        defaulted = body.get("max_tokens") is None
        if defaulted:
            request.use_default_max_tokens(self.default_max_tokens)
        lengths = self._prompt_lengths(request)
        try:
            if not defaulted and request.max_tokens is not None and request.max_tokens > self.context:
                raise VLLMValidationError(
                    f"max_tokens={request.max_tokens} cannot be greater than max_model_len={self.context}. "
                    "Please request fewer output tokens.", parameter="max_tokens", value=request.max_tokens)
            total = 0
            for length in lengths:
                if length > self.context:
                    raise VLLMValidationError(
                        f"This model's maximum context length is {self.context} tokens. However, your "
                        f"prompt contains {length} input tokens, which exceeds this limit even without "
                        "any output tokens. Please reduce the length of the input prompt.",
                        parameter="input_tokens", value=length)
                if not defaulted and request.max_tokens and length + request.max_tokens > self.context:
                    raise VLLMValidationError(
                        f"You passed {length} input tokens and requested {request.max_tokens} output "
                        f"tokens. However, the model's context length is only {self.context} tokens",
                        parameter="max_tokens", value=request.max_tokens)
                max_tokens = get_max_tokens(self.context, request.max_tokens, length, self.defaults)
                params = request.to_sampling_params(max_tokens, self.defaults)
                params.verify(self.model_config, None, None, self.tokenizer)
                total += max_tokens * (request.n or 1)
        except Exception as exc:  # noqa: BLE001 - mapped exactly as the engine path maps it
            return _naming_param(create_error_response)(exc).error.model_dump(), lengths, 0
        return None, lengths, total

    def _prompt_lengths(self, request: Any) -> list[int]:
        prompt = request.prompt
        prompts = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) \
            else [prompt]
        add_special = request.add_special_tokens
        return [len(p) if isinstance(p, list)
                else len(self.tokenizer(p, add_special_tokens=add_special).input_ids) for p in prompts]


def validate(config: JobConfig, examples_per_error: int = 3) -> ValidationReport:
    """Check every row of the input; raises InputError for job-level problems."""
    setup_started = time.monotonic()
    plan = inputs.plan_input(config.input)
    builder = request_builder(config, plan.format)
    checker = RequestChecker(config)
    started = time.monotonic()
    reader = inputs.read_parquet_file if plan.format == "parquet" else inputs.read_batch_file
    errors: Counter[str] = Counter()
    examples: dict[str, list[str]] = defaultdict(list)
    prompt_lengths: list[int] = []
    report = ValidationReport(input=config.input.path)
    for path in plan.files:
        table = reader(plan, path)
        problems = table.column(INPUT_ERROR).to_pylist()
        keys = table.column(ROW_KEY).to_pylist()
        for key, row, problem in zip(keys, _rows(table.drop_columns([INPUT_ERROR]), problems), problems):
            report.rows += 1
            error = problem
            if error is None:
                try:
                    body = builder.body(row)
                except BodyError as exc:
                    error = exc.error
                else:
                    error, lengths, new_tokens = checker.check(body)
                    if error is None:
                        report.valid_rows += 1
                        prompt_lengths.extend(lengths)
                        report.max_new_tokens += new_tokens
            if error is not None:
                kind = f"{error['type']} ({error['code']}) param={error['param']}"
                errors[kind] += 1
                if len(examples[kind]) < examples_per_error:
                    examples[kind].append(key)
    if prompt_lengths:
        ordered = sorted(prompt_lengths)
        report.prompt_tokens = {
            "min": ordered[0], "mean": round(statistics.fmean(ordered), 1),
            "p50": ordered[len(ordered) // 2], "p95": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))],
            "max": ordered[-1]}
    report.errors, report.examples = dict(errors), dict(examples)
    report.setup_s = round(started - setup_started, 3)
    report.seconds = round(time.monotonic() - started, 3)
    report.rows_per_s = round(report.rows / report.seconds, 1) if report.seconds else 0.0
    return report
