"""The board service: answer raw inputs as the line produces them, and roll a candidate model out in stages.

    python serve.py --rollout rollout.toml [--watch DIR] [--stdin] [--http PORT [--bind ADDR --allow-remote]] [--once]
                    [--fsync every|interval SECONDS]
    python serve.py --rollout rollout.toml promote|rollback|status

Inputs: image files, .npy arrays and .txt texts dropped into a watched folder (each processed once, in name
order; write them elsewhere and rename them in), lines on standard input (a file path, or for a text model
the text itself), or POSTs to a local HTTP endpoint (text/plain, application/x-npy or image/*). Each input
gets the manifest's preprocessing (preprocess.py), one JSON answer on stdout (or in the HTTP reply), and one
record in the append-only audit log (`--fsync`: when it reaches the disk, see AuditLog). A record's `agree` is
null unless both models answered without error, as the gates count comparisons.

Models: this bundle, an earlier bundle, a .tflite file, or a tf_keras .keras file (loaded in safe mode, on a machine
with TensorFlow and tf_keras); a file takes the bundle's preprocessing and class names.

Stages (rollout.toml's gates, see gates.py): shadow (the baseline answers, the candidate runs on the same
input), canary (the candidate answers `canary_share` of the inputs, chosen by a hash of the record id; both
run), full (the candidate answers, the baseline stays installed), baseline (rolled back: the baseline alone).
The gates promote shadow -> canary -> full and roll back to baseline on their own (`automatic = true`), or by
command; each decision is a log record with its evidence. The active stage lives in a small JSON file
replaced atomically (write, fsync, rename) after its decision is logged, so a kill at any moment leaves one
active stage, and a restart finishes a switch whose decision the log holds.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

try:
    from . import gates as gating
    from .preprocess import BadInput, Preprocessor, dequantize, quantize
    from .run import interpreter, model_runner
except ImportError:  # run from the bundle folder as a script
    import gates as gating
    from preprocess import BadInput, Preprocessor, dequantize, quantize
    from run import interpreter, model_runner

STAGES = ("baseline", "shadow", "canary", "full")  # promote moves one step right, rollback goes to "baseline"
MAX_HTTP_BYTES = 64 << 20
ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)  # strict JSON, built once
HTTP_KINDS = {"text/plain": ".txt", "application/x-npy": ".npy", "image/png": ".png", "image/jpeg": ".jpg",
              "image/bmp": ".bmp"}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ends_mid_line(fd: int) -> bool:
    """True when the file's last line lacks its newline (a torn write from an older crash or a power cut)."""
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


class AuditLog:
    """Append-only JSON Lines: each record one `os.write` of a whole line on an O_APPEND file.

    A record is never split across writes, so a killed process leaves whole records only, and several
    processes (the service, a promote command) can append to one log. A torn last line is kept as it is;
    the next record starts on a fresh line after it.

    Once `os.write` returns, the record is the kernel's: kill -9 or a crash of the service never loses it. Only
    a power cut (or a kernel crash) loses what is not yet fsynced, so `fsync_interval_s` chooses: 0 (the
    default) fsyncs every record before the service answers, and a power cut loses nothing answered, at the
    cost of one disk flush per input; N > 0 fsyncs at most every N seconds and on `sync()`, and a power cut
    loses at most the last N seconds of records. A `durable` record (a decision) is always fsynced at once.
    """

    def __init__(self, path: Path, *, fsync_interval_s: float = 0.0) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)  # read: its last byte
        self.prefix = b"\n" if _ends_mid_line(self.fd) else b""
        self.fsync_interval_s = fsync_interval_s
        self.synced = time.monotonic()
        self.unsynced = False

    def encode(self, record: dict[str, Any]) -> bytes:
        """Strict JSON on one line (ValueError for NaN or infinity; edgecc.shadow writes them as null)."""
        return ENCODER.encode(record).encode()

    def append(self, record: dict[str, Any], *, durable: bool = False) -> None:
        """Write `record` whole (OSError on a full disk), fsynced as `fsync_interval_s` says."""
        line = self.prefix + self.encode(record) + b"\n"
        if os.write(self.fd, line) != len(line):
            raise OSError(f"audit log {self.path}: short write (disk full?)")
        self.prefix, self.unsynced = b"", True
        if durable or time.monotonic() - self.synced >= self.fsync_interval_s:
            self.sync()

    def sync(self) -> None:
        """fsync what is written but not yet on the disk."""
        if self.unsynced:
            os.fsync(self.fd)
            self.unsynced, self.synced = False, time.monotonic()

    def close(self) -> None:
        self.sync()
        os.close(self.fd)


