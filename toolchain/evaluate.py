"""Accuracy on the held-out test split and host latency, both with the real TFLite interpreter."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from edgecc.progress import Reporter
from edgecc.runtime import Model


def predictions(model: Model, x: np.ndarray, reporter: Reporter, description: str) -> np.ndarray:
    """Predicted class per example, one interpreter call each (the graph has batch 1)."""
    out = np.empty(len(x), dtype=np.int64)
    with reporter.task(description, len(x)) as advance:
        for i, example in enumerate(x):
            out[i] = int(np.argmax(model.invoke(example)))
            advance()
    return out


@dataclass(frozen=True)
class Latency:
    """Wall time of `interpreter.invoke()` on this host, in milliseconds."""

    median_ms: float
    p90_ms: float
    runs: int
    threads: int

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


def host_latency(models: dict[str, Model], example: np.ndarray, runs: int = 300, warmup: int = 30) -> dict[str, Latency]:
    """Time each model on one example, interleaving them run by run.

    Interleaving puts every model under the same machine noise, so their ratio
    is meaningful even on a busy host where absolute figures are not.
    """
    samples: dict[str, list[float]] = {name: [] for name in models}
    for name, model in models.items():
        model.invoke(example)
    for step in range(warmup + runs):
        for name, model in models.items():
            start = time.perf_counter()
            model.interpreter.invoke()
            elapsed = (time.perf_counter() - start) * 1000
            if step >= warmup:
                samples[name].append(elapsed)
    return {
        name: Latency(float(np.median(s)), float(np.percentile(s, 90)), runs, models[name].threads)
        for name, s in samples.items()
    }
