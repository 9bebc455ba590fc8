"""Bad input gets one clear line and exit code 2, and nothing is written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import edgecc

RPI4 = Path(__file__).parents[1] / "targets" / "rpi4.toml"


def assert_clean_failure(result: subprocess.CompletedProcess[str], fragment: str, workdir: Path,
                         before: set[Path]) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("edgecc: error: ") and fragment in lines[0], lines[0]
    assert set(workdir.rglob("*")) == before, "a failed build wrote files"


def recipe(tmp_path: Path, text: str, name: str = "recipe.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("make_args", "fragment"),
    [
        (lambda d: ["--target", "rpi9"], "unknown target 'rpi9'; known targets: "),
        (lambda d: ["--target", "rpi4", "--recipe", str(d / "absent.toml")], "absent.toml does not exist"),
        (lambda d: ["--target", "rpi4", "--recipe", str(recipe(d, "[train\n"))], "is not valid TOML"),
        (lambda d: ["--target", "rpi4", "--recipe", str(recipe(d, "[train]\nepochs = 'ten'"))],
         "train.epochs: expected an integer, got 'ten'"),
        (lambda d: ["--target", "rpi4", "--recipe", str(recipe(d, "[model]\npath = 'gone.keras'"))],
         "gone.keras does not exist"),
        (lambda d: ["--target", "rpi4", "--out", str(recipe(d, "a file") / "out")], "cannot be created"),
        (lambda d: ["--target", "rpi4", "--out", "/proc/edgecc-out"], "cannot be written"),
        (lambda d: ["--target", str(recipe(d, "name = 1", "board.toml"))], "name: expected a string, got 1"),
    ],
    ids=["unknown-target", "missing-recipe", "malformed-recipe", "wrong-type", "missing-model",
         "out-under-a-file", "out-unwritable", "malformed-profile"],
)
def test_bad_input_fails_fast_and_writes_nothing(tmp_path: Path, make_args, fragment: str) -> None:
    args = make_args(tmp_path)
    before = set(tmp_path.rglob("*"))
    result = edgecc("build", *args, "--out", str(tmp_path / "out"), cwd=tmp_path) if "--out" not in args \
        else edgecc("build", *args, cwd=tmp_path)
    assert_clean_failure(result, fragment, tmp_path, before)


def test_a_file_that_is_not_a_keras_model(tmp_path: Path) -> None:
    (tmp_path / "model.keras").write_text("this is not a model")
    path = recipe(tmp_path, "[model]\npath = 'model.keras'")
    before = set(tmp_path.rglob("*"))
    result = edgecc("build", "--target", "rpi4", "--recipe", str(path), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert_clean_failure(result, "model.keras is not a Keras model edgecc can load", tmp_path, before)


def test_help_and_version() -> None:
    assert "--target" in edgecc("build", "--help").stdout
    version = edgecc("--version")
    assert version.returncode == 0 and version.stdout.startswith("edgecc ")


def test_targets_lists_profiles_without_tensorflow() -> None:
    result = edgecc("targets", "--json")
    assert result.returncode == 0 and '"rpi4"' in result.stdout
    code = ("import sys, edgecc.cli, edgecc.targets, edgecc.reader, edgecc.runtime, edgecc.evaluate, "
            "edgecc.report, edgecc.emit; edgecc.targets.all_targets(); "
            "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
