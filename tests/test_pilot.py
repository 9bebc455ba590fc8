"""`edgecc pilot report` on logs written here and on a real `edgecc shadow` log: every figure checked against
a count made here from the same records, torn lines skipped and named, labels joined, bad input exits 2."""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import edgecc
from edgecc.emit import dumps
from edgecc.errors import EdgeccError
from edgecc.pilot import ReportOptions, report
from edgecc.shadow import shadow

NAMES = ["ok", "crack", "scratch"]
START = datetime(2026, 12, 1, 6, 0, tzinfo=timezone.utc)
Z95 = 1.959963984540054


def wilson(k: int, n: int) -> tuple[float, float]:
    """The Wilson score interval, written out here rather than taken from edgecc."""
    p = k / n
    centre, spread = p + Z95**2 / (2 * n), Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n))
    return (centre - spread) / (1 + Z95**2 / n), (centre + spread) / (1 + Z95**2 / n)


def run(cls: int | None, ms: float, error: str | None = None, sha: str = "b" * 64) -> dict[str, Any]:
    return {"model_sha256": sha, "class": cls, "label": None if cls is None else NAMES[cls], "latency_ms": ms,
            "error": error}


def board_log(path: Path, count: int = 600, seed: int = 0) -> list[dict[str, Any]]:
    """A board service log as the contract writes it, with runtime errors, a candidate that did not run, gate
    decisions and rejections; three broken lines (a torn write, garbage, NaN) sit among the records."""
    rng = random.Random(seed)
    records: list[dict[str, Any]] = []
    for i in range(count):
        when = (START + timedelta(seconds=i)).isoformat(timespec="microseconds")
        stage = "shadow" if i < count // 2 else "canary"
        if i == count // 2:
            records.append({"kind": "decision", "id": f"d{i}", "time": when, "from": "shadow", "to": "canary",
                            "by": "gate", "reason": "every gate holds", "evidence": {"inputs": i, "upper": 0.031}})
        if i % 97 == 5:
            records.append({"kind": "rejected", "id": f"r{i}", "time": when, "input": f"part{i}.png",
                            "reason": rng.choice(["not an image", "wrong size"])})
            continue
        b = rng.choice([0, 0, 1, 2])
        c = b if rng.random() < 0.9 else rng.randrange(3)
        base = run(b, rng.uniform(4, 6))
        cand = run(c, rng.uniform(1, 2), sha="c" * 64)
        if i % 50 == 7:
            cand = run(None, 0.5, error="invoke failed", sha="c" * 64)
        if i % 70 == 3:
            cand = None
        both = cand is not None and cand["class"] is not None
        records.append({"kind": "prediction", "id": f"p{i}", "time": when, "stage": stage, "input": f"part{i}.png",
                        "input_sha256": "0" * 64,
                        "answered_by": "candidate" if stage == "canary" and i % 3 == 0 and both else "baseline",
                        "baseline": base, "candidate": cand, "agree": (b == c) if both else None})
    lines = [json.dumps(r) for r in records]
    lines.insert(100, '{"kind": "prediction", "id": "torn", "ti')
    lines.insert(200, "garbage \x00 not json")
    lines.insert(300, json.dumps(records[0]).replace('"latency_ms": ', '"latency_ms": NaN, "x": ', 1))
    path.write_text("\n".join(lines) + "\n")
    return records


