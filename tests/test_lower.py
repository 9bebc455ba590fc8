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
from edgecc.targets import load_target

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
