"""Start a vLLM engine and answer `/v1/completions` bodies with it.

The engine room and job/validate.py (the same checks without an engine) are the only ones that import vLLM.

Each request body goes through vLLM's own OpenAI completion handler (`OpenAIServingCompletion`), the
code that NIM 2.x serves this endpoint with. Validation, defaults, sampling, stop handling, logprobs,
echo and usage are therefore the reference server's, not a re-implementation that could drift from it.
What this module adds is what a batch needs: in-process engine start-up, the spec's defaults, errors
as values, and engine death raised instead of being recorded as a per-row error.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import importlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

from pydantic import ValidationError

from pipeline.config import EngineConfig
from pipeline.engine import core_forkserver, cpu_binding, prompt_logprob_reuse, token_text
from pipeline.engine.engine_args import engine_args
from pipeline.engine.sizing import executor, parallel, rows_in_flight
from pipeline.engine.prompt_tokens import Key, PromptTokens
from pipeline.engine.serving import (batch_request_class, batch_serving_class, naming_param, online_renderer,
                                     param_in_body, validation_error_body)
from pipeline.models.adapters import AdapterError, AdapterSet

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine process died; the rows in flight must be retried elsewhere, never recorded."""


@dataclass
class Answer:
    """What the endpoint answered for one request: exactly one of the two bodies is set."""

    response: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    prefix_cached_tokens: int = 0  # prompt tokens the engine read from its prefix cache, not computed


@dataclass
class Prepared:
    """A batch of bodies validated together, their prompts tokenized together (`CompletionEngine.prepare`).

    `requests[i]` is body i's validated request, its 400 Answer, or None (then `complete` meets the
    problem itself); `keys` are the batch's tokenized prompts, for `CompletionEngine.release`."""

    requests: list[Any]
    keys: list[Key]


def _join_this_cluster() -> None:
    """vLLM's engine-core process calls `ray.init()` to start its workers in the actor's placement group
    (vLLM reads the group in this process and hands it over): point it at the actor's own cluster."""
    import ray

    if ray.is_initialized():
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


