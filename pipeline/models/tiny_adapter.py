"""Build the project's tiny LoRA adapters of `builtin:tiny-llama`, in PEFT format, nothing downloaded.

`builtin:tiny-lora-a` and `builtin:tiny-lora-b` are rank-8 adapters of every linear layer of the tiny
model (`adapter_config.json` + `adapter_model.safetensors`, as PEFT saves them), with random weights
large enough that the adapted model answers a greedy request differently from the base. Like the
tiny model, the build is deterministic (fixed seeds, same bytes on every machine) and cached under
``~/.cache/batch-completions/models/<name>`` (``PIPELINE_MODEL_CACHE``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.models.tiny_model import BUILTIN_PREFIX, SHAPES, cached_build

LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class AdapterShape:
    """A LoRA adapter of a builtin model: its rank, scale, target layers and weight seed."""

    base: str
    seed: int
    rank: int = 8
    alpha: int = 16  # PEFT scales the update by alpha / rank: 2 here
    targets: tuple[str, ...] = LINEAR_LAYERS


ADAPTERS: dict[str, AdapterShape] = {
    "tiny-lora-a": AdapterShape(base="tiny-llama", seed=100),
    "tiny-lora-b": AdapterShape(base="tiny-llama", seed=101),
}


def is_builtin_adapter(path: str) -> bool:
    return path.startswith(BUILTIN_PREFIX) and path[len(BUILTIN_PREFIX):] in ADAPTERS


def ensure_built(name: str) -> Path:
    """The named adapter's folder, built once (concurrent callers wait on a file lock)."""
    shape = ADAPTERS[name]
    recipe = json.dumps({"adapter": asdict(shape), "base": asdict(SHAPES[shape.base])}, sort_keys=True)
    return cached_build(name, recipe, lambda out: build(shape, out))


def _in_out(layer: str, hidden: int, intermediate: int) -> tuple[int, int]:
    if layer in ("gate_proj", "up_proj"):
        return hidden, intermediate
    if layer == "down_proj":
        return intermediate, hidden
    return hidden, hidden


def build(shape: AdapterShape, out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    base = SHAPES[shape.base]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": shape.base,
        "r": shape.rank,
        "lora_alpha": shape.alpha,
        "lora_dropout": 0.0,
        "target_modules": list(shape.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    gen = torch.Generator().manual_seed(shape.seed)
    dtype = getattr(torch, base.dtype)
    tensors = {}
    for layer in range(base.layers):
        for name in shape.targets:
            group = "self_attn" if name in LINEAR_LAYERS[:4] else "mlp"
            fan_in, fan_out = _in_out(name, base.hidden, base.intermediate)
            prefix = f"base_model.model.model.layers.{layer}.{group}.{name}."
            # B @ A has entries of std fan_in**-0.5, the base layer's own scale; scaled by alpha/rank
            # the update outweighs the base weights, so the adapter visibly changes the answers.
            tensors[prefix + "lora_A.weight"] = (torch.randn(shape.rank, fan_in, generator=gen)
                                                 * fan_in ** -0.5).to(dtype)
            tensors[prefix + "lora_B.weight"] = (torch.randn(fan_out, shape.rank, generator=gen)
                                                 * shape.rank ** -0.5).to(dtype)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
