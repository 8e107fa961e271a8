"""Typed config parsing: mappings (YAML, JSON, dotted overrides) into dataclasses.

Every config of the project goes through `parse`: the run config and its sections, the data
and inference sections, the model config (`QilinConfig`, also when read from a checkpoint's
config.json) and the benches' settings. The type annotations are the schema: nested
dataclasses, `Optional`/unions, `list[T]`, `dict[K, V]`, `Literal[...]`, int, float, bool, str.
A new section is a new dataclass field; nothing else needs to learn about it. Every error is
a `ConfigError` naming the full dotted key (`eval.batch_size: expected int, got 'abc'`).

`merge` is the one preset-plus-overrides rule: mappings merge per key, anything else replaces.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import types
import typing
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A config value is missing, unknown, mistyped or contradicts another; names the key."""


class FieldError(ConfigError):
    """Raised by a dataclass's own checks (`__post_init__`, `validate`) about one of its fields;
    `parse` prefixes the dotted path of the dataclass, so the message names the full key."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _join(where: str, name) -> str:
    return f"{where}.{name}" if where else str(name)


def type_name(tp) -> str:
    """A readable name of a type annotation: 'int', 'float or null', "one of 'a', 'b'"."""
    if tp is Any:
        return "any value"
    if tp is type(None):
        return "null"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin in (list, tuple):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {type_name(args[1])}" if args else "mapping"
    if tp is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _mismatch(key: str, tp, value) -> ConfigError:
    return ConfigError(f"{key}: expected {type_name(tp)}, got {value!r} ({type(value).__name__})")


def parse(tp, value, key: str = ""):
    """`value` checked against and converted to annotation `tp`; raises ConfigError naming `key`.

    Conversions: int -> float where a float is expected (and "2e-5", which YAML 1.1 reads as a
    string); int -> str where a string is expected; tuple -> list; a mapping -> the dataclass.
    """
    if tp is Any or tp is object:
        return value
    if tp is type(None):
        if value is not None:
            raise _mismatch(key, tp, value)
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error (a nested key, an item) is the useful one
            try:
                return parse(options[0], value, key)
            except ConfigError as e:
                if str(e).startswith(f"{key}: expected "):
                    raise _mismatch(key, tp, value) from None
                raise
        for arg in options:
            try:
                return parse(arg, value, key)
            except ConfigError:
                continue
        raise _mismatch(key, tp, value)
    if origin is Literal:
        if not any(type(value) is type(a) and value == a for a in args):
            raise _mismatch(key, tp, value)
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return parse_dataclass(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise _mismatch(key, tp, value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _mismatch(key, tp, value)
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _mismatch(key, tp, value) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _mismatch(key, tp, value)
        return float(value)
    if tp is str:
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise _mismatch(key, tp, value)
        return value
    if tp in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _mismatch(key, tp, value)
        if not args:
            return list(value)
        return [parse(args[0], v, _join(key, i)) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise _mismatch(key, tp, value)
        if not args:
            return value
        return {k: parse(args[1], v, _join(key, k)) for k, v in value.items()}
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise _mismatch(key, tp, value)
        return value
    raise TypeError(f"{key}: unsupported config annotation {tp!r}")


def parse_dataclass(cls, d, where: str = ""):
    """An instance of dataclass `cls` from mapping `d` (absent fields take their defaults);
    unknown keys, wrong types and the dataclass's own checks raise ConfigError naming the key."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping ({cls.__name__}), got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in d if k not in fields]
    if unknown:
        first = unknown[0]
        close = difflib.get_close_matches(str(first), list(fields), n=1)
        hint = f" (did you mean {_join(where, close[0])}?)" if close else ""
        listed = f"{where}: unknown key(s) {unknown}; known" if where else "known top-level keys"
        raise ConfigError(f"{_join(where, first)}: unknown key{hint}. {listed}: {sorted(fields)}")
    hints = _hints(cls)
    kwargs = {name: parse(hints[name], value, _join(where, name)) for name, value in d.items()}
    return construct(cls, kwargs, where)


def construct(cls, kwargs: dict, where: str = ""):
    """`cls(**kwargs)`, with the dataclass's own FieldErrors prefixed by `where`."""
    try:
        return cls(**kwargs)
    except FieldError as e:
        raise ConfigError(f"{_join(where, e.field)}: {e.message}") from None


def check_fields(obj, where: str = "") -> None:
    """Check (and convert in place, frozen or not) every field of a dataclass instance against
    its annotation: the `__post_init__` of configs built directly in Python, not from a mapping."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = parse_dataclass(tp, value, _join(where, f.name))
        checked = parse(tp, value, _join(where, f.name))
        if checked is not value:
            object.__setattr__(obj, f.name, checked)


def merge(base: dict, update: dict | None) -> dict:
    """`update` merged into `base` in place and returned: mappings merge per key, anything else
    (scalars, lists) replaces. The one preset-plus-overrides rule of every config."""
    for k, v in (update or {}).items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def to_dict(obj) -> Any:
    """A dataclass (nested) as plain dicts/lists, for YAML/JSON."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else copy.deepcopy(obj)
