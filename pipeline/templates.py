"""Prompt templates: `{column}` placeholders filled from a row. No code runs from a template."""

from __future__ import annotations

import string
from typing import Any


class TemplateError(ValueError):
    """A row whose template cannot be filled (a null value)."""


def placeholders(template: str) -> list[str]:
    """The column names a template reads; raises ValueError for anything but plain `{name}`."""
    names = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier() and not name.replace("-", "_").replace(" ", "_").isidentifier():
            raise ValueError(f"placeholder {{{name}}} must be a plain column name (no ., [], or calls)")
        if spec or conversion:
            raise ValueError(f"placeholder {{{name}}} must not have a format spec or conversion")
        names.append(name)
    if not names:
        raise ValueError("a template needs at least one {column} placeholder")
    return names


def fill(template: str, row: dict[str, Any]) -> str:
    """The template with each placeholder replaced by the row's value (str of it)."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(literal)
        if name is not None:
            value = row.get(name)
            if value is None:
                raise TemplateError(f"template placeholder {{{name}}} has no value in this row (null)")
            parts.append(value if isinstance(value, str) else str(value))
    return "".join(parts)
