"""Typed, validated TOML for recipes and target profiles.

A schema is a frozen dataclass: field types come from its type hints, limits,
allowed values and when a field applies from `field(metadata=...)`. Every problem
in a file is collected and reported with the dotted name of its field, so a user
fixes them all at once. Numbers must be finite (TOML allows nan and inf).
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from edgecc.errors import EdgeccError

T = TypeVar("T")


def spec(default: Any = dataclasses.MISSING, *, doc: str = "", minimum: float | None = None,
         maximum: float | None = None, positive: bool = False, choices: tuple[Any, ...] = (),
         applies: dict[str, tuple[Any, ...]] | None = None) -> Any:
    """A dataclass field with the limits that validation enforces.

    Limits and choices apply to a number, to each item of a list and to each value of a table
    (`dict[str, float]`, e.g. `min_recall = { crack = 0.95 }`), whose default is always empty.
    `positive`: the number must be above 0 (it divides or counts), a stricter `minimum=0`.
    `applies`: the field may be written only when each dotted field named as a key (from the top of
    the file, defaults included) has one of the listed values, or, for a list, contains one of them;
    a field written where it does not apply would be silently ignored, so it is refused.
    """
    if positive and minimum is not None:
        raise TypeError("positive already sets the lower limit; give minimum or positive, not both")
    meta = {"doc": doc, "minimum": minimum, "maximum": maximum, "positive": positive, "choices": choices,
            "applies": applies or {}}
    if isinstance(default, (list, dict)):
        raise TypeError("use a tuple for a list default; a dict field's default is always empty (spec(dict))")
    if default is dict:
        return dataclasses.field(default_factory=dict, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


PLURALS = {int: "integers", float: "numbers", str: "strings", bool: "trues or falses"}


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if origin is tuple:
        return f"a list of {PLURALS.get(typing.get_args(hint)[0], 'values')}"
    if origin is dict:
        return f"a table of {PLURALS.get(typing.get_args(hint)[1], 'values')}"
    if dataclasses.is_dataclass(hint):
        return "a table"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "absent"}.get(hint, str(hint))


def _convert(value: Any, hint: Any, where: str, problems: list[str]) -> Any:
    """Check `value` against `hint`, returning the converted value (or None after a problem)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        written = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(written) == 1:  # TOML has no null: an optional field is either absent or its one type
            return _convert(value, written[0], where, problems)
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
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected {_type_name(hint)}, got {value!r}")
            return None
        item = typing.get_args(hint)[1]  # TOML keys are always strings
        return {key: _convert(v, item, f"{where}.{key}", problems) for key, v in value.items()}
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
    """Choices, finiteness and limits of a value, of each item of a list (named by its index) or of each value
    of a table (named by its key)."""
    if isinstance(value, tuple):
        items = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
    elif isinstance(value, dict):
        items = [(f"{where}.{key}", v) for key, v in value.items()]
    else:
        items = [(where, value)]
    for name, v in items:
        if meta.get("choices") and v not in meta["choices"]:
            allowed = ", ".join(repr(c) for c in meta["choices"])
            problems.append(f"{name}: {v!r} is not one of {allowed}")
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if not math.isfinite(v):
            problems.append(f"{name}: {v} is not a finite number")
        elif meta.get("positive") and v <= 0:
            problems.append(f"{name}: {v} must be above 0")
        elif meta.get("minimum") is not None and v < meta["minimum"]:
            problems.append(f"{name}: {v} is below the minimum {meta['minimum']}")
        elif meta.get("maximum") is not None and v > meta["maximum"]:
            problems.append(f"{name}: {v} is above the maximum {meta['maximum']}")


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


def _shown(value: Any) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def _check_applies(obj: Any, data: dict[str, Any], where: str, root: Any, problems: list[str]) -> None:
    """Refuse each field written in `data` whose `applies` conditions do not hold in `root`."""
    prefix = f"{where}." if where else ""
    for f in dataclasses.fields(obj):
        if f.name not in data:
            continue
        path, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_applies(value, data[f.name], path, root, problems)
        for condition, allowed in f.metadata.get("applies", {}).items():
            actual = root
            for part in condition.split("."):
                actual = getattr(actual, part)
            listed = isinstance(actual, tuple)
            if (set(actual) & set(allowed)) if listed else actual in allowed:
                continue
            wanted = " or ".join(repr(a) for a in allowed)
            if listed:
                wanted = f"{condition} with {wanted}"
            else:
                wanted = f"an empty {condition}" if allowed == ("",) else f"{condition} {wanted}"
            problems.append(f"{path}: {_shown(value)} applies to {wanted}, not {_shown(actual)}")
            break


def parse(cls: type[T], data: dict[str, Any], source: str) -> T:
    """Build a `cls` from TOML data, raising one EdgeccError that lists every problem."""
    problems: list[str] = []
    result = _build(cls, data, "", problems)
    if result is not None:
        _check_applies(result, data, "", result, problems)
    if problems or result is None:
        raise EdgeccError(f"{source}: " + "; ".join(problems))
    return result


def read(path: Path, what: str) -> dict[str, Any]:
    """The TOML data of a file, before validation; `what` names the kind of file in error messages."""
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
    return data


def load(cls: type[T], path: Path, what: str) -> T:
    """Read and validate a TOML file; `what` names the kind of file in error messages."""
    return parse(cls, read(path, what), str(path))


BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if BARE_KEY.fullmatch(key) else toml_value(key)


def toml_value(value: Any) -> str:
    """One value in TOML: a schema dataclass or dict inline, a tuple or list (as tomllib reads arrays) an array."""
    if dataclasses.is_dataclass(value):
        inner = ", ".join(f"{f.name} = {toml_value(getattr(value, f.name))}" for f in dataclasses.fields(value))
        return "{ " + inner + " }"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dump(obj: Any, tables: tuple[str, ...]) -> str:
    """TOML text for a schema dataclass; the fields named in `tables` become [tables], the rest inline.
    A field that is None is left out: TOML has no null, and an absent optional field reads back as None."""
    top, sections = [], []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        if f.name in tables:
            body = [f"{g.name} = {toml_value(getattr(value, g.name))}" for g in dataclasses.fields(value)
                    if getattr(value, g.name) is not None]
            sections.append("\n".join([f"[{f.name}]", *body]))
        else:
            top.append(f"{f.name} = {toml_value(value)}")
    return "\n\n".join(["\n".join(top), *sections]) + "\n"
