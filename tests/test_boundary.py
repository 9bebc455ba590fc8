"""The TensorFlow boundary: only `edgecc.train` may import TensorFlow.

The base install (`pip install edgecc`, no extras) reads, checks, profiles, runs
and verifies models on a board or a CI runner. These tests prove it in any
environment: each runs a fresh Python in which importing TensorFlow, tf_keras or
TF-MOT fails, as it does on a base install (CI also runs the whole suite in a
real base install, where tests that need TensorFlow skip).
"""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import edgecc

TENSORFLOW = ("tensorflow", "tf_keras", "tensorflow_model_optimization", "keras")

# Installed in the child before anything else: makes the TensorFlow packages unimportable.
BLOCKER = f"""
import importlib.abc, sys
class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {TENSORFLOW!r}:
            raise ImportError(f"{{name}} is blocked: this process stands for edgecc's base install")
        return None
sys.meta_path.insert(0, NoTensorFlow())
"""


def without_tensorflow(code: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", BLOCKER + code], capture_output=True, text=True,
                          timeout=timeout, env=env)


def base_modules() -> list[str]:
    """Every edgecc module outside the `edgecc.train` sub-package."""
    found = pkgutil.walk_packages(edgecc.__path__, prefix="edgecc.")
    return sorted(m.name for m in found if not m.name.startswith("edgecc.train"))


def test_every_module_outside_train_imports_without_tensorflow() -> None:
    modules = base_modules()
    assert "edgecc.check" in modules and "edgecc.cli" in modules and len(modules) > 20
    result = without_tensorflow(
        "import importlib, json\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {TENSORFLOW!r})))\n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout) == []


def test_the_train_subpackage_is_where_tensorflow_is_needed() -> None:
    result = without_tensorflow("import edgecc.train.layers")
    assert result.returncode != 0 and "blocked" in result.stderr


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return without_tensorflow(f"sys.argv = ['edgecc', *{list(args)!r}]\nfrom edgecc.cli import main\nmain()")


@pytest.mark.parametrize("target", ["rpi4", "stm32h7", "coral-usb"])
def test_check_and_profile_run_without_tensorflow(tiny_models: dict[str, Path], target: str) -> None:
    model = str(tiny_models["vit_int8"])
    check = cli("check", model, "--target", target, "--json")
    assert check.returncode in (0, 1), check.stderr[-3000:]
    assert json.loads(check.stdout)["target"] == target
    profile = cli("profile", model, "--target", target, "--json")
    assert profile.returncode == 0, profile.stderr[-3000:]
    assert len(json.loads(profile.stdout)["operators"]) > 0


def test_bench_and_shadow_run_without_tensorflow(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    import numpy as np

    model = str(tiny_models["vit_int8"])
    bench = cli("bench", model, "--runs", "3", "--warmup", "1", "--json")
    assert bench.returncode == 0, bench.stderr[-3000:]
    assert json.loads(bench.stdout)["p50_ms"] > 0
    data = tmp_path / "inputs.npy"
    np.save(data, np.random.default_rng(0).random((5, 8, 8, 1), dtype=np.float32))
    shadow = cli("shadow", "--baseline", model, "--candidate", str(tiny_models["vit_float"]), "--data", str(data),
                 "--log", str(tmp_path / "audit.jsonl"), "--max-disagreement", "1", "--json")
    assert shadow.returncode == 0, shadow.stderr[-3000:]
    assert len((tmp_path / "audit.jsonl").read_text().splitlines()) >= 5


def test_build_without_tensorflow_says_what_to_install(tmp_path: Path) -> None:
    result = cli("build", "--target", "rpi4", "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "edgecc[train]" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
