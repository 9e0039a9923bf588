"""The one coercer from YAML values to typed dataclass fields, and the config error type.

`coerce(key, value, type)` checks a YAML value against a field's type annotation; `build(cls,
prefix, mapping)` makes (or updates) a frozen dataclass from a mapping, refusing unknown keys.
Used by the config sections and by anything else configured by a mapping of typed fields (the
corpus-cleaning rules). Errors are `ConfigError`: one line naming the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A bad config value: the message names the key and what is allowed."""


def check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def type_name(typ) -> str:
    """How an error names a type: int, float, a list of str, [int, float], a mapping."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {type_name(args[0])}"
        return "[" + ", ".join(map(type_name, args)) + "]"
    if typ is dict or origin is dict:
        return "a mapping"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args if a is not type(None))
    if typ is bool:
        return "true or false"
    return getattr(typ, "__name__", str(typ))


def coerce(key: str, value: Any, typ) -> Any:
    """`value` checked against the annotation `typ`: lists become tuples, ints are accepted for
    floats, a mapping becomes a dataclass, None passes for Optional; else a ConfigError."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is tuple:
        variadic = len(args) == 2 and args[1] is Ellipsis
        if isinstance(value, str) and variadic and args[0] is str:
            value = [value]
        if isinstance(value, (list, tuple)):
            if variadic:
                return tuple(coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
            if len(value) == len(args):
                return tuple(coerce(f"{key}[{i}]", v, t) for i, (v, t) in enumerate(zip(value, args)))
    elif typ is dict or origin is dict:
        if isinstance(value, dict):
            return value
    elif origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return coerce(key, value, next(a for a in args if a is not type(None)))
    elif dataclasses.is_dataclass(typ):
        if isinstance(value, dict):
            return build(typ, key, value)
        raise ConfigError(f"{key}={value!r} must be a mapping of {typ.__name__} fields")
    elif typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{key}={value!r} must be a finite number")
            return number
    elif typ is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"{key}={value!r} has the wrong type; expected {type_name(typ)}")


def field_types(cls) -> dict[str, Any]:
    """The annotation of each init field of a dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def build(cls_or_instance, prefix: str, updates: dict, *, what: str = ""):
    """A dataclass with `updates` (a mapping of field -> YAML value) applied over its defaults, or
    over an instance's values. Unknown keys name the allowed ones (`what` says what they are)."""
    cls = cls_or_instance if isinstance(cls_or_instance, type) else type(cls_or_instance)
    allowed = field_types(cls)
    changes = {}
    for name, value in updates.items():
        if name not in allowed:
            if what:
                raise ConfigError(f"{what} has no parameter {name!r}; allowed: {', '.join(allowed) or 'none'}")
            raise ConfigError(f"unknown config key {f'{prefix}.{name}'!r}; allowed under {prefix!r}: "
                              f"{', '.join(sorted(allowed))}")
        changes[name] = coerce(f"{prefix}.{name}", value, allowed[name])
    if isinstance(cls_or_instance, type):
        return cls(**changes)
    return dataclasses.replace(cls_or_instance, **changes)
