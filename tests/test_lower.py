"""Lowering int8 transformers for the Edge TPU (edgecc.lower) and the board runner that chains the segments."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES
from edgecc.bundle import write_board_files
from edgecc.check import assess
from edgecc.cost import op_costs
from edgecc.edgetpu import predict_edgetpu
from edgecc.lower import PIPELINE_FILE, Pipeline, lower_for_edgetpu, split_for_edgetpu
from edgecc.reader import read_graph
from edgecc.runtime import Model
from edgecc.targets import Target, load_target

CORAL = load_target("coral-usb")


def _chained(pipeline: Pipeline, q: np.ndarray) -> np.ndarray:
    """The segments run in order with the plain interpreter, tensors passed by their index in the whole model."""
    values = {pipeline.inputs[0]: q}
    for segment in pipeline.segments:
        model = Model(segment.content)
        for detail, tensor in zip(model.interpreter.get_input_details(), segment.inputs, strict=True):
            model.interpreter.set_tensor(detail["index"], values[tensor].reshape(detail["shape"]))
        model.interpreter.invoke()
        for detail, tensor in zip(model.interpreter.get_output_details(), segment.outputs, strict=True):
            values[tensor] = model.interpreter.get_tensor(detail["index"])
    return values[pipeline.outputs[0]]


def _quantized_inputs(model: Model, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    shape, dtype = model.input["shape"], model.input["dtype"]
    if dtype == np.int32:
        return [rng.integers(0, 50, shape).astype(np.int32) for _ in range(count)]
    return [rng.integers(-128, 128, shape).astype(dtype) for _ in range(count)]


def _outputs(model: Model, q: np.ndarray) -> np.ndarray:
    model.interpreter.set_tensor(model.input["index"], q)
    model.interpreter.invoke()
    return model.interpreter.get_tensor(model.output["index"])


def _assert_lowered_and_exact(content: bytes, blocks: int) -> Pipeline:
    """The lowered model computes the same int8 outputs; its segments map whole, chain to the same outputs, and leave
    one CPU island per encoder block (plus the host pre-step of a text model)."""
    lowered = lower_for_edgetpu(content)
    graph = read_graph(lowered)
    assert not [op for op in graph.operators if op.kind == "FULLY_CONNECTED" and graph.tensors[op.inputs[1]].constant]
    assert lower_for_edgetpu(lowered) == lowered
    original, model = Model(content), Model(lowered)
    pipeline = split_for_edgetpu(content, CORAL)
    for q in _quantized_inputs(original, 4):
        expected = _outputs(original, q)
        assert np.array_equal(_outputs(model, q), expected)
        assert np.array_equal(_chained(pipeline, q), expected)
    for segment in pipeline.segments:
        plan = predict_edgetpu(read_graph(segment.content), CORAL.edgetpu, CORAL.legal_ops)
        assert all(plan.on_tpu) == segment.edgetpu, segment.file
    cores = [s for s in pipeline.segments if not s.edgetpu and "FULLY_CONNECTED" in read_graph(s.content).op_counts()]
    assert len(cores) == blocks  # the attention cores, Q·Kᵀ and scores·V, each block's in one island
    assert sum(len(s.operators) for s in pipeline.segments) == len(graph.operators)
    return pipeline


def _mac_share_before(content: bytes) -> float:
    graph = read_graph(content)
    plan = predict_edgetpu(graph, CORAL.edgetpu, CORAL.legal_ops)
    macs = [cost.macs for cost in op_costs(graph)]
    return sum(m for m, on in zip(macs, plan.on_tpu) if on) / sum(macs)


def test_vision_transformer_lowers_exactly_to_edge_tpu_segments_around_its_attention_core() -> None:
    content = (FIXTURES / "vit_int8.tflite").read_bytes()
    summary = _assert_lowered_and_exact(content, blocks=1).to_json()
    assert _mac_share_before(content) < 0.01
    assert summary["edgetpu_mac_share"] > 0.85 and summary["edgetpu_segments"] == 2 and summary["cpu_segments"] == 1
    assert summary["compile"] == "edgetpu_compiler -s segment0_tpu.tflite segment2_tpu.tflite"


def test_text_transformer_starts_with_the_embedding_lookup_as_a_host_pre_step() -> None:
    pipeline = _assert_lowered_and_exact((FIXTURES / "text_int8.tflite").read_bytes(), blocks=1)
    first = pipeline.segments[0]
    assert not first.edgetpu and [op.kind for op in read_graph(first.content).operators] == ["GATHER"]
    assert [s.edgetpu for s in pipeline.segments] == [False, True, False, True]


def test_the_bundles_runner_chains_the_segments_to_the_builds_predictions(tmp_path: Path) -> None:
    content = lower_for_edgetpu((FIXTURES / "vit_int8.tflite").read_bytes())
    model = Model(content)
    written = write_board_files(tmp_path, content, assess(content, CORAL), [str(d) for d in range(10)])
    assert PIPELINE_FILE in written and "segment1_cpu.tflite" in written
    (tmp_path / "model.tflite").write_bytes(content)
    (tmp_path / "manifest.json").write_text(json.dumps({"preprocessing": {
        "scale": 1 / 16, "offset": 0.0, "model_input_shape": [1, 8, 8, 1], "input_dtype": "int8",
        "input_quantization": {"scale": model.input_quantization.scale,
                               "zero_point": model.input_quantization.zero_point},
        "output_quantization": {"scale": model.output_quantization.scale,
                                "zero_point": model.output_quantization.zero_point},
        "label_names": [str(d) for d in range(10)]}}))
    raw = np.random.default_rng(1).integers(0, 17, (12, 8, 8)).astype(np.float32)
    np.save(tmp_path / "raw.npy", raw)
    expected = [int(np.argmax(model.invoke(x[..., np.newaxis] / 16))) for x in raw]  # the build's evaluation

    def runner(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "raw.npy"), "--json", *flags],
                              capture_output=True, text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})

    result = runner("--cpu")  # the plain interpreter standing in for the Edge TPU delegate
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["predictions"] == expected
    missing = runner()
    assert missing.returncode == 1
    assert "segment0_tpu_edgetpu.tflite, segment2_tpu_edgetpu.tflite missing" in missing.stderr and "edgetpu_compiler -s" in missing.stderr


def test_an_operator_the_compiler_would_refuse_the_model_for_becomes_a_cpu_island() -> None:
    content = (FIXTURES / "gelu_int8.tflite").read_bytes()  # the GELU builtin: compiler 16 cannot load the model
    assert predict_edgetpu(read_graph(content), CORAL.edgetpu, CORAL.legal_ops).rejected
    pipeline = _assert_lowered_and_exact(content, blocks=0)
    islands = [read_graph(s.content).op_counts() for s in pipeline.segments if not s.edgetpu]
    assert islands == [{"GELU": 1}]


def test_a_target_without_an_edge_tpu_is_not_split() -> None:
    from edgecc.errors import EdgeccError

    with pytest.raises(EdgeccError, match="rpi4 has no Edge TPU"):
        split_for_edgetpu((FIXTURES / "vit_int8.tflite").read_bytes(), load_target("rpi4"))


def _coral_with(onchip_bytes: float | None = None, min_mac_share: float | None = None) -> Target:
    """coral-usb with another on-chip memory or MAC-share budget, as a user's profile would set them."""
    from dataclasses import replace

    from edgecc.targets import Share

    tpu = CORAL.edgetpu
    if onchip_bytes is not None:
        tpu = replace(tpu, onchip_bytes=replace(tpu.onchip_bytes, value=onchip_bytes))
    if min_mac_share is not None:
        tpu = replace(tpu, min_mac_share=Share(min_mac_share, "test profile"))
    return replace(CORAL, edgetpu=tpu)


