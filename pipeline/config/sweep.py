"""The `sweep` section (models x request parameters) and the variants it makes."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator

from pipeline.config.sections import ModelConfig, Strict
from pipeline.protocol import REQUEST_FIELDS


SWEEPABLE = "request fields except prompt, model and stream"


def _check_sweep_fields(fields: list[str], where: str) -> None:
    bad = sorted(f for f in fields if f not in REQUEST_FIELDS or f in ("prompt", "model", "stream"))
    if bad:
        raise ValueError(f"{where} names {bad}; a sweep varies {SWEEPABLE}")


class SweepConfig(Strict):
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


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "x"


def label(params: dict[str, Any]) -> str:
    return "_".join(f"{k}{json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in params.items())
