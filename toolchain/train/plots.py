"""The report's plots, as PNG bytes, drawn from the manifest's figures (matplotlib, no display)."""

from __future__ import annotations

import io
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def accuracy_vs_size(stages: list[dict[str, Any]]) -> bytes:
    """Each stage's test accuracy against its TFLite file size: the trade the build made."""
    figure, axes = plt.subplots(figsize=(6, 3.6))
    for stage in stages:
        axes.scatter(stage["bytes"] / 1024, stage["accuracy"], s=60)
        axes.annotate(stage["name"], (stage["bytes"] / 1024, stage["accuracy"]), textcoords="offset points",
                      xytext=(6, 6))
    axes.margins(0.25)
    axes.set_xlabel("TFLite file size (KiB)")
    axes.set_ylabel("test accuracy")
    axes.set_title("Accuracy against size, per stage")
    axes.grid(alpha=0.3)
    return _png(figure)


def per_op_bars(values: list[float], kinds: list[str], ylabel: str, title: str) -> bytes:
    """One bar per operator in execution order, coloured by operator kind."""
    palette = plt.get_cmap("tab20")
    colours = {kind: palette(i % 20) for i, kind in enumerate(sorted(set(kinds)))}
    figure, axes = plt.subplots(figsize=(9, 3.6))
    axes.bar(range(len(values)), values, color=[colours[k] for k in kinds], width=0.9)
    for kind, colour in colours.items():
        axes.bar([0], [0], color=colour, label=kind)
    axes.set_xlabel("operator (execution order)")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize=7, ncol=4, loc="upper right")
    return _png(figure)


def live_memory(live_bytes: list[int], arena_bytes: int | None) -> bytes:
    """Activation bytes alive while each operator runs, with the measured arena if there is one."""
    figure, axes = plt.subplots(figsize=(9, 3.2))
    axes.step(range(len(live_bytes)), [b / 1024 for b in live_bytes], where="mid", label="live activations")
    if arena_bytes:
        axes.axhline(arena_bytes / 1024, color="tab:red", linestyle="--", label="TFLite Micro arena (measured)")
    axes.set_xlabel("operator (execution order)")
    axes.set_ylabel("KiB")
    axes.set_title("Activation memory over the operator sequence")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    return _png(figure)


def confusion_matrix(confusion: list[list[int]], names: list[str], title: str) -> bytes:
    """Counts per true class (rows) and predicted class (columns), each cell coloured by its share of the row:
    a rare class's misses show as strongly as a common class's, whatever the counts."""
    counts = np.asarray(confusion, dtype=float)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = min(3 + 0.45 * len(names), 14)
    figure, axes = plt.subplots(figsize=(size + 1, size))
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    if len(names) <= 30:  # beyond that the numbers no longer fit their cells
        for (t, p), n in np.ndenumerate(counts):
            axes.text(p, t, f"{n:.0f}", ha="center", va="center", fontsize=7,
                      color="white" if shares[t, p] > 0.5 else "black")
    axes.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    axes.set_yticks(range(len(names)), names, fontsize=7)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes, label="share of the true class")
    return _png(figure)
