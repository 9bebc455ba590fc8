"""The board service's staged rollout on real int8 models: promotion by the gates, rollback of a degrading candidate,
kill -9 during switches, raw text answered as the build evaluates it, and bad input that never stops the service."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES, killed_after, needs_train_extra
from edgecc.board import serve
from edgecc.board.gates import ClassLimits, Gates, RolloutError, Tally, judge, load
from edgecc.board.preprocess import npy_array
from edgecc.build import _preprocessing
from edgecc.bundle import write_linux_bundle
from edgecc.data import Dataset, Preprocessing, load_dataset
from edgecc.emit import write_json
from edgecc.recipe import DataSection
from edgecc.runtime import Model
from edgecc.targets import load_target

LABELS = tuple(f"c{i}" for i in range(10))
GATES = """
[gates]
min_inputs = 30
max_disagreement = 0.35
max_error_rate = 0.15
max_p99_ms = 1000.0
"""


def make_bundle(folder: Path, model: Path, dataset: Dataset) -> Path:
    """A Linux bundle as `edgecc build` writes it: model.tflite, manifest.json's preprocessing, the board scripts."""
    folder.mkdir()
    shutil.copyfile(model, folder / "model.tflite")
    write_json(folder / "manifest.json", {"preprocessing": _preprocessing(dataset, Model(model.read_bytes()))})
    write_linux_bundle(folder, load_target("rpi4"), list(dataset.label_names), images=True)
    return folder


@pytest.fixture
def vit_rollout(tmp_path: Path) -> Path:
    """Candidate: the committed int8 ViT's bundle; baseline: the same network in float, a plain .tflite.
    They agree on inputs like the int8 model's calibration data (0..1) and not on inputs 10x larger (drift)."""
    pre = Preprocessing(raw="8x8 sensor values", layout="NHWC", input_shape=(8, 8, 1), scale=1.0, offset=0.0)
    dataset = Dataset("synthetic", np.zeros((1, 8, 8, 1), np.float32), np.zeros(1, np.int64), LABELS,
                      np.arange(1), np.arange(0), pre)
    bundle = make_bundle(tmp_path / "bundle", FIXTURES / "vit_int8.tflite", dataset)
    shutil.copyfile(FIXTURES / "vit_float.tflite", tmp_path / "v1.tflite")
    (bundle / "rollout.toml").write_text(f'baseline = "../v1.tflite"\ncanary_share = 0.5\n{GATES}')
    (tmp_path / "inbox").mkdir()
    return bundle


def drop_inputs(folder: Path, count: int, scale: float, start: int = 0) -> None:
    rng = np.random.default_rng(start)
    for i in range(start, start + count):
        np.save(folder / f"in{i:04d}.npy", rng.random((8, 8, 1), dtype=np.float32) * scale)


def records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def serve_folder(bundle: Path, *more: str) -> int:
    return serve.main(["--rollout", str(bundle / "rollout.toml"), "--watch", str(bundle.parent / "inbox"), "--once",
                       *more])


def test_a_whole_rollout_goes_shadow_canary_full_by_the_gates(vit_rollout: Path, capsys: pytest.CaptureFixture) -> None:
    drop_inputs(vit_rollout.parent / "inbox", 130, scale=1.0)
    assert serve_folder(vit_rollout) == 0
    log = records(vit_rollout / "rollout-audit.jsonl")
    decisions = [r for r in log if r["kind"] == "decision"]
    assert [(d["from"], d["to"], d["by"]) for d in decisions] == [("shadow", "canary", "gate"),
                                                                 ("canary", "full", "gate")]
    for d in decisions:  # promoted on the Wilson bound, not the raw rate
        assert d["evidence"]["inputs"] >= 30 and d["evidence"]["disagreement_upper"] <= 0.35
        assert d["evidence"]["disagreement_upper"] > d["evidence"]["disagreements"] / d["evidence"]["inputs"]
    predictions = [r for r in log if r["kind"] == "prediction"]
    assert len(predictions) == 130 and len({r["id"] for r in log}) == len(log)
    by_stage = {stage: [r for r in predictions if r["stage"] == stage] for stage in ("shadow", "canary", "full")}
    assert all(r["answered_by"] == "baseline" and r["candidate"]["class"] is not None for r in by_stage["shadow"])
    answered = {r["answered_by"] for r in by_stage["canary"]}
    assert answered == {"baseline", "candidate"} and all(r["agree"] is not None for r in by_stage["canary"])
    assert by_stage["full"] and all(r["answered_by"] == "candidate" and r["baseline"] is None and r["agree"] is None
                                    for r in by_stage["full"])
    assert json.loads((vit_rollout / "rollout-state.json").read_text())["stage"] == "full"
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["input"] for a in answers] == sorted(f"in{i:04d}.npy" for i in range(130))  # in name order

    assert serve_folder(vit_rollout) == 0  # a restart does not redo the processed files
    assert len(records(vit_rollout / "rollout-audit.jsonl")) == len(log)


