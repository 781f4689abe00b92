"""LoRA adapters of the job's model: where they are, what they are, and a local copy for the engine.

A model's adapters are named in `model.adapters` ({name: path}) and/or found in `model.adapter_folder`
(every subfolder is an adapter, served under the subfolder's name, as NIM's PEFT source). A path is a
PEFT folder (`adapter_config.json` + `adapter_model.safetensors`), local or any URI pyarrow resolves,
or a builtin adapter of the tiny model (`builtin:tiny-lora-a`). The driver checks them all before any
engine starts (`check_job`); each engine actor then copies remote ones to a local cache (`localize`),
because vLLM loads adapters from local folders only.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from pipeline.config import check_adapter_name
from pipeline.io.plan import InputError
from pipeline.io.storage import NO_BUCKET, bucket_missing, explain, filesystem, explained_store_errors, redact
from pipeline.models.tiny_adapter import ADAPTERS, ensure_built, is_builtin_adapter
from pipeline.models.tiny_model import BUILTIN_PREFIX, cached_build

if TYPE_CHECKING:
    from pipeline.config import JobConfig, ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class AdapterError(InputError):
    """An adapter that cannot be served (missing, not PEFT, misnamed). The message says what to fix."""


@dataclass(frozen=True)
class AdapterSet:
    """A model's adapters: where each is read from, its LoRA rank and the layers it adapts."""

    paths: dict[str, str] = field(default_factory=dict)  # served name -> folder (path, URI or builtin:)
    ranks: dict[str, int] = field(default_factory=dict)
    targets: dict[str, tuple[str, ...] | None] = field(default_factory=dict)  # None: PEFT's regex or "all-linear"

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values(), default=0)

    def target_modules(self) -> list[str] | None:
        """The layers any adapter adapts, or None when an adapter names them by a pattern."""
        if not self.targets or any(t is None for t in self.targets.values()):
            return None
        return sorted({module for modules in self.targets.values() for module in modules})

    def __bool__(self) -> bool:
        return bool(self.paths)


def unknown_model_message(model: str, base: str, adapters: list[str]) -> str:
    """The 404 message for a `model` nobody serves: vLLM's words, listing the adapters too."""
    listed = f"{base}; adapters: {', '.join(sorted(adapters))}" if adapters else base
    return f"The model `{model}` does not exist. Valid aliases: {listed}."


def _read_config(fs: pafs.FileSystem, folder: str, shown: str) -> dict:
    try:
        with fs.open_input_stream(f"{folder}/{CONFIG_FILE}") as stream:
            data = json.loads(stream.read())
    except FileNotFoundError:
        raise AdapterError(f"adapter {shown} has no {CONFIG_FILE}; an adapter is a PEFT folder "
                           f"({CONFIG_FILE} + {WEIGHT_FILES[0]})") from None
    except OSError as exc:
        raise AdapterError(str(explain(exc, f"{shown}/{CONFIG_FILE}", "read the adapter's"))) from None
    except ValueError as exc:
        raise AdapterError(f"cannot read {shown}/{CONFIG_FILE}: {exc}") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{shown}/{CONFIG_FILE} must hold a JSON object")
    return data


def read_adapter(path: str) -> tuple[int, tuple[str, ...] | None]:
    """The rank and target modules of the PEFT adapter at `path`; AdapterError when it is no readable
    LoRA adapter."""
    shown = redact(path)
    if path.startswith(BUILTIN_PREFIX):
        if not is_builtin_adapter(path):
            raise AdapterError(f"unknown builtin adapter {path!r}; choose one of "
                               f"{[BUILTIN_PREFIX + n for n in sorted(ADAPTERS)]}")
        path = str(ensure_built(path[len(BUILTIN_PREFIX):]))
    fs, folder = filesystem(path)
    with explained_store_errors(path, "read the adapter"):
        info = fs.get_file_info(folder)
    if info.type != pafs.FileType.Directory:
        if info.type == pafs.FileType.NotFound and bucket_missing(fs, path, folder):
            raise AdapterError(f"cannot read the adapter {shown}: {NO_BUCKET}")
        raise AdapterError(f"adapter folder {shown} does not exist (or is not a folder)")
    config = _read_config(fs, folder, shown)
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(f"adapter {shown} is a {config['peft_type']} adapter; only LoRA adapters are served")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"{shown}/{CONFIG_FILE} has no LoRA rank `r` (a positive integer); got {rank!r}")
    with explained_store_errors(path, "read the adapter"):
        files = {i.base_name for i in fs.get_file_info([f"{folder}/{w}" for w in WEIGHT_FILES])
                 if i.type == pafs.FileType.File}
    if not files:
        raise AdapterError(f"adapter {shown} has no weights: {' or '.join(WEIGHT_FILES)}")
    targets = config.get("target_modules")
    return rank, tuple(targets) if isinstance(targets, list) and all(isinstance(t, str) for t in targets) else None


