"""The latency estimator's data: published measurements, the fitted classes, and the profile figures it reads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from edgecc.check import assess
from edgecc.errors import EdgeccError
from edgecc.latency import MODEL_FILE, class_models, load_measurements, read_models
from edgecc.targets import Figure, load_target
from test_targets import profile

DATASET = Path(__file__).parents[1] / "benchmarks" / "latency_measurements.toml"
MODEL = (Path(__file__).parent / "fixtures" / "vit_int8.tflite").read_bytes()


def test_the_dataset_validates_with_a_source_and_a_profile_for_every_row() -> None:
    rows = load_measurements(DATASET)
    assert len(rows) >= 60 and len({r.device for r in rows}) >= 10
    assert len({r.source.split("/blob/")[0] for r in rows}) >= 4  # independent publishers and repositories
    assert {load_target(r.device).runtime for r in rows} >= {"tflite-micro", "litert-xnnpack", "edgetpu"}


def test_a_bad_row_is_named_by_row_and_field(tmp_path: Path) -> None:
    text = DATASET.read_text()
    first = text.index("[[measurement]]")
    row = text[first:text.index("[[measurement]]", first + 1)]
    bad = (row.replace('device = "stm32l4r5"', 'device = "no-such-board"').replace("https://", "ftp://")
           .replace("latency_ms = 10.05", "latency_ms = -1.0"))
    path = tmp_path / "rows.toml"
    path.write_text(text + "\n" + row + "\n" + bad)
    with pytest.raises(EdgeccError) as err:
        load_measurements(path)
    assert "measurement[73].latency_ms: -1.0 must be above 0" in str(err.value)
    path.write_text(text + "\n" + row + "\n" + bad.replace("latency_ms = -1.0", "latency_ms = 10.05"))
    with pytest.raises(EdgeccError) as err:
        load_measurements(path)
    message = str(err.value)
    assert "measurement[72]: the same device" in message
    assert "measurement[73].device: no built-in profile 'no-such-board'" in message
    assert "measurement[73].source: an https address" in message


def test_a_faster_clock_gives_a_shorter_estimate() -> None:
    for name in ("stm32l4r5", "rpi4"):
        base = load_target(name)
        faster = dataclasses.replace(base, cpu=dataclasses.replace(
            base.cpu, clock_mhz=Figure(base.cpu.clock_mhz.value * 2, "test")))
        slow, fast = (assess(MODEL, t, measure_arena=False).latency.total_ms for t in (base, faster))
        assert fast < slow, name  # the operators' cycles halve; the memory term stays


def test_the_kernel_library_enters_the_estimate() -> None:
    """microTVM's compiled CMSIS-NN calls ran the MLPerf Tiny models faster than TFLite Micro on the same board."""
    base = load_target("stm32l4r5")
    tvm = dataclasses.replace(base, cpu=dataclasses.replace(base.cpu, kernels="microtvm-cmsis-nn"))
    interpreter, compiled = (assess(MODEL, t, measure_arena=False).latency for t in (base, tvm))
    assert compiled.total_ms == pytest.approx(interpreter.total_ms * class_models()["cortex-m"].kernels["microtvm-cmsis-nn"])
    assert compiled.total_ms < interpreter.total_ms and "microtvm-cmsis-nn kernels" in compiled.method


def test_fewer_threads_give_a_longer_estimate() -> None:
    from edgecc.cost import op_costs
    from edgecc.latency import estimate_latency
    from edgecc.reader import read_graph

    graph = read_graph(MODEL)
    rpi4 = load_target("rpi4")
    one, four = (estimate_latency(graph, op_costs(graph), rpi4, threads=n).total_ms for n in (1, 4))
    assert one > four


def test_the_band_check_reports_is_the_one_the_bench_stored() -> None:
    stored = read_models(MODEL_FILE)
    assert stored == class_models() and {"cortex-m", "cortex-a", "edgetpu"} <= set(stored)
    for name, cls in (("stm32l4r5", "cortex-m"), ("rpi4", "cortex-a")):
        latency = assess(MODEL, name, measure_arena=False).latency
        assert latency.low_ms == pytest.approx(latency.total_ms * stored[cls].band_low)
        assert latency.high_ms == pytest.approx(latency.total_ms * stored[cls].band_high)
        assert stored[cls].band_low < 1 < stored[cls].band_high


def test_an_unreadable_model_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "latency_model.toml"
    path.write_text("[class.cortex-m]\nrows = 3\n")
    with pytest.raises(EdgeccError, match="latency_model.toml: the latency model cannot be read"):
        read_models(path)


@pytest.mark.parametrize("field, value, message", [
    ("clock_mhz", "0", "cpu.clock_mhz.value: 0.0 must be above 0"),
    ("clock_mhz", "nan", "cpu.clock_mhz.value: nan is not a finite"),
    ("cores", "-2", "cpu.cores.value: -2 is below the minimum 1"),
    ("bandwidth_gbps", "inf", "memory.bandwidth_gbps.value: inf is not a finite"),
])
def test_bad_figures_the_estimator_reads_are_refused_by_field(tmp_path: Path, field: str, value: str, message: str) -> None:
    with pytest.raises(EdgeccError, match=message.replace(".", r"\.")):
        load_target(str(profile(tmp_path, "ra6m4", **{field: value})))


def test_a_profile_without_clock_is_refused_by_field(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text("\n".join(line for line in (Path(__file__).parents[1] / "targets" / "rpi3bplus.toml").read_text().splitlines()
                              if not line.startswith("clock_mhz")))
    with pytest.raises(EdgeccError, match=r"cpu\.clock_mhz"):
        load_target(str(path))