def test_a_candidate_that_degrades_part_way_is_rolled_back_by_the_gate(vit_rollout: Path) -> None:
    inbox = vit_rollout.parent / "inbox"
    drop_inputs(inbox, 50, scale=1.0)
    drop_inputs(inbox, 50, scale=10.0, start=50)  # the line drifts: int8 saturates where float does not
    assert serve_folder(vit_rollout) == 0
    log = records(vit_rollout / "rollout-audit.jsonl")
    decisions = [r for r in log if r["kind"] == "decision"]
    assert [(d["from"], d["to"], d["by"]) for d in decisions] == [("shadow", "canary", "gate"),
                                                                 ("canary", "baseline", "gate")]
    evidence = decisions[-1]["evidence"]
    assert evidence["disagreement_lower"] > 0.35 and "disagreement" in decisions[-1]["reason"]
    after = [r for r in log[log.index(decisions[-1]) + 1:] if r["kind"] == "prediction"]
    assert after and all(r["stage"] == "baseline" and r["candidate"] is None for r in after)
    assert json.loads((vit_rollout / "rollout-state.json").read_text())["stage"] == "baseline"


BLOCKER = """
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("edgecc", "tensorflow", "tf_keras", "keras", "tokenizers"):
            raise ImportError(f"{name} is blocked: the board has the bundle folder only")
sys.meta_path.insert(0, Absent())
"""
DRIVER = """
import sys
from pathlib import Path
from edgecc.board import serve
from edgecc.board.gates import load

rollout = serve.Rollout(load(Path(sys.argv[1])))
service = serve.Service(rollout)
print("ready", flush=True)
for n in range(10**9):  # switches, and now and then an input
    if n % 5 == 0:
        service.handle(serve.Job("in.npy", path=Path(sys.argv[2])))
    rollout.command("rollback" if rollout.state["stage"] == "full" else "promote")
"""


def test_kill_9_at_random_moments_of_switching_leaves_one_stage_and_whole_records(vit_rollout: Path) -> None:
    toml = vit_rollout / "rollout.toml"
    toml.write_text(toml.read_text().replace("canary_share", "automatic = false\ncanary_share"))
    np.save(vit_rollout.parent / "in.npy", np.full((8, 8, 1), 0.5, np.float32))
    log, state = vit_rollout / "rollout-audit.jsonl", vit_rollout / "rollout-state.json"
    rng, rounds, behind = random.Random(0), 0, 0
    while rounds < 5 or not behind and rounds < 30:  # until a kill fell between a decision's record and its switch
        rounds += 1
        driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(toml), str(vit_rollout.parent / "in.npy")],
                                  stdout=subprocess.PIPE, text=True)
        try:
            with killed_after(driver):
                assert driver.stdout.readline() == "ready\n"
            time.sleep(rng.uniform(0.0, 0.15))
        finally:  # never left running: it loops for good, holding CI's output pipe
            driver.send_signal(signal.SIGKILL)
            driver.wait()
        lines = log.read_bytes().split(b"\n")
        assert lines[-1] == b""  # the log ends with a whole record
        written = [json.loads(line) for line in lines[:-1]]
        before = json.loads(state.read_text())
        assert before["stage"] in serve.STAGES  # exactly one active stage, readable
        restarted = serve.Rollout(load(toml))  # finishes a switch the log holds but the state file missed
        last = ([{"id": None, "to": "shadow"}] + [r for r in written if r["kind"] == "decision"])[-1]
        assert (restarted.state["decision"], restarted.state["stage"]) == (last["id"], last["to"])
        assert restarted.bad_lines == []
        restarted.log.close()
        behind += before["decision"] != last["id"]
    assert behind, "no kill fell mid-switch in 30 rounds"
    decisions = [r for r in records(log) if r["kind"] == "decision"]
    assert all(a["to"] == b["from"] for a, b in zip(decisions, decisions[1:]))


