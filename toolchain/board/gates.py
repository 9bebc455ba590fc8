"""The rollout file (rollout.toml beside the bundle) and the gates that promote a candidate or roll it back.

Plain Python (tomllib, no edgecc), so it runs on the board as it is. Validation follows edgecc's schema
rules: every problem in the file at once, each named by its field, an unknown field is an error.

    baseline = "../v1"            # an earlier edgecc bundle folder, a .tflite or a .keras file
    candidate = "."               # this bundle (default: the folder of rollout.toml)
    canary_share = 0.1            # share of inputs the candidate answers in the canary stage
    automatic = true              # promote and roll back when the gates say so
    log = "rollout-audit.jsonl"   # paths relative to rollout.toml
    state = "rollout-state.json"

    [gates]
    min_inputs = 200              # inputs in a stage before the gates judge it
    confidence = 0.95             # of the Wilson intervals
    max_disagreement = 0.02       # judged by the interval's upper end to promote, its lower end to roll back
    max_error_rate = 0.01         # candidate runtime errors (even with none, promotion needs about 3 / limit inputs)
    max_p99_ms = 50.0             # candidate latency on this board
    ok_class = "ok"               # the class that means "no defect", for max_missed

    [gates.classes.crack]         # where the baseline said crack:
    max_disagreement = 0.01       #   the candidate said something else
    max_missed = 0.002            #   the candidate said ok_class (a missed defect)
"""

from __future__ import annotations

import tomllib
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:
    from .stats import wilson_interval
except ImportError:  # run from the bundle folder
    from stats import wilson_interval

REQUIRED = object()
# name: (type, default, lowest, highest); a rate lies in 0..1, None means no limit
TOP: dict[str, tuple[type, Any, float | None, float | None]] = {
    "baseline": (str, REQUIRED, None, None),
    "candidate": (str, ".", None, None),
    "canary_share": (float, 0.1, 0.0, 1.0),
    "automatic": (bool, True, None, None),
    "log": (str, "rollout-audit.jsonl", None, None),
    "state": (str, "rollout-state.json", None, None),
}
GATES: dict[str, tuple[type, Any, float | None, float | None]] = {
    "min_inputs": (int, 100, 1, None),
    "confidence": (float, 0.95, 0.5, 0.9999),
    "max_disagreement": (float, 0.05, 0.0, 1.0),
    "max_error_rate": (float, 0.01, 0.0, 1.0),
    "max_p99_ms": (float, None, 0.0, None),
    "ok_class": (str, None, None, None),
}
CLASS: dict[str, tuple[type, Any, float | None, float | None]] = {
    "max_disagreement": (float, None, 0.0, 1.0),
    "max_missed": (float, None, 0.0, 1.0),
}


class RolloutError(ValueError):
    """A rollout file that cannot be used: one line naming every problem by its field."""


@dataclass(frozen=True, kw_only=True)
class ClassLimits:
    max_disagreement: float | None = None
    max_missed: float | None = None


@dataclass(frozen=True, kw_only=True)
class Gates:
    min_inputs: int = 100
    confidence: float = 0.95
    max_disagreement: float = 0.05
    max_error_rate: float = 0.01
    max_p99_ms: float | None = None
    ok_class: str | None = None
    classes: dict[str, ClassLimits] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """rollout.toml with its paths resolved against the file's folder."""

    path: Path
    baseline: Path
    candidate: Path
    canary_share: float
    automatic: bool
    log: Path
    state: Path
    gates: Gates


