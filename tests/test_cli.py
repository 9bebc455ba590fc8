"""Exit codes CI can trust: bad input is one clear line and exit 2 with nothing written, an internal error exit 3
with its traceback in a log; every JSON edgecc prints is strict."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import edgecc, edgecc_command, needs_train_extra
from edgecc.emit import dumps, write_json

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
    needs_train_extra()
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


def strict_json(text: str) -> object:
    """Parse as a strict JSON reader would: NaN, Infinity and -Infinity are errors."""
    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_internal_errors_exit_3_with_one_line_and_the_traceback_in_a_log(tmp_path: Path) -> None:
    """A real failure edgecc does not foresee (stdout on a full disk) is exit 3, never 1, the budget verdict."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    env = {**os.environ, "TMPDIR": str(tmp_path), "COLUMNS": "200"}
    for args in (["targets", "--json"], ["--debug", "targets"]):
        with open("/dev/full", "w") as full:
            result = subprocess.run([edgecc_command(), *args], stdout=full, stderr=subprocess.PIPE, text=True,
                                    env=env, timeout=120)
        assert result.returncode == 3, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("edgecc: internal error: OSError: [Errno 28] No space left on device; "
                               f"the traceback is in {tmp_path}/edgecc-internal-error-") and \
            last.endswith("; please report it"), result.stderr
        log = Path(last.split("the traceback is in ")[1].split(";")[0])
        assert "Traceback (most recent call last)" in log.read_text() and "No space left" in log.read_text()
        debug = "--debug" in args
        assert ("Traceback (most recent call last)" in result.stderr) == debug, result.stderr
        assert debug or len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_closed_output_pipe_is_not_a_budget_verdict() -> None:
    process = subprocess.Popen([edgecc_command(), "targets", "--json"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # the reader goes away before edgecc writes (`edgecc ... | head -c0`)
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 3, stderr
    assert stderr.strip() == "edgecc: error: standard output was closed before edgecc finished writing"


def test_usage_errors_still_exit_2_and_help_documents_the_exit_codes() -> None:
    assert edgecc("check").returncode == 2
    assert edgecc("--debug", "nosuch").returncode == 2
    assert "3 internal error" in edgecc("--help").stdout


def test_strict_json_replaces_non_finite_numbers_and_says_which(tmp_path: Path) -> None:
    data = {"limit": math.inf, "low": -math.inf, "rate": math.nan, "ok": 1.5,
            "rows": [{"value": math.nan}, [math.inf, 2.0]], "pair": (math.inf, 1)}
    expected = {"limit": None, "limit_nonfinite": "inf", "low": None, "low_nonfinite": "-inf", "rate": None,
                "rate_nonfinite": "nan", "ok": 1.5, "rows": [{"value": None, "value_nonfinite": "nan"}, [None, 2.0]],
                "pair": [None, 1]}
    assert strict_json(dumps(data)) == expected
    write_json(tmp_path / "m.json", data)
    assert strict_json((tmp_path / "m.json").read_text()) == expected


def test_check_json_is_strict_with_an_infinite_latency_limit() -> None:
    model = str(Path(__file__).parent / "fixtures" / "vit_float.tflite")
    result = edgecc("check", model, "--target", "rpi4", "--latency-ms", "inf", "--json")
    assert result.returncode == 0, result.stderr
    latency = next(b for b in strict_json(result.stdout)["budgets"] if b["name"] == "latency")
    assert latency["limit"] is None and latency["limit_nonfinite"] == "inf" and latency["ok"] is True
    assert latency["value"] > 0
    assert edgecc("check", model, "--target", "rpi4", "--latency-ms", "nan").returncode == 2