def test_co_compiled_segments_share_the_on_chip_memory_in_order_and_the_rest_streams() -> None:
    content = (FIXTURES / "vit_int8.tflite").read_bytes()
    whole = split_for_edgetpu(content, CORAL)
    first, second = [s for s in whole.segments if s.edgetpu]
    assert first.parameter_bytes > 0 and second.parameter_bytes > 0
    assert whole.streamed_parameter_bytes == 0 and whole.cached_parameter_bytes == first.parameter_bytes + second.parameter_bytes
    room = first.parameter_bytes + second.parameter_bytes // 2  # the first segment fits, the second half streams
    tight = split_for_edgetpu(content, _coral_with(onchip_bytes=room))
    first, second = [s for s in tight.segments if s.edgetpu]
    assert (first.cached_parameter_bytes, first.streamed_parameter_bytes) == (first.parameter_bytes, 0)
    assert second.cached_parameter_bytes == second.parameter_bytes // 2
    assert tight.streamed_parameter_bytes == second.parameter_bytes - second.parameter_bytes // 2
    assert all(s.cached_parameter_bytes == 0 for s in tight.segments if not s.edgetpu)
    # what crosses the host link: what the attention island reads from the Edge TPU and what it gives back
    (island,) = [read_graph(s.content) for s in whole.segments if not s.edgetpu]
    assert whole.crossing_bytes == sum(island.tensors[t].nbytes for t in (*island.inputs, *island.outputs)) > 0


def test_check_judges_the_pipeline_of_a_lowered_or_unlowered_model_the_same() -> None:
    from edgecc.latency import class_models

    content = (FIXTURES / "vit_int8.tflite").read_bytes()
    given, lowered = assess(content, CORAL, measure_arena=False), assess(lower_for_edgetpu(content), CORAL, measure_arena=False)
    assert given.pipeline.to_json() == lowered.pipeline.to_json()
    pipeline = given.pipeline
    assert pipeline.edgetpu_segments == 2 and pipeline.edgetpu_mac_share > 0.85
    assert len(given.placement) == len(given.graph.operators) and len(lowered.placement) == pipeline.operators
    # the single-graph prediction stays beside it: the compiler alone maps only the stem of the file
    assert sum(given.edgetpu.on_tpu) == 1 and given.edgetpu.segments == 1
    operators = given.budgets[0]
    assert operators.ok and (operators.value, operators.limit) == (pipeline.operators - pipeline.edgetpu_operators,
                                                                    pipeline.operators - 1)
    assert "2 Edge TPU segment(s) co-compiled and 1 CPU island(s)" in operators.detail
    assert "edgetpu_compiler alone): 1 of 53 operators" in operators.detail
    # the estimate is the sum over the segments: every Edge TPU segment invoked, the crossings over the link
    coefficients = class_models()["edgetpu"].coefficients
    link_ms = pipeline.crossing_bytes / (CORAL.edgetpu.link_gbps.value * 1e9) * 1e3
    assert given.latency.fixed_ms == pytest.approx(2 * coefficients["invoke_ms"] + coefficients["link"] * link_ms)
    assert given.latency.total_ms == pytest.approx(given.latency.fixed_ms + sum(o.ms for o in given.latency.ops))
    assert "summed over the pipeline's 3 segments" in given.latency.method


