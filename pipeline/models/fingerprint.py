"""A model's or an adapter's fingerprint: a hash of what its answers depend on, cheap for a 140 GB
checkpoint (a path can be overwritten; the fingerprint says whether it was).

It covers, in a fixed order, each file's name and size and:
- the whole of the small files: config.json, generation_config.json, adapter_config.json, the tokenizer's
  files (tokenizer.json, tokenizer_config.json, special_tokens_map.json, tokenizer.model, vocab.json,
  merges.txt, added_tokens.json, chat_template.jinja) and the weights' index
  (model.safetensors.index.json);
- a safetensors file's header: every tensor's name, dtype, shape and byte offsets (8 bytes + the
  header: kilobytes, whatever the file's size);
- any other weight file (.bin, .pt, .pth, .gguf): its first MiB.
Not the weight values themselves: a checkpoint rewritten with other values of the same shapes keeps its
fingerprint (hash the files for that; for 140 GB it takes minutes). Local folders and any URI the
input accepts; a model the driver cannot read (a hub id, a folder only the GPU nodes mount) has none.

`weight_sample` adds the values, sampled: SAMPLES stretches of SAMPLE_BYTES spread evenly through each
weight file (the whole of a file no larger than that). A checkpoint trained further changes nearly
every tensor, so a sample tells it apart from the one it replaced; it costs SAMPLES reads per file. The
answer store's key holds it (io/answer_store.py): a stored answer must never outlive the weights that
gave it. The output's identity keeps the fingerprint alone, as outputs recorded it.
"""

from __future__ import annotations

import hashlib
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow.fs as pafs

from pipeline.io.storage import filesystem, redact

WHOLE = ("config.json", "generation_config.json", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
         "chat_template.jinja", "model.safetensors.index.json")
WEIGHTS = (".bin", ".pt", ".pth", ".gguf")
HEAD_BYTES = 1 << 20
SAMPLES, SAMPLE_BYTES = 16, 64 << 10
COVERS = ("config, tokenizer and index files whole; safetensors headers (tensor names, dtypes, shapes, offsets); "
          "other weight files' first MiB; every file's size. Not the weight values.")


def fingerprint(path: str) -> dict[str, Any]:
    """{"sha256": ..., "files": n} for a model or adapter folder, or {"sha256": None, "why": ...}."""
    try:
        fs, folder = filesystem(path)
        infos = fs.get_file_info(pafs.FileSelector(folder, recursive=True))
    except (OSError, ValueError) as exc:
        return {"sha256": None, "why": f"{redact(path)} cannot be read here ({type(exc).__name__})"}
    digest, files = hashlib.sha256(), 0
    for info in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
        name = info.path[len(folder):].lstrip("/")
        base = name.rsplit("/", 1)[-1]
        content = _covered(fs, info.path, base, info.size)
        if content is None:
            continue
        digest.update(f"{name}\0{info.size}\0".encode())
        digest.update(content)
        files += 1
    if not files:
        return {"sha256": None, "why": f"{redact(path)} holds no model or adapter files"}
    return {"sha256": digest.hexdigest(), "files": files}


def _covered(fs: pafs.FileSystem, path: str, base: str, size: int) -> bytes | None:
    if base in WHOLE:
        with fs.open_input_file(path) as f:
            return f.read()
    if base.endswith(".safetensors"):
        with fs.open_input_file(path) as f:
            (length,) = struct.unpack("<Q", f.read_at(8, 0))
            return f.read_at(min(length, max(size - 8, 0)), 8)
    if base.endswith(WEIGHTS):
        with fs.open_input_file(path) as f:
            return f.read_at(min(HEAD_BYTES, size), 0)
    return None


def weight_sample(path: str) -> str | None:
    """A hash of each weight file's name, size and SAMPLES stretches of its bytes (module docstring);
    None when the folder cannot be read here."""
    try:
        fs, folder = filesystem(path)
        infos = fs.get_file_info(pafs.FileSelector(folder, recursive=True))
    except (OSError, ValueError):
        return None
    weights = sorted((i for i in infos if i.type == pafs.FileType.File
                      and i.base_name.endswith((".safetensors", *WEIGHTS))), key=lambda i: i.path)

    def sample(info: pafs.FileInfo) -> bytes:
        with fs.open_input_file(info.path) as f:
            if info.size <= SAMPLES * SAMPLE_BYTES:
                return f.read()
            step = (info.size - SAMPLE_BYTES) // (SAMPLES - 1)
            return b"".join(f.read_at(SAMPLE_BYTES, n * step) for n in range(SAMPLES))

    try:
        with ThreadPoolExecutor(8) as pool:  # object storage: the files' reads at once
            samples = list(pool.map(sample, weights))
    except OSError:
        return None
    digest = hashlib.sha256()
    for info, content in zip(weights, samples):
        digest.update(f"{info.path[len(folder):]}\0{info.size}\0".encode())
        digest.update(hashlib.sha256(content).digest())
    return digest.hexdigest()
