"""edgecc's transformer layers compute what they claim and convert to a static batch-1 graph."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tf_keras")
import edgecc.train.layers as layers_mod  # noqa: E402
from edgecc.train.convert import to_int8_tflite  # noqa: E402
from edgecc.train.layers import AttentionContext, AttentionScores, LayerNorm, keras, tf  # noqa: E402
from edgecc.reader import read_graph  # noqa: E402
from edgecc.train.teacher import inference_graph  # noqa: E402
from edgecc.train.transformer import VitConfig, vision_transformer  # noqa: E402

SMALL = VitConfig(stem_filters=(4,), stem_strides=(2,), dim=16, depth=1, heads=2, mlp_dim=24, dropout=0.0)


def test_layer_norm_matches_keras() -> None:
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(2, 5, 12)).astype(np.float32)
    ours, reference = LayerNorm(epsilon=1e-5), keras.layers.LayerNormalization(epsilon=1e-5)
    ours.build(x.shape)
    reference.build(x.shape)
    gamma = np.linspace(0.5, 1.5, 12).astype(np.float32)
    ours.set_weights([gamma, gamma - 1])
    reference.set_weights([gamma, gamma - 1])
    np.testing.assert_allclose(ours(x).numpy(), reference(x).numpy(), atol=1e-5)


def test_attention_matches_numpy_multi_head_attention() -> None:
    rng = np.random.default_rng(1)
    heads, tokens, width = 3, 4, 12
    q, k, v = (rng.normal(size=(2, tokens, width)).astype(np.float32) for _ in range(3))
    probs = keras.layers.Softmax()(AttentionScores(heads)([q, k]))
    ours = AttentionContext(heads)([probs, v]).numpy()

    def split(a: np.ndarray) -> np.ndarray:
        return a.reshape(2, tokens, heads, width // heads).transpose(0, 2, 1, 3)

    scores = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(width // heads)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = (weights @ split(v)).transpose(0, 2, 1, 3).reshape(2, tokens, width)
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_batch_one_graph_has_static_shapes_and_same_outputs() -> None:
    keras.utils.set_random_seed(0)
    model = vision_transformer(SMALL, (8, 8, 1), 10)
    batch_one = inference_graph(model)
    assert batch_one.input_shape == (1, 8, 8, 1)
    x = np.random.default_rng(2).random((1, 8, 8, 1), dtype=np.float32)
    np.testing.assert_allclose(batch_one(x).numpy(), model(x).numpy(), atol=1e-6)
    content = tf.lite.TFLiteConverter.from_keras_model(batch_one).convert()
    counts = read_graph(content).op_counts()
    assert not set(counts) & {"SHAPE", "FILL", "REDUCE_PROD", "GATHER", "PACK"}, counts
    # the float graph keeps attention batched: one BATCH_MATMUL for Q·Kᵀ and one for the context
    assert {"SOFTMAX", "FULLY_CONNECTED"} <= set(counts) and counts.get("BATCH_MATMUL") == 2, counts
    # the int8 graph: one FULLY_CONNECTED per head and product, its weights an activation (K, or the probabilities)
    graph = read_graph(to_int8_tflite(batch_one, np.random.default_rng(3).random((8, 8, 8, 1), dtype=np.float32),
                                      per_channel=False))
    counts = graph.op_counts()
    assert not set(counts) & {"SHAPE", "FILL", "REDUCE_PROD", "GATHER", "PACK", "BATCH_MATMUL"}, counts
    products = [op for op in graph.operators if op.kind == "FULLY_CONNECTED" and not graph.tensors[op.inputs[1]].constant]
    assert len(products) == 2 * SMALL.heads * SMALL.depth, counts


def test_int8_graph_attention_per_head_matches_the_batched_form() -> None:
    """Inside `int8_graph()` a batch of 1 takes the per-head path: plain matmuls, no batched one, same values."""
    rng = np.random.default_rng(4)
    heads, tokens, width = 3, 4, 12
    q, k, v = (tf.constant(rng.normal(size=(1, tokens, width)).astype(np.float32)) for _ in range(3))
    softmax, scores, context = keras.layers.Softmax(), AttentionScores(heads), AttentionContext(heads)

    def trace() -> Any:  # a fresh tf.function each time: `int8_graph()` is read when tracing, not a cache key
        return tf.function(lambda q, k, v: context([softmax(scores([q, k])), v])).get_concrete_function(q, k, v)

    batched = trace()
    with layers_mod.int8_graph():
        per_head = trace()
    kinds = [{op.type for op in f.graph.get_operations()} for f in (batched, per_head)]
    assert "BatchMatMulV2" in kinds[0] and "MatMul" not in kinds[0], kinds[0]
    assert "BatchMatMulV2" not in kinds[1] and "MatMul" in kinds[1], kinds[1]
    np.testing.assert_allclose(per_head(q, k, v).numpy(), batched(q, k, v).numpy(), atol=1e-5)


def test_saved_model_file_loads_in_safe_mode(tmp_path: Path) -> None:
    model = vision_transformer(SMALL, (8, 8, 1), 10)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True, compile=False)
    x = np.ones((1, 8, 8, 1), np.float32)
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), atol=1e-6)
