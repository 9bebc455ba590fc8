"""Wall time of `edgecc check` and `edgecc profile` on a 5 MB int8 model, as a user runs them.

Each command is a fresh process (interpreter start-up, imports, TFLite Micro arena
measurement and all), timed several times; the table goes to BENCHMARKS.md.

    python scripts/bench_check.py
"""

from __future__ import annotations

import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_estimator import ROOT, write_section  # noqa: E402
from bench_imbalance import host  # noqa: E402

MODEL = ROOT / "benchmarks" / "models" / "check" / "dense_5mb_int8.tflite"
RUNS = 5


def five_mb_model() -> Path:
    """An int8 multilayer perceptron of about 5 M parameters (random weights), built once."""
    if MODEL.exists():
        return MODEL
    from edgecc.train.convert import to_int8_tflite
    from edgecc.train.tf import keras as load_keras

    keras = load_keras()
    keras.utils.set_random_seed(0)
    inputs = keras.Input(batch_shape=(1, 256))
    x = inputs
    for width in (2048, 1536, 1024):
        x = keras.layers.Dense(width, activation="relu")(x)
    model = keras.Model(inputs, keras.layers.Dense(10)(x))
    calibration = np.random.default_rng(0).normal(size=(8, 256)).astype(np.float32)
    MODEL.parent.mkdir(parents=True, exist_ok=True)
    MODEL.write_bytes(to_int8_tflite(model, calibration, per_channel=False))
    return MODEL


def wall_times(args: list[str]) -> list[float]:
    exe = shutil.which("edgecc") or str(Path(sys.executable).with_name("edgecc"))
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run([exe, *args], capture_output=True, check=False)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    model = five_mb_model()
    rows = []
    for command in ("check", "profile"):
        for target in ("stm32h7", "rpi4"):
            times = wall_times([command, str(model), "--target", target])
            rows.append(f"| edgecc {command} --target {target} | {statistics.median(times):.2f} | {max(times):.2f} |")
    body = "\n".join([
        "## Check and profile wall time on a 5 MB model",
        "",
        f"`python scripts/bench_check.py`, {date.today().isoformat()}, on {host()}, Python "
        f"{platform.python_version()}. Model: "
        f"{model.stat().st_size / 1e6:.1f} MB int8 TFLite; each command is a fresh process, {RUNS} runs; the stm32h7 "
        "rows include the TFLite Micro arena measurement.",
        "",
        "| command | median wall time (s) | slowest (s) |",
        "|---|---|---|",
        *rows,
    ])
    print(body)
    write_section(ROOT / "BENCHMARKS.md", "bench_check", body)


if __name__ == "__main__":
    main()
