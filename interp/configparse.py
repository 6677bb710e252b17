"""Typed, strict parsing of TOML/dict data into config dataclasses (the study's, and ``saes.TrainConfig``).

TOML is data, never code: the file is read with ``tomllib`` and every value is checked against
the dataclass field's annotation. Unknown keys are named with a close suggestion, wrong types
and impossible values become one-line :class:`UserError`s before any work starts.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from interp.errors import UserError, suggest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["parse_dataclass", "read_toml", "to_plain"]

T = TypeVar("T")


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file (no code is ever executed) or raise a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; pass the path of a .toml study config (see experiments/configs/)")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid TOML ({err}); fix the syntax and re-run") from err


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except UserError as err:
                errors.append(str(err))
        raise UserError(f"{where} = {value!r} has the wrong type; expected {' or '.join(_type_name(o) for o in options if o is not type(None))}")
    if origin is typing.Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise UserError(f"{where} = {value!r} is not allowed; use one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise UserError(f"{where} must be a list, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:  # a fixed-length tuple: one type per place
            if len(value) != len(args):
                raise UserError(f"{where} must have {len(args)} entries ({', '.join(_type_name(a) for a in args)}), got {value!r}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a table, got {type(value).__name__}")
        _, val_tp = get_args(tp) or (str, Any)
        return {str(k): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a table of settings, got {type(value).__name__} {value!r}")
        return parse_dataclass(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{where} must be a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config annotation {tp!r} at {where}")


def parse_dataclass(cls: type[T], data: dict[str, Any], where: str = "config", validate: bool = True) -> T:
    """Build ``cls`` from ``data``: unknown keys, wrong types and missing required keys are UserErrors.

    After construction the dataclass's own ``validate(where)`` (if any, and ``validate``) checks value ranges.
    """
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise UserError(f"unknown key {where}.{key}{suggest(key, fields)}; remove it or fix its spelling")
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{where}.{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise UserError(f"{where}.{name} is required; add it to the config")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if validate and callable(check):
        check(where)
    return obj


def to_plain(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists (for config.toml/json dumps and hashing)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj
