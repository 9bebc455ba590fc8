"""Shadow mode, the pilot: run a candidate model beside the baseline and log every disagreement.

Both models see every input; each comparison goes to an append-only JSON Lines
audit log as one complete record, written with a single `os.write` on an
O_APPEND file and fsynced, so a crash or a kill mid-run leaves only whole
records and a restart only ever adds to the log.
"""

from __future__ import annotations

import hashlib
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgecc.board.serve import AuditLog as BoardAuditLog
from edgecc.emit import dumps, sha256_file
from edgecc.errors import EdgeccError
from edgecc.progress import Reporter
from edgecc.runtime import Model

DEFAULT_LOG = Path("shadow-audit.jsonl")


class Interrupted(EdgeccError):
    """Ctrl-C or SIGTERM mid-run: unlike a build, the work done so far is kept (in the log), so say so."""

    exit_code = 130


@dataclass(frozen=True)
class Classifier:
    """A model as shadow mode sees it: one float example in, one float output vector out."""

    path: Path
    sha256: str
    input_shape: tuple[int | None, ...]
    classes: int
    predict: Callable[[np.ndarray], np.ndarray]


def _tflite(path: Path) -> Classifier:
    content = path.read_bytes()  # hashed as loaded, so the log names exactly the model that ran
    model = Model(content)
    shape = tuple(int(d) for d in model.input["shape"][1:])
    digest = hashlib.sha256(content).hexdigest()
    return Classifier(path, digest, shape, int(model.output["shape"][-1]), model.invoke)


def _keras(path: Path) -> Classifier:
    """A tf_keras `.keras` file in safe mode: nothing in the file can run code."""
    from edgecc.train.tf import keras

    try:
        tf_keras = keras()
    except EdgeccError:
        raise EdgeccError(f"{path}: running a .keras model needs TensorFlow: pip install 'edgecc[train]'") from None
    import edgecc.train.layers  # noqa: F401  (registers edgecc's layers for deserialisation)

    try:
        model = tf_keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as err:  # Keras raises many types for a file it cannot read
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise EdgeccError(f"{path} is not a Keras model edgecc can load: {reason}") from None

    def predict(x: np.ndarray) -> np.ndarray:
        return np.asarray(model(x[np.newaxis], training=False), dtype=np.float32)[0]

    return Classifier(path, sha256_file(path), tuple(model.input_shape[1:]), int(model.output_shape[-1]), predict)


def load_classifier(path: Path) -> Classifier:
    """A `.keras` file through tf_keras (TensorFlow imported only then), anything else as TFLite."""
    if not path.is_file():
        raise EdgeccError(f"model {path} does not exist")
    return _keras(path) if path.suffix == ".keras" else _tflite(path)


def load_inputs(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Float model inputs (N, *input_shape) from a .npy, or `x` and optional labels `y` from a .npz."""
    if not path.is_file():
        raise EdgeccError(f"data {path} does not exist")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            x, y = loaded, None
        else:
            with loaded:
                if "x" not in loaded.files:
                    raise EdgeccError(f"{path} has no array 'x' (found: {', '.join(loaded.files) or 'none'})")
                x, y = loaded["x"], loaded["y"] if "y" in loaded.files else None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        reason = str(err).split(". ")[0]  # numpy's advice to unpickle the file is not for edgecc users
        raise EdgeccError(f"{path} is not a .npy or .npz file numpy can read safely: {reason}") from None
    if x.ndim < 2 or len(x) == 0 or x.dtype.kind not in "iufc":
        raise EdgeccError(f"{path}: expected a numeric array of shape (N, *input_shape), got {x.dtype} {x.shape}")
    if y is not None and (y.shape != (len(x),) or y.dtype.kind not in "iu"):
        raise EdgeccError(f"{path}: labels 'y' must be {len(x)} integers, got {y.dtype} {y.shape}")
    _check_real_and_finite(path, x)
    return x.astype(np.float32), y


def _first(bad: np.ndarray) -> int | None:
    """Index of the first example with any element flagged in `bad` (shape (N, ...)), or None."""
    rows = bad.reshape(len(bad), -1).any(axis=1)
    return int(np.argmax(rows)) if rows.any() else None


def _check_real_and_finite(path: Path, x: np.ndarray) -> None:
    """Refuse inputs the models would be fed silently wrong: NaN or infinity (quantized to arbitrary
    int8 values), complex numbers (numpy would drop the imaginary part), values float32 cannot hold."""
    rule = "shadow compares finite real inputs only"
    if x.dtype.kind == "c":
        index = _first(x.imag != 0)
        where = f"x[{index}] holds a complex number" if index is not None else f"x is complex ({x.dtype})"
        raise EdgeccError(f"{path}: {where}; {rule}")
    for name, test in (("NaN", np.isnan), ("an infinity", np.isinf)):
        index = _first(test(x))
        if index is not None:
            raise EdgeccError(f"{path}: x[{index}] holds {name}; {rule}")
    index = _first(np.abs(x) > np.finfo(np.float32).max)
    if index is not None:
        raise EdgeccError(f"{path}: x[{index}] holds a value beyond float32's range (the models take float32); {rule}")


def _check_labels(path: Path, y: np.ndarray, classes: int) -> None:
    """A label no output can predict would silently count as a miss in both accuracies."""
    outside = np.flatnonzero((y < 0) | (y >= classes))
    if len(outside):
        raise EdgeccError(f"{path}: labels 'y' must be class indices 0..{classes - 1}; "
                          f"y[{outside[0]}] is {y[outside[0]]}")


def _check_fits(model: Classifier, role: str, x: np.ndarray) -> None:
    shape = x.shape[1:]
    if len(shape) != len(model.input_shape) or any(m not in (None, d) for m, d in zip(model.input_shape, shape)):
        raise EdgeccError(f"{role} {model.path} takes inputs of shape {model.input_shape}; the data's are {shape}")


@dataclass(frozen=True)
class Latencies:
    """Per-call wall time percentiles; the tail (p99) is what a line operator notices."""

    p50_ms: float
    p90_ms: float
    p99_ms: float

    @classmethod
    def of(cls, ms: list[float]) -> Latencies:
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(float(p50), float(p90), float(p99))


@dataclass(frozen=True)
class ShadowSummary:
    """What one shadow run found; `confusion[b][c]` counts inputs the baseline called b and the candidate c."""

    baseline: Path
    candidate: Path
    log: Path
    inputs: int
    disagreements: int
    confusion: list[list[int]]
    latency: dict[str, Latencies]
    accuracy: dict[str, float] | None
    max_disagreement: float

    @property
    def disagreement_rate(self) -> float:
        return self.disagreements / self.inputs

    @property
    def ok(self) -> bool:
        return self.disagreement_rate <= self.max_disagreement

    def per_class(self) -> dict[int, dict[str, float]]:
        """Disagreement by the baseline's predicted class, for the classes it predicted at all."""
        rows = {}
        for cls, row in enumerate(self.confusion):
            total = sum(row)
            if total:
                rows[cls] = {"inputs": total, "disagreements": total - row[cls], "rate": (total - row[cls]) / total}
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "baseline": str(self.baseline),
            "candidate": str(self.candidate),
            "log": str(self.log),
            "inputs": self.inputs,
            "disagreements": self.disagreements,
            "disagreement_rate": self.disagreement_rate,
            "max_disagreement": self.max_disagreement,
            "ok": self.ok,
            "per_class": {str(c): row for c, row in self.per_class().items()},
            "confusion": self.confusion,
            "latency_ms": {role: {"p50": lat.p50_ms, "p90": lat.p90_ms, "p99": lat.p99_ms}
                           for role, lat in self.latency.items()},
            "accuracy": self.accuracy,
        }


