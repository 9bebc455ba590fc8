"""Typed, validated TOML for recipes and target profiles.

A schema is a frozen dataclass: field types come from its type hints, limits and
allowed values from `field(metadata=...)`. Every problem in a file is collected
and reported with the dotted name of its field, so a user fixes them all at once.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from edgecc.errors import EdgeccError

T = TypeVar("T")


def spec(default: Any = dataclasses.MISSING, *, doc: str = "", minimum: float | None = None,
         maximum: float | None = None, choices: tuple[Any, ...] = ()) -> Any:
    """A dataclass field with the limits that validation enforces."""
    meta = {"doc": doc, "minimum": minimum, "maximum": maximum, "choices": choices}
    if isinstance(default, (list, dict)):
        raise TypeError("use a tuple or a default_factory for mutable defaults")
    return dataclasses.field(default=default, metadata=meta)


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(hint)[0])}s"
    if dataclasses.is_dataclass(hint):
        return "a table"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "absent"}.get(hint, str(hint))


def _convert(value: Any, hint: Any, where: str, problems: list[str]) -> Any:
    """Check `value` against `hint`, returning the converted value (or None after a problem)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            trial: list[str] = []
            converted = _convert(value, arg, where, trial)
            if not trial:
                return converted
        problems.append(f"{where}: expected {_type_name(hint)}, got {value!r}")
        return None
    if origin is tuple:
        if not isinstance(value, list):
            problems.append(f"{where}: expected {_type_name(hint)}, got {value!r}")
            return None
        item = typing.get_args(hint)[0]
        return tuple(_convert(v, item, f"{where}[{i}]", problems) for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a table, got {value!r}")
            return None
        return _build(hint, value, where, problems)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is type(None) or isinstance(value, bool) != (hint is bool) or not isinstance(value, hint):
        problems.append(f"{where}: expected {_type_name(hint)}, got {value!r}")
        return None
    return value


def _check_limits(value: Any, meta: typing.Mapping[str, Any], where: str, problems: list[str]) -> None:
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if meta.get("choices") and v not in meta["choices"]:
            allowed = ", ".join(repr(c) for c in meta["choices"])
            problems.append(f"{where}: {v!r} is not one of {allowed}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if meta.get("minimum") is not None and v < meta["minimum"]:
                problems.append(f"{where}: {v} is below the minimum {meta['minimum']}")
            if meta.get("maximum") is not None and v > meta["maximum"]:
                problems.append(f"{where}: {v} is above the maximum {meta['maximum']}")


def _build(cls: type[T], data: dict[str, Any], where: str, problems: list[str]) -> T | None:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    prefix = f"{where}." if where else ""
    for key in data:
        if key not in fields:
            known = ", ".join(fields)
            problems.append(f"{prefix}{key}: unknown field (known fields: {known})")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        path = f"{prefix}{name}"
        if name in data:
            before = len(problems)
            value = _convert(data[name], hints[name], path, problems)
            if len(problems) == before:
                _check_limits(value, f.metadata, path, problems)
            values[name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{path}: missing (expected {_type_name(hints[name])})")
    if len(problems):
        return None
    return cls(**values)


def parse(cls: type[T], data: dict[str, Any], source: str) -> T:
    """Build a `cls` from TOML data, raising one EdgeccError that lists every problem."""
    problems: list[str] = []
    result = _build(cls, data, "", problems)
    if problems or result is None:
        raise EdgeccError(f"{source}: " + "; ".join(problems))
    return result


def load(cls: type[T], path: Path, what: str) -> T:
    """Read and validate a TOML file; `what` names the kind of file in error messages."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EdgeccError(f"{what} {path} does not exist") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
        raise EdgeccError(f"{what} {path} cannot be read: {err}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise EdgeccError(f"{what} {path} is not valid TOML: {err}") from None
    return parse(cls, data, str(path))


def _toml_value(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        inner = ", ".join(f"{f.name} = {_toml_value(getattr(value, f.name))}" for f in dataclasses.fields(value))
        return "{ " + inner + " }"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dump(obj: Any, tables: tuple[str, ...]) -> str:
    """TOML text for a schema dataclass; the fields named in `tables` become [tables], the rest inline."""
    top, sections = [], []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        if f.name in tables:
            body = [f"{g.name} = {_toml_value(getattr(value, g.name))}" for g in dataclasses.fields(value)]
            sections.append("\n".join([f"[{f.name}]", *body]))
        else:
            top.append(f"{f.name} = {_toml_value(value)}")
    return "\n\n".join(["\n".join(top), *sections]) + "\n"