def read_log(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """The log's whole records, and the numbers of its lines that are not one (left in the file as they are)."""
    records, bad = [], []
    if not path.exists():
        return records, bad
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict) and "kind" in record:
                records.append(record)
            elif line.strip():
                bad.append(number)
    return records, bad


@dataclass(frozen=True)
class Model:
    """One model as the service runs it: its own preprocessing and quantization, class names shared by both."""

    path: Path
    sha256: str
    labels: list[str]
    prepare: Preprocessor
    run: Callable[[np.ndarray], np.ndarray]  # quantized input -> quantized output (float: scale 0)
    input_quantization: tuple[float, int, Any, list[int]]  # scale, zero point, dtype, shape
    output_quantization: tuple[float, int]

    def answer(self, x: np.ndarray) -> tuple[int, float]:
        """The predicted class and the model's wall time in ms (quantize, invoke, dequantize)."""
        start = time.perf_counter()
        scale, zero, dtype, shape = self.input_quantization
        q = self.run(quantize(x, scale, zero, dtype).reshape(shape))
        cls = int(np.argmax(dequantize(q.reshape(-1), *self.output_quantization)))
        return cls, (time.perf_counter() - start) * 1000


def bundle_model(folder: Path) -> Model:
    """An edgecc bundle folder: model.tflite (or its Edge TPU pipeline) with its manifest's preprocessing."""
    pre = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))["preprocessing"]
    into, out = pre["input_quantization"], pre["output_quantization"]
    return Model(folder, sha256_file(folder / "model.tflite"), list(pre["label_names"]), Preprocessor(pre),
                 model_runner(folder), (into["scale"], into["zero_point"], np.dtype(pre["input_dtype"]),
                                        pre["model_input_shape"]), (out["scale"], out["zero_point"]))


def check_fits(path: Path, input_shape: list[int | None], outputs: int, bundle: Model) -> None:
    """A model fed the bundle's preprocessing must take as many values as the bundle's and give one per class."""
    if None not in input_shape and int(np.prod(input_shape)) != int(np.prod(bundle.input_quantization[3])):
        raise gating.RolloutError(f"{path} takes inputs of shape {input_shape}; "
                                  f"{bundle.path} takes {bundle.input_quantization[3]}")
    if outputs != len(bundle.labels):
        raise gating.RolloutError(f"{path} has {outputs} outputs; {bundle.path} has "
                                  f"{len(bundle.labels)} classes ({', '.join(bundle.labels)})")


def tflite_model(path: Path, bundle: Model) -> Model:
    """A plain .tflite file: its quantization read from the model, the bundle's preprocessing and class names."""
    model = interpreter(path, threads=1)
    source, sink = model.get_input_details()[0], model.get_output_details()[0]
    check_fits(path, [int(d) for d in source["shape"]], int(sink["shape"][-1]), bundle)

    def run(q: np.ndarray) -> np.ndarray:
        model.set_tensor(source["index"], q)
        model.invoke()
        return model.get_tensor(sink["index"])

    in_scale, in_zero = source["quantization"]
    return Model(path, sha256_file(path), bundle.labels, bundle.prepare, run,
                 (in_scale, in_zero, source["dtype"], [int(d) for d in source["shape"]]), sink["quantization"])