class CompletionEngine:
    """One vLLM engine answering completion request bodies, many in flight at once."""

    def __init__(self, engine: Any, serving: Any, served_name: str, default_max_tokens: int,
                 startup_s: float) -> None:
        self._engine = engine
        self._serving = serving
        self._request_class = batch_request_class()
        self._prompt_tokens = PromptTokens(engine.renderer, engine.model_config)
        self._adapters_loaded: asyncio.Task | None = None
        self._prefix_leaders: dict[tuple, asyncio.Future] = {}  # `_prefix_turn`: prefix -> its first request
        self.last_output_at = time.monotonic()
        self._time_outputs(engine.output_processor)
        self.served_name = served_name
        self.default_max_tokens = default_max_tokens
        self.startup_s = startup_s

    def _time_outputs(self, processor: Any) -> None:
        """Keep `last_output_at`: when vLLM last processed an engine step's outputs (the supervisor's
        sign of progress). The output handler calls the processor's method by name at every step."""
        process = processor.process_outputs

        def timed(*args: Any, **kwargs: Any) -> Any:
            self.last_output_at = time.monotonic()
            return process(*args, **kwargs)

        processor.process_outputs = timed

    @property
    def errored(self) -> bool:
        """Whether vLLM knows its engine is dead (its engine-core process exited, or its output handler
        stopped)."""
        return self._engine.errored

    @classmethod
    def start(cls, cfg: EngineConfig, model_path: str, served_name: str,
              sampling_defaults: dict[str, Any], adapters: AdapterSet = AdapterSet(),
              stat_loggers: Sequence[Any] = ()) -> "CompletionEngine":
        """Start an engine. `sampling_defaults` holds temperature, top_p and max_tokens defaults;
        `adapters` (local folders) are served under their names beside the base model, as the server's
        `--lora-modules` serves them; `stat_loggers`: vLLM's stat-logger classes (its engine metrics),
        none by default (vLLM then keeps no per-step stats)."""
        import_vllm_apart()
        if cfg.resolved_device() == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kvcache_space_gb))
        if executor(cfg) == "ray":
            _join_this_cluster()
        if cfg.batch_invariant:  # read by vLLM in the engine's processes (GPU only: config/sections.py)
            os.environ["VLLM_BATCH_INVARIANT"] = "1"
        from vllm.entrypoints.openai.models.protocol import BaseModelPath, LoRAModulePath
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels
        from vllm.v1.engine.async_llm import AsyncLLM

        t0 = time.monotonic()
        defaults = {k: v for k, v in sampling_defaults.items() if k != "max_tokens"}
        cpu_binding.for_a_new_engine()
        if cfg.resolved_device() == "cpu":
            cpu_binding.bind_workers(cfg.tensor_parallel_size * parallel(cfg)[1])
        with core_forkserver.forked_engine_core():
            engine = AsyncLLM.from_engine_args(engine_args(cfg, model_path, served_name, defaults, adapters),
                                               stat_loggers=list(stat_loggers) or None)
        cpu_binding.share_out_cores()
        lora_modules = [LoRAModulePath(name=name, path=path) for name, path in adapters.paths.items()]
        models = OpenAIServingModels(engine_client=engine,
                                     base_model_paths=[BaseModelPath(name=served_name, model_path=model_path)],
                                     lora_modules=lora_modules or None)
        renderer = online_renderer(engine.model_config, engine.renderer)
        serving = batch_serving_class()(engine, models, online_renderer=renderer, request_logger=None)
        serving.create_error_response = naming_param(serving.create_error_response)
        token_text.install()  # each token's text in logprobs decoded once per process, not per position
        if cfg.prompt_logprob_reuse and cfg.enable_prefix_caching:  # a shared context computed once
            prompt_logprob_reuse.install()
            serving.prompt_logprob_memory = prompt_logprob_reuse.PromptLogprobMemory(
                engine.vllm_config.cache_config.block_size,
                max(prompt_logprob_reuse.MAX_ANSWERS, 4 * rows_in_flight(cfg)))
        settle_for_serving()
        return cls(engine, serving, served_name, sampling_defaults["max_tokens"], time.monotonic() - t0)

    def _request(self, body: dict[str, Any]) -> Any:
        """The body as vLLM's validated CompletionRequest; raises pydantic's ValidationError."""
        request = self._request_class.model_validate(body)
        if body.get("max_tokens") is None:
            request.use_default_max_tokens(self.default_max_tokens)
        request.read_prefix_cache(self._serving.prompt_logprob_memory is not None)
        # A batch has no stream: the record is the complete body (validation above saw `stream`).
        request.stream = False
        return request

    def prepare(self, bodies: list[dict[str, Any]]) -> Prepared:
        """Validate a batch of bodies and tokenize their prompts in batches, ahead of `complete`.

        Only work `complete` would do anyway, done once per batch: each request is still answered by
        vLLM's handler, which takes its prompt's tokens from the batch. Thread-safe with respect to
        the event loop (`complete` only reads what this adds)."""
        requests: list[Any] = []
        for body in bodies:
            try:
                requests.append(self._request(body))
            except ValidationError as exc:
                requests.append(Answer(error=validation_error_body(exc)))
            except Exception:  # noqa: BLE001 - `complete` meets it again and reports it as the server would
                requests.append(None)
        try:
            keys = self._prompt_tokens.add(r for r in requests if r is not None and not isinstance(r, Answer))
        except Exception:  # noqa: BLE001 - then the renderer tokenizes each prompt, as it always could
            log.warning("tokenizing a batch of prompts ahead failed; they are tokenized one by one",
                        exc_info=True)
            keys = []
        return Prepared(requests, keys)

    def release(self, prepared: Prepared) -> None:
        """Forget the batch's prompt tokens no request took."""
        self._prompt_tokens.discard(prepared.keys)

    async def complete(self, body: dict[str, Any], request: Any = None) -> Answer:
        """Answer one request body as the endpoint would; raises EngineDeadError if the engine died.

        `request` is the body's entry in `prepare`'s batch, if it went through one."""
        from vllm.entrypoints.openai.completion.protocol import CompletionResponse
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDead

        if isinstance(request, Answer):
            return request
        await self.load_adapters()
        try:
            if request is None:
                request = self._request(body)
            with await self._prefix_turn(body):
                result = await self._serving.create_completion(request, None)
            if request.unfilled is not None:
                request, result = await self._filled(request, body)
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
            return Answer(response=result.model_dump(mode="json"), prefix_cached_tokens=request.prefix_cached_tokens)
        if self._engine.errored:
            raise EngineDeadError(f"vLLM engine died: {self._engine.dead_error}")
        return Answer(error=param_in_body(result.model_dump(mode="json")["error"], body))

    async def _prefix_turn(self, body: dict[str, Any]) -> contextlib.AbstractContextManager:
        """For a request with prompt logprobs whose prompt is token ids: wait while another request with
        the same cacheable prefix (its whole KV blocks) is being answered, so that this one reads that
        prefix from the prefix cache rather than computing it in the same engine step (vLLM finds only
        blocks computed in an earlier step). The first of them leads: the context it returns is held
        while it is answered. A document's choices go into the engine one step after its first."""
        memory = self._serving.prompt_logprob_memory
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list):
            prompt = prompt[0]  # one prompt of token ids, as lm-evaluation-harness sends it
        if memory is None or not body.get("echo") or body.get("logprobs") is None or not isinstance(prompt, list) \
                or not prompt or not all(isinstance(t, int) for t in prompt):
            return contextlib.nullcontext()
        cacheable = (len(prompt) - 1) // memory.block_size * memory.block_size
        if cacheable == 0:
            return contextlib.nullcontext()
        key = tuple(prompt[:cacheable])
        leader = self._prefix_leaders.get(key)
        if leader is not None:
            await asyncio.shield(leader)
            return contextlib.nullcontext()
        turn = asyncio.get_running_loop().create_future()
        self._prefix_leaders[key] = turn

        @contextlib.contextmanager
        def leading() -> Any:
            try:
                yield
            finally:
                del self._prefix_leaders[key]
                turn.set_result(None)

        return leading()

    async def _filled(self, request: Any, body: dict[str, Any]) -> tuple[Any, Any]:
        """A request that read the prefix cache before any answer with its cached positions' logprobs
        was in (prompt_logprob_reuse.py): the answers of the same engine step come in one after the
        other, so it waits for them a moment; failing that, it is asked again with cache reads off."""
        for delay in REFILL_WAITS_S:
            await asyncio.sleep(delay)
            result = self._serving.filled_response(request)
            if result is not None:
                return request, result
        again = self._request(body)
        again.read_prefix_cache(False)
        return again, await self._serving.create_completion(again, None)

    async def load_adapters(self) -> None:
        """Load the adapters into the engine, once, as the server does at start-up; a request waits for it.

        Loading is asynchronous in vLLM and `start` runs outside the event loop the engine serves on,
        so it happens at the first request. An adapter that does not load raises AdapterError.
        """
        if self._adapters_loaded is None:
            self._adapters_loaded = asyncio.ensure_future(self._load_adapters())
        if not self._adapters_loaded.done():  # every request asks: once loaded, no await at all
            await asyncio.shield(self._adapters_loaded)
        self._adapters_loaded.result()  # raises what loading raised

    async def _load_adapters(self) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDead

        t0 = time.monotonic()
        models = self._serving.models
        try:
            await models.init_static_loras()
        except VllmEngineDead as exc:
            raise EngineDeadError(f"vLLM engine died loading the adapters: {exc}") from exc
        except ValueError as exc:  # the server's own words for an adapter that does not load
            raise AdapterError(f"a LoRA adapter did not load into {self.served_name}: {exc}") from exc
        if models.static_lora_modules:
            log.info("loaded %d adapters in %.2fs", len(models.static_lora_modules), time.monotonic() - t0)

    def shutdown(self) -> None:
        """Stop the engine; safe from any thread, and more than once. A request still in it fails with
        vLLM's EngineDeadError rather than waiting forever: vLLM fails the requests in flight only
        when its output handler sees the engine die, and a handler cancelled first never does.

        The handler is cancelled, and done, before the engine process goes: a handler still reading
        when the engine exits logs the exit as an EngineDeadError (ERROR and a traceback in the actor's
        log) although nothing failed. vLLM's own shutdown (AsyncLLM.shutdown, and its clean-up at
        process exit) stops the engine first and cancels the handler after."""
        handler = getattr(self._engine, "output_handler", None)
        if handler is not None and not handler.done():
            _stop_output_handler(handler, self._engine.output_processor)
        self._engine.shutdown()


