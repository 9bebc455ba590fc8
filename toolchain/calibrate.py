"""`edgecc targets calibrate`: a user profile whose latency estimates match a board's own measurement.

The estimator already prices each operator kind from the profile's figures, so what a board's
own measurements add is how much faster or slower it runs them. One model gives one factor
(`cpu.latency_scale`). Models that differ in their share of multiply-accumulate work give two,
as a board departs from its class in two ways: how well its kernels use the SIMD datapath
(the MAC terms, `cpu.mac_scale`) and its memory and per-operator costs (the rest, then
`cpu.latency_scale`). The result is a normal profile TOML, usable with `--target FILE`, whose
changed figures say where they came from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np

from edgecc import schema
from edgecc.check import assess
from edgecc.errors import EdgeccError
from edgecc.targets import Figure, Target

TABLES = ("cpu", "memory", "arena", "edgetpu", "ethosu")


MAX_SPLIT = 10.0  # the most the MAC factor and the rest's may differ before two factors count as a fit to noise


def calibration_factors(measured_ms: list[float], estimated_ms: list[float],
                        mac_ms: list[float]) -> tuple[float, float | None]:
    """(latency_scale, mac_scale) from the models' measured and estimated latencies and the estimates' MAC terms.

    One factor, the geometric mean of measured over estimated (errors are relative), with mac_scale None; from two or
    more models whose share of MAC work differs, a factor on the MAC terms and one on the rest, those that fit the
    models best (least squares of the relative error), kept when both are positive and within MAX_SPLIT of each
    other."""
    one = math.exp(sum(math.log(m / e) for m, e in zip(measured_ms, estimated_ms)) / len(measured_ms))
    a = np.array([[mac / m, (e - mac) / m] for m, e, mac in zip(measured_ms, estimated_ms, mac_ms)])
    if len(a) < 2 or np.linalg.matrix_rank(a) < 2:
        return one, None
    mac, rest = np.linalg.lstsq(a, np.ones(len(a)), rcond=None)[0]
    if not (mac > 0 and rest > 0 and max(mac, rest) <= MAX_SPLIT * min(mac, rest)):
        return one, None
    return float(rest), float(mac)


def calibrated_ms(estimated_ms: float, mac_ms: float, factors: tuple[float, float | None]) -> float:
    """An estimate (with its MAC terms) under calibration factors, as a profile carrying them gives it."""
    rest, mac = factors
    return (mac or rest) * mac_ms + rest * (estimated_ms - mac_ms)


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


def calibrate(records: list[tuple[dict[str, Any], bytes]], target: Target,
              name: str | None = None) -> tuple[Target, tuple[float, float | None]]:
    """A copy of `target` fitted to `records` (`edgecc bench` records, each with its model); returns it and its
    factors (latency_scale, mac_scale or None)."""
    if target.runtime not in ("litert-xnnpack", "tflite-micro"):
        raise EdgeccError(f"calibration fits CPU runtimes; {target.name} runs {target.runtime}")
    measured = [_measured(record, model) for record, model in records]
    unscaled = dataclasses.replace(target, cpu=dataclasses.replace(target.cpu, latency_scale=None, mac_scale=None))
    estimates = [assess(model, unscaled, measure_arena=False).latency for _, model in records]
    factors = calibration_factors(measured, [e.total_ms for e in estimates], [e.mac_ms for e in estimates])
    first = records[0][0]
    runs = "; ".join(f"{record.get('model', 'model')} p50 {m:.4g} ms against an estimate of {e.total_ms:.4g} ms "
                     f"({e.mac_ms / e.total_ms:.0%} of it multiply-accumulates)"
                     for (record, _), m, e in zip(records, measured, estimates))
    note = (f"calibrated with edgecc bench on {first.get('machine', 'an unnamed machine')} at "
            f"{first.get('measured_at', '?')} with {first.get('threads', '?')} threads: {runs}")
    rest, mac = factors
    scope = " on all but the MAC terms" if mac else ""
    cpu = dataclasses.replace(target.cpu, latency_scale=Figure(round(rest, 6), f"{note}; x{rest:.3g}{scope}"),
                              mac_scale=Figure(round(mac, 6), f"{note}; x{mac:.3g} on the MAC terms") if mac else None)
    return dataclasses.replace(target, name=name or f"{target.name}-calibrated", cpu=cpu), factors


def write_profile(target: Target, path: Path) -> None:
    header = f"# {target.name}: written by `edgecc targets calibrate`; use it with --target {path.name}\n"
    try:
        path.write_text(header + schema.dump(target, TABLES), encoding="utf-8")
    except OSError as err:
        raise EdgeccError(f"cannot write {path}: {err.strerror}") from None
