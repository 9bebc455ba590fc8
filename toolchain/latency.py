"""Latency estimates per operator from the target profile's calibrated rates.

Each operator costs a fixed dispatch time plus the larger of its arithmetic
time (MACs at the profile's effective int8 or fp32 rate) and its memory time
(bytes moved at the profile's bandwidth). On an Edge TPU the mapped operators
run at the accelerator's rate instead, parameters that do not fit on chip
stream over the host link on every inference, and each inference pays the
accelerator's fixed invoke cost. These are estimates: the band is the error
of this model against published measurements (scripts/bench_estimator.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgecc.cost import OpCost
from edgecc.reader import Graph
from edgecc.targets import Target

ERROR_BAND = 0.30  # relative; the estimator's worst error against published figures, rounded up


@dataclass(frozen=True)
class OpEstimate:
    index: int
    kind: str
    macs: int
    bytes_moved: int
    unit: str  # where it runs: "cpu" or "edgetpu"
    ms: float


@dataclass(frozen=True)
class LatencyEstimate:
    total_ms: float
    low_ms: float
    high_ms: float
    fixed_ms: float  # per-inference costs outside the operators (accelerator invoke, streamed parameters)
    ops: tuple[OpEstimate, ...]
    method: str


def _cpu_ms(cost: OpCost, is_int8: bool, target: Target) -> float:
    cpu = target.cpu
    rate = (cpu.int8_gmacs if is_int8 else cpu.fp32_gmacs).value * 1e9
    compute = cost.macs / rate if rate else float("inf")
    memory = cost.bytes_moved / (target.memory.bandwidth_gbps.value * 1e9)
    return (cpu.op_overhead_us.value * 1e-6 + max(compute, memory)) * 1e3


def _edgetpu_ms(cost: OpCost, target: Target) -> float:
    tpu = target.edgetpu
    assert tpu is not None
    rate = tpu.tops.value * 1e12 / 2 * tpu.mac_efficiency.value
    return (tpu.op_overhead_us.value * 1e-6 + cost.macs / rate) * 1e3


def estimate_latency(graph: Graph, costs: list[OpCost], target: Target,
                     on_tpu: tuple[bool, ...] | None = None, streamed_bytes: int = 0) -> LatencyEstimate:
    """Estimate one batch-1 inference on `target`.

    `on_tpu` marks the operators an Edge TPU runs; `streamed_bytes` is what crosses
    the host link on every inference besides the input and output (parameters
    that do not fit on chip, activations passed between the Edge TPU and the CPU).
    """
    ops = []
    for index, (op, cost) in enumerate(zip(graph.operators, costs)):
        out = graph.tensors[op.outputs[0]] if op.outputs else None
        is_int8 = out is None or out.dtype in ("INT8", "UINT8", "INT16", "INT32")
        tpu = bool(on_tpu and on_tpu[index])
        ms = _edgetpu_ms(cost, target) if tpu else _cpu_ms(cost, is_int8, target)
        ops.append(OpEstimate(index, op.kind, cost.macs, cost.bytes_moved, "edgetpu" if tpu else "cpu", ms))
    fixed = 0.0
    method = f"estimate: per-operator cost model with the rates of the {target.name} profile (sources in its TOML)"
    if on_tpu is not None and any(on_tpu) and target.edgetpu is not None:
        fixed = target.edgetpu.invoke_overhead_ms.value + streamed_bytes / (target.edgetpu.link_gbps.value * 1e9) * 1e3
        method += " (Edge TPU part + CPU part + parameters and activations over the host link)"
    total = fixed + sum(o.ms for o in ops)
    return LatencyEstimate(total, total * (1 - ERROR_BAND), total * (1 + ERROR_BAND), fixed, tuple(ops), method)
