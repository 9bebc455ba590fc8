"""`edgecc pilot report`: a rollout's audit log made into evidence for people, and field metrics.

The log (JSON Lines, written by the board service or by `edgecc shadow`) is read once, line by line, into
running tallies: memory grows with the classes, windows, gate decisions, the latencies (8 bytes per timed
call, kept for exact percentiles) and the ids (12 bytes per prediction, see below), never with whole records.
A line that is not a whole record (an older crash's torn write) is skipped and named by its line number; a file
without one valid record is not a log.
Labels that arrive later (an inspector's verdict) are joined to the predictions by record id; an `edgecc shadow`
record has no id, so its index stands for one (and its own label, when the data had one, is used where the labels
file has none). A prediction that repeats an earlier one's id (a log joined with itself, a shadow run restarted
from its first example) is counted again, as it appears, and named in the report's notes: ids are kept as 8-byte
hashes with their line numbers and compared once the log is read.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import math
import os
import tempfile
from array import array
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from edgecc.board.stats import wilson_interval
from edgecc.emit import dumps, loads
from edgecc.errors import EdgeccError
from edgecc.report import Block, render_html, render_markdown

ROLES = ("baseline", "candidate")
FIELD_ROLES = (*ROLES, "answered")  # "answered": whichever model's answer the line acted on
STAGES = ("shadow", "canary", "full", "baseline")
OK_NAMES = ("ok", "good", "normal", "none")  # the good class when --ok-class is not given
CONFIDENCE = 0.95
AUTO_WINDOWS = 25  # without --window: at most 50 windows of equal count (26 or more once there are 1,000 predictions)
MIN_AUTO_WINDOW = 20  # ... and at least 20 predictions each, so that a short log is not cut into single predictions
HISTOGRAM_BINS = 20
SHOWN = 20  # skipped lines, unknown label ids and rejection reasons named one by one
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class _Bad(Exception):
    """A line that is JSON but not a record of the log format: skipped and named, never fatal."""


@dataclass(frozen=True, kw_only=True)
class ReportOptions:
    """What `edgecc pilot report` was asked for besides the log."""

    labels: Path | None = None         # CSV `id,label` or JSON Lines {"id", "label"}
    ok_class: str | None = None        # the good class (name or index) for miss and false-alarm rates
    window: str | None = None          # "500" compared predictions, "15m" of time, None: automatic
    max_disagreement: float | None = None  # gate on the upper Wilson bound of the whole log


@dataclass(frozen=True)
class WindowSpec:
    """How the log is cut for disagreement over time: `size` compared predictions, or `size` seconds."""

    by: str  # "records" or "time"
    size: float
    auto: bool = False

    @classmethod
    def parse(cls, text: str | None) -> WindowSpec:
        if text is None:
            return cls("records", MIN_AUTO_WINDOW, auto=True)
        number, unit = (text[:-1], text[-1]) if text[-1:] in DURATION_UNITS else (text, "")
        try:
            value = float(number) if unit else int(number)
        except ValueError:
            value = 0
        if not value > 0 or not math.isfinite(value):
            raise EdgeccError(f"--window {text!r}: give a count of predictions (500) or a duration (30s, 15m, 2h, 1d)")
        return cls("time", value * DURATION_UNITS[unit]) if unit else cls("records", value)


@dataclass
class Window:
    """The compared predictions of one stretch of the log."""

    start: datetime
    end: datetime
    compared: int = 0
    disagreements: int = 0

    def merged(self, other: Window) -> Window:
        return Window(min(self.start, other.start), max(self.end, other.end),
                      self.compared + other.compared, self.disagreements + other.disagreements)


class _Windows:
    """Windows filled as the log streams; automatic ones double in size whenever there would be more than 50."""

    def __init__(self, spec: WindowSpec) -> None:
        self.spec, self.size = spec, spec.size
        self.rows: list[Window] = []
        self.by_time: dict[int, Window] = {}

    def add(self, when: datetime, disagree: bool) -> None:
        if self.spec.by == "time":
            key = math.floor(when.timestamp() / self.size)
            window = self.by_time.get(key)
            if window is None:
                window = self.by_time[key] = Window(when, when)
        else:
            if not self.rows or self.rows[-1].compared >= self.size:
                if self.spec.auto and len(self.rows) == 2 * AUTO_WINDOWS:
                    self.rows = [a.merged(b) for a, b in zip(self.rows[::2], self.rows[1::2])]
                    self.size *= 2
                self.rows.append(Window(when, when))
            window = self.rows[-1]
        window.compared += 1
        window.disagreements += disagree
        window.start, window.end = min(window.start, when), max(window.end, when)

    def ordered(self) -> list[Window]:
        return [self.by_time[k] for k in sorted(self.by_time)] if self.spec.by == "time" else self.rows


class _Run(NamedTuple):
    """One model's part of a prediction record."""

    cls: int | None
    label: str | None
    latency_ms: float | None
    error: str | None
    sha256: str | None