def test_bad_inputs_are_rejected_and_a_torn_log_line_is_kept(vit_rollout: Path, capsys: pytest.CaptureFixture) -> None:
    import importlib.util

    pillow = importlib.util.find_spec("PIL") is not None  # absent on the base install: the image is then refused
    inbox = vit_rollout.parent / "inbox"
    log = vit_rollout / "rollout-audit.jsonl"
    torn = b'{"kind":"rejected","id":"0-1","time":"2026-12-01T00:00:00.000000+00:00","input":"x","reason":"r"}\n{"kin'
    log.write_bytes(torn)
    drop_inputs(inbox, 3, scale=1.0)
    (inbox / "b0_garbage.npy").write_bytes(b"not numpy")
    np.save(inbox / "b1_shape.npy", np.zeros(5, np.float32))
    np.save(inbox / "b2_type.npy", np.array(["a"] * 64))
    (inbox / "b3_note.txt").write_text("a text, for a model that takes arrays")
    if pillow:
        from PIL import Image

        Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(inbox / "b4_image.png")
    else:
        (inbox / "b4_image.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert serve_folder(vit_rollout) == 0
    err = capsys.readouterr().err
    assert "line(s) 2 are not whole records" in err
    content = log.read_bytes()
    assert content.startswith(torn + b"\n")  # kept as it was; the new records start on a fresh line
    written = [json.loads(line) for line in content[len(torn) + 1:].splitlines()]
    rejected = {r["input"]: r["reason"] for r in written if r["kind"] == "rejected"}
    assert set(rejected) == {"b0_garbage.npy", "b1_shape.npy", "b2_type.npy", "b3_note.txt"} | \
        (set() if pillow else {"b4_image.png"})
    assert "not a .npy file" in rejected["b0_garbage.npy"] and "shape (5,)" in rejected["b1_shape.npy"]
    assert "<U1" in rejected["b2_type.npy"] and "not an input this model takes" in rejected["b3_note.txt"]
    served = [r["input"] for r in written if r["kind"] == "prediction"]
    if not pillow:
        assert "needs Pillow: pip install pillow" in rejected["b4_image.png"]
    assert served == ["b4_image.png"] * pillow + ["in0000.npy", "in0001.npy", "in0002.npy"]  # the service went on


def test_a_gate_file_with_an_unknown_field_is_refused_and_the_gates_in_force_stay(
        vit_rollout: Path, capsys: pytest.CaptureFixture) -> None:
    toml = vit_rollout / "rollout.toml"
    good = toml.read_text()
    toml.write_text(good.replace("min_inputs", "min_input").replace("canary_share = 0.5", "canary_share = 2.0"))
    with pytest.raises(RolloutError) as caught:  # every problem at once, each by its field
        load(toml)
    assert "gates.min_input: unknown field" in str(caught.value)
    assert "canary_share: 2.0 is above the maximum 1.0" in str(caught.value)
    assert serve_folder(vit_rollout) == 2 and "gates.min_input: unknown field" in capsys.readouterr().err

    toml.write_text(good)
    rollout = serve.Rollout(load(toml))
    service = serve.Service(rollout)
    drop_inputs(vit_rollout.parent / "inbox", 2, scale=1.0)
    first = service.handle(serve.Job("in0000.npy", path=vit_rollout.parent / "inbox" / "in0000.npy"))
    toml.write_text(good.replace("max_p99_ms", "max_p99") )  # edited while serving
    os.utime(toml, ns=(time.time_ns(), time.time_ns() + 10**9))
    second = service.handle(serve.Job("in0001.npy", path=vit_rollout.parent / "inbox" / "in0001.npy"))
    assert "gates.max_p99: unknown field" in capsys.readouterr().err
    assert first["label"] and second["label"] and rollout.config.gates.max_p99_ms == 1000.0
    third = service.handle(serve.Job("stdin:3", text="/no/such/file.npy"))  # a line naming no file, no text model
    assert "this model does not take text" in third["rejected"]
    assert [r["kind"] for r in records(rollout.config.log)] == ["prediction", "prediction", "rejected"]


def test_commands_promote_and_roll_back_with_evidence(vit_rollout: Path, capsys: pytest.CaptureFixture) -> None:
    rollout = ["--rollout", str(vit_rollout / "rollout.toml")]
    assert serve.main([*rollout, "promote"]) == 0 and serve.main([*rollout, "rollback"]) == 0
    assert serve.main([*rollout, "rollback"]) == 2
    out, err = capsys.readouterr()
    assert out.splitlines() == ["shadow -> canary", "canary -> baseline"] and "already answers" in err
    assert serve.main([*rollout, "status"]) == 0
    assert json.loads(capsys.readouterr().out)["stage"] == "baseline"
    decisions = records(vit_rollout / "rollout-audit.jsonl")
    assert [(d["to"], d["by"], d["evidence"]["inputs"]) for d in decisions] == [("canary", "command", 0),
                                                                               ("baseline", "command", 0)]
    assert serve.main([*rollout, "--http", "0", "--bind", "0.0.0.0"]) == 2  # other machines only when asked


def test_a_text_bundle_answers_raw_text_as_the_build_evaluates(tmp_path: Path) -> None:
    words = ["bolt", "crack", "scratch", "rust", "dent", "ok", "fine", "good", "line", "part", "edge", "spot"]
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=rng.integers(2, 12))) + rng.choice(["", "!", " ?"]) for _ in range(60)]
    (tmp_path / "texts.txt").write_text("".join(f"{['a', 'b', 'c'][i % 3]} {t}\n" for i, t in enumerate(texts)))
    section = DataSection(source="text", path="texts.txt", format="label-text", test_every=2, sequence_length=8,
                          min_count=1, max_vocabulary=50)
    dataset = load_dataset(section, seed=0, base=tmp_path)
    bundle = make_bundle(tmp_path / "bundle", FIXTURES / "text_int8.tflite", dataset)
    shutil.copyfile(FIXTURES / "text_int8.tflite", tmp_path / "v1.tflite")
    (bundle / "rollout.toml").write_text('baseline = "../v1.tflite"\n')
    model = Model((FIXTURES / "text_int8.tflite").read_bytes())
    expected = [dataset.label_names[int(np.argmax(model.invoke(dataset.x[i])))] for i in dataset.test_index]
    lines = "".join(f"{texts[i]}\n" for i in dataset.test_index)

    board = (f"{BLOCKER}import runpy, sys\n"  # the bundle alone: edgecc and TensorFlow cannot be imported
             "sys.argv = ['serve.py', '--rollout', 'rollout.toml', '--stdin', '--once']\n"
             "runpy.run_path('serve.py', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", board], input=lines, capture_output=True, text=True, cwd=bundle,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["label"] for line in result.stdout.splitlines()] == expected
    logged = [r for r in records(bundle / "rollout-audit.jsonl") if r["kind"] == "prediction"]
    assert [r["candidate"]["label"] for r in logged] == expected and all(r["agree"] for r in logged)
    assert [r["input"] for r in logged] == [f"stdin:{n}" for n in range(1, len(expected) + 1)]


