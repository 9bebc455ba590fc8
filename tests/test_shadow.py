"""Shadow mode on real models: the disagreement rate is right, the audit log survives a kill, bad input exits 2."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import edgecc, edgecc_command, needs_train_extra
from edgecc.errors import EdgeccError
from edgecc.shadow import AuditLog, load_inputs, shadow

RECORD_KEYS = {"index", "input_sha256", "label", "baseline", "candidate", "agree", "time"}
MODEL_KEYS = {"model_sha256", "output", "class", "latency_ms"}


def digits(manifest: dict, count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """load_digits as the build's manifest says to feed the float model: x = images * scale + offset."""
    from sklearn.datasets import load_digits

    pre = manifest["preprocessing"]
    data = load_digits()
    x = (data.images[:count].astype(np.float32) * pre["scale"] + pre["offset"])[..., np.newaxis]
    return x.astype(np.float32), data.target[:count]


def classes_by_hand(path: Path, x: np.ndarray) -> np.ndarray:
    """Argmax per input straight from the interpreter, quantizing by the tensor's own parameters (not edgecc's code)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    scale, zero_point = inp["quantization"]
    found = []
    for example in x:
        fed = np.clip(np.round(example / scale) + zero_point, -128, 127) if scale else example
        interpreter.set_tensor(inp["index"], fed[np.newaxis].astype(inp["dtype"]))
        interpreter.invoke()
        found.append(int(np.argmax(interpreter.get_tensor(out["index"])[0])))
    return np.array(found)


def records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_int8_against_float_gives_the_true_disagreement_rate(default_build, tmp_path: Path) -> None:
    out, manifest, _ = default_build
    x, y = digits(manifest)
    np.savez(tmp_path / "digits.npz", x=x, y=y)
    float_classes = classes_by_hand(out / "float.tflite", x)
    int8_classes = classes_by_hand(out / "model.tflite", x)
    expected_rate = float(np.mean(float_classes != int8_classes))

    log = tmp_path / "audit.jsonl"
    result = edgecc("shadow", "--baseline", str(out / "float.tflite"), "--candidate", str(out / "model.tflite"),
                    "--data", str(tmp_path / "digits.npz"), "--log", str(log), "--json",
                    "--max-disagreement", str(expected_rate))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["inputs"] == len(x)
    assert summary["disagreements"] == int(np.sum(float_classes != int8_classes))
    assert summary["disagreement_rate"] == pytest.approx(expected_rate)
    assert summary["accuracy"]["baseline"] == pytest.approx(np.mean(float_classes == y))
    assert summary["accuracy"]["candidate"] == pytest.approx(np.mean(int8_classes == y))
    confusion = np.zeros((10, 10), dtype=int)
    np.add.at(confusion, (float_classes, int8_classes), 1)
    assert summary["confusion"] == confusion.tolist()
    for cls, row in summary["per_class"].items():
        mine = float_classes == int(cls)
        assert row["inputs"] == mine.sum() and row["disagreements"] == (int8_classes[mine] != int(cls)).sum()
    assert set(summary["latency_ms"]) == {"baseline", "candidate"}
    for lat in summary["latency_ms"].values():
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]

    logged = records(log)
    assert [r["index"] for r in logged] == list(range(len(x)))
    for r, example, b, c in zip(logged, x, float_classes, int8_classes):
        assert set(r) == RECORD_KEYS and set(r["baseline"]) == set(r["candidate"]) == MODEL_KEYS
        assert r["input_sha256"] == hashlib.sha256(example.tobytes()).hexdigest()
        assert (r["baseline"]["class"], r["candidate"]["class"], r["agree"]) == (b, c, b == c)
        assert len(r["baseline"]["output"]) == 10 and int(np.argmax(r["candidate"]["output"])) == c
    assert logged[0]["baseline"]["model_sha256"] == manifest["artifacts"]["float.tflite"]["sha256"]
    assert logged[0]["candidate"]["model_sha256"] == manifest["artifacts"]["model.tflite"]["sha256"]


def test_a_different_model_disagrees_and_exits_1(default_build, tiny_models, tmp_path: Path) -> None:
    out, manifest, _ = default_build
    x, _ = digits(manifest, 200)
    np.save(tmp_path / "x.npy", x)
    result = edgecc("shadow", "--baseline", str(out / "model.tflite"), "--candidate", str(tiny_models["vit_int8"]),
                    "--data", str(tmp_path / "x.npy"), "--log", str(tmp_path / "audit.jsonl"),
                    "--max-disagreement", "0.05", "--quiet")
    assert result.returncode == 1, result.stderr
    rate = 1 - np.mean(classes_by_hand(out / "model.tflite", x) == classes_by_hand(tiny_models["vit_int8"], x))
    assert rate > 0.5
    assert f"200 inputs, {round(rate * 200)} disagreements: rate {rate:.2%}, ABOVE the limit 5.00%" in result.stdout
    assert "confusion" in result.stdout and "p99 ms" in result.stdout


def test_a_killed_run_leaves_whole_records_and_a_restart_appends(default_build, tmp_path: Path) -> None:
    out, manifest, _ = default_build
    x, _ = digits(manifest, 500)
    np.save(tmp_path / "x.npy", x)
    log = tmp_path / "audit.jsonl"
    args = [edgecc_command(), "shadow", "--baseline", str(out / "float.tflite"), "--candidate",
            str(out / "model.tflite"), "--data", str(tmp_path / "x.npy"), "--log", str(log), "--quiet",
            "--max-disagreement", "1"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while (not log.exists() or log.read_bytes().count(b"\n") < 20) and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    before = log.read_bytes()
    first = records(log)
    assert 20 <= len(first) < len(x), "the run was not killed mid-way"
    assert before.endswith(b"\n") and [r["index"] for r in first] == list(range(len(first)))
    assert all(set(r) == RECORD_KEYS for r in first)

    assert subprocess.run(args, timeout=120).returncode == 0
    after = log.read_bytes()
    assert after.startswith(before)
    second = records(log)[len(first):]
    assert [r["index"] for r in second] == list(range(len(x)))
    assert all(set(r) == RECORD_KEYS for r in second)


def test_a_torn_last_line_is_kept_and_new_records_start_on_a_new_line(default_build, tmp_path: Path) -> None:
    out, manifest, _ = default_build
    x, y = digits(manifest, 5)
    np.savez(tmp_path / "digits.npz", x=x, y=y)
    log = tmp_path / "audit.jsonl"
    log.write_bytes(b'{"index": 0}\n{"index": 1, "inp')
    summary = shadow(out / "float.tflite", out / "model.tflite", tmp_path / "digits.npz", log)
    lines = log.read_text().splitlines()
    assert lines[:2] == ['{"index": 0}', '{"index": 1, "inp']
    assert [json.loads(line)["label"] for line in lines[2:]] == y.tolist()
    assert summary.inputs == 5 and summary.accuracy is not None


def keras_digits_model(tmp_path: Path, lambda_layer: bool = False) -> tuple[Path, bytes]:
    """A small tf_keras classifier for 8x8x1 inputs saved as .keras, and its float TFLite conversion."""
    from edgecc.train.convert import to_float_tflite
    from edgecc.train.tf import keras

    tf_keras = keras()
    tf_keras.utils.set_random_seed(0)
    inputs = tf_keras.Input(batch_shape=(1, 8, 8, 1))
    x = tf_keras.layers.Flatten()(inputs)
    if lambda_layer:
        x = tf_keras.layers.Lambda(lambda t: t * 2.0)(x)
    model = tf_keras.Model(inputs, tf_keras.layers.Dense(10)(tf_keras.layers.Dense(32, activation="relu")(x)))
    path = tmp_path / "model.keras"
    model.save(path)
    return path, to_float_tflite(model)


def test_a_keras_baseline_agrees_with_its_own_tflite_conversion(default_build, tmp_path: Path) -> None:
    x, y = digits(default_build[1], 100)
    np.savez(tmp_path / "digits.npz", x=x, y=y)
    path, tflite = keras_digits_model(tmp_path)
    (tmp_path / "model.tflite").write_bytes(tflite)
    log = tmp_path / "audit.jsonl"
    summary = shadow(path, tmp_path / "model.tflite", tmp_path / "digits.npz", log, max_disagreement=0.0)
    assert summary.ok and summary.disagreements == 0 and summary.inputs == 100
    for r in records(log):
        np.testing.assert_allclose(r["baseline"]["output"], r["candidate"]["output"], rtol=1e-4, atol=1e-5)


def test_a_keras_model_with_code_in_it_is_refused(tmp_path: Path) -> None:
    needs_train_extra()
    path, tflite = keras_digits_model(tmp_path, lambda_layer=True)
    (tmp_path / "model.tflite").write_bytes(tflite)
    np.save(tmp_path / "x.npy", np.zeros((2, 8, 8, 1), np.float32))
    with pytest.raises(EdgeccError, match="is not a Keras model edgecc can load"):
        shadow(path, tmp_path / "model.tflite", tmp_path / "x.npy", tmp_path / "audit.jsonl")
    assert not (tmp_path / "audit.jsonl").exists()


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        (lambda d, m: {"--data": d / "absent.npy"}, "absent.npy does not exist"),
        (lambda d, m: {"--candidate": d / "absent.tflite"}, "absent.tflite does not exist"),
        (lambda d, m: {"--data": save(d / "small.npy", np.zeros((3, 4, 4, 1), np.float32))},
         "takes inputs of shape (8, 8, 1); the data's are (4, 4, 1)"),
        (lambda d, m: {"--candidate": write(d / "notes.tflite", b"not a model at all")}, "not a TFLite model"),
        (lambda d, m: {"--data": write(d / "x.npy", b"not numpy")}, "is not a .npy or .npz file"),
        (lambda d, m: {"--data": savez(d / "d.npz", images=np.zeros((3, 8, 8, 1)))}, "has no array 'x' (found: images)"),
        (lambda d, m: {"--data": savez(d / "d.npz", x=np.zeros((3, 8, 8, 1)), y=np.zeros(2, int))},
         "labels 'y' must be 3 integers"),
        (lambda d, m: {"--data": savez(d / "d.npz", x=np.zeros((3, 8, 8, 1)), y=np.zeros(3))},
         "labels 'y' must be 3 integers, got float64 (3,)"),
        (lambda d, m: {"--data": savez(d / "d.npz", x=np.zeros((3, 8, 8, 1)), y=np.array([0, 9, 10]))},
         "d.npz: labels 'y' must be class indices 0..9; y[2] is 10"),
        (lambda d, m: {"--data": save(d / "x.npy", with_value(2, np.nan))},
         "x.npy: x[2] holds NaN; shadow compares finite real inputs only"),
        (lambda d, m: {"--data": save(d / "x.npy", with_value(1, 1j).astype(np.complex64))},
         "x.npy: x[1] holds a complex number; shadow compares finite real inputs only"),
        (lambda d, m: {"--data": save(d / "x.npy", np.full((3, 8, 8, 1), "a"))},
         "expected a numeric array of shape (N, *input_shape), got <U1 (3, 8, 8, 1)"),
        (lambda d, m: {"--data": save(d / "x.npy", np.empty((3, 8, 8, 1), dtype=object))},
         "Object arrays cannot be loaded when allow_pickle=False"),
    ],
    ids=["missing-data", "missing-model", "wrong-input-shape", "not-a-model", "not-numpy", "npz-without-x",
         "wrong-labels", "float-labels", "label-out-of-range", "nan-input", "complex-input", "text-input",
         "object-input"],
)
def test_bad_input_exits_2_and_logs_nothing(default_build, tmp_path: Path, setup, fragment: str) -> None:
    out, _, _ = default_build
    args = {"--baseline": out / "float.tflite", "--candidate": out / "model.tflite",
            "--data": save(tmp_path / "ok.npy", np.zeros((3, 8, 8, 1), np.float32))}
    args.update(setup(tmp_path, out))
    result = edgecc("shadow", *(str(a) for pair in args.items() for a in pair), "--log", str(tmp_path / "audit.jsonl"))
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgecc: error: ") and fragment in lines[0], result.stderr
    assert not (tmp_path / "audit.jsonl").exists()


def with_value(index: int, value: complex) -> np.ndarray:
    """Three zero 8x8x1 inputs, one element of example `index` set to `value`."""
    x = np.zeros((3, 8, 8, 1), dtype=complex if isinstance(value, complex) else np.float64)
    x[index, 4, 5, 0] = value
    return x


@pytest.mark.parametrize(
    ("x", "fragment"),
    [
        (with_value(2, np.inf), "x[2] holds an infinity"),
        (with_value(0, -np.inf), "x[0] holds an infinity"),
        (with_value(1, 1e300), "x[1] holds a value beyond float32's range"),
        (np.zeros((3, 8, 8, 1), np.complex128), "x is complex (complex128)"),
        (np.zeros((3, 8, 8, 1), bool), "expected a numeric array"),
        (np.zeros((3, 8, 8, 1), "m8[s]"), "expected a numeric array"),
    ],
    ids=["inf", "minus-inf", "beyond-float32", "complex-without-imaginary-part", "bool", "timedelta"],
)
def test_inputs_must_be_finite_real_numbers(tmp_path: Path, x: np.ndarray, fragment: str) -> None:
    with pytest.raises(EdgeccError, match=r"^" + re.escape(f"{tmp_path / 'x.npy'}: ")) as err:
        load_inputs(save(tmp_path / "x.npy", x))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_finite_integer_inputs_and_labels_are_taken(tmp_path: Path) -> None:
    x, y = load_inputs(savez(tmp_path / "d.npz", x=np.arange(128, dtype=np.int16).reshape(2, 8, 8, 1),
                             y=np.array([3, 4], np.uint8)))
    assert x.dtype == np.float32 and x[1, 7, 7, 0] == 127 and y.tolist() == [3, 4]


def test_audit_log_lines_are_strict_json_even_for_a_non_finite_output(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append({"index": 0, "baseline": {"output": [0.5, float("nan"), float("inf")], "latency_ms": float("inf")}})
    log.close()
    (line,) = (tmp_path / "audit.jsonl").read_text().splitlines()
    record = json.loads(line, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert record["baseline"] == {"output": [0.5, None, None], "latency_ms": None, "latency_ms_nonfinite": "inf"}


def save(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


def savez(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def test_tflite_models_need_no_tensorflow_and_keras_ones_say_what_to_install(default_build, tmp_path: Path) -> None:
    out, manifest, _ = default_build
    np.save(tmp_path / "x.npy", digits(manifest, 3)[0])
    (tmp_path / "model.keras").write_bytes(b"never read")
    script = f"""
import sys
sys.modules["tensorflow"] = None  # as on a board: importing TensorFlow fails
from pathlib import Path
from edgecc.errors import EdgeccError
from edgecc.shadow import shadow
d = Path({str(tmp_path)!r})
print(shadow(Path({str(out / "float.tflite")!r}), Path({str(out / "model.tflite")!r}), d / "x.npy", d / "a.jsonl").inputs)
try:
    shadow(d / "model.keras", Path({str(out / "model.tflite")!r}), d / "x.npy", d / "b.jsonl")
except EdgeccError as err:
    print(err)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["3", f"{tmp_path / 'model.keras'}: running a .keras model needs TensorFlow: "
                                               "pip install 'edgecc[train]'"]
