"""`edgecc targets calibrate`: a user profile whose latency estimates match a board's own measurement.

The CPU estimate is scaled by one factor (measured over estimated) for the
benchmarked model, kept in the profile's `cpu.latency_scale`. The result is a normal profile
TOML, usable with `--target FILE`, whose changed figures say where they came from.
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


def _scaled(figure: Figure, factor: float, note: str) -> Figure:
    return Figure(round(figure.value * factor, 6), f"{note}; before calibration {figure.value:g}: {figure.source}")


def calibrate(record: dict[str, Any], model: bytes, target: Target, name: str | None = None) -> tuple[Target, float]:
    """A copy of `target` fitted to `record` (an `edgecc bench` record of `model`); returns it and the factor."""
    if target.runtime not in ("litert-xnnpack", "tflite-micro"):
        raise EdgeccError(f"calibration fits CPU runtimes; {target.name} runs {target.runtime}")
    if hashlib.sha256(model).hexdigest() != record.get("model_sha256"):
        raise EdgeccError("the model file is not the one the bench record measured (sha256 differs)")
    try:
        measured = float(record["p50_ms"])
    except (KeyError, TypeError, ValueError):
        raise EdgeccError("the bench record has no p50_ms figure") from None
    if not math.isfinite(measured) or measured <= 0:
        raise EdgeccError(f"the bench record's p50_ms is {measured}; a measured latency is a finite number above 0")
    estimate = assess(model, target, measure_arena=False).latency.total_ms
    factor = measured / estimate
    note = (f"calibrated with edgecc bench on {record.get('machine', 'an unnamed machine')} at "
            f"{record.get('measured_at', '?')}: {record.get('model', 'model')} p50 {measured:.4g} ms with "
            f"{record.get('threads', '?')} threads against an estimate of {estimate:.4g} ms (x{factor:.3g})")
    cpu = target.cpu
    calibrated = dataclasses.replace(
        target,
        name=name or f"{target.name}-calibrated",
        cpu=dataclasses.replace(cpu, latency_scale=_scaled(cpu.latency_scale or Figure(1.0, "no calibration"), factor, note)),
    )
    return calibrated, factor


def write_profile(target: Target, path: Path) -> None:
    header = f"# {target.name}: written by `edgecc targets calibrate`; use it with --target {path.name}\n"
    try:
        path.write_text(header + schema.dump(target, TABLES), encoding="utf-8")
    except OSError as err:
        raise EdgeccError(f"cannot write {path}: {err.strerror}") from None
