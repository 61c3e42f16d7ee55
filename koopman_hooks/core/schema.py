"""Typed, frozen configuration: check values against dataclass type hints, with clear errors.

:func:`from_mapping` builds a (frozen) dataclass from plain data (a recipe section, a saved
file's JSON header): unknown keys are refused naming the closest valid one, and every value
is checked against its field's type hint (``int``, ``float``, ``bool``, ``str``, ``None``,
``Literal``, unions, ``tuple[X, ...]``, ``dict[str, X]`` and nested dataclasses), naming the
key, the expected type and what was given. Lists become tuples, ints are accepted as floats.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from koopman_hooks.errors import ConfigError

T = TypeVar("T")


def closest(name: str, options: list[str]) -> str:
    """``"; did you mean 'x'?"`` or ``""``."""
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def describe(hint: Any) -> str:
    """A short, readable name of a type hint."""
    origin = typing.get_origin(hint)
    if hint is type(None):
        return "None"
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(describe(a) for a in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        return f"list of {describe(args[0])}" if len(args) == 2 and args[1] is Ellipsis else "list"
    if origin in (dict, Mapping):
        return f"table of {describe(typing.get_args(hint)[1])}"
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return f"table ({hint.__name__})"
    return getattr(hint, "__name__", str(hint))


def check(value: Any, hint: Any, path: str) -> Any:
    """``value`` converted to ``hint`` (lists to tuples, ints to floats), or a :class:`ConfigError`."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
    elif origin is typing.Literal:
        if any(value == option and type(value) is type(option) for option in typing.get_args(hint)):
            return value
    elif origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return check(value, option, path)
            except ConfigError:
                continue
    elif origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(check(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
            if len(args) == len(value):
                return tuple(check(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    elif origin in (dict, Mapping):
        key_type, value_type = typing.get_args(hint)
        if isinstance(value, Mapping):
            return {check(k, key_type, path): check(v, value_type, f"{path}.{k}") for k, v in value.items()}
    elif isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            return from_mapping(hint, value, path)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(hint, type):
        if isinstance(value, hint):
            return value
    else:  # pragma: no cover - a hint this checker does not know: accept
        return value
    raise ConfigError(f"{path}: expected {describe(hint)}, got {value!r} ({type(value).__name__})")


def from_mapping(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, checking names and types (see module docstring)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or cls.__name__}: expected a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    prefix = f"{path}." if path else ""
    unknown = [key for key in data if key not in fields]
    if unknown:
        key = unknown[0]
        raise ConfigError(f"unknown key '{prefix}{key}'{closest(str(key), list(fields))} (valid: {', '.join(fields)})")
    values = {key: check(value, hints[key], f"{prefix}{key}") for key, value in data.items()}
    return cls(**values)


def check_fields(obj: Any) -> None:
    """Check (and convert) every field of a frozen dataclass instance against its type hint;
    call it from ``__post_init__``."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        object.__setattr__(obj, f.name, check(getattr(obj, f.name), hints[f.name], f.name))


def to_mapping(obj: Any) -> Any:
    """Plain JSON-able data of a (nested) dataclass: tuples become lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_mapping(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_mapping(v) for k, v in obj.items()}
    return obj
