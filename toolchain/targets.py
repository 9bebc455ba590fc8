"""Target device profiles: TOML files under `targets/`, every figure with its source.

Profiles are data, not code: adding a board means adding a TOML file (or passing
the path of one to `--target`). A figure is written as `{ value = ..., source = "..." }`
so that no number enters a report without saying where it came from.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from edgecc import schema
from edgecc.errors import EdgeccError
from edgecc.schema import spec

RUNTIMES = ("litert-xnnpack", "tflite-micro", "edgetpu", "ethos-u")
# CPU kernel libraries the latency estimator has fitted factors for (edgecc.latency)
KERNELS = ("tflite-micro", "microtvm-cmsis-nn", "onnc-cmsis-nn", "tflite", "litert-xnnpack")
# figures older profiles carried that no estimate reads any more: refused by name so that nobody tunes them in vain
RETIRED = {"cpu": ("int8_gmacs", "fp32_gmacs", "op_overhead_us"),
           "edgetpu": ("invoke_overhead_ms", "op_overhead_us", "mac_efficiency")}


@dataclass(frozen=True)
class Figure:
    """A number and the public source it was taken from (or how it was derived); 0 is meaningful."""

    value: float = spec(minimum=0.0)
    source: str = spec()


@dataclass(frozen=True)
class Rate(Figure):
    """A figure above 0: estimates divide by it, or a budget of 0 would refuse every model."""

    value: float = spec(positive=True)


@dataclass(frozen=True)
class Share(Figure):
    """A fraction of a whole, from 0 to 1."""

    value: float = spec(minimum=0.0, maximum=1.0)


@dataclass(frozen=True)
class Count(Figure):
    """A whole number of things, at least one."""

    value: int = spec(minimum=1)


@dataclass(frozen=True)
class Cpu:
    """The processor that runs the model (or the part of it an accelerator does not take)."""

    core: str = spec(doc="processor core, e.g. Cortex-A72")
    cores: Count = spec(doc="cores the runtime uses")
    clock_mhz: Rate = spec()
    fp32_macs_per_cycle: Rate | None = spec(None, doc="peak single-precision multiply-accumulates one core completes "
                                            "per cycle (SIMD lanes x FMA pipes: Cortex-A7 1, Cortex-A72 4), from a "
                                            "datasheet or a measured peak; absent means the class default "
                                            "(edgecc.latency.FP32_MACS_PER_CYCLE)")
    int8_macs_per_cycle: Rate | None = spec(None, doc="peak int8 multiply-accumulates one core completes per cycle "
                                            "(a Cortex-M4, M7 or M33's SMLAD 2, a Helium core's 128-bit vector MAC "
                                            "every 2 cycles 8), from a datasheet or the core's scheduling model; "
                                            "absent means the class's ratio to the fp32 rate "
                                            "(edgecc.latency.INT8_PER_FP32) times fp32_macs_per_cycle")
    kernels: str = spec("", choices=("", *KERNELS), doc="the CPU kernel library: tflite-micro (TFLite Micro's "
                        "interpreter with CMSIS-NN), microtvm-cmsis-nn, onnc-cmsis-nn (ONNC's generated calls to "
                        "CMSIS-NN's q7 kernels), tflite (LiteRT's built-in kernels) or "
                        "litert-xnnpack; empty means the runtime's usual one (an Edge TPU host: tflite)")
    latency_scale: Rate | None = spec(None, doc="measured over estimated latency on this board (with mac_scale: of "
                                      "the terms other than multiply-accumulates), written by `edgecc targets "
                                      "calibrate`; absent means 1; present, the estimate gets the error band measured "
                                      "after calibration")
    mac_scale: Rate | None = spec(None, doc="measured over estimated multiply-accumulate work (convolutions, "
                                  "matrix products) on this board, written by `edgecc targets calibrate` from models "
                                  "that differ in their share of it; latency_scale then scales the rest; absent means "
                                  "latency_scale")


@dataclass(frozen=True)
class Memory:
    ram_bytes: Rate = spec(doc="RAM of the board (smallest variant)")
    runtime_ram_bytes: Figure = spec(doc="RAM the OS and the inference runtime take before any model")
    flash_bytes: Rate = spec(doc="storage for the model: flash, or the SD card / eMMC")
    runtime_flash_bytes: Figure = spec(doc="code size of the inference runtime on this target")
    bandwidth_gbps: Rate = spec(doc="effective main-memory bandwidth in GB/s")


@dataclass(frozen=True)
class Arena:
    """TFLite Micro only: what the target's optimised kernels need beyond the host's reference kernels."""

    margin_bytes: Figure = spec(doc="fixed extra arena for optimised kernels' scratch buffers")
    margin_fraction: Figure = spec(doc="extra arena as a fraction of the measured arena")

    def margin(self, measured_bytes: float) -> float:
        """Bytes to add to an arena measured with the host's reference kernels."""
        return measured_bytes * self.margin_fraction.value + self.margin_bytes.value


