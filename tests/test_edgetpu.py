"""Edge TPU partition: predictions on real int8 models, and the compiler's log format."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import needs_train_extra

from edgecc.train.convert import to_int8_tflite
from edgecc.check import assess
from edgecc.cost import op_costs
from edgecc.edgetpu import (EDGETPU_OPS, PREDICTION, compiler_rejection, cpu_op_counts, operator_problem,
                            parse_compiler_log, plan_edgetpu, plan_from_compiler)
from edgecc.reader import Graph, Operator, Tensor, read_graph
from edgecc.targets import EdgeTpu, Figure

FIXTURES = Path(__file__).parent / "fixtures"


def coral(onchip_bytes: float = 8 * 2**20) -> EdgeTpu:
    source = "test profile"
    return EdgeTpu(tops=Figure(4, source), onchip_bytes=Figure(onchip_bytes, source), link_gbps=Figure(0.3, source))


def calibration(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(0).random((8, *shape), dtype=np.float32)


@pytest.fixture(scope="module")
def cnn() -> Graph:
    """Conv2D + ReLU + pooling + Dense + softmax on a 1-D output: all in the supported-operations table."""
    needs_train_extra()
    from edgecc.train.tf import keras, tensorflow

    tensorflow()
    keras = keras()
    inputs = keras.Input(shape=(16, 16, 1), batch_size=1)
    x = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, activation="relu")(x)
    x = keras.layers.AveragePooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(10)(x)
    outputs = keras.layers.Softmax()(x)
    model = keras.Model(inputs, outputs)
    return read_graph(to_int8_tflite(model, calibration((16, 16, 1)), per_channel=True))


@pytest.fixture(scope="module")
def vit() -> Graph:
    """edgecc's own transformer, tiny, batch 1, per-tensor int8."""
    needs_train_extra()
    from edgecc.train.teacher import inference_graph
    from edgecc.train.transformer import VitConfig, vision_transformer

    config = VitConfig(stem_filters=(8,), stem_strides=(2,), dim=16, depth=1, heads=2, mlp_dim=32, dropout=0.0)
    model = inference_graph(vision_transformer(config, (8, 8, 1), num_classes=3))
    return read_graph(to_int8_tflite(model, calibration((8, 8, 1)), per_channel=False))


def test_the_op_list_names_real_tflite_builtins() -> None:
    from ai_edge_litert import schema_py_generated as schema

    assert set(EDGETPU_OPS) <= set(vars(schema.BuiltinOperator))
    assert len(set(EDGETPU_OPS)) == len(EDGETPU_OPS)


def test_legal_cnn_is_one_edge_tpu_segment(cnn: Graph) -> None:
    assert {op.kind for op in cnn.operators} >= {"CONV_2D", "MAX_POOL_2D", "FULLY_CONNECTED", "SOFTMAX"}
    plan = plan_edgetpu(cnn, coral(), EDGETPU_OPS)
    assert plan.method.startswith(PREDICTION)
    assert plan.on_tpu == (True,) * len(cnn.operators)
    assert plan.segments == 1 and plan.first_cpu_op is None and plan.reasons == {}


def test_transformer_leaves_the_edge_tpu_with_a_reason_per_op(vit: Graph) -> None:
    kinds = [op.kind for op in vit.operators]
    # the ops that break the documented rules by themselves, whatever comes before them
    own = {i: operator_problem(vit, op, EDGETPU_OPS) for i, op in enumerate(vit.operators)}
    own = {i: p for i, p in own.items() if p}
    # UNPACK splits Q, K, Vᵀ and the probabilities into heads; it is not in the supported-operations table
    assert {kinds[i] for i in own} == {"FULLY_CONNECTED", "SOFTMAX", "UNPACK"}
    # the int8 graph computes attention as one FULLY_CONNECTED per head whose weights are an activation
    assert "BATCH_MATMUL" not in kinds
    products = [i for i, op in enumerate(vit.operators)
                if op.kind == "FULLY_CONNECTED" and not vit.tensors[op.inputs[1]].constant]
    assert len(products) == 2 * 2  # Q·Kᵀ and the context, for each of the 2 heads of the 1 block
    assert all(own[i].startswith("FULLY_CONNECTED: both inputs are activations") for i in products)
    scores = products[0]  # the first attention product, Q·Kᵀ of the first head
    assert scores < kinds.index("SOFTMAX") < products[-1]
    assert "1-D tensor of at most 16,000" in own[kinds.index("SOFTMAX")]
    assert kinds[-1] == "FULLY_CONNECTED" and len(vit.operators) - 1 not in own  # logits: a 1-D output

    plan = plan_edgetpu(vit, coral(), EDGETPU_OPS)
    # Earlier than attention: the token projection (a Dense over 16 tokens) has a 2-D output,
    # and the table maps a fully-connected layer only with a one-dimensional output.
    first = kinds.index("FULLY_CONNECTED")
    assert first < scores and plan.first_cpu_op == first
    assert "is not one-dimensional" in plan.reasons[first]
    assert plan.on_tpu == tuple(i < first for i in range(len(kinds)))
    assert plan.segments == 1
    assert set(plan.reasons) == set(range(first, len(kinds)))
    for i in range(first + 1, len(kinds)):
        assert plan.reasons[i] == own.get(i, f"{kinds[i]}: depends on op {first}, which runs on the CPU after the "
                                             "Edge TPU part; the compiler maps nothing further (by default it builds "
                                             "a single Edge TPU subgraph)")
    assert plan.reasons[scores].startswith("FULLY_CONNECTED: both inputs are activations")