def keras_model(path: Path, bundle: Model) -> Model:
    """A tf_keras .keras file (a baseline the plant already has, on a machine that has TensorFlow): loaded in safe
    mode, so nothing in the file can run code, and fed the bundle's preprocessing in float."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tf_keras (Keras 2), as edgecc builds with
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
        import tf_keras
    except ImportError:
        raise gating.RolloutError(f"{path}: a .keras model needs TensorFlow and tf_keras, which this machine lacks "
                                  "(pip install tensorflow tf-keras); give its int8 .tflite or edgecc bundle "
                                  "instead") from None
    with contextlib.suppress(ImportError):  # edgecc's own layers, where edgecc is installed beside the bundle
        import edgecc.train.layers  # noqa: F401
    try:
        model = tf_keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as err:  # Keras raises many types for a file it cannot read
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise gating.RolloutError(f"{path} is not a Keras model this service can load in safe mode: {reason}") from None
    takes = [1, *model.input_shape[1:]]
    check_fits(path, takes, int(model.output_shape[-1]), bundle)

    def run(x: np.ndarray) -> np.ndarray:
        try:
            return np.asarray(model(x, training=False))
        except tf.errors.OpError as err:  # as the interpreter's RuntimeError: this input refused, the service goes on
            raise RuntimeError(err.message) from None

    shape = takes if None not in takes else bundle.input_quantization[3]
    return Model(path, sha256_file(path), bundle.labels, bundle.prepare, run,
                 (0.0, 0, np.dtype(model.inputs[0].dtype.as_numpy_dtype), shape), (0.0, 0))


def check_paths(rollout: gating.RolloutConfig) -> None:
    """Each model an edgecc bundle folder, a .tflite or a .keras file, named by its field."""
    for role, path in (("baseline", rollout.baseline), ("candidate", rollout.candidate)):
        if not (path / "manifest.json").is_file() and not (path.suffix in (".tflite", ".keras") and path.is_file()):
            raise gating.RolloutError(f"{rollout.path}: {role}: {path} is neither an edgecc bundle folder (with "
                                      "manifest.json), a .tflite nor a .keras file")


def load_models(rollout: gating.RolloutConfig) -> tuple[Model, Model]:
    """(baseline, candidate): bundle folders with their own manifests, a .tflite or .keras file with the other's
    preprocessing."""
    paths = {"baseline": rollout.baseline, "candidate": rollout.candidate}
    bundles = {role: bundle_model(path) for role, path in paths.items() if path.is_dir()}
    if not bundles:
        raise gating.RolloutError(f"{rollout.path}: baseline or candidate must be an edgecc bundle folder "
                                  "(its manifest.json gives the preprocessing and the class names)")
    first = next(iter(bundles.values()))
    models = {role: bundles.get(role) or (keras_model if paths[role].suffix == ".keras" else tflite_model)(
        paths[role], first) for role in paths}
    if models["baseline"].labels != models["candidate"].labels:
        raise gating.RolloutError(f"the baseline's classes {models['baseline'].labels} are not the candidate's "
                                  f"{models['candidate'].labels}: their answers cannot be compared")
    gating.check_classes(rollout.gates, first.labels, rollout.path)
    return models["baseline"], models["candidate"]


def model_sha256(path: Path) -> str:
    return sha256_file(path / "model.tflite" if path.is_dir() else path)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """One decision at a time across processes (the service and a promote/rollback command)."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Replace the state file atomically: a reader or a restart sees the old state or the new, never a mix."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, json.dumps(state, indent=1).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


