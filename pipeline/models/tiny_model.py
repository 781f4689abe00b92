"""Build the project's tiny Llama-shaped model: random weights, a trained byte-level BPE tokenizer.

No model can be downloaded on CI machines, so the demo, the tests and the benchmark run on models
this module builds. The build is deterministic: the same shape gives the same bytes on every machine
(fixed seed, tokenizer trained on ``pipeline/models/assets/corpus.txt``), and it is cached under
``~/.cache/batch-completions/models/<name>`` (override with ``PIPELINE_MODEL_CACHE``).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

BUILTIN_PREFIX = "builtin:"
BOS, EOS, UNK = "<s>", "</s>", "<unk>"
CORPUS = Path(__file__).parent / "assets" / "corpus.txt"


@dataclass(frozen=True)
class ModelShape:
    """The shape of a random-weight Llama model. Head size is fixed at 64 (the CPU backend needs it)."""

    layers: int
    hidden: int
    intermediate: int
    context: int = 4096
    vocab_target: int = 2048
    dtype: str = "float32"
    seed: int = 0
    # Std of the output head: large enough that the next-token distribution is peaked, so greedy
    # decoding is stable against batch-composition noise and sampling is not uniform.
    lm_head_std: float = 0.25

    @property
    def heads(self) -> int:
        return self.hidden // 64


SHAPES: dict[str, ModelShape] = {
    # Demo and tests: ~0.9M parameters, about 20k tokens/s on 2 CPU cores.
    "tiny-llama": ModelShape(layers=2, hidden=128, intermediate=512),
    # A second tiny model (other weights) for sweeps that compare models.
    "tiny-llama-b": ModelShape(layers=2, hidden=128, intermediate=512, seed=1),
    # Benchmark model: 8 layers, 512 wide, bfloat16 (~27M parameters).
    "bench-llama-27m": ModelShape(layers=8, hidden=512, intermediate=1536, dtype="bfloat16",
                                  vocab_target=8192),
}


def cache_root() -> Path:
    return Path(os.environ.get("PIPELINE_MODEL_CACHE", Path.home() / ".cache" / "batch-completions" / "models"))


def resolve_model(model: str) -> str:
    """Turn ``builtin:<name>`` into a built model folder; any other value is returned unchanged."""
    if not model.startswith(BUILTIN_PREFIX):
        return model
    name = model[len(BUILTIN_PREFIX):]
    if name not in SHAPES:
        raise ValueError(f"unknown builtin model {name!r}; choose one of {sorted(SHAPES)}")
    return str(ensure_built(name))


def ensure_built(name: str) -> Path:
    """Build the named model once; concurrent callers (actors, test workers) wait on a file lock."""
    shape = SHAPES[name]
    wanted = json.dumps({"shape": asdict(shape), "corpus_bytes": CORPUS.stat().st_size}, sort_keys=True)
    return cached_build(name, wanted, lambda out: build(shape, out))


def cached_build(name: str, recipe: str, build_into: Callable[[Path], None]) -> Path:
    """``cache_root()/name`` (a relative path), built by ``build_into`` unless a build of the same
    ``recipe`` is there.

    Concurrent callers (actors, test workers) wait on a file lock; the folder appears whole or not at all.
    """
    target = cache_root() / name
    stamp = target / "build.json"
    if stamp.exists() and stamp.read_text() == recipe:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text() == recipe:
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        build_into(tmp)
        (tmp / "build.json").write_text(recipe)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target


def build_tokenizer(shape: ModelShape, out: Path) -> int:
    """Train a byte-level BPE tokenizer on the shipped corpus; returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=shape.vocab_target,
        min_frequency=2,
        special_tokens=[UNK, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    tokenizer.train_from_iterator(lines, trainer)
    bos_id = tokenizer.token_to_id(BOS)
    # Like Llama: every encoded prompt starts with BOS, so usage.prompt_tokens counts it.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "unk_token": UNK,
        "model_max_length": shape.context,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": True,
    }, indent=2, sort_keys=True))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK}, indent=2, sort_keys=True))
    return tokenizer.get_vocab_size()


def build(shape: ModelShape, out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    vocab = build_tokenizer(shape, out)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.heads,
        "head_dim": 64,
        "hidden_act": "silu",
        "max_position_embeddings": shape.context,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": vocab,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "torch_dtype": shape.dtype,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))

    gen = torch.Generator().manual_seed(shape.seed)
    dtype = getattr(torch, shape.dtype)

    def normal(*size: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * std).to(dtype)

    h, i = shape.hidden, shape.intermediate
    tensors = {"model.embed_tokens.weight": normal(vocab, h, std=1.0)}
    for layer in range(shape.layers):
        p = f"model.layers.{layer}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[p + f"self_attn.{proj}.weight"] = normal(h, h, std=h ** -0.5)
        tensors[p + "mlp.gate_proj.weight"] = normal(i, h, std=h ** -0.5)
        tensors[p + "mlp.up_proj.weight"] = normal(i, h, std=h ** -0.5)
        tensors[p + "mlp.down_proj.weight"] = normal(h, i, std=i ** -0.5)
        tensors[p + "input_layernorm.weight"] = torch.ones(h, dtype=dtype)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=dtype)
    tensors["model.norm.weight"] = torch.ones(h, dtype=dtype)
    tensors["lm_head.weight"] = normal(vocab, h, std=shape.lm_head_std)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
