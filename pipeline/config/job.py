"""The job config: one YAML file (plus --set overrides), validated before Ray starts; unknown keys are
rejected and every bad key is named."""

from __future__ import annotations

import difflib
import itertools
import json
import os
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from pipeline.config.scoring import CHOICE_REQUEST_FIELDS, ScoringConfig
from pipeline.config.sections import (AnswerStoreConfig, ConfigError, CostConfig, EngineConfig, InputConfig,
                                      ModelConfig, OutputConfig, RequestDefaults, Strict)
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
    answer_store: AnswerStoreConfig = Field(default_factory=AnswerStoreConfig, description=(
        "Where the answers of greedy and seeded rows are kept for later jobs (on by default, in the output)."))
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
            # what a rerun does, not how rows are answered: when_changed, repeated_keys
            "input": self.input.model_dump(exclude={"path", "when_changed", "repeated_keys"}),
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

    Raises ConfigError naming every bad key, where it was set (the file, a `--set`, `--input` or
    `--output`), and for an unknown key the valid keys it may have meant.
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
    given: dict[tuple[str, ...], str] = {}  # the keys the command line set (replacing the file's), and by what
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: write it as key.subkey=value")
        _set_key(data, key.strip(), value)
        _given(given, tuple(key.strip().split(".")), f"--set {item}")
    for section, value in (("input", input), ("output", output)):
        if value is not None:
            current = data.get(section)
            data[section] = {**(current if isinstance(current, dict) else {}), "path": value}
            _given(given, (section, "path"), f"--{section}")
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        by_source: dict[str, list[str]] = {}
        for err in exc.errors(include_url=False):
            loc = tuple(err["loc"])
            key = _dotted(loc) or "(top level)"
            msg = _unknown_key(loc) if err["type"] == "extra_forbidden" else err["msg"]
            got = "" if err["type"] in ("missing", "extra_forbidden") else f" (got {err.get('input')!r})"
            by_source.setdefault(_source(loc, given, path), []).append(f"{key}: {msg}{got}")
        if len(by_source) == 1:
            (where, lines), = by_source.items()
            raise ConfigError(f"invalid config {where}:\n" + "\n".join(f"  {line}" for line in lines)) from None
        raise ConfigError("invalid config:\n" + "\n".join(
            f"  {where}:\n" + "\n".join(f"    {line}" for line in lines) for where, lines in by_source.items())) from None


def _dotted(loc: tuple[Any, ...]) -> str:
    """A validation error's `loc` as the config's dotted key, without the validator labels pydantic puts
    in a union member's (`function-after[_adapters_not_named_as_base(), ModelConfig]`)."""
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and p.startswith("function-")))


def _given(given: dict[tuple[str, ...], str], key: tuple[str, ...], source: str) -> None:
    """Record that `source` set `key`, replacing whatever the file or an earlier flag had below it."""
    for known in [k for k in given if k[:len(key)] == key]:
        del given[known]
    given[key] = source


def _source(loc: tuple[Any, ...], given: dict[tuple[str, ...], str], path: str | None) -> str:
    """Where the key at `loc` came from, as the error message says it: `in FILE`, `from --set K=V`,
    `from --input`; an error about a whole section names the file and the flags that set keys in it."""
    for n in range(len(loc), 0, -1):  # the flag that set the key, or a section holding it
        if loc[:n] in given:
            return f"from {given[loc[:n]]}"
    inside = [source for key, source in given.items() if key[:len(loc)] == loc]
    if inside:
        flags = ", ".join(dict.fromkeys(inside))
        return f"in {path} with {flags}" if path else f"from {flags}"
    return f"in {path}" if path else "from the command line"