def test_parameter_cache_splits_at_onchip_bytes(cnn: Graph) -> None:
    constants = {i for op in cnn.operators for i in op.inputs if i >= 0 and cnn.tensors[i].constant}
    total = sum(cnn.tensors[i].nbytes for i in constants)
    assert total >= 8 * 9 + 16 * 9 * 8 + 10 * 64  # the int8 kernels alone
    roomy = plan_edgetpu(cnn, coral(), EDGETPU_OPS)
    assert (roomy.cached_parameter_bytes, roomy.streamed_parameter_bytes) == (total, 0)
    tight = plan_edgetpu(cnn, coral(onchip_bytes=1000), EDGETPU_OPS)
    assert (tight.cached_parameter_bytes, tight.streamed_parameter_bytes) == (1000, total - 1000)


# A sample of the compiler's documented `edgetpu_compiler -s` output format (as printed in
# Coral's docs and in google-coral/edgetpu issues), written for the CNN above with its last
# three operators left on the CPU. It is not the output of a real run.
SAMPLE_LOG = """\
Edge TPU Compiler version 16.0.384591198
Started a compilation timeout timer of 180 seconds.

Model compiled successfully in 31 ms.

Input model: /tmp/edgecc-edgetpu-x/model.tflite
Input size: 5.70KiB
Output model: /tmp/edgecc-edgetpu-x/model_edgetpu.tflite
Output size: 40.15KiB
On-chip memory used for caching model parameters: 1.25KiB
On-chip memory remaining for caching model parameters: 7.72MiB
Off-chip memory used for streaming uncached model parameters: 0.50MiB
Number of Edge TPU subgraphs: 1
Total number of operations: 7
Operation log: /tmp/edgecc-edgetpu-x/model_edgetpu.log

Model successfully compiled but not all operations are supported by the Edge TPU. A percentage of the model will instead run on the CPU, which is slower. If possible, consider updating your model to use only operations supported by the Edge TPU. For details, visit g.co/coral/model-reqs.
Number of operations that will run on Edge TPU: 4
Number of operations that will run on CPU: 3

Operator                       Count      Status

SOFTMAX                        1          More than one subgraph is not supported
CONV_2D                        2          Mapped to Edge TPU
FULLY_CONNECTED                1          More than one subgraph is not supported
RESHAPE                        1          Operation is otherwise supported, but not mapped due to some unspecified limitation
MAX_POOL_2D                    1          Mapped to Edge TPU
AVERAGE_POOL_2D                1          Mapped to Edge TPU
Compilation child process completed within timeout period.
Compilation succeeded!
"""


def test_compiler_log_is_parsed() -> None:
    log = parse_compiler_log(SAMPLE_LOG)
    assert log.version == "16.0.384591198" and log.subgraphs == 1
    assert (log.cached_bytes, log.streamed_bytes) == (1280, 512 * 1024)
    assert ("CONV_2D", 2, "Mapped to Edge TPU") in log.statuses and len(log.statuses) == 6


