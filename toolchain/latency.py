"""Latency estimates per operator from profile figures a user can read off a datasheet.

Each operator's time is a sum of terms, each a work count scaled by a profile figure
and multiplied by a coefficient of the device class (Cortex-M, Cortex-A, Edge TPU):
  - a fixed cost per operator, in cycles of the profile's clock;
  - its multiply-accumulates in cycles per MAC on the threads it runs on: matrix products
    (convolutions, fully connected, batch matmul: the same GEMM inner loop in CMSIS-NN, ruy
    and XNNPACK), depthwise convolutions, and element-wise work, for int8 and fp32, each counted
    in cycles at the core's peak rate for its precision (`cpu.fp32_macs_per_cycle`: a Cortex-A7
    completes one fp32 multiply-accumulate a cycle, a Cortex-A72 four; `cpu.int8_macs_per_cycle`,
    by default the class's ratio to the fp32 rate, as one SIMD datapath sets both: XNNPACK's
    published int8 MobileNets run about 2.5x their fp32 speed on a Cortex-A7, A53 and A72 alike;
    a Helium Cortex-M's vector unit breaks that ratio, so its profile gives the int8 figure), so
    each coefficient is the inverse of the kernels' efficiency and at least 1;
  - the bytes it moves over the profile's memory bandwidth.
The sum is scaled by the kernels' factor (`cpu.kernels`: TFLite Micro's interpreter with
CMSIS-NN, microTVM's compiled CMSIS-NN calls, ONNC's compiled calls to CMSIS-NN's q7 kernels,
LiteRT's built-in kernels, XNNPACK), one number per kernel library fitted against the class's
reference library.
On an Edge TPU the mapped operators cost a time per operator plus their MACs at the
accelerator's peak rate, each inference a fixed invoke time, and what crosses the
host link (parameters that do not fit on chip, activations passed to and from the CPU)
its bytes at the link's bandwidth; the rest runs on the host CPU.

The coefficients, each within a physically sensible range, and the error band of each
class are fitted and measured by scripts/bench_estimator.py on published measurements
(benchmarks/latency_measurements.toml) and stored in latency_model.toml beside this
module: a band is the 10th-90th percentile of the estimator's held-out error for that class,
held out one model at a time for a board with published rows, with their board and model at
once for a board without, and after calibration for a calibrated profile (ClassModel).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from edgecc import schema
from edgecc.cost import OpCost
from edgecc.errors import EdgeccError
from edgecc.reader import Graph
from edgecc.schema import spec
from edgecc.targets import Target, builtin_names

MODEL_FILE = Path(__file__).with_name("latency_model.toml")
ERROR_BAND = 0.30  # relative; only for Vela's own Ethos-U estimate, which the dataset does not cover yet

CPU_CLASS = {"tflite-micro": "cortex-m", "ethos-u": "cortex-m", "litert-xnnpack": "cortex-a", "edgetpu": "cortex-a"}
KINDS = {"CONV_2D": "gemm", "TRANSPOSE_CONV": "gemm", "DEPTHWISE_CONV_2D": "depthwise",
         "FULLY_CONNECTED": "gemm", "BATCH_MATMUL": "gemm"}
INT_TYPES = ("INT8", "UINT8", "INT16", "INT32")
MEASURED_RUNTIMES = ("tflite-micro", "microtvm-cmsis-nn", "onnc-cmsis-nn", "x-cube-ai", "plumerai", "tflite",
                     "litert-xnnpack", "edgetpu")
# each runtime's usual CPU kernel library (edgecc.targets.KERNELS), when a profile's cpu.kernels is empty
DEFAULT_KERNELS = {"tflite-micro": "tflite-micro", "ethos-u": "tflite-micro", "litert-xnnpack": "litert-xnnpack",
                   "edgetpu": "tflite"}
# kernel libraries whose element-wise operators run on one thread: LiteRT's built-in kernels spread only matrix
# products, depthwise convolutions and reductions over their thread pool (cpu_backend_threadpool); XNNPACK spreads every
# operator
ONE_THREAD_ELEMENTWISE = ("tflite",)
# the CPU terms that price multiply-accumulates (convolutions, matrix products): `edgecc targets calibrate` may scale
# them apart from the rest (per-operator, memory and element-wise work), as cpu.mac_scale
MAC_TERMS = ("gemm_", "depthwise_")
# peak fp32 multiply-accumulates per cycle of one core when a profile does not give cpu.fp32_macs_per_cycle: one
# 128-bit NEON FMA a cycle (Cortex-A15/A57/A72, flatlib's vfpbench: 8 single-precision FLOP a cycle), one FPU
# FMA a cycle on a Cortex-M
FP32_MACS_PER_CYCLE = {"cortex-m": 1.0, "cortex-a": 4.0}
# peak int8 multiply-accumulates per cycle over peak fp32 ones when a profile does not give cpu.int8_macs_per_cycle:
# a Cortex-M's SMLAD does 2 int8 (as int16) MACs a cycle against the FPU's one FMA; a 128-bit NEON SDOT or
# widening multiply-accumulate pair does 16 against FMLA's 4
INT8_PER_FP32 = {"cortex-m": 2.0, "cortex-a": 4.0}


@dataclass(frozen=True)
class Measurement:
    """One published latency: what ran, on what, how fast, and where it was read."""

    device: str = spec(doc="the built-in profile of the board")
    runtime: str = spec(choices=MEASURED_RUNTIMES)
    runtime_version: str = spec()
    threads: int = spec(minimum=1)
    model: str = spec(doc="an architecture scripts/bench_estimator.py rebuilds")
    precision: str = spec(choices=("int8", "fp32"))
    latency_ms: float = spec(positive=True)
    source: str = spec(doc="address of the page or file the figure was read from")
    note: str = spec("", doc="which table or line, and what was assumed")


@dataclass(frozen=True)
class Measurements:
    measurement: tuple[Measurement, ...] = spec()


def load_measurements(path: Path) -> tuple[Measurement, ...]:
    """The published measurements in `path`, every problem named by row and field."""
    rows = schema.load(Measurements, path, "latency measurements").measurement
    known, seen, problems = set(builtin_names()), set(), []
    for i, row in enumerate(rows):
        where = f"measurement[{i}]"
        if row.device not in known:
            problems.append(f"{where}.device: no built-in profile {row.device!r}")
        if not row.source.startswith("https://"):
            problems.append(f"{where}.source: an https address, got {row.source!r}")
        key = (row.device, row.runtime, row.runtime_version, row.threads, row.model, row.precision)
        if key in seen:
            problems.append(f"{where}: the same device, runtime, threads, model and precision as an earlier row")
        seen.add(key)
    if problems:
        raise EdgeccError(f"{path}: " + "; ".join(problems))
    return rows


@dataclass(frozen=True)
class Band:
    """Published over estimated: its 10th and 90th percentiles over `count` held-out estimates."""

    low: float
    high: float
    count: int


@dataclass(frozen=True)
class ClassModel:
    """One device class's fitted coefficients and held-out error bands.

    Which band an estimate gets depends on what the estimator has seen of the board: the band of the rows held out
    one model at a time for a board with published rows (`devices`), the wider one of the rows held out with their
    board and their model at once for a board it has none of (a user's own profile, or a built-in one without rows),
    and for a profile `edgecc targets calibrate` wrote, the band of those rows after calibrating on 1 or 2 of the
    board's other models."""

    coefficients: dict[str, float]
    kernels: dict[str, float]  # each kernel library's factor on the CPU terms; absent means 1 (the reference library)
    band: Band  # over the rows held out one model at a time
    precisions: tuple[str, ...] = ("int8", "fp32")  # of those rows: a term of another precision is a prior, not a fit
    devices: tuple[str, ...] = ()  # the boards with rows
    unseen: Band | None = None  # over the rows held out with their board and their model at once
    calibrated: Band | None = None  # the same after calibrating on 1 or 2 of the board's other models


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
    mac_ms: float = 0.0  # of total_ms, the CPU's multiply-accumulate terms (MAC_TERMS), which cpu.mac_scale scales


def read_models(path: Path = MODEL_FILE) -> dict[str, ClassModel]:
    """The fitted classes in `path` (written by scripts/bench_estimator.py)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        return {name: ClassModel({k: float(v) for k, v in c["coefficients"].items()},
                                 {k: float(v) for k, v in c.get("kernels", {}).items()},
                                 Band(float(c["band_low"]), float(c["band_high"]), int(c["rows"])),
                                 tuple(str(p) for p in c["precisions"]), tuple(str(d) for d in c.get("devices", ())),
                                 _band(c["unseen"]) if "unseen" in c else None,
                                 _band(c["calibrated"]) if "calibrated" in c else None)
                for name, c in data["class"].items()}
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as err:
        raise EdgeccError(f"{path}: the latency model cannot be read ({err}); rerun scripts/bench_estimator.py") from None


def _band(table: dict[str, float]) -> Band:
    return Band(float(table["low"]), float(table["high"]), int(table["count"]))


def band_for(model: ClassModel, target: Target) -> tuple[float, float, str]:
    """The band of `model` an estimate on `target` gets (see ClassModel), and what it was measured on."""
    if target.cpu.latency_scale and model.calibrated:
        band, measured_on = model.calibrated, ("estimates on boards held out and calibrated on 1 or 2 of their models, "
                                               "as this profile was")
    elif target.name in model.devices or model.unseen is None:
        band, measured_on = model.band, "published rows, each held out with its model"
    else:
        band, measured_on = model.unseen, (f"published rows, each held out with its board and its model, as no "
                                           f"published row is of {target.name}")
    return band.low, band.high, f"{band.count} {measured_on}"


@cache
def class_models() -> dict[str, ClassModel]:
    return read_models()


def cpu_features(cost: OpCost, kind: str, is_int8: bool, target: Target, threads: int) -> dict[str, float]:
    """One CPU operator's work, each term in ms per unit of its coefficient."""
    cycle_ms = 1e3 / (target.cpu.clock_mhz.value * 1e6)
    precision = "int8" if is_int8 else "fp32"
    features = {"op_cycles": cycle_ms, "bytes": cost.bytes_moved / (target.memory.bandwidth_gbps.value * 1e9) * 1e3}
    if cost.macs:
        work = KINDS.get(kind, "elementwise")
        spread = 1 if work == "elementwise" and kernels_of(target) in ONE_THREAD_ELEMENTWISE else threads
        rate = int8_macs_per_cycle(target) if is_int8 else fp32_macs_per_cycle(target)
        features[f"{work}_{precision}"] = cost.macs * cycle_ms / spread / rate
    return features


def fp32_macs_per_cycle(target: Target) -> float:
    """One core's peak fp32 multiply-accumulates per cycle: the profile's figure, else its class's default."""
    figure = target.cpu.fp32_macs_per_cycle
    return figure.value if figure else FP32_MACS_PER_CYCLE[CPU_CLASS[target.runtime]]


def int8_macs_per_cycle(target: Target) -> float:
    """One core's peak int8 multiply-accumulates per cycle: the profile's figure, else its class's ratio to the fp32
    rate."""
    figure = target.cpu.int8_macs_per_cycle
    return figure.value if figure else INT8_PER_FP32[CPU_CLASS[target.runtime]] * fp32_macs_per_cycle(target)


def edgetpu_features(cost: OpCost, target: Target) -> dict[str, float]:
    """One Edge TPU operator's work: a count (per us) and its MACs at the peak rate (ms)."""
    tpu = target.edgetpu
    assert tpu is not None
    return {"tpu_op_us": 1e-3, "tpu_macs": cost.macs / (tpu.tops.value * 1e12 / 2) * 1e3}


def fixed_features(target: Target, streamed_bytes: int, invokes: int = 1) -> dict[str, float]:
    """An Edge TPU inference's fixed work: its invokes (one per Edge TPU segment, in ms) and the bytes over the host
    link."""
    tpu = target.edgetpu
    assert tpu is not None
    return {"invoke_ms": float(invokes), "link": streamed_bytes / (tpu.link_gbps.value * 1e9) * 1e3}


def _priced(features: dict[str, float], model: ClassModel) -> float:
    return sum(model.coefficients.get(name, 0.0) * value for name, value in features.items())


def _needed(name: str, models: dict[str, ClassModel]) -> ClassModel:
    if name not in models:
        raise EdgeccError(f"no latency model for the {name} class in {MODEL_FILE.name}; rerun scripts/bench_estimator.py")
    return models[name]


def kernels_of(target: Target) -> str:
    """The CPU kernel library the target's profile runs: its `cpu.kernels`, else its runtime's usual one."""
    return target.cpu.kernels or DEFAULT_KERNELS[target.runtime]


def estimate_latency(graph: Graph, costs: list[OpCost], target: Target,
                     on_tpu: tuple[bool, ...] | None = None, streamed_bytes: int = 0, *, invokes: int = 1,
                     threads: int | None = None, models: dict[str, ClassModel] | None = None) -> LatencyEstimate:
    """Estimate one batch-1 inference on `target`.

    `on_tpu` marks the operators an Edge TPU runs; `streamed_bytes` is what crosses
    the host link on every inference besides the input and output (parameters
    that do not fit on chip, activations passed between the Edge TPU and the CPU); `invokes` the Edge TPU
    invocations per inference (a pipeline of Edge TPU segments invokes each: the sum over its segments).
    `threads` defaults to the profile's cores; `models` to the fitted classes.
    """
    models = class_models() if models is None else models
    cpu_class = _needed(CPU_CLASS[target.runtime], models)
    used = min(threads or target.cpu.cores.value, target.cpu.cores.value)
    tpu_class = _needed("edgetpu", models) if on_tpu is not None and any(on_tpu) and target.edgetpu else None
    kernels = kernels_of(target)
    kernel_factor = cpu_class.kernels.get(kernels, 1.0)
    scale = target.cpu.latency_scale.value if target.cpu.latency_scale else 1.0
    mac_scale = target.cpu.mac_scale.value if target.cpu.mac_scale else scale
    ops, cpu_precisions, mac_ms = [], set(), 0.0
    for index, (op, cost) in enumerate(zip(graph.operators, costs)):
        out = graph.tensors[op.outputs[0]] if op.outputs else None
        is_int8 = out is None or out.dtype in INT_TYPES
        unit = "edgetpu" if tpu_class and on_tpu and on_tpu[index] else "cpu"
        if unit == "edgetpu":
            ms = _priced(edgetpu_features(cost, target), tpu_class)
        else:
            features = cpu_features(cost, op.kind, is_int8, target, used)
            macs = {n: v for n, v in features.items() if n.startswith(MAC_TERMS)}
            mac = _priced(macs, cpu_class) * kernel_factor
            rest = _priced({n: v for n, v in features.items() if n not in macs}, cpu_class) * kernel_factor
            ms = mac * mac_scale + rest * scale
            mac_ms += mac * mac_scale
            cpu_precisions.add("int8" if is_int8 else "fp32")
        ops.append(OpEstimate(index, op.kind, cost.macs, cost.bytes_moved, unit, ms))
    fixed = 0.0
    band_class = cpu_class
    method = (f"estimate: per-operator model of the {CPU_CLASS[target.runtime]} class (coefficients fitted on published "
              f"measurements) with the {target.name} profile's clock, {used} thread(s), "
              f"{fp32_macs_per_cycle(target):g} fp32 and {int8_macs_per_cycle(target):g} int8 MACs per cycle of a "
              f"core, memory bandwidth and {kernels} kernels")
    if tpu_class:
        fixed = _priced(fixed_features(target, streamed_bytes, invokes), tpu_class)
        band_class = tpu_class
        method += "; Edge TPU part at the accelerator's peak rate, invoke and host-link costs fitted on Coral's figures"
    total = fixed + sum(o.ms for o in ops)
    low, high, measured_on = band_for(band_class, target)
    method += f"; band: 10th-90th percentile of the class's held-out error over {measured_on}"
    if unfitted := sorted(cpu_precisions - set(cpu_class.precisions)):
        method += (f"; its {' and '.join(unfitted)} operators are priced at the {CPU_CLASS[target.runtime]} class's "
                   f"prior rates: no published {' or '.join(unfitted)} measurement of the class fits them, so the "
                   "band does not cover them")
    return LatencyEstimate(total, total * low, total * high, fixed, tuple(ops), method, mac_ms)
