"""Latency estimator against published measurements.

Rebuilds the published reference models from their architectures (random
weights give the same ops, shapes and MACs), converts them to TFLite, estimates
them on the targets the measurements were taken on, and writes the comparison to
BENCHMARKS.md. Published figures: ../shared/DESIGN.md, "Verified facts".

    python scripts/bench_estimator.py            # models are cached in benchmarks/models/estimator
"""

from __future__ import annotations

import argparse
import platform
import statistics
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from edgecc.check import assess

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / "models" / "estimator"

# (model, precision, target, published ms, where it was published)
PUBLISHED = [
    ("mobilenet_v1", "int8", "rpi4", 24.0, "XNNPACK on Raspberry Pi 4, 4 threads"),
    ("mobilenet_v2", "int8", "rpi4", 17.0, "XNNPACK on Raspberry Pi 4, 4 threads"),
    ("mobilenet_v1", "fp32", "rpi4", 77.0, "XNNPACK on Raspberry Pi 4, 4 threads"),
    ("mobilenet_v2", "fp32", "rpi4", 46.0, "XNNPACK on Raspberry Pi 4, 4 threads"),
    ("mobilenet_v1", "int8", "coral-usb", 2.4, "Coral USB Accelerator, USB 3"),
    ("mobilenet_v2", "int8", "coral-usb", 2.6, "Coral USB Accelerator, USB 3"),
    ("ds_cnn_kws", "int8", "stm32l4r5", 181.9, "MLPerf Tiny v0.5 reference, TFLM, STM32L4R5 (Cortex-M4, 120 MHz)"),
    ("resnet8_ic", "int8", "stm32l4r5", 704.2, "MLPerf Tiny v0.5 reference, TFLM, STM32L4R5 (Cortex-M4, 120 MHz)"),
]


def _mobilenet_v1(keras: Any) -> Any:
    return keras.applications.MobileNet(weights=None, input_shape=(224, 224, 3))


def _mobilenet_v2(keras: Any) -> Any:
    return keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3))


def _ds_cnn_kws(keras: Any) -> Any:
    """MLPerf Tiny keyword spotting DS-CNN: 49x10 MFCC input, 64 filters, 4 depthwise-separable blocks."""
    layers = keras.layers
    inputs = keras.Input((49, 10, 1))
    x = layers.Conv2D(64, (10, 4), strides=(2, 2), padding="same", use_bias=False)(inputs)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    for _ in range(4):
        x = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
        x = layers.ReLU()(layers.BatchNormalization()(x))
        x = layers.Conv2D(64, 1, use_bias=False)(x)
        x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.AveragePooling2D(pool_size=(x.shape[1], x.shape[2]))(x)
    return keras.Model(inputs, layers.Dense(12, activation="softmax")(layers.Flatten()(x)))


def _resnet8_ic(keras: Any) -> Any:
    """MLPerf Tiny image classification ResNet-8: 32x32x3 input, three residual stacks of 16/32/64 filters."""
    layers = keras.layers
    inputs = keras.Input((32, 32, 3))
    x = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(16, 3, padding="same")(inputs)))
    for filters, stride in ((16, 1), (32, 2), (64, 2)):
        y = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(filters, 3, stride, padding="same")(x)))
        y = layers.BatchNormalization()(layers.Conv2D(filters, 3, padding="same")(y))
        shortcut = x if stride == 1 else layers.Conv2D(filters, 1, stride)(x)
        x = layers.ReLU()(layers.Add()([shortcut, y]))
    x = layers.AveragePooling2D(pool_size=x.shape[1])(x)
    return keras.Model(inputs, layers.Dense(10, activation="softmax")(layers.Flatten()(x)))


BUILDERS: dict[str, Callable[[Any], Any]] = {
    "mobilenet_v1": _mobilenet_v1, "mobilenet_v2": _mobilenet_v2,
    "ds_cnn_kws": _ds_cnn_kws, "resnet8_ic": _resnet8_ic,
}


def model_file(name: str, precision: str) -> Path:
    """The converted model, built on first use (batch 1, random weights, random calibration data)."""
    path = CACHE / f"{name}_{precision}.tflite"
    if path.exists():
        return path
    from edgecc.train.convert import to_float_tflite, to_int8_tflite
    from edgecc.train.teacher import inference_graph
    from edgecc.train.tf import keras as load_keras

    keras = load_keras()
    keras.utils.set_random_seed(0)
    model = BUILDERS[name](keras)
    batch_one = inference_graph(model)
    calibration = np.random.default_rng(0).uniform(-1, 1, (8, *model.input_shape[1:])).astype(np.float32)
    content = to_int8_tflite(batch_one, calibration, per_channel=True) if precision == "int8" else to_float_tflite(batch_one)
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def run() -> list[dict[str, Any]]:
    rows = []
    for name, precision, target, published, where in PUBLISHED:
        path = model_file(name, precision)
        result = assess(path.read_bytes(), target, measure_arena=False)
        estimate = result.latency.total_ms
        rows.append({
            "model": name, "precision": precision, "target": target, "macs_m": result.total_macs / 1e6,
            "published_ms": published, "estimate_ms": estimate, "error": (estimate - published) / published,
            "where": where,
        })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | precision | target | MMACs | published (ms) | estimate (ms) | error | published on |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['precision']} | {r['target']} | {r['macs_m']:.1f} | {r['published_ms']:.1f} | "
                     f"{r['estimate_ms']:.1f} | {r['error']:+.0%} | {r['where']} |")
    median = statistics.median(abs(r["error"]) for r in rows)
    worst = max(abs(r["error"]) for r in rows)
    lines += ["", f"Median absolute error {median:.0%}, worst {worst:.0%} over {len(rows)} published figures."]
    return "\n".join(lines)


def write_section(path: Path, name: str, body: str) -> None:
    """Replace this script's section of BENCHMARKS.md, keeping the other scripts' sections."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEach section is regenerated by the script it names.\n"
    section = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    rows = run()
    body = "\n".join([
        "## Latency estimator against published measurements",
        "",
        f"`python scripts/bench_estimator.py`, {date.today().isoformat()}, on {platform.machine()} "
        f"({platform.processor() or platform.system()}). The models are rebuilt from their architectures with random "
        "weights (same ops, shapes and MACs as the published ones) and estimated with the target profiles in "
        "`targets/`. The profiles' rates were calibrated on these same figures, so this shows how well one "
        "per-operator model with a handful of rates per target fits them; it is not an out-of-sample test.",
        "",
        table(rows),
    ])
    print(body)
    write_section(args.out, "bench_estimator", body)


if __name__ == "__main__":
    main()