def test_a_minimum_share_of_macs_on_the_edge_tpu_is_a_budget(tmp_path: Path) -> None:
    from edgecc.errors import EdgeccError

    content = (FIXTURES / "vit_int8.tflite").read_bytes()
    share = split_for_edgetpu(content, CORAL).edgetpu_mac_share
    for minimum, holds in ((0.5, True), (0.95, False)):
        result = assess(content, _coral_with(min_mac_share=minimum), measure_arena=False)
        budget = next(b for b in result.budgets if b.name == "MACs off the Edge TPU")
        assert budget.ok is holds and result.ok is holds
        assert budget.value == pytest.approx(100 * (1 - share), abs=0.01) and budget.limit == pytest.approx(100 * (1 - minimum))
    profile = tmp_path / "my-coral.toml"
    text = (Path(__file__).parents[1] / "targets" / "coral-usb.toml").read_text()
    profile.write_text(text.replace("min_mac_share = { value = 0.5", "min_mac_share = { value = 1.5"))
    with pytest.raises(EdgeccError, match=r"edgetpu\.min_mac_share.*1\.5 is above the maximum 1"):
        load_target(str(profile))


def test_the_edge_tpu_segments_are_co_compiled_in_one_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """edgetpu_compiler does not run here: a stand-in on PATH records its command line and writes what it would."""
    from edgecc.edgetpu import compile_command

    assert compile_command(["segment0_tpu.tflite", "segment2_tpu.tflite"], "out") == [
        "edgetpu_compiler", "-s", "-o", "out", "segment0_tpu.tflite", "segment2_tpu.tflite"]
    content = lower_for_edgetpu((FIXTURES / "vit_int8.tflite").read_bytes())
    fit = assess(content, CORAL, measure_arena=False)  # before the stand-in: check would compile the file alone too
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "edgetpu_compiler").write_text(
        "#!/bin/sh\necho \"$@\" >> \"$CALLS\"\nout=$3; shift 3\n"
        "for f in \"$@\"; do b=$(basename \"$f\" .tflite); cp \"$f\" \"$out/${b}_edgetpu.tflite\"; done\n")
    (tools / "edgetpu_compiler").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}:/usr/bin:/bin")
    monkeypatch.setenv("CALLS", str(tmp_path / "calls.txt"))
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    from edgecc.bundle import write_edgetpu_pipeline

    written = write_edgetpu_pipeline(bundle, content, fit)
    (call,) = (tmp_path / "calls.txt").read_text().splitlines()
    args = call.split()
    assert args[:2] == ["-s", "-o"] and [Path(a).name for a in args[3:]] == ["segment0_tpu.tflite", "segment2_tpu.tflite"]
    assert {"segment0_tpu_edgetpu.tflite", "segment2_tpu_edgetpu.tflite"} <= set(written)
    assert (bundle / "segment2_tpu_edgetpu.tflite").read_bytes() == (bundle / "segment2_tpu.tflite").read_bytes()


def test_the_report_gives_each_segments_figures() -> None:
    from edgecc.check import edgetpu_json, pipeline_json
    from edgecc.report import _edgetpu_section

    fit = assess((FIXTURES / "text_int8.tflite").read_bytes(), CORAL, measure_arena=False)
    pipeline = pipeline_json(fit.pipeline)
    pre_step = pipeline["segments"][0]  # the embedding lookup: its table is a parameter the host keeps
    assert pre_step["parameter_bytes"] > 0 and pre_step["cached_parameter_bytes"] == pre_step["streamed_parameter_bytes"] == 0
    (title, blocks), (single_title, _) = _edgetpu_section({"target": "coral-usb", **edgetpu_json(fit.edgetpu)}, pipeline)
    assert title == "Edge TPU pipeline (coral-usb): what the bundle runs" and "as one graph" in single_title
    assert "co-compiled (`edgetpu_compiler -s segment1_tpu.tflite segment3_tpu.tflite`)" in blocks[0][1]
    header, rows = blocks[1][1]
    assert [row[:2] for row in rows] == [["segment0_cpu.tflite", "cpu"], ["segment1_tpu.tflite", "edgetpu"],
                                         ["segment2_cpu.tflite", "cpu"], ["segment3_tpu.tflite", "edgetpu"]]
