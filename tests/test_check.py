"""`edgecc check` and `edgecc profile` on TFLite models, with the real TFLite Micro interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import FIXTURES, edgecc
from edgecc.arena import abort_cause, measure_arena
from edgecc.check import assess, stock_custom_ops
from edgecc.errors import EdgeccError
from edgecc.latency import class_models
from edgecc.liveness import lifetimes, plan_memory
from edgecc.reader import read_graph
from edgecc.runtime import load_interpreter
from edgecc.targets import load_target

TFLM_TARGET = "stm32h7"


def allocates(model: Path, size: int) -> bool:
    """Try TFLite Micro in a fresh process: a too-small arena may crash it instead of raising."""
    code = ("import sys\nfrom tflite_micro import runtime\n"
            f"runtime.Interpreter.from_bytes(open({str(model)!r}, 'rb').read(), arena_size={size})")
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_reported_arena_is_what_tflite_micro_needs(tiny_models) -> None:
    model = tiny_models["vit_int8"]
    arena = measure_arena(model)
    assert allocates(model, arena.bytes)
    assert not allocates(model, int(arena.bytes * 0.98))


def test_check_reports_the_measured_arena_plus_the_targets_margin(tiny_models) -> None:
    result = assess(tiny_models["vit_int8"].read_bytes(), TFLM_TARGET)
    assert result.arena is not None and result.arena.bytes > result.memory.lower_bound_bytes
    ram = next(b for b in result.budgets if b.name == "RAM")
    margin = result.target.arena.margin_bytes.value + result.arena.bytes * result.target.arena.margin_fraction.value
    assert ram.value == pytest.approx(result.arena.bytes + margin + result.target.memory.runtime_ram_bytes.value)
    assert "measured with the TFLite Micro interpreter" in ram.detail


def test_lower_bound_is_the_largest_live_set(tiny_models) -> None:
    graph = read_graph(tiny_models["vit_int8"].read_bytes())
    plan = plan_memory(graph)
    spans = lifetimes(graph)
    assert plan.lower_bound_bytes == max(sum(s.bytes for s in spans if s.first <= i <= s.last)
                                         for i in range(len(graph.operators)))
    assert plan.planned_bytes >= plan.lower_bound_bytes


def test_missing_tflm_ops_are_named(tiny_models) -> None:
    result = assess(tiny_models["gelu_int8"].read_bytes(), TFLM_TARGET)
    assert "GELU" in result.missing_ops
    operators = next(b for b in result.budgets if b.name == "operators")
    assert not operators.ok and "GELU" in operators.detail


SSD = FIXTURES / "ssd_postprocess.tflite"
UNKNOWN_CUSTOM = b"Plant_Defect_PostProcess_v2x"  # as long as the SSD's custom operator name, so a byte swap renames it


def test_a_custom_operator_that_stock_litert_registers_is_not_missing(tmp_path: Path) -> None:
    """An SSD's TFLite_Detection_PostProcess runs in every stock LiteRT: check passes its operators; the same
    model with a custom operator of another name needs a kernel no stock build has, and check names it, exit 1.
    The independent answer is the real interpreter, which runs the one and cannot resolve the other."""
    content = SSD.read_bytes()
    renamed = tmp_path / "renamed.tflite"
    renamed.write_bytes(content.replace(b"TFLite_Detection_PostProcess", UNKNOWN_CUSTOM))
    interpreter = load_interpreter(content)
    interpreter.invoke()
    assert len(interpreter.get_output_details()) == 4
    with pytest.raises(EdgeccError, match="custom op"):
        load_interpreter(renamed.read_bytes())

    assert assess(content, "rpi4").missing_ops == ()
    assert edgecc("check", str(SSD), "--target", "rpi4").returncode == 0
    result = assess(renamed.read_bytes(), "rpi4")
    assert result.missing_ops == ("CUSTOM:" + UNKNOWN_CUSTOM.decode(),)
    operators = next(b for b in result.budgets if b.name == "operators")
    assert not operators.ok and UNKNOWN_CUSTOM.decode() in operators.detail
    assert edgecc("check", str(renamed), "--target", "rpi4").returncode == 1


def test_tflite_micro_registers_the_custom_operators_check_accepts(tmp_path: Path) -> None:
    """What check takes as TFLite Micro's stock custom operators is what the real TFLite Micro interpreter resolves."""
    stock = stock_custom_ops(load_target(TFLM_TARGET))
    renamed = tmp_path / "renamed.tflite"
    renamed.write_bytes(SSD.read_bytes().replace(b"TFLite_Detection_PostProcess", UNKNOWN_CUSTOM))
    assert "TFLite_Detection_PostProcess" in stock and allocates(SSD, 200_000)
    assert UNKNOWN_CUSTOM.decode() not in stock and not allocates(renamed, 200_000)


