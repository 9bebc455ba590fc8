"""Arm's Vela compiler for Ethos-U targets: the real NPU plan, not a prediction.

Vela (`pip install ethos-u-vela`) runs in a subprocess: its C++ core can crash
(a truncated model ends in SIGSEGV), and a crash must not take edgecc down.
Figures come from the summary CSV that Vela writes beside the optimised model;
which operators fall back to the CPU is read from the optimised model itself,
where every operator that is not Vela's `ethos-u` custom op runs on the CPU.

Vela counts cycles of the NPU clock and scales every memory clock from it, so
its cycle count does not depend on the system config's `core_clock`: the
latency is those cycles at the profile's `npu_clock_mhz` (the same number as
Vela's own inference time when the two clocks agree).
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from edgecc.errors import EdgeccError
from edgecc.reader import Graph, read_graph
from edgecc.targets import EthosU


@dataclass(frozen=True)
class VelaResult:
    vela_version: str
    accelerator_config: str
    sram_bytes: int            # SRAM Vela's plan uses (total SRAM used, from Vela's summary)
    flash_bytes: int           # off-chip flash / read-only memory used by the compiled model (Vela summary)
    npu_ops: int               # operators of the input model that Vela placed on the NPU
    cpu_ops: tuple[str, ...]   # TFLite op kinds, one per operator that falls back to the CPU, in graph order
    cycles: int                # Vela's total cycle estimate for one inference
    latency_ms: float          # Vela's inference time estimate, at the profile's NPU clock (see below)
    model: bytes               # the Vela-optimised .tflite (what gets embedded on the board)


def _vela_version() -> str:
    try:
        return metadata.version("ethos-u-vela")
    except metadata.PackageNotFoundError:
        raise EdgeccError("Ethos-U targets need Arm's Vela compiler: pip install ethos-u-vela") from None


def _check_int8(graph: Graph) -> None:
    """Vela does not refuse float models, it silently leaves them on the CPU: refuse them here."""
    for op in graph.operators:
        if any(graph.tensors[i].dtype.startswith("FLOAT") for i in (*op.inputs, *op.outputs) if i >= 0):
            raise EdgeccError(f"the Ethos-U needs a fully int8 model, but its {op.kind} operator works "
                              "in float: convert it with full-integer (int8) quantization")


def _failure(result: subprocess.CompletedProcess[str]) -> str:
    """One line from Vela's output: its last line without the exception class and "Error:"."""
    if result.returncode < 0:
        return f"Vela crashed (signal {-result.returncode})"
    lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
    if not lines:
        return f"Vela exited with code {result.returncode}"
    return re.sub(r"^error: ", "", re.sub(r"^[\w.]+: ", "", lines[-1]).strip("'"), flags=re.IGNORECASE)


def _cpu_ops(optimised: bytes) -> tuple[str, ...]:
    """Kinds of the operators that Vela left outside its `ethos-u` custom ops."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(optimised, 0)
    npu = {i for i, code in enumerate(model.operatorCodes) if code.customCode == b"ethos-u"}
    raw = model.subgraphs[0].operators
    return tuple(op.kind for op, r in zip(read_graph(optimised).operators, raw) if r.opcodeIndex not in npu)


def _kib(row: dict[str, str], column: str) -> int:
    """Bytes from a summary column: Vela writes memory sizes in KiB."""
    return round(float(row[column]) * 1024)


def compile_for_ethos_u(content: bytes, ethosu: EthosU) -> VelaResult:
    """Compile an int8 .tflite with Vela for the profile's NPU, memory mode and SRAM."""
    version = _vela_version()
    graph = read_graph(content)
    _check_int8(graph)
    with tempfile.TemporaryDirectory(prefix="edgecc-vela-") as tmp:
        work = Path(tmp)
        (work / "model.tflite").write_bytes(content)
        out = work / "out"
        command = [sys.executable, "-m", "ethosu.vela", str(work / "model.tflite"),
                   "--accelerator-config", ethosu.accelerator_config,
                   "--config", "Arm/vela.ini", "--system-config", ethosu.system_config,
                   "--memory-mode", ethosu.memory_mode,
                   # the SRAM Vela may plan its arena and weight buffers into
                   "--arena-cache-size", str(int(ethosu.sram_bytes.value)),
                   "--output-dir", str(out)]
        result = subprocess.run(command, capture_output=True, text=True, cwd=work)
        summary = next(out.glob("*_summary_*.csv"), None)
        optimised = next(out.glob("*_vela.tflite"), None)
        if result.returncode != 0 or summary is None or optimised is None:
            raise EdgeccError(f"Vela could not compile the model for {ethosu.accelerator_config}: {_failure(result)}")
        with summary.open(newline="") as f:
            row = next(csv.DictReader(f))
        model = optimised.read_bytes()
    cpu_ops = _cpu_ops(model)
    cycles = round(float(row["cycles_total"]))
    return VelaResult(
        vela_version=version,
        accelerator_config=ethosu.accelerator_config,
        sram_bytes=_kib(row, "sram_memory_used"),
        flash_bytes=_kib(row, "on_chip_flash_memory_used") + _kib(row, "off_chip_flash_memory_used"),
        npu_ops=len(graph.operators) - len(cpu_ops),
        cpu_ops=cpu_ops,
        cycles=cycles,
        latency_ms=cycles / (ethosu.npu_clock_mhz.value * 1e3),
        model=model,
    )
