"""The job config: one YAML file (plus --set overrides), validated before Ray starts; unknown keys are
rejected and every bad key is named."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from pipeline.config.scoring import CHOICE_REQUEST_FIELDS, ScoringConfig
from pipeline.config.sections import (ConfigError, CostConfig, EngineConfig, InputConfig, ModelConfig,
                                      OutputConfig, RequestDefaults, Strict)
from pipeline.config.sweep import SweepConfig, Variant, label, slug


# engine.vllm arguments that change only speed or placement, not answers: a resume may change them.
SPEED_ONLY = {"pipeline_parallel_size", "distributed_executor_backend", "block_size", "swap_space",
              "cpu_offload_gb", "max_parallel_loading_workers", "disable_custom_all_reduce", "max_num_partial_prefills",
              "max_long_partial_prefills", "long_prefill_token_threshold", "scheduling_policy", "num_gpu_blocks_override",
              "kv_cache_memory_bytes", "enable_expert_parallel", "data_parallel_size", "async_scheduling",
              "compilation_config", "cuda_graph_sizes", "load_format", "download_dir", "worker_cls", "ray_workers_use_nsight"}


class JobConfig(Strict):
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
    cost: CostConfig = Field(default_factory=CostConfig, description=(
        "The price of an accelerator-hour, for the summary's cost figures."))
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
                    parts = [explicit.get("name") or label(fixed), label(grid)]
                    if len(models) > 1:
                        parts.insert(0, served_name)
                    name = "_".join(slug(p) for p in parts if p) or "default"
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
            "input": self.input.model_dump(exclude={"path", "when_changed"}),  # when_changed: what a rerun does
            "output": self.output.model_dump(include={"format", "columns", "rows_per_file"}),
            "engine": self.engine.model_dump(include={"max_model_len", "dtype", "seed", "max_logprobs"}),
            "defaults": self.defaults.model_dump(),
            "variants": {v.name: {"model": _model_identity(v), "params": v.params} for v in self.variants()},
        }
        answering = {k: v for k, v in self.engine.vllm.items() if k.replace("-", "_") not in SPEED_ONLY}
        if answering:  # engine.vllm arguments that change answers (an identity without any is what it was)
            identity["engine"]["vllm"] = answering
        if self.engine.batch_invariant:  # other kernels: other numerics
            identity["engine"]["batch_invariant"] = True
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