def test_a_custom_operator_only_tflite_micro_has_is_judged_by_tflite_micro() -> None:
    """TFLite Micro's audio front end (SignalWindow and the other Signal* ops) is not in LiteRT: check does not ask
    LiteRT to load such a model for a TFLite Micro target, whose own interpreter gives the verdict (here: it refuses
    a SignalWindow fed with an SSD's tensors, and check says why), not a bad-input exit."""
    from edgecc.tflite_edit import pack, unpack

    model = unpack(SSD.read_bytes())
    code = next(c for c in model.operatorCodes if c.customCode)
    code.customCode = "SignalWindow"
    result = assess(pack(model), TFLM_TARGET)
    assert result.missing_ops == ()
    operators = next(b for b in result.budgets if b.name == "operators")
    assert not operators.ok and "TFLite Micro" in operators.detail


def test_check_cli_exit_codes_json_and_junit(tiny_models, tmp_path: Path) -> None:
    model = str(tiny_models["vit_int8"])
    ok = edgecc("check", model, "--target", "rpi4", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["ok"] is True
    junit = tmp_path / "check.xml"
    slow = edgecc("check", model, "--target", "rpi4", "--latency-ms", "0.0001", "--junit", str(junit))
    assert slow.returncode == 1, slow.stderr
    assert "does not fit" in slow.stdout and "latency" in slow.stdout
    suite = ET.parse(junit).getroot()
    assert suite.get("failures") == "1"
    failed = [case.get("name") for case in suite if case.find("failure") is not None]
    assert failed == ["latency"]


def test_a_model_that_aborts_tflite_micro_gets_a_verdict_from_the_plan(tiny_models) -> None:
    """An untrained MobileNet (the MLPerf Tiny VWW shape) calibrates its logits to a scale of ~1e-8, and TFLite
    Micro's int8 softmax aborts the process in Prepare: the RAM verdict falls back to edgecc's plan, saying why,
    and the model does not fit, since the board's interpreter would abort the same way."""
    from ai_edge_litert import schema_py_generated as schema
    from test_modelcheck import repacked

    def squash_softmax_input(model: schema.ModelT) -> None:
        code = next(i for i, c in enumerate(model.operatorCodes)
                    if max(c.builtinCode, c.deprecatedBuiltinCode) == schema.BuiltinOperator.SOFTMAX)
        graph = model.subgraphs[0]
        graph.tensors[next(o for o in graph.operators if o.opcodeIndex == code).inputs[0]].quantization.scale = [1e-9]

    content = tiny_models["vit_int8"].read_bytes()
    assert abort_cause(read_graph(content)) is None
    result = assess(repacked(squash_softmax_input, content), "stm32l4r5")
    assert result.arena is None and "SOFTMAX: its int8 input scale 1e-09 is at most 2^-26" in result.arena_failure
    ram = next(b for b in result.budgets if b.name == "RAM")
    assert ram.detail.startswith(f"tensor arena {result.memory.planned_bytes:,} B estimate: edgecc's activation plan")
    assert "could not run the model: op " in ram.detail and ram.ok
    operators = next(b for b in result.budgets if b.name == "operators")
    assert not operators.ok and operators.detail.startswith("the TFLite Micro interpreter cannot run this model: op ")
    assert result.verdict == "does not fit"


def test_a_1d_tensor_quantized_along_a_dimension_it_lacks_is_read_as_tflite_micro_reads_it(tiny_models) -> None:
    """TFLite Micro's person_detect example has biases whose per-channel quantized_dimension says 3. TFLite Micro
    runs such a model (its outputs are the unedited model's) and a microcontroller target gets a verdict; LiteRT
    refuses it, and so does a LiteRT target, naming the field."""
    import numpy as np
    from ai_edge_litert import schema_py_generated as schema
    from test_modelcheck import repacked

    from edgecc.errors import EdgeccError
    from edgecc.memplan import micro_outputs

    def along_3(model: schema.ModelT) -> None:
        (tensor,) = [t for t in model.subgraphs[0].tensors if t.quantization is not None
                     and t.quantization.scale is not None and len(t.quantization.scale) > 1 and len(t.shape) == 1]
        tensor.quantization.quantizedDimension = 3

    content = tiny_models["vit_int8"].read_bytes()
    edited = repacked(along_3, content)
    result = assess(edited, TFLM_TARGET)
    assert result.arena is not None and result.arena == assess(content, TFLM_TARGET).arena
    graph = read_graph(content)
    example = [[np.random.default_rng(0).integers(-128, 128, graph.tensors[graph.inputs[0]].shape, dtype=np.int8)]]
    assert np.array_equal(micro_outputs(edited, example, 65536)[0][0], micro_outputs(content, example, 65536)[0][0])
    with pytest.raises(EdgeccError, match="quantized_dimension"):
        assess(edited, "rpi4", measure_arena=False)


def test_latency_verdict_fits_does_not_fit_or_uncertain_from_the_band(tiny_models) -> None:
    content = tiny_models["vit_int8"].read_bytes()
    band = assess(content, "rpi4", measure_arena=False).latency
    assert band.low_ms < band.total_ms < band.high_ms
    for limit, verdict, ok in ((band.high_ms * 1.01, "fits", True), (band.low_ms * 0.99, "does not fit", False),
                               (band.total_ms, "uncertain", False)):
        result = assess(content, "rpi4", latency_ms=limit, measure_arena=False)
        latency = result.budgets[-1]
        assert (result.verdict, latency.ok, latency.uncertain) == (verdict, ok, verdict == "uncertain"), limit
    lenient = assess(content, "rpi4", latency_ms=band.total_ms, measure_arena=False, uncertain_passes=True)
    assert lenient.verdict == "uncertain" and lenient.ok


def test_check_cli_counts_an_uncertain_latency_as_the_flag_says(tiny_models) -> None:
    model = str(tiny_models["vit_int8"])
    limit = str(assess(tiny_models["vit_int8"].read_bytes(), "rpi4", measure_arena=False).latency.total_ms)
    strict = edgecc("check", model, "--target", "rpi4", "--latency-ms", limit)
    assert strict.returncode == 1 and "uncertain: latency (counts as fail" in strict.stdout, strict.stdout
    lenient = edgecc("check", model, "--target", "rpi4", "--latency-ms", limit, "--uncertain", "pass", "--json")
    assert lenient.returncode == 0, lenient.stderr
    data = json.loads(lenient.stdout)
    assert data["verdict"] == "uncertain" and data["budgets"][-1]["verdict"] == "uncertain"


@pytest.mark.parametrize(
    ("make_args", "fragment"),
    [
        (lambda m, d: [str(d / "absent.tflite"), "--target", "rpi4"], "does not exist"),
        (lambda m, d: [str(write(d / "x.tflite", b"not a model at all")), "--target", "rpi4"], "not a TFLite model"),
        (lambda m, d: [str(write(d / "t.tflite", m["vit_int8"].read_bytes()[:2000])), "--target", "rpi4"],
         "points outside the file"),
        (lambda m, d: [str(m["vit_float"]), "--target", str(int8_only_profile(d))],
         "a float model given to an int8-only target"),
        (lambda m, d: [str(m["vit_int8"]), "--target", "rpi9"], "unknown target 'rpi9'"),
        (lambda m, d: [str(m["vit_int8"]), "--target", str(write(d / "p.toml", b"name = 'x'\nruntime = 3"))],
         "runtime: expected a string, got 3"),
    ],
    ids=["missing", "not-tflite", "truncated", "float-on-int8-only", "unknown-target", "malformed-profile"],
)
def test_bad_input_exits_2_with_one_line(tiny_models, tmp_path: Path, make_args, fragment: str) -> None:
    for command in ("check", "profile"):
        result = edgecc(command, *make_args(tiny_models, tmp_path))
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], result.stderr


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def int8_only_profile(folder: Path) -> Path:
    """The TFLite Micro profile for a firmware that registers only int8 kernels (TFLite Micro itself runs float)."""
    text = (Path(__file__).parents[1] / "targets" / f"{TFLM_TARGET}.toml").read_text()
    return write(folder / "int8_only.toml", text.replace("int8_only = false", "int8_only = true").encode())


