"""`edgecc bench` measures a model; `edgecc targets calibrate` fits a profile to that measurement."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from conftest import edgecc
from edgecc.calibrate import MAX_SPLIT
from edgecc.check import assess
from edgecc.targets import load_target


def test_bench_record(tiny_models, tmp_path: Path) -> None:
    record = tmp_path / "record.json"
    result = edgecc("bench", str(tiny_models["vit_int8"]), "--runs", "30", "--record", str(record), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(record.read_text())
    assert data == json.loads(result.stdout)
    assert 0 < data["p50_ms"] <= data["p90_ms"] <= data["p99_ms"]
    assert data["runs"] == 30 and data["threads"] == 1
    assert data["rss_after_bytes"] > 0 and data["model_rss_bytes"] == data["rss_after_bytes"] - data["rss_before_bytes"]


def test_bench_without_warm_up_times_the_zero_input() -> None:
    """Found by fuzzing: with `--warmup 0` the timed runs read an input tensor nothing had set, and a text model's
    GATHER took its garbage for token ids ("gather index out of bounds", exit 2) on a model that runs."""
    text_model = Path(__file__).parent / "fixtures" / "text_int8.tflite"
    result = edgecc("bench", str(text_model), "--runs", "2", "--warmup", "0", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["warmup"] == 0


def test_calibrated_profile_reproduces_the_measurement(tiny_models, tmp_path: Path) -> None:
    model = tiny_models["vit_int8"]
    record = tmp_path / "record.json"
    assert edgecc("bench", str(model), "--runs", "30", "--record", str(record), "--quiet").returncode == 0
    profile = tmp_path / "my-board.toml"
    result = edgecc("targets", "calibrate", str(record), str(model), "--target", "rpi4", "--out", str(profile))
    assert result.returncode == 0, result.stderr
    mine = load_target(str(profile))
    assert mine.name == "rpi4-calibrated" and "calibrated with edgecc bench" in mine.cpu.latency_scale.source
    estimate = assess(model.read_bytes(), mine, measure_arena=False).latency.total_ms
    assert estimate == pytest.approx(json.loads(record.read_text())["p50_ms"], rel=1e-4)


def test_calibrating_on_two_models_takes_the_geometric_mean_of_their_factors(tiny_models, tmp_path: Path) -> None:
    """Two models of the same share of multiply-accumulate work (one model, twice) give one factor."""
    model = tiny_models["vit_int8"]
    record = tmp_path / "record.json"
    assert edgecc("bench", str(model), "--runs", "10", "--record", str(record), "--quiet").returncode == 0
    p50 = json.loads(record.read_text())["p50_ms"]
    other = _record(tmp_path, "again", model, 4 * p50)
    profile = tmp_path / "mine.toml"
    result = edgecc("targets", "calibrate", str(record), str(model), str(other), str(model), "--target", "rpi4",
                    "--out", str(profile))
    assert result.returncode == 0, result.stderr
    mine = load_target(str(profile))
    assert mine.cpu.mac_scale is None
    assert mine.cpu.latency_scale.value == pytest.approx(2 * p50 / _estimate(model, "rpi4").total_ms, rel=1e-4)
    odd = edgecc("targets", "calibrate", str(record), str(model), str(other), "--target", "rpi4",
                 "--out", str(tmp_path / "x.toml"))
    assert odd.returncode == 2 and "records and models come in pairs" in odd.stderr


@pytest.mark.parametrize("mac, rest", [(2.0, 0.5), (20.0, 1.0)])
def test_models_that_differ_in_their_share_of_macs_calibrate_the_macs_apart(tiny_models, tmp_path: Path, mac: float,
                                                                           rest: float) -> None:
    """Records as a board would give them if it ran the MAC terms `mac` times and the rest `rest` times the estimate:
    from two models both factors come back, and a third model's estimate follows them; factors more than MAX_SPLIT
    apart are a fit to noise, not a board, and the geometric mean of the two models' ratios stands instead."""
    args = []
    for name in ("vit_int8", "gelu_int8"):
        model = tiny_models[name]
        estimate = _estimate(model, "rpi4")
        p50 = mac * estimate.mac_ms + rest * (estimate.total_ms - estimate.mac_ms)
        args += [str(_record(tmp_path, name, model, p50)), str(model)]
    profile = tmp_path / "mine.toml"
    result = edgecc("targets", "calibrate", *args, "--target", "rpi4", "--out", str(profile))
    assert result.returncode == 0, result.stderr
    mine = load_target(str(profile))
    third = _estimate(tiny_models["vit_float"], "rpi4")
    if mac / rest <= MAX_SPLIT:
        assert (mine.cpu.mac_scale.value, mine.cpu.latency_scale.value) == (pytest.approx(mac), pytest.approx(rest))
        assert _estimate(tiny_models["vit_float"], mine).total_ms == pytest.approx(
            mac * third.mac_ms + rest * (third.total_ms - third.mac_ms), rel=1e-5)
        assert f"multiply-accumulates by {mac:.3g}, the rest by {rest:.3g}" in result.stdout
    else:
        ratios = [json.loads(Path(rec).read_text())["p50_ms"] / _estimate(Path(m), "rpi4").total_ms
                  for rec, m in zip(args[::2], args[1::2])]
        assert mine.cpu.mac_scale is None
        assert mine.cpu.latency_scale.value == pytest.approx((ratios[0] * ratios[1]) ** 0.5, rel=1e-4)