@dataclass(frozen=True)
class EdgeTpu:
    tops: Rate = spec(doc="peak int8 tera-operations per second (1 MAC = 2 operations)")
    onchip_bytes: Figure = spec(doc="on-chip memory that caches parameters")
    link_gbps: Rate = spec(doc="effective host link bandwidth in GB/s (USB, PCIe); parameters that do not fit on chip stream over it")
    min_mac_share: Share | None = spec(None, doc="budget: the least share of the model's MACs (0-1) that must run on "
                                       "the Edge TPU; absent means no such budget")


@dataclass(frozen=True)
class EthosU:
    """Arm Ethos-U NPU: the settings the Vela compiler takes."""

    accelerator_config: str = spec(doc="Vela --accelerator-config, e.g. ethos-u55-128")
    system_config: str = spec(doc="Vela --system-config from Vela's vela.ini")
    memory_mode: str = spec(doc="Vela --memory-mode from Vela's vela.ini")
    npu_clock_mhz: Rate = spec()
    sram_bytes: Rate = spec(doc="SRAM available to Vela's tensor arena")


@dataclass(frozen=True)
class Target:
    name: str = spec()
    description: str = spec()
    runtime: str = spec(choices=RUNTIMES)
    int8_only: bool = spec(doc="the deployment runs only fully-int8 models (e.g. a firmware that registers only int8 "
                                "kernels): check refuses float activations. LiteRT and TFLite Micro run float32 "
                                "kernels; an Edge TPU runs the float parts on its host")
    latency_budget_ms: Rate = spec(doc="default latency ceiling when neither the recipe nor --latency-ms gives one")
    cpu: Cpu = spec()
    memory: Memory = spec()
    legal_ops: tuple[str, ...] = spec((), doc="TFLite builtin ops the runtime has; empty means every builtin")
    legal_ops_source: str = spec("", doc="where the op list comes from")
    arena: Arena | None = spec(None)
    edgetpu: EdgeTpu | None = spec(None)
    ethosu: EthosU | None = spec(None)

    @property
    def is_micro(self) -> bool:
        """Runs on TFLite Micro (a microcontroller, with or without an NPU)."""
        return self.runtime in ("tflite-micro", "ethos-u") or self.arena is not None


def _builtin_dir() -> Path:
    return Path(str(resources.files("edgecc.builtin_targets")))


def builtin_names() -> list[str]:
    return sorted(p.stem for p in _builtin_dir().glob("*.toml"))


def load_target(name_or_path: str) -> Target:
    """A built-in profile by name, or a user's profile TOML file by path."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        if name_or_path not in builtin_names():
            known = ", ".join(builtin_names())
            raise EdgeccError(f"unknown target {name_or_path!r}; known targets: {known}")
        path = _builtin_dir() / f"{name_or_path}.toml"
    retired = _retired_fields(path)
    if retired:
        raise EdgeccError(f"{path}: {', '.join(retired)}: no longer read (latency is estimated from clock_mhz, cores, "
                          "bandwidth_gbps and kernels with coefficients fitted on published measurements); delete "
                          + ("it" if len(retired) == 1 else "them"))
    target = schema.load(Target, path, "target profile")
    problems = []
    if target.runtime == "edgetpu" and target.edgetpu is None:
        problems.append("edgetpu: an edgetpu runtime needs an [edgetpu] table")
    if target.runtime == "ethos-u" and target.ethosu is None:
        problems.append("ethosu: an ethos-u runtime needs an [ethosu] table")
    if target.runtime in ("tflite-micro", "ethos-u") and target.arena is None:
        problems.append("arena: a TFLite Micro target needs an [arena] table")
    if problems:
        raise EdgeccError(f"{path}: " + "; ".join(problems))
    return target


def _retired_fields(path: Path) -> list[str]:
    """The retired figures a profile still has; a file that cannot be read is left to schema.load to name."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return []
    return [f"{table}.{key}" for table, keys in RETIRED.items() if isinstance(data.get(table), dict)
            for key in keys if key in data[table]]


def all_targets() -> list[Target]:
    return [load_target(name) for name in builtin_names()]