def test_tflite_micro_runs_a_float_model(tiny_models) -> None:
    """TFLite Micro has float32 kernels (its hello_world_float example): check measures the float model's arena with
    the real interpreter and labels the latency of its float operators as priced at prior rates (no published
    Cortex-M fp32 measurement), instead of refusing the model."""
    content = tiny_models["vit_float"].read_bytes()
    result = assess(content, TFLM_TARGET)
    assert result.arena is not None and allocates(tiny_models["vit_float"], result.arena.bytes)
    assert result.arena.bytes > assess(tiny_models["vit_int8"].read_bytes(), TFLM_TARGET).arena.bytes
    assert "fp32 operators are priced at the cortex-m class's prior rates" in result.latency.method
    assert "prior rates" not in assess(tiny_models["vit_int8"].read_bytes(), TFLM_TARGET).latency.method


def test_profile_lists_every_operator(tiny_models) -> None:
    result = edgecc("profile", str(tiny_models["vit_int8"]), "--target", TFLM_TARGET, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    graph = read_graph(tiny_models["vit_int8"].read_bytes())
    assert [row["op"] for row in data["operators"]] == [op.kind for op in graph.operators]
    assert sum(row["macs"] for row in data["operators"]) == data["total_macs"] > 0
    assert data["arena"]["bytes"] > 0


def test_check_and_profile_never_import_tensorflow(tiny_models) -> None:
    code = f"""
import sys
import edgecc.cli as cli
for command in ("check", "profile"):
    sys.argv = ["edgecc", command, {str(tiny_models["vit_int8"])!r}, "--target", {TFLM_TARGET!r}]
    try:
        cli.app(prog_name="edgecc")
    except SystemExit as done:
        assert done.code in (0, None), done.code
assert "tensorflow" not in sys.modules, "TensorFlow was imported"
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_edgetpu_check_splits_the_transformer_and_charges_the_link(tiny_models) -> None:
    result = assess(tiny_models["vit_int8"].read_bytes(), "coral-usb")
    plan = result.edgetpu
    assert plan is not None and plan.method.startswith("prediction")
    # judged as the bundle's pipeline: the stem and the head on the Edge TPU, the attention core a CPU island
    assert result.placement[0] == "edgetpu" and result.placement[-1] == "edgetpu"
    # the int8 graph's attention products: one FULLY_CONNECTED per head whose weights are an activation
    # (K for Q·Kᵀ, the probabilities for the context); tiny ViT: 1 block, 2 heads, 2 products each
    graph = result.graph
    products = [i for i, op in enumerate(graph.operators)
                if op.kind == "FULLY_CONNECTED" and not graph.tensors[op.inputs[1]].constant]
    assert len(products) == 2 * 2, products
    assert all(plan.reasons[i].startswith("FULLY_CONNECTED: both inputs are activations") for i in products)
    assert all(result.placement[i] == "cpu" for i in products)
    invoke_ms = class_models()["edgetpu"].coefficients["invoke_ms"]
    assert result.latency.fixed_ms > invoke_ms  # the stem's output crosses to the CPU over the link
    assert [o.unit for o in result.latency.ops] == list(result.placement)


@pytest.mark.parametrize("budget", ["NaN", "-Infinity", '"fast"', "-5"])
def test_a_build_folder_whose_manifest_budget_is_not_a_number_is_bad_input(tiny_models, tmp_path: Path,
                                                                            budget: str) -> None:
    folder = tmp_path / "build"
    folder.mkdir()
    (folder / "model.tflite").write_bytes(tiny_models["vit_int8"].read_bytes())
    (folder / "manifest.json").write_text('{"latency_budget_ms": ' + budget + "}")
    result = edgecc("check", str(folder), "--target", "rpi4")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "manifest.json" in result.stderr