class AuditLog(BoardAuditLog):
    """The board service's append-only writer (one `os.write` of a whole record, then fsync; a torn last line
    kept and the next record started on a fresh line), with non-finite figures written as null."""

    def __init__(self, path: Path) -> None:
        try:
            super().__init__(path)
        except OSError as err:
            raise EdgeccError(f"audit log {path} cannot be opened for appending: {err.strerror}") from None

    def encode(self, record: dict[str, Any]) -> bytes:
        return dumps(record, separators=(",", ":")).encode()


def _timed(model: Classifier, x: np.ndarray) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    out = model.predict(x)
    return out.ravel(), (time.perf_counter() - start) * 1000


def shadow(baseline_path: Path, candidate_path: Path, data: Path, log: Path = DEFAULT_LOG,
           max_disagreement: float = 0.01, reporter: Reporter | None = None) -> ShadowSummary:
    """Run both models on every input, log each comparison, and summarise the disagreements.

    Everything is validated before the log is opened, so bad input adds nothing to it.
    Latency is the wall time of one call as the caller sees it (int8 quantize and
    dequantize included), one example at a time.
    """
    reporter = reporter or Reporter(quiet=True)
    x, y = load_inputs(data)
    baseline, candidate = load_classifier(baseline_path), load_classifier(candidate_path)
    _check_fits(baseline, "baseline", x)
    _check_fits(candidate, "candidate", x)
    if baseline.classes != candidate.classes:
        raise EdgeccError(f"the baseline has {baseline.classes} outputs and the candidate {candidate.classes}: "
                          "their classes cannot be compared")
    if y is not None:
        _check_labels(data, y, baseline.classes)

    confusion = np.zeros((baseline.classes, baseline.classes), dtype=np.int64)
    latency: dict[str, list[float]] = {"baseline": [], "candidate": []}
    predicted: dict[str, list[int]] = {"baseline": [], "candidate": []}
    audit = AuditLog(log)
    try:
        with reporter.task("shadow: baseline vs candidate", len(x)) as advance:
            for i, example in enumerate(x):
                record: dict[str, Any] = {"index": i, "input_sha256": hashlib.sha256(example.tobytes()).hexdigest(),
                                          "label": None if y is None else int(y[i])}
                for role, model in (("baseline", baseline), ("candidate", candidate)):
                    out, ms = _timed(model, example)
                    cls = int(np.argmax(out))
                    latency[role].append(ms)
                    predicted[role].append(cls)
                    record[role] = {"model_sha256": model.sha256, "output": out.tolist(), "class": cls,
                                    "latency_ms": ms}
                record["agree"] = record["baseline"]["class"] == record["candidate"]["class"]
                record["time"] = datetime.now(timezone.utc).isoformat(timespec="microseconds")
                audit.append(record)
                confusion[record["baseline"]["class"], record["candidate"]["class"]] += 1
                advance()
    finally:
        audit.close()

    accuracy = None if y is None else {role: float(np.mean(np.array(p) == y)) for role, p in predicted.items()}
    return ShadowSummary(
        baseline=baseline_path, candidate=candidate_path, log=log, inputs=len(x),
        disagreements=int(len(x) - np.trace(confusion)), confusion=confusion.tolist(),
        latency={role: Latencies.of(ms) for role, ms in latency.items()},
        accuracy=accuracy, max_disagreement=max_disagreement,
    )