def test_compiled_model_and_log_give_the_placement(cnn: Graph) -> None:
    # The compiled model's shape: one edgetpu-custom-op for ops 0-3, then the CPU ops unchanged.
    ops = cnn.operators
    custom = Operator("CUSTOM", cnn.inputs, ops[3].outputs)
    compiled = Graph((custom, *ops[4:]), cnn.tensors, cnn.inputs, cnn.outputs)
    plan = plan_from_compiler(cnn, compiled, parse_compiler_log(SAMPLE_LOG))
    assert plan.method == "edgetpu_compiler 16.0.384591198"
    assert plan.on_tpu == (True, True, True, True, False, False, False)
    assert plan.first_cpu_op == 4 and plan.segments == 1
    assert plan.reasons == {
        4: "RESHAPE: Operation is otherwise supported, but not mapped due to some unspecified limitation (edgetpu_compiler)",
        5: "FULLY_CONNECTED: More than one subgraph is not supported (edgetpu_compiler)",
        6: "SOFTMAX: More than one subgraph is not supported (edgetpu_compiler)",
    }
    assert (plan.cached_parameter_bytes, plan.streamed_parameter_bytes) == (1280, 512 * 1024)


def test_fully_connected_maps_only_one_row_at_a_time() -> None:
    """A LayerNorm mean over 16 tokens is FULLY_CONNECTED with output (1, 16, 1): 16 rows, so not mapped."""
    from edgecc.edgetpu import _limitation
    from edgecc.reader import Tensor

    def tensor(shape: tuple[int, ...], constant: bool = False) -> Tensor:
        return Tensor("t", "INT8", shape, constant, (0.1,), (0,))

    rows = _limitation("FULLY_CONNECTED", [tensor((1, 16, 64)), tensor((1, 64), True)], [tensor((1, 16, 1))])
    assert rows is not None and "not one-dimensional" in rows
    assert _limitation("FULLY_CONNECTED", [tensor((1, 64)), tensor((10, 64), True)], [tensor((1, 10))]) is None


# --- The predictor against the real compiler, and each rule on a small model built here (no TensorFlow) ---

MIRROR = Path(os.environ.get("EDGECC_CORAL_TEST_DATA", "/work/.mirror/google-coral+test_data/repo"))


