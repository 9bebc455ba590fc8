"""Shared fixtures: the default build runs once per test session and its artifacts are shared."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def edgecc_command() -> str:
    """The installed `edgecc` console script (beside this Python when its venv is not on PATH)."""
    return shutil.which("edgecc") or str(Path(sys.executable).with_name("edgecc"))


def edgecc(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `edgecc` as a user would, in a wide terminal so messages stay on one line."""
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([edgecc_command(), *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def default_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, subprocess.CompletedProcess[str]]:
    """`edgecc build --target rpi4` on the built-in default recipe, exactly as the README runs it."""
    work = tmp_path_factory.mktemp("default-build")
    result = edgecc("build", "--target", "rpi4", "--json", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    out = work / "build" / "rpi4"
    return out, json.loads((out / "manifest.json").read_text()), result


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small TFLite models made here: edgecc's transformer in int8 and float, and an int8 model with GELU."""
    import numpy as np

    from edgecc.train.convert import to_float_tflite, to_int8_tflite
    from edgecc.train.layers import keras
    from edgecc.train.teacher import inference_graph
    from edgecc.train.transformer import VitConfig, vision_transformer

    keras.utils.set_random_seed(0)
    folder = tmp_path_factory.mktemp("tiny-models")
    calibration = np.random.default_rng(0).random((16, 8, 8, 1), dtype=np.float32)
    config = VitConfig(stem_filters=(8,), stem_strides=(2,), dim=32, depth=1, heads=2, mlp_dim=64, dropout=0.0)
    vit = inference_graph(vision_transformer(config, (8, 8, 1), 10))
    inputs = keras.Input(batch_shape=(1, 8, 8, 1))
    x = keras.layers.Dense(16, activation="gelu")(keras.layers.Flatten()(inputs))
    gelu = keras.Model(inputs, keras.layers.Dense(10)(x))
    contents = {
        "vit_int8": to_int8_tflite(vit, calibration, per_channel=False),
        "vit_float": to_float_tflite(vit),
        "gelu_int8": to_int8_tflite(gelu, calibration, per_channel=False),
    }
    paths = {}
    for name, content in contents.items():
        paths[name] = folder / f"{name}.tflite"
        paths[name].write_bytes(content)
    return paths
