"""The latency estimator's data: published measurements, the fitted classes, and the profile figures it reads."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgecc.check import assess
from edgecc.errors import EdgeccError
from edgecc.latency import CPU_CLASS, MODEL_FILE, Measurement, class_models, load_measurements, read_models
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
    copy = text.count("[[measurement]]")  # the appended rows' indices: the copy, then the bad row
    added = copy + 1
    with pytest.raises(EdgeccError) as err:
        load_measurements(path)
    assert f"measurement[{added}].latency_ms: -1.0 must be above 0" in str(err.value)
    path.write_text(text + "\n" + row + "\n" + bad.replace("latency_ms = -1.0", "latency_ms = 10.05"))
    with pytest.raises(EdgeccError) as err:
        load_measurements(path)
    message = str(err.value)
    assert f"measurement[{copy}]: the same device" in message
    assert f"measurement[{added}].device: no built-in profile 'no-such-board'" in message
    assert f"measurement[{added}].source: an https address" in message


def test_a_faster_clock_gives_a_shorter_estimate() -> None:
    for name in ("stm32l4r5", "rpi4"):
        base = load_target(name)
        faster = dataclasses.replace(base, cpu=dataclasses.replace(
            base.cpu, clock_mhz=Figure(base.cpu.clock_mhz.value * 2, "test")))
        slow, fast = (assess(MODEL, t, measure_arena=False).latency.total_ms for t in (base, faster))
        assert fast < slow, name  # the operators' cycles halve; the memory term stays


def test_the_kernel_library_enters_the_estimate() -> None:
    """A board's kernel library scales its estimate by that library's fitted factor (compiled CMSIS-NN calls, by
    microTVM or ONNC, against TFLite Micro's interpreter), and the method names the library."""
    base = load_target("stm32l4r5")
    interpreter = assess(MODEL, base, measure_arena=False).latency
    for kernels in ("microtvm-cmsis-nn", "onnc-cmsis-nn"):
        board = dataclasses.replace(base, cpu=dataclasses.replace(base.cpu, kernels=kernels))
        compiled = assess(MODEL, board, measure_arena=False).latency
        factor = class_models()["cortex-m"].kernels[kernels]
        assert compiled.total_ms == pytest.approx(interpreter.total_ms * factor), kernels
        assert factor != pytest.approx(1.0, abs=1e-3) and f"{kernels} kernels" in compiled.method


def test_litert_builtin_kernels_run_element_wise_operators_on_one_thread() -> None:
    """LiteRT's built-in kernels spread matrix products over their threads but not an ADD; XNNPACK spreads both."""
    from edgecc.cost import OpCost
    from edgecc.latency import cpu_features

    rpi4 = load_target("rpi4")
    cost = OpCost(macs=4096, activation_bytes=0, weight_bytes=0)
    for kernels, add_spread in (("tflite", 1), ("litert-xnnpack", 4)):
        target = dataclasses.replace(rpi4, cpu=dataclasses.replace(rpi4.cpu, kernels=kernels))
        for kind, key, spread in (("ADD", "elementwise_int8", add_spread), ("FULLY_CONNECTED", "gemm_int8", 4)):
            one, four = (cpu_features(cost, kind, True, target, n)[key] for n in (1, 4))
            assert one / four == pytest.approx(spread), (kernels, kind)


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
        assert latency.low_ms == pytest.approx(latency.total_ms * stored[cls].band.low)
        assert latency.high_ms == pytest.approx(latency.total_ms * stored[cls].band.high)
        assert stored[cls].band.low < 1 < stored[cls].band.high


def test_the_band_follows_what_the_estimator_has_seen_of_the_board() -> None:
    """The bands as the bench stored them (read here with tomllib, not edgecc's reader): rpi4 has published rows, so
    its estimate gets the band of the rows held out with their model; rpi5 has none, so the band of the rows held out
    with their board and model at once; a profile `edgecc targets calibrate` wrote (it carries cpu.latency_scale), the
    band after calibration, whatever board it is of."""
    import tomllib

    stored = tomllib.loads(MODEL_FILE.read_text(encoding="utf-8"))["class"]["cortex-a"]
    assert "rpi4" in stored["devices"] and "rpi5" not in stored["devices"]
    rpi4 = load_target("rpi4")
    scaled = dataclasses.replace(rpi4.cpu, latency_scale=Figure(1.5, "test"))
    calibrated = dataclasses.replace(rpi4, name="my-pi", cpu=scaled)
    expected = {"rpi4": (stored["band_low"], stored["band_high"], "each held out with its model"),
                "rpi5": (stored["unseen"]["low"], stored["unseen"]["high"], "held out with its board and its model"),
                "my-pi": (stored["calibrated"]["low"], stored["calibrated"]["high"], "calibrated on 1 or 2")}
    for target in ("rpi4", "rpi5", calibrated):
        latency = assess(MODEL, target, measure_arena=False).latency
        low, high, words = expected[target if isinstance(target, str) else target.name]
        assert (latency.low_ms, latency.high_ms) == pytest.approx((latency.total_ms * low, latency.total_ms * high))
        assert words in latency.method


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


def test_the_cores_fp32_rate_scales_the_multiply_accumulates_of_int8_and_float_models() -> None:
    """A Cortex-A72 completes four fp32 multiply-accumulates a cycle, a Cortex-A7 one, and the SIMD datapath that sets
    this sets the int8 rate too: float and int8 models alike slow down on a 1-MAC core, by less than 4x, as the bytes
    moved and the per-operator cost do not scale; a profile without the figure gets the class's."""
    from edgecc.cost import op_costs
    from edgecc.latency import FP32_MACS_PER_CYCLE, estimate_latency
    from edgecc.reader import read_graph

    rpi4 = load_target("rpi4")
    assert rpi4.cpu.fp32_macs_per_cycle is not None and rpi4.cpu.fp32_macs_per_cycle.value == 4
    assert load_target("rpi2").cpu.fp32_macs_per_cycle.value == 1  # type: ignore[union-attr]
    assert load_target("coral-usb").cpu.fp32_macs_per_cycle == rpi4.cpu.fp32_macs_per_cycle  # its host is a Pi 4
    narrow = dataclasses.replace(rpi4, cpu=dataclasses.replace(rpi4.cpu, fp32_macs_per_cycle=Figure(1, "test")))
    unset = dataclasses.replace(rpi4, cpu=dataclasses.replace(rpi4.cpu, fp32_macs_per_cycle=None))
    for name in ("vit_float", "vit_int8"):
        graph = read_graph((Path(__file__).parent / "fixtures" / f"{name}.tflite").read_bytes())
        wide, one, default = (estimate_latency(graph, op_costs(graph), t) for t in (rpi4, narrow, unset))
        assert wide.total_ms < one.total_ms < 4 * wide.total_ms, name
        macs = [o.ms for o in wide.ops if o.macs]
        assert macs and max(o.ms for o in one.ops if o.macs) > max(macs), name
        assert default.total_ms == pytest.approx(wide.total_ms) and FP32_MACS_PER_CYCLE["cortex-a"] == 4
    assert "4 fp32 and 16 int8 MACs per cycle of a core" in wide.method


def test_the_cores_int8_rate_scales_only_the_int8_multiply_accumulates() -> None:
    """A Helium Cortex-M completes 4 times an M4's int8 MACs per cycle at 2 times its fp32 ones, so a profile may give
    the int8 rate apart: doubling it halves every int8 operator's work term (matrix product, depthwise or element-wise)
    and leaves its per-operator and memory terms and a float model's estimate as they were; without it the class's ratio
    to the fp32 rate stands in."""
    from edgecc.cost import op_costs
    from edgecc.latency import INT8_PER_FP32, cpu_features, estimate_latency, int8_macs_per_cycle
    from edgecc.reader import read_graph

    h7 = load_target("stm32h7")
    assert h7.cpu.int8_macs_per_cycle is None and int8_macs_per_cycle(h7) == INT8_PER_FP32["cortex-m"] == 2
    fast = dataclasses.replace(h7, cpu=dataclasses.replace(h7.cpu, int8_macs_per_cycle=Figure(4, "test")))
    fixtures = Path(__file__).parent / "fixtures"
    graph = read_graph((fixtures / "vit_int8.tflite").read_bytes())
    costs = op_costs(graph)
    checked = 0
    for op, cost in zip(graph.operators, costs):
        if not cost.macs:
            continue
        base, doubled = (cpu_features(cost, op.kind, True, t, 1) for t in (h7, fast))
        for name, value in base.items():
            assert doubled[name] == pytest.approx(value / 2 if name.endswith("_int8") else value), name
            checked += name.endswith("_int8")
    assert checked
    assert estimate_latency(graph, costs, fast).total_ms < estimate_latency(graph, costs, h7).total_ms
    rpi4 = load_target("rpi4")
    fast_rpi4 = dataclasses.replace(rpi4, cpu=dataclasses.replace(rpi4.cpu, int8_macs_per_cycle=Figure(64, "test")))
    floats = read_graph((fixtures / "vit_float.tflite").read_bytes())
    assert (estimate_latency(floats, op_costs(floats), fast_rpi4).total_ms
            == pytest.approx(estimate_latency(floats, op_costs(floats), rpi4).total_ms))


@pytest.mark.parametrize("field", ["fp32_macs_per_cycle", "int8_macs_per_cycle", "mac_scale"])
@pytest.mark.parametrize("value, message", [
    ("0", "0.0 must be above 0"),
    ("-4", "-4.0 must be above 0"),
    ("-1.5", "-1.5 must be above 0"),
    ("nan", "nan is not a finite"),
    ("inf", "inf is not a finite"),
])
def test_a_bad_cpu_rate_is_refused_by_field(tmp_path: Path, field: str, value: str, message: str) -> None:
    """A peak rate a user wrote from a datasheet, or a hand-edited or truncated calibrated profile's MAC factor, is
    named like every other figure (written into stm32h7's profile, which gives none of them)."""
    path = profile(tmp_path, "stm32h7")
    line = f'{field} = {{ value = {value}, source = "test" }}'
    path.write_text(path.read_text().replace("\nclock_mhz = ", f"\n{line}\nclock_mhz = "))
    with pytest.raises(EdgeccError, match=f"cpu.{field}.value: {message}".replace(".", r"\.")):
        load_target(str(path))


@pytest.fixture(scope="module")
def estimator() -> Any:
    """scripts/bench_estimator.py, whose fit needs scipy (in the training extra, not in the base install)."""
    pytest.importorskip("scipy")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_estimator

    return bench_estimator


def test_each_class_knows_the_precisions_its_published_rows_have(estimator: Any) -> None:
    """What latency_model.toml says each class was fitted on is what the dataset's modelled rows of that class are
    (counted here from the rows and profiles); a CPU term of another precision is a prior, and the estimate says so."""
    fitted: dict[str, set[str]] = {}
    for row in load_measurements(DATASET):
        if row.runtime in estimator.MODELLED:
            cls = "edgetpu" if row.runtime == "edgetpu" else CPU_CLASS[load_target(row.device).runtime]
            fitted.setdefault(cls, set()).add(row.precision)
    assert {cls: set(m.precisions) for cls, m in read_models(MODEL_FILE).items()} == fitted


def _synthetic_rows(estimator: Any, cls: str, truth: dict[str, float], outlier: int, off_by: float) -> list[Any]:
    """Twelve models whose published latency is `truth`'s estimate, each term's share spread over two decades, but
    for one row `off_by` times slower (as Coral's Inception-ResNet v2 against our rebuild's parameter count)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        shares = {name: 10 ** rng.uniform(-1, 1) / c for name, c in truth.items()}  # a term's ms at coefficient 1
        work = dict.fromkeys(estimator.TPU_FEATURES if cls == "edgetpu" else estimator.CPU_FEATURES, 0.0) | shares
        cpu, tpu = ({"op_cycles": 0.5}, work) if cls == "edgetpu" else (work, {})
        ms = sum(truth[n] * v for n, v in shares.items()) + (0.5 if tpu else 0)
        published = ms * (off_by if i == outlier else 1)
        rows.append(estimator.Row(i, "board", f"model{i}", "int8", "tflite", "build", published, cls,
                        "cortex-a" if tpu else cls, "tflite" if tpu else "tflite-micro", cpu, tpu))
    return rows


@pytest.mark.parametrize("cls, truth", [
    ("cortex-m", {"op_cycles": 2000, "gemm_int8": 3, "depthwise_int8": 5}),
    ("edgetpu", {"tpu_macs": 2, "invoke_ms": 1, "link": 1.2}),
])
def test_one_gross_outlier_cannot_drag_the_fit_of_the_other_rows(estimator: Any, monkeypatch: pytest.MonkeyPatch,
                                                                  cls: str, truth: dict[str, float]) -> None:
    """The same rule in every class: a row 2.2 times off leaves the others' coefficients and estimates where they are,
    where least squares (of the log ratio here) would move them all."""
    rows = _synthetic_rows(estimator, cls, truth, outlier=3, off_by=2.2)
    host = {"cortex-a": estimator.Fit({"op_cycles": 1.0})}  # an Edge TPU row's CPU part: 0.5 ms

    def fitted() -> tuple[dict[str, float], list[float]]:
        fits = host | {cls: estimator.fit(rows, cls, host)}
        return ({n: fits[cls].coefficients[n] / c - 1 for n, c in truth.items()},
                [estimator.estimate(r, fits) / r.published_ms - 1 for r in rows])

    coefficients, errors = fitted()
    assert max(map(abs, coefficients.values())) < 0.03, coefficients
    assert max(abs(e) for i, e in enumerate(errors) if i != 3) < 0.02
    assert errors[3] == pytest.approx(1 / 2.2 - 1, abs=0.02)  # the outlier stays as far off as it is
    monkeypatch.setattr(estimator, "ROBUST", {"loss": "linear"})
    coefficients, errors = fitted()
    assert max(map(abs, coefficients.values())) > 0.1 and max(abs(e) for i, e in enumerate(errors) if i != 3) > 0.1


def test_coefficients_and_a_kernel_librarys_factor_are_fitted_at_once(estimator: Any) -> None:
    """Eight of twelve models ran on a library 3x slower than the class's reference one: the fit gives back the
    reference coefficients and the factor 3, though most rows are the other library's."""
    truth = {"op_cycles": 2000, "gemm_int8": 3, "depthwise_int8": 5}
    rows = [dataclasses.replace(r, kernels="microtvm-cmsis-nn", published_ms=r.published_ms * 3) if r.index >= 4 else r
            for r in _synthetic_rows(estimator, "cortex-m", truth, outlier=-1, off_by=1.0)]
    fit = estimator.fit(rows, "cortex-m")
    assert {n: fit.coefficients[n] for n in truth} == pytest.approx(truth, rel=0.03)
    assert fit.kernels == {"microtvm-cmsis-nn": pytest.approx(3.0, rel=0.03)}
    assert max(abs(estimator.estimate(r, {"cortex-m": fit}) / r.published_ms - 1) for r in rows) < 0.02


def test_a_new_model_on_a_new_board_is_estimated_by_a_fit_on_rows_of_neither(estimator: Any) -> None:
    """The band of a board without rows comes from estimates whose fit saw neither the row's board nor its model:
    twelve rows over three boards (each its own speed) and four models, each estimate equal to the one of a fit on
    exactly the rows of another board and another model, and different from the fit that leaves out the board only."""
    speed = {"board0": 1.0, "board1": 1.5, "board2": 0.7}
    rows = [dataclasses.replace(r, device=f"board{r.index % 3}", model=f"model{r.index % 4}",
                                published_ms=r.published_ms * speed[f"board{r.index % 3}"])
            for r in _synthetic_rows(estimator, "cortex-m", {"op_cycles": 2000, "gemm_int8": 3}, outlier=-1, off_by=1)]
    by_pair = estimator.held_out(rows, estimator.fits_without_pair(rows), estimator.pair)
    by_device = estimator.held_out(rows, estimator.fits_without(rows, lambda r: r.device), lambda r: r.device)
    assert sorted(by_pair) == [r.index for r in rows]
    for r in rows:
        neither = estimator.fit_all([x for x in rows if x.model != r.model and x.device != r.device])
        assert by_pair[r.index] == pytest.approx(estimator.estimate(r, neither))
    assert any(by_pair[r.index] != pytest.approx(by_device[r.index]) for r in rows)


def test_calibration_is_judged_within_one_setup_of_a_board(estimator: Any) -> None:
    """A board's rows from two runtime builds, one twice as slow, each off the estimate by its own factor: calibrated
    on records of the same build, the other models of that build come out exact; builds and precisions never mix."""
    rows = [estimator.Row(i, "board", f"model{i % 4}", precision, "tflite", build, 10.0 * (i + 1) * factor,
                          "cortex-a", "cortex-a", "tflite", {"op_cycles": 10.0 * (i + 1)}, {})
            for i, (build, factor, precision) in enumerate([("2020", 2.0, "fp32")] * 4 + [("2022", 1.25, "fp32")] * 4
                                                           + [("2022", 1.25, "int8")] * 2)]
    fit = {"cortex-a": estimator.Fit({"op_cycles": 1.0})}  # the estimate: 10 ms x (index + 1)
    runs = estimator.calibrations(rows, {estimator.pair(r): fit for r in rows})
    lines = estimator.calibration_table(runs).splitlines()[2:]
    assert [line.split(" | ")[2:6] for line in lines] == [["tflite: 2020", "fp32", "4", "50% / 50%"],
                                                          ["tflite: 2022", "fp32", "4", "20% / 20%"]]
    assert all(line.endswith("| 0% / 0% | 0% / 0% |") for line in lines)
    calibrated = estimator.calibrated_ratios(runs)  # the band after calibration: every other model exact
    assert list(calibrated) == ["cortex-a"] and len(calibrated["cortex-a"]) == 2 * (4 * 3 + 6 * 2)
    assert calibrated["cortex-a"] == pytest.approx([1.0] * 48)


def test_a_lookup_moves_the_rows_it_gathers_not_its_whole_table() -> None:
    """The text fixture's embedding GATHER reads one table row per token: the bytes it moves are the ids, the rows
    and its output, however many rows the table has."""
    from edgecc.cost import op_costs
    from edgecc.reader import read_graph

    graph = read_graph((Path(__file__).parent / "fixtures" / "text_int8.tflite").read_bytes())
    (index, op), = [(i, op) for i, op in enumerate(graph.operators) if op.kind == "GATHER"
                    and graph.tensors[op.inputs[0]].constant and graph.tensors[op.inputs[0]].shape[0] > 2]
    table, ids, out = graph.tensors[op.inputs[0]], graph.tensors[op.inputs[1]], graph.tensors[op.outputs[0]]
    cost = op_costs(graph)[index]
    assert out.nbytes < table.nbytes
    assert (cost.weight_bytes, cost.bytes_moved) == (out.nbytes, ids.nbytes + 2 * out.nbytes)


def test_a_rows_floor_is_its_macs_at_peak_and_its_streamed_bytes_at_the_links_signalling_rate(
        estimator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The least time a rebuilt model can take, checked against the arithmetic: a 4096x4096 int8 fully connected
    layer is 16.8 M MACs at 16 int8 MACs a cycle on each of the Pi 4's four 1.5 GHz cores; on the Coral USB
    Accelerator its 16.8 MB of weights outgrow the 8 MB on-chip memory, and what is left must cross USB 3.0 (5 Gbit/s)
    every inference. A published figure below the floor is not of the rebuilt model, and the benchmark sets it
    aside."""
    pytest.importorskip("tensorflow")
    monkeypatch.setattr(estimator, "CACHE", tmp_path)
    monkeypatch.setattr(estimator, "BUILDERS", {"wide": lambda keras: keras.Sequential(
        [keras.Input((4096,)), keras.layers.Dense(4096)])})
    weights = 4096 * 4096

    def row(device: str, runtime: str) -> Any:
        return estimator.featurize(0, Measurement(device, runtime, "v", 4, "wide", "int8", 1.0, "https://example.org"))

    assert row("rpi4", "litert-xnnpack").floor_ms == pytest.approx(weights / (1500e6 * 4 * 16) * 1e3, rel=0.01)
    on_usb = row("coral-usb", "edgetpu").floor_ms
    assert (weights - 8e6) / 0.625e9 * 1e3 < on_usb < (weights - 6e6) / 0.625e9 * 1e3  # 6-8 MB cached on chip
