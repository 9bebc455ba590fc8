"""Edge TPU partition: predictions on real int8 models, and the compiler's log format."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import needs_train_extra

from edgecc.train.convert import to_int8_tflite
from edgecc.edgetpu import (EDGETPU_OPS, PREDICTION, operator_problem, parse_compiler_log, plan_edgetpu,
                            plan_from_compiler)
from edgecc.reader import Graph, Operator, read_graph
from edgecc.targets import EdgeTpu, Figure


def coral(onchip_bytes: float = 8 * 2**20) -> EdgeTpu:
    source = "test profile"
    return EdgeTpu(tops=Figure(4, source), onchip_bytes=Figure(onchip_bytes, source), link_gbps=Figure(0.3, source),
                   invoke_overhead_ms=Figure(0.3, source), op_overhead_us=Figure(5, source),
                   mac_efficiency=Figure(0.5, source))


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
        assert plan.reasons[i] == own.get(i, f"{kinds[i]}: after the first CPU operator (op {first}), the compiler "
                                             "maps nothing further (by default it builds a single Edge TPU subgraph)")
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
