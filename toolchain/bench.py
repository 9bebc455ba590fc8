"""`edgecc bench`: latency and memory of a model measured on the machine it runs on (the board).

The record it writes ties the measurement to the model's operator costs, so
`edgecc targets calibrate` can turn it into a profile whose estimates match
that board.
"""

from __future__ import annotations

import hashlib
import platform
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import edgecc
from edgecc.progress import Reporter
from edgecc.reader import read_graph
from edgecc.runtime import Model


@dataclass(frozen=True)
class BenchRecord:
    """One measurement of one model on one machine; the calibration record."""

    model: str
    model_sha256: str
    threads: int
    runs: int
    warmup: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    rss_before_bytes: int
    rss_after_bytes: int
    machine: str
    measured_at: str
    edgecc_version: str

    @property
    def model_rss_bytes(self) -> int:
        """Resident memory the loaded, allocated and run model added to the process."""
        return self.rss_after_bytes - self.rss_before_bytes

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "model_rss_bytes": self.model_rss_bytes}


def resident_bytes() -> int:
    """Current resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def bench(path: Path, threads: int = 1, runs: int = 200, warmup: int = 20,
          reporter: Reporter | None = None) -> BenchRecord:
    """Load, warm up and time `invoke()` on a zero-valued input; memory is measured around the load."""
    reporter = reporter or Reporter(quiet=True)
    content = path.read_bytes()
    read_graph(content)  # a clear error for a file that is not a TFLite model
    before = resident_bytes()
    model = Model(content, threads=threads)
    # set once, warm-up runs or none: an input never set holds whatever its memory held (a text model's GATHER then
    # reads token ids out of its table and the run fails)
    model.set_input(np.zeros(model.input["shape"][1:], dtype=np.float32))
    for _ in range(warmup):
        model.run()
    times = []
    with reporter.task(f"timing {path.name}", runs) as advance:
        for _ in range(runs):
            start = time.perf_counter()
            model.run()
            times.append((time.perf_counter() - start) * 1000)
            advance()
    after = resident_bytes()
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    return BenchRecord(
        model=path.name, model_sha256=hashlib.sha256(content).hexdigest(), threads=threads, runs=runs,
        warmup=warmup, p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99), mean_ms=float(np.mean(times)),
        rss_before_bytes=before, rss_after_bytes=after,
        machine=f"{platform.node()} {platform.machine()} {platform.processor() or platform.system()}",
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), edgecc_version=edgecc.__version__,
    )