class Rollout:
    """The rollout's state, log and gates, without the models: what the service and the commands share."""

    def __init__(self, rollout: gating.RolloutConfig, *, fsync_interval_s: float = 0.0) -> None:
        """`fsync_interval_s`: the audit log's durability against a power cut (AuditLog)."""
        check_paths(rollout)
        self.config = rollout
        self.lock = rollout.state.with_name(f".{rollout.state.name}.lock")
        self.started = time.time_ns()
        self.counter = 0
        records, self.bad_lines = read_log(rollout.log)
        self.log = AuditLog(rollout.log, fsync_interval_s=fsync_interval_s)
        self.processed = {r.get("input") for r in records if r["kind"] in ("prediction", "rejected")}
        decisions = [r for r in records if r["kind"] == "decision"]
        last = decisions[-1] if decisions else None
        with locked(self.lock):
            self.state = self._recovered(last)
        since = records.index(last) + 1 if last else 0
        self.tally = gating.Tally()
        for record in records[since:]:
            if record["kind"] == "prediction":
                self.tally.add(record, rollout.gates.ok_class)
        self.seen = self._stamp()

    def _recovered(self, last: dict[str, Any] | None) -> dict[str, Any]:
        """The state file, brought up to the log's last decision when a kill fell between logging and switching."""
        path = self.config.state
        for leftover in path.parent.glob(f".{path.name}.*.tmp"):  # a state never renamed in: killed mid-write
            leftover.unlink()
        state = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
        candidate, baseline = model_sha256(self.config.candidate), model_sha256(self.config.baseline)
        if state is None or (last is not None and state["decision"] != last["id"]):
            state = {"stage": last["to"] if last else "shadow", "decision": last["id"] if last else None,
                     "candidate": str(self.config.candidate), "candidate_sha256": candidate,
                     "baseline": str(self.config.baseline), "baseline_sha256": baseline, "time": now()}
            write_state(path, state)
        if (state["candidate_sha256"], state["baseline_sha256"]) != (candidate, baseline):
            state = self._switch(state, "shadow", "command", "a new candidate or baseline: the rollout starts over "
                                 f"(candidate {candidate[:12]}, baseline {baseline[:12]})",
                                 gating.judge(gating.Tally(), self.config.gates, compare=True).evidence)
        return state

    def next_id(self) -> str:
        self.counter += 1
        return f"{self.started}-{self.counter}"

    def _stamp(self) -> tuple[int, int]:
        info = os.stat(self.config.state)
        return info.st_ino, info.st_mtime_ns

    def refresh(self) -> None:
        """Take up a decision another process (a promote or rollback command) made since."""
        stamp = self._stamp()
        if stamp != self.seen:
            self.seen, stage = stamp, self.state["stage"]
            self.state = json.loads(self.config.state.read_text(encoding="utf-8"))
            if self.state["stage"] != stage:
                self.tally = gating.Tally()

    def _switch(self, state: dict[str, Any], to: str, by: str, reason: str, evidence: dict[str, Any]) -> dict[str, Any]:
        """Log the decision, then replace the state file (callers hold the lock)."""
        record = {"kind": "decision", "id": self.next_id(), "time": now(), "from": state["stage"], "to": to,
                  "by": by, "reason": reason, "evidence": evidence}
        self.log.append(record, durable=True)  # on the disk before the state file names it
        state = {**state, "stage": to, "decision": record["id"], "time": record["time"],
                 "candidate_sha256": model_sha256(self.config.candidate),
                 "baseline_sha256": model_sha256(self.config.baseline)}
        write_state(self.config.state, state)
        return state

    def decide(self, to: str, by: str, reason: str, evidence: dict[str, Any]) -> None:
        with locked(self.lock):
            self.state = json.loads(self.config.state.read_text(encoding="utf-8"))
            self.state = self._switch(self.state, to, by, reason, evidence)
        self.seen, self.tally = self._stamp(), gating.Tally()

    def verdict(self) -> gating.Verdict:
        return gating.judge(self.tally, self.config.gates, compare=self.state["stage"] in ("shadow", "canary"))

    def command(self, name: str) -> str:
        """promote, rollback or status, as a person types them; returns the line to print."""
        stage = self.state["stage"]
        if name == "status":
            verdict = self.verdict()
            return json.dumps({**self.state, "gates": {"action": verdict.action, "reason": verdict.reason,
                                                       "evidence": verdict.evidence}, "log": str(self.config.log),
                               "unreadable_log_lines": self.bad_lines})
        if name == "promote" and stage == "full":
            raise gating.RolloutError("promote: the candidate already answers every input (stage full)")
        if name == "rollback" and stage == "baseline":
            raise gating.RolloutError("rollback: the baseline already answers every input (stage baseline)")
        to = STAGES[STAGES.index(stage) + 1] if name == "promote" else "baseline"
        self.decide(to, "command", f"{name} by command", self.verdict().evidence)
        return f"{stage} -> {to}"


