"""A small TOML writer for resolved configs (the standard library only reads TOML)."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["dumps_toml"]


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string literal is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_scalar(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dumps_toml(data: dict[str, Any]) -> str:
    """Top-level scalars first, then one ``[table]`` per nested dict (tables inside are inlined)."""
    lines = [f"{k} = {_scalar(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for key, table in data.items():
        if isinstance(table, dict):
            lines.append(f"\n[{key}]")
            lines.extend(f"{k} = {_scalar(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"
