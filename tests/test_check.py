"""`edgecc check` and `edgecc profile` on TFLite models, with the real TFLite Micro interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import edgecc
from edgecc.arena import measure_arena
from edgecc.check import assess
from edgecc.liveness import lifetimes, plan_memory
from edgecc.reader import read_graph

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


@pytest.mark.parametrize(
    ("make_args", "fragment"),
    [
        (lambda m, d: [str(d / "absent.tflite"), "--target", "rpi4"], "does not exist"),
        (lambda m, d: [str(write(d / "x.tflite", b"not a model at all")), "--target", "rpi4"], "not a TFLite model"),
        (lambda m, d: [str(write(d / "t.tflite", m["vit_int8"].read_bytes()[:2000])), "--target", "rpi4"],
         "points outside the file"),
        (lambda m, d: [str(m["vit_float"]), "--target", TFLM_TARGET], "a float model given to an int8-only target"),
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
    assert result.placement[0] == "edgetpu" and result.placement[-1] == "cpu"
    # the int8 graph's attention products: one FULLY_CONNECTED per head whose weights are an activation
    # (K for Q·Kᵀ, the probabilities for the context); tiny ViT: 1 block, 2 heads, 2 products each
    graph = result.graph
    products = [i for i, op in enumerate(graph.operators)
                if op.kind == "FULLY_CONNECTED" and not graph.tensors[op.inputs[1]].constant]
    assert len(products) == 2 * 2, products
    assert all(plan.reasons[i].startswith("FULLY_CONNECTED: both inputs are activations") for i in products)
    tpu = result.target.edgetpu
    assert result.latency.fixed_ms > tpu.invoke_overhead_ms.value  # the stem's output crosses to the CPU
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