@dataclass(frozen=True)
class Job:
    """One input: a file, a text line, or bytes from HTTP (`suffix` says their kind)."""

    name: str
    path: Path | None = None
    text: str | None = None
    data: bytes | None = None
    suffix: str = ""
    reply: queue.Queue[dict[str, Any]] | None = None


class Service:
    """Runs the models of the active stage on each input, logs the record, and applies the gates."""

    def __init__(self, rollout: Rollout) -> None:
        self.rollout = rollout
        self.baseline, self.candidate = load_models(rollout.config)
        self.config_stamp = rollout.config.path.stat().st_mtime_ns

    def reload_gates(self) -> None:
        """Take up an edited rollout.toml's gates, canary_share and automatic (the models, log and state take a
        restart); a bad edit is reported and the gates in force stay."""
        stamp = self.rollout.config.path.stat().st_mtime_ns
        if stamp == self.config_stamp:
            return
        self.config_stamp = stamp
        try:
            config = gating.load(self.rollout.config.path)
            gating.check_classes(config.gates, self.candidate.labels, config.path)
        except gating.RolloutError as err:
            print(f"serve.py: {err}; the gates in force stay", file=sys.stderr, flush=True)
            return
        self.rollout.config = replace(self.rollout.config, gates=config.gates, canary_share=config.canary_share,
                                      automatic=config.automatic)

    def inputs(self, job: Job) -> dict[int, np.ndarray]:
        """The model input of each preprocessing in use (a .tflite baseline shares the bundle's)."""
        prepared = {}
        for model in (self.baseline, self.candidate):
            key = id(model.prepare)
            if key not in prepared:
                if job.text is not None:
                    prepared[key] = model.prepare.text(job.text)
                else:
                    prepared[key] = model.prepare.load(job.suffix, job.data if job.path is None else job.path)
        return prepared

    def _run(self, model: Model, x: np.ndarray) -> dict[str, Any]:
        try:
            cls, ms = model.answer(x)
        except (RuntimeError, ValueError) as err:  # the interpreter refused this input
            return {"model_sha256": model.sha256, "class": None, "label": None, "latency_ms": None,
                    "error": " ".join(str(err).split()) or type(err).__name__}
        return {"model_sha256": model.sha256, "class": cls, "label": model.labels[cls], "latency_ms": ms,
                "error": None}

    def handle(self, job: Job) -> dict[str, Any]:
        """One input: its record in the log, and the answer."""
        rollout = self.rollout
        rollout.refresh()
        self.reload_gates()
        record_id = rollout.next_id()
        try:
            if job.text is None and job.path is not None:
                job = Job(job.name, data=job.path.read_bytes(), suffix=job.path.suffix, reply=job.reply)
            prepared = self.inputs(job)
        except (BadInput, OSError) as err:
            reason = f"{job.name} {err}" if isinstance(err, BadInput) else f"{job.name} cannot be read: {err.strerror}"
            record = {"kind": "rejected", "id": record_id, "time": now(), "input": job.name, "reason": reason}
            rollout.log.append(record)
            return {"id": record_id, "input": job.name, "rejected": reason}
        stage = rollout.state["stage"]
        content = job.text.encode() if job.text is not None else job.data
        results: dict[str, dict[str, Any] | None] = {"baseline": None, "candidate": None}
        if stage != "full":
            results["baseline"] = self._run(self.baseline, prepared[id(self.baseline.prepare)])
        if stage != "baseline":
            results["candidate"] = self._run(self.candidate, prepared[id(self.candidate.prepare)])
        answered_by = "candidate" if stage == "full" or (stage == "canary" and self._canary(record_id)) else "baseline"
        answered = [r for r in results.values() if r is not None and r["error"] is None]
        record = {"kind": "prediction", "id": record_id, "time": now(), "stage": stage, "input": job.name,
                  "input_sha256": hashlib.sha256(content or b"").hexdigest(), "answered_by": answered_by,
                  **results,
                  "agree": answered[0]["class"] == answered[1]["class"] if len(answered) == 2 else None}
        rollout.log.append(record)
        rollout.tally.add(record, rollout.config.gates.ok_class)
        answer = results[answered_by]
        if rollout.config.automatic and stage != "baseline" and self._judge_now():
            verdict = rollout.verdict()
            if verdict.action == "rollback" or (verdict.action == "promote" and stage != "full"):
                to = "baseline" if verdict.action == "rollback" else STAGES[STAGES.index(stage) + 1]
                rollout.decide(to, "gate", verdict.reason, verdict.evidence)
        return {"id": record_id, "input": job.name, "answered_by": answered_by, "class": answer["class"],
                "label": answer["label"], "error": answer["error"]}

    def _judge_now(self) -> bool:
        """After every input while the stage is young, then every 1% of its inputs: a decision comes at most 1%
        late, and judging (a p99 over the stage's latencies) stays a small share of an input's time."""
        inputs = self.rollout.tally.inputs
        return inputs % max(1, inputs // 100) == 0

    def _canary(self, record_id: str) -> bool:
        """The candidate answers this input: a hash of its id, so the same share of every stream, reproducibly."""
        share = int.from_bytes(hashlib.sha256(record_id.encode()).digest()[:8], "big") / 2**64
        return share < self.rollout.config.canary_share


def watch(folder: Path, done: set[str], jobs: queue.Queue[Job | None], once: bool, poll_s: float) -> None:
    """New files in `folder`, in name order, each once (`done`: those the log already holds)."""
    while True:
        for path in sorted(folder.iterdir()):
            if path.is_file() and not path.name.startswith(".") and path.name not in done:
                done.add(path.name)
                jobs.put(Job(path.name, path=path))
        if once:
            return
        time.sleep(poll_s)


def read_stdin(jobs: queue.Queue[Job | None]) -> None:
    """A line naming a file is that file; any other line is a text (rejected by a model that does not take text)."""
    for number, line in enumerate(sys.stdin, 1):
        line = line.rstrip("\n")
        path = Path(line)
        if line and path.is_file():
            jobs.put(Job(line, path=path))
        else:
            jobs.put(Job(f"stdin:{number}", text=line))


def http_server(address: str, port: int, jobs: queue.Queue[Job | None]) -> ThreadingHTTPServer:
    """POST / with the input as the body; the reply is the answer as JSON."""
    count = iter(range(1, 2**63))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            kind = self.headers.get("Content-Type", "text/plain").split(";")[0].strip()
            size = int(self.headers.get("Content-Length", 0))
            if size > MAX_HTTP_BYTES:
                self.send_error(413, f"an input is at most {MAX_HTTP_BYTES} bytes")
                return
            body = self.rfile.read(size)
            reply: queue.Queue[dict[str, Any]] = queue.Queue()
            name = f"http:{next(count)}"
            if kind == "text/plain":
                jobs.put(Job(name, text=body.decode("utf-8", errors="replace"), reply=reply))
            else:
                jobs.put(Job(name, data=body, suffix=HTTP_KINDS.get(kind, kind), reply=reply))
            try:
                answer = json.dumps(reply.get(timeout=60)).encode()
            except queue.Empty:
                self.send_error(503, "the service did not answer within 60 s")
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:  # the audit log is the record, not stderr
            pass

    return ThreadingHTTPServer((address, port), Handler)


def serve(service: Service, args: argparse.Namespace) -> None:
    jobs: queue.Queue[Job | None] = queue.Queue()
    feeders = []
    if args.watch:
        feeders.append(threading.Thread(target=watch, args=(args.watch, service.rollout.processed, jobs, args.once,
                                                            args.poll), daemon=True))
    if args.stdin:
        feeders.append(threading.Thread(target=read_stdin, args=(jobs,), daemon=True))
    server = None
    if args.http is not None:
        server = http_server(args.bind, args.http, jobs)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        print(f"serve.py: listening on http://{args.bind}:{server.server_address[1]}/", file=sys.stderr, flush=True)
    for feeder in feeders:
        feeder.start()
    if args.once and server is None:  # stop when every source is exhausted
        threading.Thread(target=lambda: ([f.join() for f in feeders], jobs.put(None)), daemon=True).start()
    log = service.rollout.log
    try:
        while True:
            try:  # a blocked get() would not see SIGTERM; idle, the log's records go to the disk
                job = jobs.get(timeout=min(0.5, log.fsync_interval_s or 0.5))
            except queue.Empty:
                log.sync()
                continue
            if job is None:
                break
            answer = service.handle(job)
            if job.reply is not None:
                job.reply.put(answer)
            else:
                print(json.dumps(answer), flush=True)
    finally:
        log.sync()


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def fsync_interval(words: list[str]) -> float:
    """--fsync every (0) or --fsync interval SECONDS; ValueError naming the option."""
    if words == ["every"]:
        return 0.0
    if len(words) == 2 and words[0] == "interval":
        with contextlib.suppress(ValueError):
            seconds = float(words[1])
            if 0 < seconds < float("inf"):
                return seconds
    raise ValueError(f"--fsync {' '.join(words)}: expected `every` or `interval SECONDS` (SECONDS above 0)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve raw inputs and run the staged rollout rollout.toml describes.")
    parser.add_argument("command", nargs="?", default="serve", choices=("serve", "promote", "rollback", "status"))
    parser.add_argument("--rollout", type=Path, default=Path(__file__).resolve().parent / "rollout.toml")
    parser.add_argument("--watch", type=Path, help="a folder whose new files are inputs")
    parser.add_argument("--stdin", action="store_true", help="read inputs from standard input, one per line")
    parser.add_argument("--http", type=int, metavar="PORT", help="answer POSTs on this port (0: any free port)")
    parser.add_argument("--bind", default="127.0.0.1", help="the HTTP address (default 127.0.0.1, this board only)")
    parser.add_argument("--allow-remote", action="store_true", help="allow a --bind address other machines reach")
    parser.add_argument("--once", action="store_true", help="stop when the folder's files and stdin are done")
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between looks at the watched folder")
    parser.add_argument("--fsync", nargs="+", default=["every"], metavar=("every|interval", "SECONDS"),
                        help="when the audit log goes to the disk: `every` record before its answer (the default: a "
                             "power cut loses nothing answered), or at most every SECONDS and when idle (a power cut "
                             "loses at most the last SECONDS; cheaper on slow storage). Either way a killed service "
                             "loses no record, and a decision is on the disk before the stage switches")
    args = parser.parse_args(argv)
    try:
        interval = fsync_interval(args.fsync)
    except ValueError as err:
        print(f"serve.py: {err}", file=sys.stderr)
        return 2
    if args.bind not in ("127.0.0.1", "localhost", "::1") and not args.allow_remote:
        print(f"serve.py: --bind {args.bind} answers other machines; add --allow-remote to mean it", file=sys.stderr)
        return 2
    if args.watch is not None and not args.watch.is_dir():
        print(f"serve.py: --watch {args.watch} is not a folder", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        rollout = Rollout(gating.load(args.rollout), fsync_interval_s=interval)
        if rollout.bad_lines:
            print(f"serve.py: {rollout.config.log}: line(s) {', '.join(map(str, rollout.bad_lines[:10]))} are not "
                  "whole records (from an older crash); left as they are", file=sys.stderr, flush=True)
        if args.command != "serve":
            print(rollout.command(args.command))
            return 0
        serve(Service(rollout), args)
    except (gating.RolloutError, BadInput) as err:
        print(f"serve.py: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