def test_http_answers_on_localhost(vit_rollout: Path) -> None:
    process = subprocess.Popen([sys.executable, "serve.py", "--rollout", "rollout.toml", "--http", "0"],
                               cwd=vit_rollout, stderr=subprocess.PIPE, text=True)
    try:
        with killed_after(process):
            address = next(line for line in process.stderr if "listening on " in line).split("listening on ")[1].strip()
        assert address.startswith("http://127.0.0.1:")
        body = vit_rollout.parent / "in.npy"
        np.save(body, np.full((8, 8, 1), 0.5, np.float32))
        request = urllib.request.Request(address, data=body.read_bytes(),
                                         headers={"Content-Type": "application/x-npy"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            answer = json.loads(reply.read())
        assert answer["input"] == "http:1" and answer["label"] in LABELS
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 130
    assert [r["input"] for r in records(vit_rollout / "rollout-audit.jsonl")] == ["http:1"]


def prediction(baseline: str, candidate: str) -> dict:
    return {"baseline": {"class": LABELS.index(baseline), "label": baseline, "latency_ms": 1.0, "error": None},
            "candidate": {"class": LABELS.index(candidate), "label": candidate, "latency_ms": 1.0, "error": None}}


def test_per_class_gates_roll_back_a_candidate_that_misses_defects_and_wait_for_unseen_classes() -> None:
    limits = {"c1": ClassLimits(max_missed=0.05), "c2": ClassLimits(max_disagreement=0.2)}
    gates = Gates(min_inputs=30, max_disagreement=0.5, max_error_rate=0.5, ok_class="c0", classes=limits)
    tally = Tally()
    for i in range(60):  # c1 (a defect) called c0 (ok) 1 time in 4: 15 of 60 overall, under the global limit
        tally.add(prediction("c1", "c0" if i % 4 == 0 else "c1"), gates.ok_class)
    verdict = judge(tally, gates, compare=True)
    assert verdict.action == "rollback" and verdict.reason.startswith("c1.missed 15/60")
    assert verdict.evidence["per_class"]["c1"]["missed"]["lower"] > 0.05
    assert verdict.evidence["disagreement_upper"] < 0.5

    agreeing = Tally()
    for _ in range(60):
        agreeing.add(prediction("c1", "c1"), gates.ok_class)
    verdict = judge(agreeing, gates, compare=True)  # c2 never seen: its bound is 0..1, so no promotion yet
    assert verdict.action == "wait" and "c2.disagreement 0/0" in verdict.reason


def test_fsync_interval_loses_no_answered_record_to_kill_9(vit_rollout: Path) -> None:
    """Without an fsync per record, what os.write gave the kernel survives the process: kill -9 loses nothing."""
    inbox = vit_rollout.parent / "inbox"
    drop_inputs(inbox, 20, scale=1.0)
    process = subprocess.Popen([sys.executable, "serve.py", "--rollout", "rollout.toml", "--stdin",
                                "--fsync", "interval", "3600"], cwd=vit_rollout, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        for path in sorted(inbox.iterdir()):
            process.stdin.write(f"{path}\n")
        process.stdin.flush()
        with killed_after(process):
            answered = [json.loads(process.stdout.readline()) for _ in range(20)]
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    logged = records(vit_rollout / "rollout-audit.jsonl")
    assert [r["id"] for r in logged] == [a["id"] for a in answered]
    assert all(r["kind"] == "prediction" and r["agree"] is not None for r in logged)
    bad = serve.main(["--rollout", str(vit_rollout / "rollout.toml"), "--fsync", "interval", "0"])
    assert bad == 2


def tiny_keras(path: Path, lambda_layer: bool = False) -> object:
    """A tf_keras classifier of 8x8x1 inputs into 10 classes, saved as .keras at `path` (a Lambda: code in the file)."""
    from edgecc.train.tf import keras

    tf_keras = keras()
    tf_keras.utils.set_random_seed(0)
    inputs = tf_keras.Input((8, 8, 1))
    x = tf_keras.layers.Flatten()(inputs)
    if lambda_layer:
        x = tf_keras.layers.Lambda(lambda t: t * 2.0)(x)
    model = tf_keras.Model(inputs, tf_keras.layers.Dense(10)(x))
    model.save(path)
    return model


def test_a_keras_baseline_runs_in_safe_mode_with_the_bundles_preprocessing(vit_rollout: Path) -> None:
    needs_train_extra()
    toml = vit_rollout / "rollout.toml"
    model = tiny_keras(vit_rollout.parent / "v0.keras")
    toml.write_text(toml.read_text().replace("v1.tflite", "v0.keras"))
    inbox = vit_rollout.parent / "inbox"
    drop_inputs(inbox, 8, scale=1.0)
    rollout = serve.Rollout(load(toml))
    service = serve.Service(rollout)
    answers = [service.handle(serve.Job(path.name, path=path)) for path in sorted(inbox.iterdir())]
    expected = [int(np.argmax(model(np.load(path)[np.newaxis]))) for path in sorted(inbox.iterdir())]
    logged = records(rollout.config.log)
    assert [r["baseline"]["class"] for r in logged] == expected == [a["class"] for a in answers]
    assert all(r["candidate"]["error"] is None and r["agree"] is not None for r in logged)
    assert logged[0]["baseline"]["model_sha256"] == serve.sha256_file(vit_rollout.parent / "v0.keras")

    tiny_keras(vit_rollout.parent / "v0.keras", lambda_layer=True)  # code in the file: refused, never run
    with pytest.raises(RolloutError, match="v0.keras is not a Keras model this service can load in safe mode"):
        serve.Service(serve.Rollout(load(toml)))


def test_a_keras_baseline_without_tensorflow_is_refused_in_one_line(vit_rollout: Path) -> None:
    (vit_rollout.parent / "v0.keras").write_bytes(b"a .keras file")
    toml = vit_rollout / "rollout.toml"
    toml.write_text(toml.read_text().replace("v1.tflite", "v0.keras"))
    board = (f"{BLOCKER}import runpy, sys\n"  # the bundle on a board without TensorFlow
             "sys.argv = ['serve.py', '--rollout', 'rollout.toml', '--stdin', '--once']\n"
             "runpy.run_path('serve.py', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", board], input="", capture_output=True, text=True, cwd=vit_rollout,
                            timeout=60)
    assert result.returncode == 2  # one line, after LiteRT's own note on loading the candidate
    assert result.stderr.splitlines()[-1].startswith("serve.py: ../v0.keras: a .keras model needs TensorFlow and "
                                                     "tf_keras, which this machine lacks")


def test_npy_inputs_read_from_their_cached_header_equal_numpys_reading() -> None:
    arrays = [np.arange(64, dtype=">f4").reshape(8, 8, 1), np.asfortranarray(np.arange(12.0).reshape(3, 4)),
              np.arange(5, dtype=np.int16)]
    for array in arrays:
        for version in ((1, 0), (2, 0)):
            stream = io.BytesIO()
            np.lib.format.write_array(stream, array, version=version)
            for _ in range(2):  # numpy parses the header, then the bytes are read behind the cached one
                read = npy_array(stream.getvalue())
                assert read.dtype == array.dtype and read.shape == array.shape and (read == array).all()
            with pytest.raises(ValueError):
                npy_array(stream.getvalue()[:-2])  # cut short: rejected, not read past its end


def test_a_runtime_error_is_logged_with_agree_null_and_counted_as_an_error_not_a_comparison(tmp_path: Path) -> None:
    pre = Preprocessing(raw="token ids", layout="NL token ids", input_shape=(8,), scale=1.0, offset=0.0)
    dataset = Dataset("ids", np.zeros((1, 8), np.float32), np.zeros(1, np.int64), ("a", "b", "c"), np.arange(1),
                      np.arange(0), pre)
    bundle = make_bundle(tmp_path / "bundle", FIXTURES / "text_int8.tflite", dataset)
    shutil.copyfile(FIXTURES / "text_int8.tflite", tmp_path / "v1.tflite")
    (bundle / "rollout.toml").write_text('baseline = "../v1.tflite"\nautomatic = false\n')
    np.save(tmp_path / "ok.npy", np.arange(8, dtype=np.int32))
    np.save(tmp_path / "unknown.npy", np.full(8, 10**6, np.int32))  # ids past the vocabulary: GATHER fails
    rollout = serve.Rollout(load(bundle / "rollout.toml"))
    service = serve.Service(rollout)
    answers = [service.handle(serve.Job(name, path=tmp_path / name)) for name in ("ok.npy", "unknown.npy", "ok.npy")]
    assert [a["error"] is None for a in answers] == [True, False, True] and "gather" in answers[1]["error"]
    logged = records(rollout.config.log)
    assert [r["agree"] for r in logged] == [True, None, True]
    assert logged[1]["baseline"]["class"] is None and logged[1]["candidate"]["latency_ms"] is None
    verdict = rollout.verdict()  # the tally the gates judge, and one rebuilt from the log by a restart
    restarted = serve.Rollout(load(bundle / "rollout.toml"))
    for evidence in (verdict.evidence, restarted.verdict().evidence):
        assert (evidence["inputs"], evidence["errors"], evidence["compared"], evidence["disagreements"]) == (3, 1, 2, 0)
