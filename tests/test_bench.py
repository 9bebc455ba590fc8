"""`edgecc bench` measures a model; `edgecc targets calibrate` fits a profile to that measurement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import edgecc
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
    args = []
    for name in ("vit_int8", "gelu_int8"):
        model = tiny_models[name]
        record = tmp_path / f"{name}.json"
        assert edgecc("bench", str(model), "--runs", "10", "--record", str(record), "--quiet").returncode == 0
        args += [str(record), str(model)]
    profile = tmp_path / "mine.toml"
    result = edgecc("targets", "calibrate", *args, "--target", "rpi4", "--out", str(profile))
    assert result.returncode == 0, result.stderr
    mine = load_target(str(profile))
    ratios = [json.loads(Path(rec).read_text())["p50_ms"] / assess(Path(m).read_bytes(), "rpi4", measure_arena=False)
              .latency.total_ms for rec, m in zip(args[::2], args[1::2])]
    assert mine.cpu.latency_scale.value == pytest.approx((ratios[0] * ratios[1]) ** 0.5, rel=1e-4)
    odd = edgecc("targets", "calibrate", *args[:3], "--target", "rpi4", "--out", str(tmp_path / "x.toml"))
    assert odd.returncode == 2 and "records and models come in pairs" in odd.stderr


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
