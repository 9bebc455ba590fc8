"""`edgecc targets calibrate`: a user profile whose latency estimates match a board's own measurement.

The CPU estimate is scaled by one factor, the geometric mean of measured over estimated
over the benchmarked models (one or more), kept in the profile's `cpu.latency_scale`:
the estimator already prices each operator kind from the profile's figures, so what a
board's own measurements add is how much faster or slower it runs them all. The result is a
normal profile TOML, usable with `--target FILE`, whose changed figures say where they came from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path
from typing import Any

from edgecc import schema
from edgecc.check import assess
from edgecc.errors import EdgeccError
from edgecc.targets import Figure, Target

TABLES = ("cpu", "memory", "arena", "edgetpu", "ethosu")


def calibration_factor(measured_ms: list[float], estimated_ms: list[float]) -> float:
    """Measured over estimated, the geometric mean over the calibration models (errors are relative)."""
    return math.exp(sum(math.log(m / e) for m, e in zip(measured_ms, estimated_ms)) / len(measured_ms))


def _measured(record: dict[str, Any], model: bytes) -> float:
    if hashlib.sha256(model).hexdigest() != record.get("model_sha256"):
        raise EdgeccError("the model file is not the one the bench record measured (sha256 differs)")
    try:
        measured = float(record["p50_ms"])
    except (KeyError, TypeError, ValueError):
        raise EdgeccError("the bench record has no p50_ms figure") from None
    if not math.isfinite(measured) or measured <= 0:
        raise EdgeccError(f"the bench record's p50_ms is {measured}; a measured latency is a finite number above 0")
    return measured


def calibrate(records: list[tuple[dict[str, Any], bytes]], target: Target, name: str | None = None) -> tuple[Target, float]:
    """A copy of `target` fitted to `records` (`edgecc bench` records, each with its model); returns it and the factor."""
    if target.runtime not in ("litert-xnnpack", "tflite-micro"):
        raise EdgeccError(f"calibration fits CPU runtimes; {target.name} runs {target.runtime}")
    measured = [_measured(record, model) for record, model in records]
    unscaled = dataclasses.replace(target, cpu=dataclasses.replace(target.cpu, latency_scale=None))
    estimated = [assess(model, unscaled, measure_arena=False).latency.total_ms for _, model in records]
    factor = calibration_factor(measured, estimated)
    first = records[0][0]
    runs = "; ".join(f"{record.get('model', 'model')} p50 {m:.4g} ms against an estimate of {e:.4g} ms"
                     for (record, _), m, e in zip(records, measured, estimated))
    note = (f"calibrated with edgecc bench on {first.get('machine', 'an unnamed machine')} at "
            f"{first.get('measured_at', '?')} with {first.get('threads', '?')} threads: {runs} (x{factor:.3g})")
    calibrated = dataclasses.replace(
        target, name=name or f"{target.name}-calibrated",
        cpu=dataclasses.replace(target.cpu, latency_scale=Figure(round(factor, 6), note)))
    return calibrated, factor


def write_profile(target: Target, path: Path) -> None:
    header = f"# {target.name}: written by `edgecc targets calibrate`; use it with --target {path.name}\n"
    try:
        path.write_text(header + schema.dump(target, TABLES), encoding="utf-8")
    except OSError as err:
        raise EdgeccError(f"cannot write {path}: {err.strerror}") from None