def _unknown_key(loc: tuple[Any, ...]) -> str:
    """The message for the unknown key at `loc`: the section's keys it may have meant
    (`did you mean engine.num_actors?`), and the sections that have a key of that very name."""
    *section, name = loc
    models = _models_at(tuple(section))
    hints = []
    elsewhere = list(dict.fromkeys(where for where, model in [("the top level", JobConfig), *_sections()]
                                   if name in model.model_fields and model not in models))
    if elsewhere:
        hints.append(f"{name} is a key of {_joined(elsewhere, 'and')}")
    fields = sorted({f for m in models for f in m.model_fields})
    prefix = f"{_dotted(tuple(section))}." if section else ""
    close = difflib.get_close_matches(str(name), fields, n=3, cutoff=0.6)
    if close:
        hints.append(f"{'or ' if hints else ''}did you mean {_joined([prefix + c for c in close], 'or')}?")
    return "unknown key; " + ", ".join(hints) if hints else "unknown key (check its spelling and section)"


def _joined(items: list[str], word: str) -> str:
    """`a`, `a and b`, `a, b and c`."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {word} {items[-1]}"


def _members(annotation: Any) -> list[Any]:
    """The types an annotation allows: Annotated and unions unwrapped, None left out."""
    if get_origin(annotation) is Annotated:
        return _members(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        return [t for arg in get_args(annotation) for t in _members(arg)]
    return [] if annotation is type(None) else [annotation]


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _models_at(loc: tuple[Any, ...]) -> list[type[BaseModel]]:
    """The pydantic models a validation error's `loc` points into, walked down from JobConfig: field
    names, list indices, dict keys, and the union members pydantic names (a discriminator's tag,
    `function-after[..., ModelConfig]`)."""
    kinds: list[Any] = [JobConfig]
    for part in loc:
        models = [t for t in kinds if _is_model(t)]
        if isinstance(part, int):
            found = [get_args(t)[0] for t in kinds if get_origin(t) in (list, tuple) and get_args(t)]
        elif any(part in m.model_fields for m in models):
            found = [m.model_fields[part].annotation for m in models if part in m.model_fields]
        elif any(_names(m, part) for m in models):  # a union member: stay at this level, narrowed to it
            found = [m for m in models if _names(m, part)]
        else:
            found = [get_args(t)[1] for t in kinds if get_origin(t) is dict and len(get_args(t)) == 2]
        kinds = [t for f in found for t in _members(f)]
    return [t for t in kinds if _is_model(t)]


def _names(model: type[BaseModel], part: str) -> bool:
    """Whether pydantic's `loc` names this union member by `part`: its class, or its discriminator's tag."""
    if part == model.__name__ or part.endswith(f" {model.__name__}]"):
        return True
    return any(get_origin(f.annotation) is Literal and part in get_args(f.annotation)
               for f in model.model_fields.values())


def _sections() -> list[tuple[str, type[BaseModel]]]:
    """Every section of the config (a model nested in JobConfig) by its dotted path, shallowest first
    (`scoring.scorers[i]` for the models of a list's entries); a model found at several places
    (ModelConfig: `model` and `sweep.models[i]`) only at the first."""
    found: list[tuple[str, type[BaseModel]]] = []
    queue: list[tuple[str, type[BaseModel]]] = [("", JobConfig)]
    while queue:
        where, model = queue.pop(0)
        for name, field in model.model_fields.items():
            for suffix, t in _nested(field.annotation):
                if _is_model(t) and all(t is not m for _, m in found):
                    path = f"{where}.{name}{suffix}" if where else f"{name}{suffix}"
                    found.append((path, t))
                    queue.append((path, t))
    return found


def _nested(annotation: Any, suffix: str = "") -> list[tuple[str, Any]]:
    """The types an annotation holds, each with the suffix that reaches it: `[i]` for a list's entries,
    `[key]` for a dict's values."""
    held = []
    for t in _members(annotation):
        args = get_args(t)
        if get_origin(t) in (list, tuple) and args:
            held += _nested(args[0], suffix + "[i]")
        elif get_origin(t) is dict and len(args) == 2:
            held += _nested(args[1], suffix + "[key]")
        else:
            held.append((suffix, t))
    return held


def in_ray_job() -> bool:
    """True when this driver runs under `ray job submit`."""
    return "RAY_JOB_ID" in os.environ or "RAY_ADDRESS" in os.environ