def _values(data: Any, spec: dict[str, tuple[type, Any, float | None, float | None]], where: str,
            problems: list[str], tables: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of one TOML table checked against `spec`; problems are appended, named `where.field`."""
    if not isinstance(data, dict):
        problems.append(f"{where}: expected a table")
        return {}
    prefix = f"{where}." if where else ""
    values = {}
    for key in data:
        if key not in spec and key not in tables:
            problems.append(f"{prefix}{key}: unknown field (known fields: {', '.join([*spec, *tables])})")
    for name, (kind, default, lowest, highest) in spec.items():
        if name not in data:
            if default is REQUIRED:
                problems.append(f"{prefix}{name}: missing")
            values[name] = None if default is REQUIRED else default
            continue
        value = data[name]
        number = kind is float and isinstance(value, int) and not isinstance(value, bool)
        if not (isinstance(value, kind) and not (kind is int and isinstance(value, bool))) and not number:
            problems.append(f"{prefix}{name}: expected {kind.__name__}, got {value!r}")
        elif kind in (int, float) and not (value == value and abs(value) != float("inf")):
            problems.append(f"{prefix}{name}: {value} is not a finite number")
        elif lowest is not None and value < lowest:
            problems.append(f"{prefix}{name}: {value} is below the minimum {lowest}")
        elif highest is not None and value > highest:
            problems.append(f"{prefix}{name}: {value} is above the maximum {highest}")
        values[name] = float(value) if number else value
    return values


def parse(data: dict[str, Any], path: Path) -> RolloutConfig:
    """A Rollout from TOML data; RolloutError listing every problem."""
    problems: list[str] = []
    top = _values(data, TOP, "", problems, tables=("gates",))
    gates = _values(data.get("gates", {}), GATES, "gates", problems, tables=("classes",))
    classes = {}
    table = data.get("gates", {}).get("classes", {}) if isinstance(data.get("gates", {}), dict) else {}
    for label, limits in (table.items() if isinstance(table, dict) else []):
        classes[label] = ClassLimits(**_values(limits, CLASS, f"gates.classes.{label}", problems))
    if any(limits.max_missed is not None for limits in classes.values()) and not gates.get("ok_class"):
        problems.append("gates.ok_class: missing (max_missed counts the inputs the candidate called ok_class)")
    if problems:
        raise RolloutError(f"{path}: " + "; ".join(problems))
    folder = path.parent
    return RolloutConfig(path=path, baseline=folder / top["baseline"], candidate=folder / top["candidate"],
                   canary_share=top["canary_share"], automatic=top["automatic"], log=folder / top["log"],
                   state=folder / top["state"], gates=Gates(**gates, classes=classes))


def load(path: Path) -> RolloutConfig:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise RolloutError(f"rollout file {path} cannot be read: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise RolloutError(f"rollout file {path} is not valid TOML: {err}") from None
    return parse(data, path)


def check_classes(gates: Gates, labels: list[str], path: Path) -> None:
    """Every class the gates name must be one the models have (a typo would silently judge nothing)."""
    named = [*(f"gates.classes.{label}" for label in gates.classes if label not in labels),
             *(["gates.ok_class"] if gates.ok_class is not None and gates.ok_class not in labels else [])]
    if named:
        raise RolloutError(f"{path}: " + "; ".join(f"{name}: not a class of the models (classes: {', '.join(labels)})"
                                                   for name in named))


@dataclass
class Tally:
    """A stage's inputs since it began, from the prediction records of the log (the log format's fields)."""

    inputs: int = 0  # inputs the candidate ran on
    errors: int = 0
    compared: int = 0  # both models answered without error (the record's `agree` is not null)
    disagreements: int = 0
    latencies: array[float] = field(default_factory=lambda: array("d"))  # 8 bytes an input on a long stage
    by_class: dict[str, list[int]] = field(default_factory=dict)  # baseline's label -> [compared, disagreed, missed]

    def add(self, record: dict[str, Any], ok_class: str | None) -> None:
        baseline, candidate = record.get("baseline"), record.get("candidate")
        if candidate is None:
            return
        self.inputs += 1
        if candidate["error"] is not None:
            self.errors += 1
            return
        self.latencies.append(candidate["latency_ms"])
        if baseline is None or baseline["error"] is not None:
            return
        self.compared += 1
        disagree = baseline["class"] != candidate["class"]
        self.disagreements += disagree
        row = self.by_class.setdefault(baseline["label"], [0, 0, 0])
        row[0] += 1
        row[1] += disagree
        row[2] += disagree and candidate["label"] == ok_class


@dataclass(frozen=True)
class Verdict:
    action: str  # "promote", "rollback" or "wait"
    reason: str
    evidence: dict[str, Any]


def judge(tally: Tally, gates: Gates, compare: bool) -> Verdict:
    """Roll back when a limit is exceeded beyond doubt (a rate's lower bound above it, the p99 above its limit);
    promote when every limit holds beyond doubt (each rate's upper bound within it); else wait for more inputs.
    `compare`: the stage runs both models (shadow, canary), so disagreement is judged too."""
    rates: list[tuple[str, int, int, float | None]] = [("error_rate", tally.errors, tally.inputs, gates.max_error_rate)]
    evidence: dict[str, Any] = {"inputs": tally.inputs, "compared": tally.compared, "errors": tally.errors,
                                "error_rate": tally.errors / tally.inputs if tally.inputs else None,
                                "disagreements": None, "disagreement_lower": None, "disagreement_upper": None,
                                "per_class": {}}
    if compare:
        rates.append(("disagreement", tally.disagreements, tally.compared, gates.max_disagreement))
        for label, limits in sorted(gates.classes.items()):
            compared, disagreed, missed = tally.by_class.get(label, [0, 0, 0])
            rates += [(f"{label}.disagreement", disagreed, compared, limits.max_disagreement),
                      (f"{label}.missed", missed, compared, limits.max_missed)]
    p99 = float(np.percentile(tally.latencies, 99)) if tally.latencies else None
    evidence["p99_ms"] = p99
    broken, unsure = [], []
    for name, count, trials, limit in rates:
        lower, upper = wilson_interval(count, trials, gates.confidence)
        figures = {"count": count, "of": trials, "lower": lower, "upper": upper, "limit": limit}
        if name == "disagreement":
            evidence.update(disagreements=count, disagreement_lower=lower, disagreement_upper=upper)
        elif "." in name:
            label, what = name.split(".")
            evidence["per_class"].setdefault(label, {})[what] = figures
        if limit is None:
            continue
        if lower > limit:
            broken.append(f"{name} {count}/{trials}: its lower bound {lower:.4f} is above {limit}")
        elif upper > limit:
            unsure.append(f"{name} {count}/{trials}: its upper bound {upper:.4f} is above {limit}")
    if gates.max_p99_ms is not None and p99 is not None and p99 > gates.max_p99_ms:
        broken.append(f"p99 latency {p99:.2f} ms is above {gates.max_p99_ms} ms")
    if tally.inputs < gates.min_inputs:
        return Verdict("wait", f"{tally.inputs} of gates.min_inputs {gates.min_inputs} inputs", evidence)
    if broken:
        return Verdict("rollback", "; ".join(broken), evidence)
    if unsure:
        return Verdict("wait", "; ".join(unsure), evidence)
    return Verdict("promote", f"every gate holds over {tally.inputs} inputs", evidence)