def test_every_figure_matches_a_count_made_from_the_records(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    records = board_log(log)
    data = report(log, ReportOptions(window="100", max_disagreement=0.5)).to_json()

    predictions = [r for r in records if r["kind"] == "prediction"]
    compared = [r for r in predictions if r["agree"] is not None]
    disagree = sum(not r["agree"] for r in compared)
    assert data["skipped"] == {"count": 3, "first": [
        {"line": 101, "reason": "not a whole JSON record"}, {"line": 201, "reason": "not a whole JSON record"},
        {"line": 301, "reason": "not a whole JSON record"}]}
    assert data["records"] == dict(Counter(r["kind"] for r in records))
    assert data["repeated_ids"] == {"count": 0, "first": []}
    dis = data["disagreement"]
    assert (dis["count"], dis["of"]) == (disagree, len(compared))
    assert (dis["low"], dis["high"]) == pytest.approx(wilson(disagree, len(compared)))
    assert dis["within_limit"] is True
    for stage in ("shadow", "canary"):
        mine = [r for r in compared if r["stage"] == stage]
        assert data["stages"][stage]["disagreement"]["count"] == sum(not r["agree"] for r in mine)

    windows = [compared[i:i + 100] for i in range(0, len(compared), 100)]
    assert [w["compared"] for w in data["windows"]["rows"]] == [len(w) for w in windows]
    seen = 0
    for row, chunk in zip(data["windows"]["rows"], windows):
        k = sum(not r["agree"] for r in chunk)
        seen += len(chunk)
        assert row["disagreements"] == k and row["upper"] == pytest.approx(wilson(k, len(chunk))[1])
        assert row["start"] == datetime.fromisoformat(chunk[0]["time"]).isoformat()
        assert row["cumulative_upper"] == pytest.approx(wilson(sum(not r["agree"] for r in compared[:seen]), seen)[1])

    both = Counter((r["baseline"]["class"], r["candidate"]["class"]) for r in predictions
                   if r["candidate"] is not None and r["candidate"]["class"] is not None)
    assert data["classes"] == {"0": "ok", "1": "crack", "2": "scratch"}
    assert data["confusion"] == [[both[b, c] for c in range(3)] for b in range(3)]

    for role in ("baseline", "candidate"):
        ran = [r[role] for r in predictions if r[role] is not None]
        ms = np.array([x["latency_ms"] for x in ran])
        lat = data["latency_ms"][role]
        assert lat["count"] == len(ms)
        assert [lat["p50"], lat["p90"], lat["p99"]] == pytest.approx(np.percentile(ms, [50, 90, 99]).tolist())
        hist = data["latency_histogram_ms"]
        assert sum(hist["counts"][role]) + hist["above"][role] == len(ms)
        assert data["runtime_errors"][role]["count"] == sum(x["error"] is not None for x in ran)
    assert data["answered_by"] == dict(Counter(r["answered_by"] for r in predictions))
    decision = next(r for r in records if r["kind"] == "decision")
    assert [(d["from"], d["to"], d["by"], d["evidence"]) for d in data["decisions"]] == [
        ("shadow", "canary", "gate", decision["evidence"])]
    assert data["rejected"]["reasons"] == dict(Counter(r["reason"] for r in records if r["kind"] == "rejected"))
    assert data["field"] is None

    # the gate judges the upper bound, not the raw rate
    rate = disagree / len(compared)
    assert not report(log, ReportOptions(max_disagreement=(rate + dis["high"]) / 2)).ok


def test_automatic_and_time_windows(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    records = board_log(log, count=3000)
    compared = [r for r in records if r["kind"] == "prediction" and r["agree"] is not None]
    auto = report(log, ReportOptions()).to_json()["windows"]
    assert 26 <= len(auto["rows"]) <= 50 and sum(w["compared"] for w in auto["rows"]) == len(compared)
    assert all(w["compared"] == auto["size"] for w in auto["rows"][:-1])
    by_time = report(log, ReportOptions(window="10m")).to_json()["windows"]
    per_slot = Counter(int((datetime.fromisoformat(r["time"]) - START).total_seconds() // 600) for r in compared)
    assert [w["compared"] for w in by_time["rows"]] == [per_slot[k] for k in sorted(per_slot)]


def test_labels_join_by_id_and_give_field_metrics(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    records = board_log(log)
    rng = random.Random(1)
    predictions = [r for r in records if r["kind"] == "prediction"]
    labelled = {r["id"]: rng.choice([0, 0, 1, 2]) for r in predictions if rng.random() < 0.7}
    csv_file, jsonl_file = tmp_path / "labels.csv", tmp_path / "labels.jsonl"
    rows = [(rid, NAMES[t] if i % 2 else str(t)) for i, (rid, t) in enumerate(labelled.items())]  # names and indices
    rows += [("p999999", "crack"), ("lost-part", "ok")]
    csv_file.write_text("id,label\n" + "".join(f"{rid},{label}\n" for rid, label in rows))
    jsonl_file.write_text("".join(json.dumps({"id": rid, "label": label}) + "\n" for rid, label in rows))

    data = report(log, ReportOptions(labels=csv_file)).to_json()
    assert report(log, ReportOptions(labels=jsonl_file)).to_json()["field"] == {**data["field"],
                                                                                 "labels": str(jsonl_file)}
    field = data["field"]
    assert (field["unknown_ids"], field["unknown_id_examples"]) == (2, ["lost-part", "p999999"])
    assert field["joined_predictions"] == len(labelled) and field["ok_class"] == "ok"
    for role in ("baseline", "candidate", "answered"):
        pairs = []
        for r in predictions:
            model = r[r["answered_by"] if role == "answered" else role]
            if r["id"] in labelled and model is not None and model["class"] is not None:
                pairs.append((labelled[r["id"]], model["class"]))
        truth, predicted = np.array(pairs).T
        mine = field["models"][role]
        assert mine["labelled"] == len(pairs)
        assert mine["accuracy"]["rate"] == pytest.approx(np.mean(truth == predicted))
        for cls in range(3):
            assert mine["per_class"][NAMES[cls]]["recall"] == pytest.approx(np.mean(predicted[truth == cls] == cls))
        assert mine["miss_rate"]["rate"] == pytest.approx(np.mean(predicted[truth != 0] == 0))
        assert mine["false_alarm_rate"]["rate"] == pytest.approx(np.mean(predicted[truth == 0] != 0))

    no_ok = report(log, ReportOptions(labels=csv_file, ok_class="crack")).to_json()["field"]["models"]["baseline"]
    assert no_ok["miss_rate"]["of"] == sum(1 for r in predictions if r["id"] in labelled and labelled[r["id"]] != 1)
    with pytest.raises(EdgeccError, match="--ok-class 'fine' is not a class"):
        report(log, ReportOptions(labels=csv_file, ok_class="fine"))


def test_a_real_shadow_log_reports_as_shadow_did(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.normal(size=(60, 8, 8, 1)).astype(np.float32),
             y=rng.integers(0, 10, size=60))
    log = tmp_path / "shadow.jsonl"
    summary = shadow(tiny_models["vit_float"], tiny_models["vit_int8"], tmp_path / "data.npz", log)
    with log.open("a") as f:
        f.write('{"index": 60, "input_sha256": "')  # an older crash's torn write

    out, page = tmp_path / "report.json", tmp_path / "report.html"
    result = edgecc("pilot", "report", str(log), "--json", "--out", str(out), "--html", str(page))
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["skipped"]["first"] == [{"line": 61, "reason": "not a whole JSON record"}]
    assert data["stages"] == {"shadow": {"predictions": 60, "disagreement": pytest.approx(
        {"count": summary.disagreements, "of": 60, "rate": summary.disagreement_rate,
         "low": wilson(summary.disagreements, 60)[0], "high": wilson(summary.disagreements, 60)[1]})}}
    classes = [int(c) for c in data["classes"]]
    assert data["confusion"] == [[summary.confusion[b][c] for c in classes] for b in classes]
    logged = [json.loads(line) for line in log.read_text().splitlines()[:60]]
    for role in ("baseline", "candidate"):
        ms = [r[role]["latency_ms"] for r in logged]
        assert data["latency_ms"][role]["p99"] == pytest.approx(float(np.percentile(ms, 99)))
        assert data["field"]["models"][role]["accuracy"]["rate"] == pytest.approx(summary.accuracy[role])
    assert data["models"]["candidate"] == {logged[0]["candidate"]["model_sha256"]: 60}

    text = page.read_text()
    assert text.count("<svg") == 3 and "<script" not in text
    assert not re.search(r"""(src|href)\s*=|url\(|@import|https?://(?!www\.w3\.org/2000/svg")""", text)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npz", "report.html", "report.json", "shadow.jsonl"]


@pytest.mark.parametrize("case", ["not a log", "unknown label", "output is the log"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, case: str) -> None:
    log, labels, out = tmp_path / "audit.jsonl", tmp_path / "labels.csv", tmp_path / "report.md"
    board_log(log, count=50)
    labels.write_text("id,label\np1,ok\np2,dent\n")
    args, named = {
        "not a log": ([str(labels)], f"{labels} is not an audit log"),
        "unknown label": ([str(log), "--labels", str(labels)], f"labels {labels}: line 3: label 'dent'"),
        "output is the log": ([str(log), "--html", str(log)], "is an input of the report"),
    }[case]
    before = log.read_bytes()
    result = edgecc("pilot", "report", *args, "--out", str(out))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and named in result.stderr
    assert log.read_bytes() == before and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.jsonl", "labels.csv"]


def test_the_gate_exits_1_above_the_limit_and_still_reports(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    board_log(log, count=200)
    result = edgecc("pilot", "report", str(log), "--max-disagreement", "0.01")
    assert result.returncode == 1, result.stderr
    assert "Limit 1.00% on the upper bound: ABOVE (exit 1)." in result.stdout
    assert "## Gate decisions" in result.stdout and "| shadow | canary | gate | every gate holds |" in result.stdout


def test_a_log_joined_with_part_of_itself_names_every_repeated_id(tmp_path: Path) -> None:
    """The first 120 lines appended again: each prediction among them is named as repeating its line, and counted
    again, as the notes say."""
    log = tmp_path / "audit.jsonl"
    board_log(log)
    clean = report(log, ReportOptions()).to_json()
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines + lines[:120]) + "\n")
    data = report(log, ReportOptions()).to_json()

    def prediction(line: str) -> bool:
        try:
            return json.loads(line)["kind"] == "prediction"
        except ValueError:  # line 101 is torn
            return False

    again = [(len(lines) + n, n) for n, line in enumerate(lines[:120], 1) if prediction(line)]
    assert data["repeated_ids"] == {"count": len(again), "first": [
        {"line": line, "repeats_line": earlier} for line, earlier in again[:20]]}
    assert sum(s["predictions"] for s in data["stages"].values()) == \
        sum(s["predictions"] for s in clean["stages"].values()) + len(again)
    assert any(note.startswith(f"{len(again)} prediction(s) repeat the id of an earlier one (line {again[0][0]} "
                               f"repeats line {again[0][1]}, ") for note in data["notes"])
    assert not any("repeat" in note for note in clean["notes"])


def test_mangled_records_are_skipped_or_reported_never_a_crash(tmp_path: Path) -> None:
    """Fields deleted or given wrong types, lines cut anywhere: a report or exit 2, never an internal error."""
    log = tmp_path / "audit.jsonl"
    records = board_log(log, count=150)
    rng = random.Random(2)
    wrong = [None, -1, 1.5, "x", [], {}, True, 10**30, "2026-13-01"]
    for _ in range(40):
        lines = []
        for record in json.loads(json.dumps(records)):
            target = record
            while rng.random() < 0.5 and any(isinstance(v, dict) for v in target.values()):
                target = rng.choice([v for v in target.values() if isinstance(v, dict)])
            key = rng.choice(list(target))
            if rng.random() < 0.3:
                del target[key]
            else:
                target[key] = rng.choice(wrong)
            lines.append(json.dumps(record) if rng.random() < 0.1 else json.dumps(records[len(lines)]))
        text = "\n".join(lines)
        log.write_text(text[:rng.randrange(len(text))])
        try:
            result = report(log, ReportOptions(window=rng.choice([None, "7", "1m"]), max_disagreement=0.1))
        except EdgeccError:
            continue
        result.markdown(), result.html(), dumps(result.to_json())


@pytest.mark.parametrize(("content", "message"), [
    ("id;label\np1;ok\n", "line 1 must be the header 'id,label'"),
    ("id,label\np1,ok\np1,crack\n", "line 3 labels id 'p1' 'crack', an earlier line 'ok'"),
    ('{"id": "p1", "label": "ok"}\n{"id": "p2"}\n', "line 2 is not a JSON object with 'id' and 'label'"),
    ("id,label\n", "holds no label"),
])
def test_bad_labels_files_are_named_with_their_line(tmp_path: Path, content: str, message: str) -> None:
    log, labels = tmp_path / "audit.jsonl", tmp_path / "labels.txt"
    board_log(log, count=20)
    labels.write_text(content)
    with pytest.raises(EdgeccError, match=re.escape(f"labels {labels}: {message}") if "line" in message else message):
        report(log, ReportOptions(labels=labels))


@pytest.mark.parametrize("window", ["0", "-3", "1.5", "15x", "infm", "m"])
def test_a_window_that_is_neither_a_count_nor_a_duration_is_refused(tmp_path: Path, window: str) -> None:
    log = tmp_path / "audit.jsonl"
    board_log(log, count=5)
    with pytest.raises(EdgeccError, match=re.escape(f"--window {window!r}: give a count")):
        report(log, ReportOptions(window=window))
