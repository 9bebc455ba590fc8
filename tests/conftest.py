"""Shared fixtures: the default build runs once per test session and its artifacts are shared."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest


TRAIN_EXTRA = ("tf_keras", "tensorflow_model_optimization", "sklearn", "PIL", "matplotlib")


def needs_train_extra() -> None:
    """Skip the calling test or fixture on the base install (no edgecc[train]), as CI's first job runs."""
    import importlib.util

    absent = [name for name in TRAIN_EXTRA if importlib.util.find_spec(name) is None]
    if absent:
        pytest.skip(f"needs the training extra ({', '.join(absent)} absent): pip install 'edgecc[train]'")


def pytest_sessionstart(session: pytest.Session) -> None:
    """CI's base-install job sets EDGECC_BASE_INSTALL: prove TensorFlow really is absent there."""
    if os.environ.get("EDGECC_BASE_INSTALL"):
        import importlib.util

        present = [name for name in ("tensorflow", "tf_keras") if importlib.util.find_spec(name)]
        assert not present, f"EDGECC_BASE_INSTALL is set but {present} can be imported"


@contextmanager
def killed_after(process: subprocess.Popen, seconds: float = 120) -> Iterator[None]:
    """Kill `process` if the block still runs after `seconds`: a read from its pipes then ends (EOF) and the test
    fails, instead of waiting for a line that never comes until CI's own time limit."""
    timer = threading.Timer(seconds, process.kill)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


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
    needs_train_extra()
    work = tmp_path_factory.mktemp("default-build")
    result = edgecc("build", "--target", "rpi4", "--json", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    out = work / "build" / "rpi4"
    return out, json.loads((out / "manifest.json").read_text()), result


TINY_RECIPE = """name = "tiny"
[model]
stem_filters = [8]
stem_strides = [2]
dim = 16
depth = 1
heads = 2
mlp_dim = 32
[data]
test_fraction = 0.5
[train]
epochs = 1
batch_size = 64
[compress]
calibration_samples = 32
"""  # the built-in digits data, a one-block model, one epoch: a whole build in seconds


FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """Small real TFLite models committed under tests/fixtures (scripts/make_fixtures.py made them):
    edgecc's transformer in int8 and float, and an int8 model with GELU. No TensorFlow needed."""
    return {name: FIXTURES / f"{name}.tflite" for name in ("vit_int8", "vit_float", "gelu_int8")}


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: pyproject's addopts run the tests in two workers
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Hand the workers whole files, so each module fixture is made once, and the files that read the default
    build to one worker as one unit, so the build (minutes) runs once."""
    from xdist.scheduler import LoadScopeScheduling

    class OneDefaultBuild(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::")[0]
            return "default build" if _reads_default_build(config.rootpath / path) else path

    return OneDefaultBuild(config, log)


@functools.cache
def _reads_default_build(file: Path) -> bool:
    return file.is_file() and "default_build" in file.read_text(encoding="utf-8")