# How long a request whose cached positions' logprobs no answer had yet waits for the other answers of
# its engine step before it is computed whole: a few turns of the event loop, then a few milliseconds.
REFILL_WAITS_S = (0, 0, 0, 0, 0.001, 0.005, 0.02)
HANDLER_STOP_S = 5.0  # how long shutdown waits for the output handler's event loop to cancel it


def _stop_output_handler(handler: asyncio.Task, output_processor: Any) -> None:
    """Fail the requests in flight (EngineDeadError) and cancel vLLM's output handler, in its event
    loop; from another thread, wait until that is done. A loop that is not running (closed, or at
    process exit) runs neither the handler nor anything else: there is nothing to wait for."""
    from vllm.utils.async_utils import in_loop
    from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDead

    def stop() -> None:
        output_processor.propagate_error(VllmEngineDead())
        handler.cancel()

    loop = handler.get_loop()
    if in_loop(loop):
        stop()
        return
    if loop.is_closed() or not loop.is_running():
        return

    async def stopped() -> None:
        stop()
        await asyncio.wait([handler])

    try:
        asyncio.run_coroutine_threadsafe(stopped(), loop).result(timeout=HANDLER_STOP_S)
    except Exception:  # noqa: BLE001 - a loop that stopped meanwhile or is stuck: shut down all the same
        log.debug("the output handler did not stop within %.0f s", HANDLER_STOP_S, exc_info=True)