def _child(folder: str, name: str) -> str:
    """`folder/name`, for a path or a URI with a query (s3://b/x?endpoint_override=... -> s3://b/x/name?...)."""
    path, sep, query = folder.partition("?")
    return f"{path.rstrip('/')}/{name}{sep}{query}"


def _folder_adapters(folder: str) -> dict[str, str]:
    """The subfolders of an adapter folder, by name; hidden ones (`.x`, `_x`) are skipped."""
    fs, path = filesystem(folder)
    with explained_store_errors(folder, "read model.adapter_folder"):
        infos = fs.get_file_info(path), fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    if infos[0].type != pafs.FileType.Directory:
        if infos[0].type == pafs.FileType.NotFound and bucket_missing(fs, folder, path):
            raise AdapterError(f"cannot read model.adapter_folder {redact(folder)}: {NO_BUCKET}")
        raise AdapterError(f"model.adapter_folder {redact(folder)} does not exist (or is not a folder)")
    found = {}
    for info in infos[1]:
        if info.type == pafs.FileType.Directory and not info.base_name.startswith((".", "_")):
            found[info.base_name] = _child(folder, info.base_name)
    if not found:
        raise AdapterError(f"model.adapter_folder {redact(folder)} holds no adapters; each adapter is a "
                           f"subfolder ({CONFIG_FILE} + {WEIGHT_FILES[0]}) named as requests will name it")
    return found


def discover(model: "ModelConfig") -> AdapterSet:
    """Every adapter of the model, checked: readable, LoRA, not named as the base model."""
    if not model.has_adapters():
        return AdapterSet()
    paths = dict(model.adapters)
    if model.adapter_folder is not None:
        for name, path in _folder_adapters(model.adapter_folder).items():
            if name in paths:
                raise AdapterError(f"adapter {name!r} is both in model.adapters and a subfolder of "
                                   "model.adapter_folder; rename one of them")
            try:
                check_adapter_name(name)
            except ValueError as exc:
                raise AdapterError(f"model.adapter_folder: {exc}; rename the subfolder") from None
            paths[name] = path
    base = model.resolved_served_name()
    if base in paths:
        raise AdapterError(f"adapter {base!r} (in {redact(paths[base])}) has the base model's served name; "
                           "rename it or set model.served_name")
    found = {name: read_adapter(path) for name, path in sorted(paths.items())}
    return AdapterSet(paths, {name: rank for name, (rank, _) in found.items()},
                      {name: targets for name, (_, targets) in found.items()})


def check_job(config: "JobConfig") -> None:
    """The adapters of every model the job runs, and every sweep entry naming one; raises AdapterError."""
    found: dict[str, AdapterSet] = {}
    for variant in config.variants():
        key = variant.model.model_dump_json()
        if key not in found:
            found[key] = discover(variant.model)
        adapters = found[key]
        if variant.adapter is not None and variant.adapter not in adapters.paths:
            raise AdapterError(f"sweep.models names {variant.adapter!r}, which is no adapter of "
                               f"{variant.model.resolved_served_name()}; its adapters: "
                               f"{', '.join(sorted(adapters.paths)) or 'none'}")


def localize(adapters: AdapterSet) -> AdapterSet:
    """The same adapters as local folders: builtins built, remote ones copied to the local cache."""
    return replace(adapters, paths={name: _local_folder(path) for name, path in adapters.paths.items()})


def _local_folder(path: str) -> str:
    if path.startswith(BUILTIN_PREFIX):
        return str(ensure_built(path[len(BUILTIN_PREFIX):]))
    if "://" not in path:
        return os.path.abspath(path)
    fs, folder = filesystem(path)
    if isinstance(fs, pafs.LocalFileSystem):
        return folder
    listing = sorted((i.path, i.size, i.mtime_ns) for i in fs.get_file_info(pafs.FileSelector(folder, recursive=True)))
    recipe = json.dumps({"uri": redact(path), "files": listing}, default=str)
    digest = hashlib.sha256(path.encode()).hexdigest()[:16]
    copy = cached_build(f"remote-adapters/{digest}", recipe, lambda out: pafs.copy_files(
        folder, str(out), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()))
    return str(copy)