class _Model:
    """One model's calls (baseline or candidate): runtime errors, latencies, model files, answers to labelled inputs."""

    def __init__(self) -> None:
        self.calls = 0
        self.errors: Counter[str] = Counter()
        self.latency = array("d")
        self.files: Counter[str] = Counter()
        self.labelled: Counter[tuple[str, int]] = Counter()  # (label as written, predicted class)

    def add(self, run: _Run) -> None:
        self.calls += 1
        if run.error is not None:
            self.errors[run.error] += 1
        if run.latency_ms is not None:
            self.latency.append(run.latency_ms)
        if run.sha256 is not None:
            self.files[run.sha256] += 1


def _time(record: dict[str, Any]) -> datetime:
    text = record.get("time")
    try:
        when = datetime.fromisoformat(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise _Bad("no valid 'time'") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _run(value: Any, role: str) -> _Run | None:
    """A record's `role` entry checked against the log format; None when that model did not run."""
    if value is None:
        return None
    if type(value) is not dict:
        raise _Bad(f"'{role}' is not an object")
    cls, label, ms, error = value.get("class"), value.get("label"), value.get("latency_ms"), value.get("error")
    sha = value.get("model_sha256")
    if (error is None and type(cls) is int and cls >= 0 and type(ms) is float and ms >= 0
            and type(label) is str and type(sha) is str):
        return _Run(cls, label, ms, None, sha)  # the usual call, tested at once; any other is looked at in turn
    if not (error is None or isinstance(error, str)):
        raise _Bad(f"'{role}.error' is not null or text")
    if not ((type(cls) is int and cls >= 0) or (cls is None and error is not None)):
        raise _Bad(f"'{role}.class' is not a class index")
    if not (ms is None or ((type(ms) is float or type(ms) is int) and ms >= 0)):
        raise _Bad(f"'{role}.latency_ms' is not a duration")
    if not (label is None or isinstance(label, str)):
        raise _Bad(f"'{role}.label' is not text")
    return _Run(cls, label, None if ms is None else float(ms), error, sha if isinstance(sha, str) else None)


def _read_labels(path: Path) -> tuple[dict[str, str], dict[str, int]]:
    """Labels by record id, and the line where each distinct label first appears (to name a bad one)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise EdgeccError(f"labels {path} cannot be read: {getattr(err, 'strerror', None) or err}") from None
    rows: list[tuple[int, Any, Any]] = []
    if text.lstrip().startswith("{"):
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = loads(line)
                except ValueError:
                    row = None
                if not isinstance(row, dict) or "id" not in row or "label" not in row:
                    raise EdgeccError(f"labels {path}: line {number} is not a JSON object with 'id' and 'label'")
                rows.append((number, row["id"], row["label"]))
    else:
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or not {"id", "label"} <= {f.strip() for f in reader.fieldnames}:
            raise EdgeccError(f"labels {path}: line 1 must be the header 'id,label' (CSV) or a JSON Lines record")
        reader.fieldnames = [f.strip() for f in reader.fieldnames]
        for row in reader:
            if row["label"] is None or row["id"] is None:
                raise EdgeccError(f"labels {path}: line {reader.line_num} has no label")
            rows.append((reader.line_num, row["id"].strip(), row["label"].strip()))
    labels: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, rid, label in rows:
        if isinstance(rid, bool) or not isinstance(rid, (str, int)) or isinstance(label, bool) \
                or not isinstance(label, (str, int)) or str(rid) == "" or str(label) == "":
            raise EdgeccError(f"labels {path}: line {number}: 'id' and 'label' must be non-empty text or integers")
        rid, label = str(rid), str(label)
        if labels.setdefault(rid, label) != label:
            raise EdgeccError(f"labels {path}: line {number} labels id {rid!r} {label!r}, an earlier line "
                              f"{labels[rid]!r}")
        first_line.setdefault(label, number)
    if not labels:
        raise EdgeccError(f"labels {path} holds no label")
    return labels, first_line


class _Tally:
    """Everything the report needs, accumulated one record at a time."""

    def __init__(self, spec: WindowSpec, labels: dict[str, str] | None) -> None:
        self.lines = self.valid = 0
        self.skipped: list[tuple[int, str]] = []
        self.skipped_count = 0
        self.kinds: Counter[str] = Counter()
        self.first: datetime | None = None
        self.last: datetime | None = None
        self.stages: Counter[str] = Counter()
        self.stage_compared: Counter[str] = Counter()
        self.stage_disagreements: Counter[str] = Counter()
        self.answered_by: Counter[str] = Counter()
        self.windows = _Windows(spec)
        self.confusion: Counter[tuple[int, int]] = Counter()
        self.names: dict[int, str] = {}
        self.name_conflicts: set[int] = set()
        self.models = {role: _Model() for role in FIELD_ROLES}  # "answered" only counts labelled answers
        self.decisions: list[dict[str, Any]] = []
        self.rejected: Counter[str] = Counter()
        self.labels = labels
        self.matched: set[str] = set()
        self.joined = 0
        self.id_hashes, self.id_lines = array("Q"), array("I")  # of every counted prediction, for repeats

    def line(self, number: int, raw: bytes) -> None:
        self.lines = number
        if not raw.strip():
            return
        try:
            record = loads(raw.decode("utf-8"))
        except ValueError:  # not UTF-8, not JSON, NaN or Infinity
            self._skip(number, "not a whole JSON record")
            return
        try:
            if not isinstance(record, dict):
                raise _Bad("not a JSON object")
            kind = record.get("kind")
            if kind is None and "index" in record:
                kind = "prediction"  # an `edgecc shadow` audit log record
                self._prediction(record, _time(record), legacy=True)
            elif kind == "prediction":
                self._prediction(record, _time(record), legacy=False)
            elif kind == "decision":
                self._decision(record, _time(record), number)
            elif kind == "rejected":
                self._rejected(record, _time(record))
            elif isinstance(kind, str):
                _time(record)
            else:
                raise _Bad("no 'kind'")
        except _Bad as bad:
            self._skip(number, str(bad))
            return
        self.valid += 1
        self.kinds[kind] += 1

    def _skip(self, number: int, reason: str) -> None:
        self.skipped_count += 1
        if len(self.skipped) < SHOWN:
            self.skipped.append((number, reason))

    def _when(self, when: datetime) -> None:
        if self.first is None or when < self.first:
            self.first = when
        if self.last is None or when > self.last:
            self.last = when

    def _prediction(self, record: dict[str, Any], when: datetime, legacy: bool) -> None:
        if legacy:
            rid, stage, answered_by, truth = str(record["index"]), "shadow", "baseline", record.get("label")
            if not (truth is None or (type(truth) is int and truth >= 0)):
                raise _Bad("'label' is not a class index")
        else:
            rid, stage, answered_by, truth = record.get("id"), record.get("stage"), record.get("answered_by"), None
            if not isinstance(rid, str):
                raise _Bad("no 'id'")
            if stage not in STAGES:
                raise _Bad(f"'stage' is not one of {', '.join(STAGES)}")
            if answered_by not in ROLES:
                raise _Bad("'answered_by' is not baseline or candidate")
        base, cand = _run(record.get("baseline"), "baseline"), _run(record.get("candidate"), "candidate")
        answered = base if answered_by == "baseline" else cand
        if answered is None:
            raise _Bad(f"'answered_by' names the {answered_by}, which did not run")
        agree = record.get("agree")
        if not (agree is None or type(agree) is bool):
            raise _Bad("'agree' is not true, false or null")
        both = base is not None and cand is not None and base.cls is not None and cand.cls is not None
        if both and agree is not None and agree != (base.cls == cand.cls):  # type: ignore[union-attr]
            raise _Bad("'agree' contradicts the two classes")

        self._when(when)
        self.id_hashes.append(int.from_bytes(hashlib.blake2b(f"{legacy}:{rid}".encode(), digest_size=8).digest()))
        self.id_lines.append(self.lines)
        self.stages[stage] += 1
        self.answered_by[answered_by] += 1
        if agree is not None:
            self.stage_compared[stage] += 1
            if not agree:
                self.stage_disagreements[stage] += 1
            self.windows.add(when, not agree)
        if both:
            self.confusion[base.cls, cand.cls] += 1  # type: ignore[union-attr]
        runs = ((self.models["baseline"], base), (self.models["candidate"], cand))
        for model, run in runs:
            if run is not None:
                model.add(run)
                if run.label is not None and run.cls is not None and self.names.get(run.cls) != run.label:
                    if self.names.setdefault(run.cls, run.label) != run.label:
                        self.name_conflicts.add(run.cls)
        if self.labels is not None and rid in self.labels:
            self.matched.add(rid)
            truth = self.labels[rid]
        elif truth is not None:
            truth = str(truth)
        if truth is not None:
            self.joined += 1
            for model, run in (*runs, (self.models["answered"], answered)):
                if run is not None and run.cls is not None:
                    model.labelled[truth, run.cls] += 1

    def _decision(self, record: dict[str, Any], when: datetime, number: int) -> None:
        evidence = record.get("evidence")
        if not isinstance(evidence, dict):
            raise _Bad("decision without an 'evidence' object")
        if record.get("by") not in ("gate", "command"):
            raise _Bad("decision 'by' is not gate or command")
        self._when(when)
        self.decisions.append({"line": number, "time": when.isoformat(), "id": record.get("id"),
                               **{key: record.get(key) for key in ("from", "to", "by", "reason")},
                               "evidence": evidence})

    def _rejected(self, record: dict[str, Any], when: datetime) -> None:
        reason = record.get("reason")
        if not isinstance(reason, str):
            raise _Bad("rejected record without a 'reason'")
        self._when(when)
        self.rejected[reason] += 1


def _repeats(hashes: array, lines: array) -> tuple[int, list[tuple[int, int]]]:
    """How many predictions carry an earlier prediction's id, and the first few as (line, earlier line)."""
    ids = np.frombuffer(hashes, dtype=np.uint64)
    order = np.argsort(ids, kind="stable")  # stable: within one id, file order
    ordered = ids[order]
    starts = np.concatenate(([True], ordered[1:] != ordered[:-1]))
    repeats = np.flatnonzero(~starts)
    if not len(repeats):
        return 0, []
    first = np.maximum.accumulate(np.where(starts, np.arange(len(ids)), 0))  # each id's first position
    at = np.frombuffer(lines, dtype=np.uint32)
    earliest = repeats[np.argsort(at[order[repeats]], kind="stable")[:SHOWN]]
    return len(repeats), [(int(at[order[i]]), int(at[order[first[i]]])) for i in earliest]


def _rate(k: int, n: int) -> dict[str, Any]:
    """A share with its Wilson interval; null figures when nothing was counted."""
    low, high = wilson_interval(k, n, CONFIDENCE)
    return {"count": k, "of": n, "rate": k / n if n else None, "low": low if n else None, "high": high if n else None}


def _percentiles(values: array) -> dict[str, Any]:
    if not values:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None}
    data = np.frombuffer(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(data, [50, 90, 99])
    return {"count": len(data), "p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(data.max())}


def _histogram(latency: dict[str, array]) -> dict[str, Any]:
    """Common bins for every model, from the fastest call to the slowest model's p99, and the calls beyond it."""
    present = {role: np.frombuffer(v, dtype=np.float64) for role, v in latency.items() if v}
    if not present:
        return {"edges": [], "counts": {}, "above": {}}
    low = min(float(v.min()) for v in present.values())
    high = max(float(np.percentile(v, 99)) for v in present.values())
    high = high if high > low else low + 1e-3
    edges = np.linspace(low, high, HISTOGRAM_BINS + 1)
    return {"edges": edges.tolist(),
            "counts": {role: np.histogram(v, bins=edges)[0].tolist() for role, v in present.items()},
            "above": {role: int((v > high).sum()) for role, v in present.items()}}


def _resolve(raw: str, index_of: dict[str, int]) -> int | None:
    """A label as a class index: a class name of the log, or an index."""
    if raw in index_of:
        return index_of[raw]
    return int(raw) if raw.isdigit() else None


def _resolved(counts: Counter[tuple[str, int]], index_of: dict[str, int]) -> Counter[tuple[int, int]]:
    """(label as written, predicted class) counts as (true class, predicted class): "ok" and "0" may be one class."""
    out: Counter[tuple[int, int]] = Counter()
    for (raw, predicted), n in counts.items():
        out[_resolve(raw, index_of), predicted] += n  # type: ignore[index]  (every label was resolved before)
    return out


def _field_metrics(counts: Counter[tuple[int, int]], ok: int | None, name: Callable[[int], str]) -> dict[str, Any]:
    labelled = sum(counts.values())
    correct = sum(n for (t, p), n in counts.items() if t == p)
    support: Counter[int] = Counter()
    hits: Counter[int] = Counter()
    for (t, p), n in counts.items():
        support[t] += n
        hits[t] += n if t == p else 0
    out: dict[str, Any] = {"labelled": labelled, "accuracy": _rate(correct, labelled),
                           "per_class": {name(t): {"support": support[t], "recall": hits[t] / support[t]}
                                         for t in sorted(support)}}
    if ok is not None:
        defects = sum(n for (t, _), n in counts.items() if t != ok)
        missed = sum(n for (t, p), n in counts.items() if t != ok and p == ok)
        good = support[ok]
        alarms = sum(n for (t, p), n in counts.items() if t == ok and p != ok)
        out["miss_rate"], out["false_alarm_rate"] = _rate(missed, defects), _rate(alarms, good)
    return out


class PilotReport:
    """The figures of one log as strict-JSON-ready data, rendered as Markdown or a self-contained HTML page."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    @property
    def ok(self) -> bool:
        """False when --max-disagreement was given and the upper Wilson bound of the disagreement exceeds it."""
        return self.data["disagreement"]["within_limit"] is not False

    def to_json(self) -> dict[str, Any]:
        return self.data

    def markdown(self) -> str:
        return render_markdown(*_document(self.data, svg=False), plots_in="the --html page")

    def html(self) -> str:
        return render_html(*_document(self.data, svg=True), {})


def report(log: Path, options: ReportOptions) -> PilotReport:
    """Read `log` once and summarise it; labels (when given) are read first, and checked against the log's classes."""
    spec = WindowSpec.parse(options.window)
    labels, label_lines = _read_labels(options.labels) if options.labels is not None else (None, {})
    if not log.is_file():
        raise EdgeccError(f"log {log} does not exist or is not a file")
    tally = _Tally(spec, labels)
    try:
        with log.open("rb") as f:
            for number, raw in enumerate(f, 1):
                tally.line(number, raw)
    except OSError as err:
        raise EdgeccError(f"log {log} cannot be read: {err.strerror}") from None
    if not tally.valid:
        raise EdgeccError(f"{log} is not an audit log: none of its {tally.lines} lines is a record "
                          "(JSON Lines of predictions, decisions and rejections)")
    return PilotReport(_summary(log, tally, spec, options, label_lines))


def _summary(log: Path, t: _Tally, spec: WindowSpec, options: ReportOptions,
             label_lines: dict[str, int]) -> dict[str, Any]:
    notes: list[str] = []
    index_of = {name: cls for cls, name in t.names.items()}
    if t.name_conflicts:
        notes.append(f"class indices {sorted(t.name_conflicts)} carry different names in different records; "
                     "the first name seen is used")
    repeated, pairs = _repeats(t.id_hashes, t.id_lines)
    if repeated:
        notes.append(f"{repeated} prediction(s) repeat the id of an earlier one ("
                     + ", ".join(f"line {line} repeats line {earlier}" for line, earlier in pairs)
                     + (" ..." if repeated > len(pairs) else "") + "; an `edgecc shadow` record's id is its example "
                     "index): a log joined with itself, or a shadow run restarted from its start? Every repeat is "
                     "counted, in every figure, and labels join to each")
    for raw, number in label_lines.items():
        if _resolve(raw, index_of) is None:
            known = ", ".join(sorted(index_of)) or "none, the log names no class"
            raise EdgeccError(f"labels {options.labels}: line {number}: label {raw!r} is neither a class name in "
                              f"the log ({known}) nor a class index")

    def name(cls: int) -> str:
        return t.names.get(cls, str(cls))

    compared, disagreements = sum(t.stage_compared.values()), sum(t.stage_disagreements.values())
    overall = _rate(disagreements, compared)
    limit = options.max_disagreement
    windows, running_k, running_n = [], 0, 0
    for w in t.windows.ordered():
        running_k, running_n = running_k + w.disagreements, running_n + w.compared
        windows.append({"start": w.start.isoformat(), "end": w.end.isoformat(), "compared": w.compared,
                        "disagreements": w.disagreements, "rate": w.disagreements / w.compared,
                        "upper": wilson_interval(w.disagreements, w.compared, CONFIDENCE)[1],
                        "cumulative_rate": running_k / running_n,
                        "cumulative_upper": wilson_interval(running_k, running_n, CONFIDENCE)[1]})
    classes = sorted({c for pair in t.confusion for c in pair} | set(t.names))
    field = None
    if t.joined or options.labels is not None:
        ok = _ok_class(options.ok_class, index_of, classes, notes)
        unknown = sorted(set(t.labels or ()) - t.matched)
        field = {
            "labels": None if options.labels is None else str(options.labels),
            "labels_in_file": len(t.labels or ()), "joined_predictions": t.joined,
            "unknown_ids": len(unknown), "unknown_id_examples": unknown[:SHOWN],
            "ok_class": None if ok is None else name(ok),
            "models": {role: _field_metrics(_resolved(t.models[role].labelled, index_of), ok, name)
                       for role in FIELD_ROLES if t.models[role].labelled},
        }
    return {
        "log": str(log), "lines": t.lines, "records": dict(t.kinds),
        "skipped": {"count": t.skipped_count, "first": [{"line": n, "reason": r} for n, r in t.skipped]},
        "repeated_ids": {"count": repeated, "first": [{"line": n, "repeats_line": e} for n, e in pairs]},
        "time": {"first": t.first.isoformat() if t.first else None, "last": t.last.isoformat() if t.last else None},
        "stages": {stage: {"predictions": t.stages[stage],
                           "disagreement": _rate(t.stage_disagreements[stage], t.stage_compared[stage])}
                   for stage in STAGES if t.stages[stage]},
        "answered_by": {role: t.answered_by[role] for role in ROLES},
        "disagreement": {**overall, "confidence": CONFIDENCE, "max_disagreement": limit,
                         "within_limit": None if limit is None else overall["high"] is None or overall["high"] <= limit},
        "windows": {"by": spec.by, "size": t.windows.size, "rows": windows},
        "classes": {str(c): name(c) for c in classes},
        "confusion": [[t.confusion[b, c] for c in classes] for b in classes],
        "latency_ms": {role: _percentiles(t.models[role].latency) for role in ROLES},
        "latency_histogram_ms": _histogram({role: t.models[role].latency for role in ROLES}),
        "runtime_errors": {role: {**_rate(sum(t.models[role].errors.values()), t.models[role].calls),
                                  "messages": dict(t.models[role].errors.most_common(5))} for role in ROLES},
        "models": {role: dict(t.models[role].files) for role in ROLES},
        "decisions": t.decisions,
        "rejected": {"count": sum(t.rejected.values()), "reasons": dict(t.rejected.most_common(SHOWN))},
        "field": field,
        "notes": notes,
    }


def _ok_class(given: str | None, index_of: dict[str, int], classes: list[int], notes: list[str]) -> int | None:
    """The good class: --ok-class, else a class named ok, good, normal or none; None (rates omitted) otherwise."""
    if given is not None:
        found = _resolve(given, index_of)
        if found is None:
            raise EdgeccError(f"--ok-class {given!r} is not a class of the log ({', '.join(sorted(index_of)) or 'none named'})")
        return found
    found = next((index_of[n] for n in index_of if n.lower() in OK_NAMES), None)
    if found is None:
        notes.append("no class is named ok, good, normal or none: the defect miss rate and false-alarm rate are "
                     "omitted (name the good class with --ok-class)")
    return found


# ---- rendering ---------------------------------------------------------------------------------------------------

def _cell(value: Any) -> str:
    """A figure or text for a table cell: shares as percentages with 2 decimals, text without table breakers."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return " ".join(str(value).replace("|", "/").split())


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _with_bound(rate: dict[str, Any]) -> str:
    if rate["rate"] is None:
        return "n/a (none)"
    return f"{_pct(rate['rate'])} [{_pct(rate['low'])}, {_pct(rate['high'])}] ({rate['count']}/{rate['of']})"


def _document(d: dict[str, Any], svg: bool) -> tuple[str, list[tuple[str, list[Block]]]]:
    """The report's content once, as sections of blocks, for both the Markdown and the HTML page."""
    dis = d["disagreement"]
    skipped = d["skipped"]
    intro = (f"{sum(d['records'].values())} records on {d['lines']} lines, "
             f"from {d['time']['first']} to {d['time']['last']}: "
             + ", ".join(f"{kind} {n}" for kind, n in sorted(d["records"].items())) + ". ")
    if skipped["count"]:
        intro += (f"{skipped['count']} line(s) skipped (not a whole record, e.g. torn by a crash): "
                  + "; ".join(f"line {s['line']} ({s['reason']})" for s in skipped["first"])
                  + (" ..." if skipped["count"] > len(skipped["first"]) else "") + ".")
    verdict = ""
    if dis["max_disagreement"] is not None:
        verdict = (f" Limit {_pct(dis['max_disagreement'])} on the upper bound: "
                   + ("within." if dis["within_limit"] else "ABOVE (exit 1)."))
    sections: list[tuple[str, list[Block]]] = [
        ("", [("p", intro), *([("list", d["notes"])] if d["notes"] else [])]),
        ("Disagreement between baseline and candidate", [
            ("p", f"Predictions where both models answered: {dis['of']}; they disagree on "
                  f"{_with_bound(dis)}, the brackets being the {dis['confidence']:.0%} Wilson interval "
                  f"(its upper end is what a gate judges, not the raw rate).{verdict}"),
            ("table", (["stage", "predictions", "disagreement [95% Wilson]"],
                       [[s, str(v["predictions"]), _with_bound(v["disagreement"])] for s, v in d["stages"].items()])),
            ("p", f"Over time, windows of {_window_size(d['windows'])}; 'cumulative' is everything up to the "
                  "window's end."),
            ("table", (["from", "to", "compared", "disagree", "rate", "upper 95%", "cumulative rate",
                        "cumulative upper"],
                       [[w["start"], w["end"], str(w["compared"]), str(w["disagreements"]), _pct(w["rate"]),
                         _pct(w["upper"]), _pct(w["cumulative_rate"]), _pct(w["cumulative_upper"])]
                        for w in d["windows"]["rows"]])),
            *([("svg", (_disagreement_svg(d["windows"]["rows"], dis["max_disagreement"]),
                        "Disagreement per window (dots), its upper 95% bound and the cumulative upper bound"))]
              if svg and d["windows"]["rows"] else []),
        ]),
        ("Baseline vs candidate classes", [
            ("p", "Each row is the baseline's class, each column the candidate's, over predictions where both ran "
                  "without error; off the diagonal they disagree."),
            ("table", (["baseline \\ candidate", *map(_cell, d["classes"].values())],
                       [[_cell(name), *(str(n) for n in row)]
                        for name, row in zip(d["classes"].values(), d["confusion"])])),
        ]),
        *_latency_section(d, svg),
        *_decisions_section(d["decisions"]),
        ("Rejected inputs", [
            ("p", f"{d['rejected']['count']} input(s) rejected (not answered)."),
            *([("table", (["reason", "inputs"], [[_cell(r), str(n)] for r, n in d["rejected"]["reasons"].items()]))]
              if d["rejected"]["reasons"] else []),
        ]),
        *_field_section(d["field"]),
        ("Models", [("table", (["role", "model sha256", "calls"],
                               [[role, _cell(sha), str(n)] for role, shas in d["models"].items() for sha, n in shas.items()]))]),
    ]
    return f"edgecc pilot report: {Path(d['log']).name}", sections


def _window_size(windows: dict[str, Any]) -> str:
    return f"{windows['size']:g} s" if windows["by"] == "time" else f"{int(windows['size'])} compared predictions"


def _latency_section(d: dict[str, Any], svg: bool) -> list[tuple[str, list[Block]]]:
    lat, hist, errors = d["latency_ms"], d["latency_histogram_ms"], d["runtime_errors"]
    roles = list(hist["counts"])
    edges = hist["edges"]
    blocks: list[Block] = [
        ("p", "Latency of each model call as the service timed it on the board (ms), and its runtime errors."),
        ("table", (["model", "calls timed", "p50", "p90", "p99", "max", "runtime errors"],
                   [[role, str(lat[role]["count"]), _ms(lat[role]["p50"]), _ms(lat[role]["p90"]),
                     _ms(lat[role]["p99"]), _ms(lat[role]["max"]), _with_bound(errors[role])] for role in ROLES])),
    ]
    if roles:
        rows = [[f"{edges[i]:.3f} - {edges[i + 1]:.3f}", *(str(hist["counts"][r][i]) for r in roles)]
                for i in range(len(edges) - 1)]
        rows.append([f"> {edges[-1]:.3f}", *(str(hist["above"][r]) for r in roles)])
        blocks.append(("table", (["ms", *roles], rows)))
        if svg:
            blocks += [("svg", (_histogram_svg(edges, hist["counts"][r], hist["above"][r]),
                                f"Latency histogram of the {r} (ms; the last bar is beyond the slower model's p99)"))
                       for r in roles]
    return [("Latency on the board", blocks)]


def _decisions_section(decisions: list[dict[str, Any]]) -> list[tuple[str, list[Block]]]:
    def evidence(e: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {dumps(v)}" for k, v in e.items())

    rows = [[x["time"], _cell(x["from"]), _cell(x["to"]), _cell(x["by"]), _cell(x["reason"]),
             _cell(evidence(x["evidence"]))] for x in decisions]
    return [("Gate decisions", [("p", f"{len(decisions)} decision(s), in the order logged.")]
             + ([("table", (["time", "from", "to", "by", "reason", "evidence"], rows))] if rows else []))]


def _field_section(field: dict[str, Any] | None) -> list[tuple[str, list[Block]]]:
    if field is None:
        return [("Field metrics", [("p", "No labels: give the inspectors' verdicts with --labels FILE "
                                         "(CSV id,label or JSON Lines) to measure each model on the line's own data.")])]
    source = f"{field['labels']} ({field['labels_in_file']} labels)" if field["labels"] else "the log itself"
    models = field["models"]
    classes = sorted({c for m in models.values() for c in m["per_class"]})
    blocks: list[Block] = [
        ("p", f"Labels from {source}, joined by record id to {field['joined_predictions']} prediction(s); "
              f"{field['unknown_ids']} labelled id(s) are not in the log"
              + (f" (e.g. {', '.join(map(_cell, field['unknown_id_examples'][:5]))})" if field["unknown_ids"] else "")
              + ". Good class: " + (field["ok_class"] or "none (miss and false-alarm rates omitted)")
              + "; 'answered' is the answer the line acted on. Brackets: 95% Wilson interval."),
        ("table", (["model", "labelled", "accuracy", "defect miss rate", "false-alarm rate"],
                   [[role, str(m["labelled"]), _with_bound(m["accuracy"]),
                     _with_bound(m["miss_rate"]) if "miss_rate" in m else "n/a",
                     _with_bound(m["false_alarm_rate"]) if "false_alarm_rate" in m else "n/a"]
                    for role, m in models.items()])),
        ("table", (["true class", *(f"{role} recall" for role in models)],
                   [[_cell(c), *(_recall(m["per_class"].get(c)) for m in models.values())] for c in classes])),
    ]
    return [("Field metrics", blocks)]


def _recall(row: dict[str, Any] | None) -> str:
    return "n/a" if row is None else f"{row['recall']:.2%} of {row['support']}"


# ---- inline SVG plots: small, plain, no script ---------------------------------------------------------------------

_W, _H, _PAD = 640, 220, 40


def _svg(body: list[str], label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" '
            f'role="img" aria-label="{html.escape(label)}" font-family="sans-serif" font-size="11">'
            f'<rect width="{_W}" height="{_H}" fill="white"/>'
            f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - 10}" y2="{_H - _PAD}" stroke="#444"/>'
            f'<line x1="{_PAD}" y1="10" x2="{_PAD}" y2="{_H - _PAD}" stroke="#444"/>' + "".join(body) + "</svg>")


def _y(value: float, top: float) -> float:
    return _H - _PAD - (_H - _PAD - 10) * value / top


def _disagreement_svg(rows: list[dict[str, Any]], limit: float | None) -> str:
    # scaled to the rates and the cumulative bound: a short last window's wide bound is cut at the top, not allowed
    # to flatten everything else (the table gives it)
    top = min(1.0, max([r["rate"] for r in rows] + [r["cumulative_upper"] for r in rows] + [limit or 0.0]) * 1.5) or 1.0
    step = (_W - 10 - _PAD) / max(len(rows), 1)
    xs = [_PAD + step * (i + 0.5) for i in range(len(rows))]
    body = [f'<text x="2" y="14">{top:.1%}</text><text x="2" y="{_H - _PAD}">0%</text>',
            f'<text x="{_PAD}" y="{_H - 22}">{html.escape(rows[0]["start"][:19])}</text>',
            f'<text x="{_W - 10}" y="{_H - 22}" text-anchor="end">{html.escape(rows[-1]["end"][:19])}</text>']
    for key, colour in (("upper", "#e69f00"), ("cumulative_upper", "#0072b2")):
        points = " ".join(f"{x:.1f},{_y(min(r[key], top), top):.1f}" for x, r in zip(xs, rows))
        body.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
    body += [f'<circle cx="{x:.1f}" cy="{_y(r["rate"], top):.1f}" r="2" fill="#333"/>' for x, r in zip(xs, rows)]
    if limit is not None:
        body.append(f'<line x1="{_PAD}" x2="{_W - 10}" y1="{_y(limit, top):.1f}" y2="{_y(limit, top):.1f}" '
                    f'stroke="#d55e00" stroke-dasharray="4 3"/><text x="{_W - 10}" y="{_y(limit, top) - 3:.1f}" '
                    f'text-anchor="end" fill="#d55e00">limit {limit:.2%}</text>')
    body.append(f'<text x="{_PAD + 5}" y="{_H - 6}"><tspan fill="#333">&#9679; window rate</tspan> '
                '<tspan fill="#e69f00">&#8212; window upper bound</tspan> '
                '<tspan fill="#0072b2">&#8212; cumulative upper bound</tspan></text>')
    return _svg(body, "disagreement over time")


def _histogram_svg(edges: list[float], counts: list[int], above: int) -> str:
    bars = [*counts, above]
    top = max(bars) or 1
    step = (_W - 10 - _PAD) / len(bars)
    body = [f'<text x="2" y="14">{top}</text><text x="2" y="{_H - _PAD}">0</text>',
            f'<text x="{_PAD}" y="{_H - 24}">{edges[0]:.3f} ms</text>',
            f'<text x="{_W - 10 - step}" y="{_H - 24}" text-anchor="end">{edges[-1]:.3f} ms</text>',
            f'<text x="{_W - 10}" y="{_H - 10}" text-anchor="end" fill="#d55e00">beyond</text>']
    for i, n in enumerate(bars):
        y = _y(n, top)
        fill = "#d55e00" if i == len(counts) else "#0072b2"
        body.append(f'<rect x="{_PAD + step * i + 1:.1f}" y="{y:.1f}" width="{step - 2:.1f}" '
                    f'height="{_H - _PAD - y:.1f}" fill="{fill}"><title>{n}</title></rect>')
    return _svg(body, "latency histogram")


# ---- output ------------------------------------------------------------------------------------------------------

def check_output(path: Path, *inputs: Path | None) -> None:
    """Refuse, before reading anything, an output that cannot be written or would replace an input."""
    if path.is_dir():
        raise EdgeccError(f"output {path} is a directory")
    if not path.parent.is_dir():
        raise EdgeccError(f"output {path}: its folder {path.parent} does not exist")
    for source in inputs:
        if source is not None and source.exists() and path.exists() and path.samefile(source):
            raise EdgeccError(f"output {path} is an input of the report; name another file")


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`: never a half-written report."""
    try:
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise EdgeccError(f"cannot write {path}: {err.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException as err:
        with suppress(FileNotFoundError):
            os.unlink(temporary)
        if isinstance(err, OSError):
            raise EdgeccError(f"cannot write {path}: {err.strerror}") from None
        raise