# Allocations between two youngest-generation collections while serving (Python's default is 700).
GC_YOUNG_THRESHOLD = 50_000


def settle_for_serving() -> None:
    """Settle this process for answering requests, as vLLM's own server does once it is up.

    - The start-up heap (torch, vLLM, the model's tokenizer: millions of objects) is frozen out of
      the garbage collector (vLLM's `freeze_gc_heap`, what its API server calls after start-up).
    - The youngest generation is collected every GC_YOUNG_THRESHOLD allocations, not 700. A shard
      puts thousands of requests in flight at once, each a handful of live objects; with Python's
      default the collector ran 2,700 times in a 20,000-row short-request job and took 9.1 s of the
      event loop's ~22 s, most of it full collections walking the rows still in flight (py-spy and
      gc.callbacks, docs/performance.md). With this: 8-16 collections, 0.4-1.0 s, and no full
      collection. Cyclic garbage is still collected, in larger batches.
    - vLLM's environment variables are read once, not at every request (`enable_envs_cache`, what
      vLLM's engine core calls after start-up): the completion handler reads one per request.
    """
    from vllm.envs import enable_envs_cache
    from vllm.utils.gc_utils import freeze_gc_heap

    freeze_gc_heap()
    young, older, oldest = gc.get_threshold()
    gc.set_threshold(max(young, GC_YOUNG_THRESHOLD), older, oldest)
    enable_envs_cache()


# Every vLLM module this one imports, imported first by `import_vllm_apart`.
VLLM_MODULES = (
    "vllm.engine.arg_utils", "vllm.entrypoints.openai.completion.protocol",
    "vllm.entrypoints.openai.completion.serving", "vllm.entrypoints.openai.models.protocol",
    "vllm.entrypoints.openai.models.serving", "vllm.entrypoints.serve.exception_handling.error_response",
    "vllm.entrypoints.serve.exception_handling.handlers.validation",
    "vllm.entrypoints.serve.exception_handling.utils", "vllm.exceptions", "vllm.renderers.online_renderer",
    "vllm.utils.async_utils", "vllm.utils.gc_utils", "vllm.envs", "vllm.v1.engine.async_llm",
    "vllm.v1.engine.exceptions",
)


@functools.cache
def import_vllm_apart() -> None:
    """Import vLLM in a thread of its own, so that what vLLM keeps from its imports pins nothing of ours.

    vLLM keeps an exception it caught while importing (`_torchcodec_import_exc` in
    `vllm.multimodal.media.audio`, whenever torchcodec is absent, as on the CPU stack), and with it a
    traceback whose frames reach every caller up the stack: imported from an engine actor's
    constructor, the actor and everything its frames held (the job's config and plan) would live as
    long as the process. From a thread of its own, the frames stop at the thread.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="import-vllm") as pool:
        pool.submit(lambda: [importlib.import_module(name) for name in VLLM_MODULES]).result()