def test_prediction_agrees_with_the_real_compiler_on_every_pair() -> None:
    """google-coral/test_data's CPU models beside the _edgetpu.tflite files Coral's compiler made from them."""
    if not (MIRROR / "HEAD").exists():
        pytest.skip(f"no google-coral/test_data git snapshot at {MIRROR} (set EDGECC_CORAL_TEST_DATA to one)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from bench_edgetpu import score

    scores = score(MIRROR)
    assert len(scores) >= 14  # the pairs the snapshot holds today, co-compiled files aside
    assert [(s.pair, s.differences()) for s in scores if not s.agree] == []
    # the pipeline models (float or custom post-processing) are among them, with their tails on the CPU
    assert any(s.compiler == {"CUSTOM:PosenetDecoderOp": 1} for s in scores)
    assert any("CAST" in s.compiler for s in scores)


def tflite(tensors: list[tuple[str, str, tuple[int, ...], np.ndarray | None]],
           ops: list[tuple[str, list[int], list[int], object]], inputs: list[int], outputs: list[int],
           version: int = 1) -> bytes:
    """A one-subgraph TFLite model: tensors (name, type, shape, constant data or None), ops (builtin, inputs,
    outputs, options object or a custom operator's name)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT()
    model.version, model.buffers, model.operatorCodes = 3, [schema.BufferT()], []
    subgraph = schema.SubGraphT()
    subgraph.tensors, subgraph.operators, subgraph.inputs, subgraph.outputs = [], [], inputs, outputs
    for name, dtype, shape, data in tensors:
        tensor = schema.TensorT()
        tensor.name, tensor.type, tensor.shape, tensor.buffer = name, getattr(schema.TensorType, dtype), list(shape), 0
        if data is not None:
            buffer = schema.BufferT()
            buffer.data = list(np.asarray(data).tobytes())
            model.buffers.append(buffer)
            tensor.buffer = len(model.buffers) - 1
        if dtype in ("INT8", "UINT8"):
            tensor.quantization = schema.QuantizationParametersT()
            tensor.quantization.scale, tensor.quantization.zeroPoint = [0.1], [0]
        subgraph.tensors.append(tensor)
    for kind, op_inputs, op_outputs, options in ops:
        code = schema.OperatorCodeT()
        code.version = version
        if isinstance(options, str):
            code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
            code.customCode = options
        else:
            code.builtinCode = getattr(schema.BuiltinOperator, kind)
            code.deprecatedBuiltinCode = min(code.builtinCode, 127)
        model.operatorCodes.append(code)
        op = schema.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = len(model.operatorCodes) - 1, op_inputs, op_outputs
        if options is not None and not isinstance(options, str):
            op.builtinOptionsType = getattr(schema.BuiltinOptions, type(options).__name__.removesuffix("T"))
            op.builtinOptions = options
        subgraph.operators.append(op)
    model.subgraphs = [subgraph]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def resize(align_corners: bool) -> object:
    from ai_edge_litert import schema_py_generated as schema

    options = schema.ResizeBilinearOptionsT()
    options.alignCorners = align_corners
    return options


def pipeline() -> Graph:
    """float input -> QUANTIZE -> ADD -> ARG_MAX (CPU), and a MUL on the ADD after it in the file, then a float tail."""
    x = (1, 4, 4, 8)
    return read_graph(tflite(
        [("in", "FLOAT32", x, None), ("q", "INT8", x, None), ("sum", "INT8", x, None),
         ("axis", "INT32", (), np.int32(3)), ("best", "INT32", x[:3], None), ("twice", "INT8", x, None),
         ("out", "FLOAT32", x, None)],
        [("QUANTIZE", [0], [1], None), ("ADD", [1, 1], [2], None), ("ARG_MAX", [2, 3], [4], None),
         ("MUL", [2, 2], [5], None), ("DEQUANTIZE", [5], [6], None)],
        [0], [4, 6]))


def test_the_edge_tpu_part_is_a_dataflow_region_not_a_prefix() -> None:
    graph = pipeline()
    plan = plan_edgetpu(graph, coral(), EDGETPU_OPS)
    # the float input's QUANTIZE runs on the CPU before the Edge TPU part; MUL does not depend on ARG_MAX, so it
    # maps although it comes after it; the float tail stays on the CPU (movenet_single_pose_lightning_ptq shows all three)
    assert plan.on_tpu == (False, True, False, True, False)
    assert plan.first_cpu_op == 2 and plan.segments == 1 and plan.rejected is None
    assert "FLOAT32" in plan.reasons[0] and "ARG_MAX: not in" in plan.reasons[2] and "DEQUANTIZE" in plan.reasons[4]
    assert cpu_op_counts(graph, plan.on_tpu) == {"ARG_MAX": 1, "DEQUANTIZE": 1, "QUANTIZE": 1}


def test_what_depends_on_a_cpu_operator_after_the_edge_tpu_stays_on_the_cpu() -> None:
    x = (1, 4, 4, 8)
    graph = read_graph(tflite(
        [("in", "INT8", x, None), ("a", "INT8", x, None), ("b", "INT8", x, None), ("c", "INT8", x, None),
         ("d", "INT8", x, None)],
        [("RELU", [0], [1], None), ("HARD_SWISH", [1], [2], None), ("RELU", [2], [3], None), ("ADD", [1, 3], [4], None)],
        [0], [4]))
    plan = plan_edgetpu(graph, coral(), EDGETPU_OPS)
    assert plan.on_tpu == (True, False, False, False) and plan.first_cpu_op == 1
    assert "depends on op 1" in plan.reasons[3] and "maps nothing further" in plan.reasons[3]


def test_reader_keeps_options_small_constants_versions_and_custom_names() -> None:
    graph = read_graph(tflite(
        [("in", "UINT8", (1, 4, 4, 2), None), ("size", "INT32", (2,), np.array([8, 8], np.int32)),
         ("up", "UINT8", (1, 8, 8, 2), None), ("post", "FLOAT32", (1,), None)],
        [("RESIZE_BILINEAR", [0, 1], [2], resize(True)), ("CUSTOM", [2], [3], "PosenetDecoderOp")], [0], [3],
        version=3))
    up, custom = graph.operators
    assert up.options == {"align_corners": True, "half_pixel_centers": False} and up.version == 3
    assert graph.tensors[1].values == (8, 8) and graph.tensors[0].values is None
    assert custom.kind == "CUSTOM" and custom.custom_code == "PosenetDecoderOp" and custom.options == {}


@pytest.mark.parametrize("side, out, maps", [(4, 8, True), (4, 4, True), (1, 8, False), (4, 9, False)])
def test_resize_bilinear_maps_an_integer_upscale_of_a_side_above_1(side: int, out: int, maps: bool) -> None:
    graph = read_graph(tflite(
        [("in", "UINT8", (1, side, side, 2), None), ("size", "INT32", (2,), np.array([out, out], np.int32)),
         ("up", "UINT8", (1, out, out, 2), None)],
        [("RESIZE_BILINEAR", [0, 1], [2], resize(True))], [0], [2]))
    problem = operator_problem(graph, graph.operators[0], EDGETPU_OPS)
    assert (problem is None) == maps, problem


def test_lstm_state_in_int16_does_not_keep_the_lstm_off_the_edge_tpu() -> None:
    """The int8 LSTM keeps its cell state in int16; the compiler maps it whole (keras_lstm_mnist_ptq)."""
    def tensor(dtype: str, shape: tuple[int, ...], constant: bool = False, variable: bool = False) -> Tensor:
        return Tensor("t", dtype, shape, constant, (0.1,), (0,), variable=variable)

    tensors = (tensor("INT8", (1, 28, 28)), tensor("INT8", (20, 28), True), tensor("INT32", (20,), True),
               tensor("INT8", (1, 20), variable=True), tensor("INT16", (1, 20), variable=True), tensor("INT8", (1, 28, 20)))
    lstm = Operator("UNIDIRECTIONAL_SEQUENCE_LSTM", (0, 1, 2, 3, 4), (5,))
    assert operator_problem(Graph((lstm,), tensors, (0,), (5,)), lstm, EDGETPU_OPS) is None
    unkept = Graph((lstm,), tuple(dataclasses.replace(t, variable=False) for t in tensors), (0,), (5,))
    assert "INT16" in (operator_problem(unkept, lstm, EDGETPU_OPS) or "")


def test_a_model_the_compiler_cannot_load_is_rejected_whole() -> None:
    gelu = read_graph((FIXTURES / "gelu_int8.tflite").read_bytes())
    assert "GELU" in {op.kind for op in gelu.operators}
    plan = plan_edgetpu(gelu, coral(), EDGETPU_OPS)
    assert plan.rejected is not None and "GELU is builtin code 150" in plan.rejected
    assert not any(plan.on_tpu) and plan.segments == 0
    assert all("the Edge TPU compiler would reject this model" in r for r in plan.reasons.values())
    x = (1, 8)
    newer = read_graph(tflite([("in", "INT8", x, None), ("out", "UINT8", x, None)], [("QUANTIZE", [0], [1], None)],
                              [0], [1], version=3))
    assert "QUANTIZE version 3" in (compiler_rejection(newer) or "")

    # the file as one graph is rejected; the pipeline the bundle runs leaves GELU to a CPU island between segments
    result = assess((FIXTURES / "gelu_int8.tflite").read_bytes(), "coral-usb")
    operators = result.budgets[0]
    assert result.edgetpu.rejected and result.pipeline is not None and operators.ok
    assert "edgetpu_compiler alone): the Edge TPU compiler would reject it whole: GELU" in operators.detail
    assert [p for p, op in zip(result.placement, result.graph.operators) if op.kind == "GELU"] == ["cpu"]


def test_nothing_on_the_edge_tpu_does_not_fit_and_a_float_model_is_not_bad_input() -> None:
    """A float model on an Edge TPU target runs on its host's CPU: assessed (not exit 2), but it does not fit."""
    x = (1, 8, 8, 4)
    content = tflite([("in", "FLOAT32", x, None), ("out", "FLOAT32", x, None)], [("ADD", [0, 0], [1], None)], [0], [1])
    result = assess(content, "coral-usb")
    operators = result.budgets[0]
    assert result.edgetpu is not None and result.edgetpu.rejected is None and result.placement == ("cpu",)
    assert not operators.ok and not result.ok and (operators.value, operators.limit) == (1, 0)
    assert operators.detail.startswith("no operator runs on the Edge TPU: 0 of 1 operators (0%)")
    assert result.latency.total_ms > 0


def test_mixed_model_reports_its_cpu_tail_and_the_share_of_compute() -> None:
    x = (1, 8, 8, 4)
    content = tflite(
        [("in", "UINT8", x, None), ("w", "UINT8", (4, 1, 1, 4), np.ones((4, 1, 1, 4), np.uint8)),
         ("b", "INT32", (4,), np.zeros(4, np.int32)), ("y", "UINT8", x, None), ("post", "FLOAT32", (1,), None)],
        [("CONV_2D", [0, 1, 2], [3], None), ("CUSTOM", [3], [4], "PosenetDecoderOp")], [0], [4])
    result = assess(content, "coral-usb")
    assert result.placement == ("edgetpu", "cpu")
    assert "custom operator PosenetDecoderOp" in result.edgetpu.reasons[1]
    operators = result.budgets[0]
    assert operators.ok and (operators.value, operators.limit) == (1, 1)
    conv = op_costs(result.graph)[0].macs
    assert conv == 8 * 8 * 4 * 4 and result.total_macs > conv  # the custom operator's time is estimated too
    assert operators.detail.startswith(f"1 of 2 operators (50%) and {conv / result.total_macs:.1%} of the MACs run "
                                       "on the Edge TPU, 1 on the CPU")