def _record(tmp_path: Path, name: str, model: Path, p50_ms: float) -> Path:
    """A bench record of `model` with the given median (what calibrate reads of one)."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"model": name, "model_sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
                                "p50_ms": p50_ms}))
    return path


def _estimate(model: Path, target: Any) -> Any:
    return assess(model.read_bytes(), target, measure_arena=False).latency


def test_calibrate_refuses_a_record_of_another_model(tiny_models, tmp_path: Path) -> None:
    record = tmp_path / "record.json"
    assert edgecc("bench", str(tiny_models["vit_int8"]), "--runs", "5", "--record", str(record), "--quiet").returncode == 0
    result = edgecc("targets", "calibrate", str(record), str(tiny_models["gelu_int8"]), "--target", "rpi4",
                    "--out", str(tmp_path / "x.toml"))
    assert result.returncode == 2 and "sha256 differs" in result.stderr
    assert not (tmp_path / "x.toml").exists()


@pytest.mark.parametrize("p50", [0, -1.0, "NaN"])
def test_calibrate_refuses_a_latency_that_is_not_a_positive_number(tiny_models, tmp_path: Path, p50) -> None:
    model = tiny_models["vit_int8"]
    record = tmp_path / "record.json"
    assert edgecc("bench", str(model), "--runs", "3", "--record", str(record), "--quiet").returncode == 0
    data = json.loads(record.read_text())
    record.write_text(json.dumps({**data, "p50_ms": float(p50)}))
    result = edgecc("targets", "calibrate", str(record), str(model), "--target", "rpi4", "--out", str(tmp_path / "x.toml"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert ("p50_ms" if p50 != "NaN" else "NaN is not JSON") in result.stderr  # strict JSON refuses NaN itself
    assert not (tmp_path / "x.toml").exists()


def test_a_benchmark_judges_a_speed_goal_on_the_rpi4_estimate_not_on_its_host() -> None:
    """The brief judges device speed on the target's estimate: a host without VNNI runs int8 slower than a Pi does
    relative to float, so the host's ratio is shown beside the verdict and never decides it."""
    pytest.importorskip("scipy")  # bench_compression imports bench_estimator, whose fit needs it
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from bench_compression import speed_verdict

    assert "(yes, at least 5x; 2.98x on this run's host)" in speed_verdict("student", 5.77, 2.98, 5)
    assert "(NO, at least 3x; 4.00x on this run's host)" in speed_verdict("final int8", 2.5, 4.0, 3)
    assert "not judged" in speed_verdict("final int8", None, 4.0, 3)


def test_a_rendered_section_names_no_host_as_if_it_had_measured_there() -> None:
    """`--render` runs no task, so only the rows' own notes say where they were measured; a run names its host."""
    pytest.importorskip("scipy")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from bench_compression import command_line
    from bench_imbalance import host

    assert host() not in command_line("bench_micro.py", [], "--tasks ")
    assert command_line("bench_micro.py", ["digits", "trec"], "--tasks ") == \
        f"`python scripts/bench_micro.py --tasks digits trec` (the tasks run), on {host()}"
