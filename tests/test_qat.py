"""Quantization-aware training with real TF-MOT: it trains, converts to an all-int8 graph, and that graph agrees with it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytest.importorskip("tensorflow_model_optimization")
from edgecc.errors import EdgeccError  # noqa: E402
from edgecc.train.layers import keras  # noqa: E402
from edgecc.train.qat import qat_model, quantize_scope, to_int8_tflite_from_qat  # noqa: E402
from edgecc.reader import read_graph  # noqa: E402
from edgecc.runtime import Model  # noqa: E402
from edgecc.train.teacher import inference_graph  # noqa: E402
from edgecc.train.transformer import VitConfig, vision_transformer  # noqa: E402

TINY = VitConfig(stem_filters=(8,), stem_strides=(2,), dim=16, depth=1, heads=2, mlp_dim=32, dropout=0.0)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16).astype(np.float32)[..., np.newaxis], data.target


def _compile(model: Any, learning_rate: float) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


@pytest.fixture(scope="module")
def trained(digits: tuple[np.ndarray, np.ndarray]) -> tuple[Any, list[float], bytes]:
    """QAT from scratch on digits, 10 epochs of 30 steps (tracing costs more than the steps), then int8 conversion."""
    x, y = digits
    keras.utils.set_random_seed(0)
    qat = qat_model(vision_transformer(TINY, (8, 8, 1), 10), x[:200])
    _compile(qat, 3e-3)
    losses = qat.fit(x[:960], y[:960], batch_size=32, epochs=10, verbose=0).history["loss"]
    return qat, losses, to_int8_tflite_from_qat(qat, x[:16])


def test_qat_model_trains(trained: tuple[Any, list[float], bytes]) -> None:
    qat, losses, _ = trained
    assert sum(type(layer).__name__ == "QuantizeWrapperV2" for layer in qat.layers) == len(qat.layers) - 2
    assert np.isfinite(losses).all()
    assert losses[1] < losses[0] and losses[-1] < 0.6 * losses[0], losses


def test_qat_graph_converts_to_all_int8(trained: tuple[Any, list[float], bytes]) -> None:
    graph = read_graph(trained[2])
    kinds = {tensor.dtype for tensor in graph.activation_tensors()}
    assert kinds == {"INT8"}, kinds
    ops = set(graph.op_counts())
    assert {"SOFTMAX", "RSQRT", "FULLY_CONNECTED"} <= ops and "BATCH_MATMUL" not in ops, ops
    assert not [t.name for t in graph.tensors if ";" in t.name]  # fused names cut to their first (compact_names)
    assert not ops & {"SHAPE", "FILL", "REDUCE_PROD", "GATHER", "PACK", "QUANTIZE", "DEQUANTIZE"}, ops


def test_int8_graph_agrees_with_fake_quant_model(
    trained: tuple[Any, list[float], bytes], digits: tuple[np.ndarray, np.ndarray]
) -> None:
    qat, _, content = trained
    x = digits[0][1500:1600]
    keras_predictions = qat.predict(x, verbose=0).argmax(-1)
    int8 = Model(content)
    int8_predictions = np.array([int8.invoke(example).argmax() for example in x])
    agreement = float(np.mean(keras_predictions == int8_predictions))
    print(f"int8 TFLite agrees with the QAT model on {agreement:.2f} of 100 digits")
    assert agreement >= 0.95


def test_quantize_scope_rebuilds_qat_model_at_batch_one(trained: tuple[Any, list[float], bytes]) -> None:
    qat = trained[0]
    with quantize_scope():
        batch_one = inference_graph(qat)
    x = np.random.default_rng(0).random((1, 8, 8, 1), dtype=np.float32)
    assert batch_one.input_shape == (1, 8, 8, 1)
    np.testing.assert_allclose(batch_one(x).numpy(), qat(x).numpy(), atol=1e-5)


@pytest.mark.parametrize("make_layer", [
    lambda: keras.layers.LayerNormalization(name="refused"),  # not rewritten into edgecc's LayerNorm
    lambda: keras.layers.Dense(8, activation="elu", name="refused"),  # an activation TF-MOT cannot quantize
], ids=["LayerNormalization", "Dense-elu"])
def test_unsupported_layer_is_refused_by_name(make_layer: Any) -> None:
    inputs = keras.Input((4, 8))
    model = keras.Model(inputs, keras.layers.Dense(2)(make_layer()(inputs)))
    with pytest.raises(EdgeccError, match="'refused'"):
        qat_model(model, np.zeros((1, 4, 8), np.float32))


def test_text_transformer_quantizes_with_int32_token_ids() -> None:
    """Token ids stay int32 through QAT and TFLite; the embedding table becomes an int8 GATHER."""
    from edgecc.train.transformer import text_transformer

    keras.utils.set_random_seed(0)
    ids = np.random.default_rng(0).integers(0, 50, size=(40, 12)).astype(np.int32)
    labels = (ids[:, 0] % 3).astype(np.int64)  # learnable from the first token
    qat = qat_model(text_transformer(TINY, 12, 50, 3), ids[:32])
    _compile(qat, 3e-3)
    qat.fit(ids, labels, batch_size=8, epochs=2, verbose=0)
    content = to_int8_tflite_from_qat(qat, ids[:16])
    graph = read_graph(content)
    assert "GATHER" in graph.op_counts() and "BATCH_MATMUL" not in graph.op_counts()
    assert {t.dtype for t in graph.activation_tensors()} == {"INT8", "INT32"}
    model = Model(content)
    assert model.input["dtype"] == np.int32
    expected = np.argmax(qat.predict(ids, verbose=0), axis=1)
    got = np.array([np.argmax(model.invoke(example)) for example in ids])
    assert np.mean(got == expected) >= 0.9


def test_a_tiny_variance_does_not_blow_up_the_norm_ranges_in_training() -> None:
    """BERT's epsilon is 1e-12: a token whose variance rounds to 0 on the int8 grid must not give rsqrt(1e-12) = 1e6
    in a training step (which would drag the moving-average range of 1/sigma up for good); TFLite saturates it at
    the calibrated top of that range, and training now does the same."""
    from edgecc.train.layers import LayerNorm

    inputs = keras.Input((4, 8))
    model = keras.Model(inputs, keras.layers.Dense(2)(LayerNorm(1e-12, name="norm")(inputs)))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4, 8)).astype(np.float32) * np.array([1e-2, 1e-2, 1.0, 100.0])[:, np.newaxis]
    qat = qat_model(model, x)
    (inverse_max,) = [w for w in qat.non_trainable_weights if "norm" in w.name and w.name.endswith("inverse_max:0")]
    calibrated = float(inverse_max.numpy())  # 1/sigma of the quietest token, about 200
    for _ in range(3):
        qat(x, training=True)
    assert float(inverse_max.numpy()) == pytest.approx(calibrated, rel=0.01)  # it was 3195 before the floor


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_per_channel_qat_gives_every_dense_kernel_its_own_scales(
    digits: tuple[np.ndarray, np.ndarray], sparse: bool
) -> None:
    """compress.per_channel in QAT: each Dense kernel's int8 scales are max|w|/127 per output unit of the trained
    kernel (recomputed here), zeros stay zero with `preserve_sparsity`, and the int8 graph agrees with the QAT model."""
    x, y = digits
    keras.utils.set_random_seed(0)
    model = vision_transformer(TINY, (8, 8, 1), 10)
    dense = [layer for layer in model.layers if type(layer) is keras.layers.Dense]
    if sparse:  # every other input row of each kernel zeroed, as an earlier sparsify stage would leave it
        for layer in dense:
            kernel, *rest = layer.get_weights()
            kernel[::2] = 0.0
            layer.set_weights([kernel, *rest])
    qat = qat_model(model, x[:200], preserve_sparsity=sparse, per_channel=True)
    _compile(qat, 3e-3)
    qat.fit(x[:960], y[:960], batch_size=32, epochs=2, verbose=0)
    content = to_int8_tflite_from_qat(qat, x[:16])
    graph, int8 = read_graph(content), Model(content)
    weights = {graph.tensors[op.inputs[1]].name.split("/")[1].removeprefix("quant_"): op.inputs[1]
               for op in graph.operators
               if op.kind == "FULLY_CONNECTED" and "/quant_" in graph.tensors[op.inputs[1]].name}
    trained = {w.name.split("/")[0].removeprefix("quant_"): w.numpy() for w in qat.weights
               if w.name.endswith("/kernel:0")}
    for layer in dense:
        index = weights[layer.name]
        np.testing.assert_allclose(graph.tensors[index].scale, np.abs(trained[layer.name]).max(axis=0) / 127, rtol=1e-5)
        if sparse:  # the int8 weights are (units, inputs)
            assert not np.any(int8.interpreter.get_tensor(index)[:, ::2]), layer.name
    held_out = x[1500:1600]
    agreement = np.mean(qat.predict(held_out, verbose=0).argmax(-1) == [int8.invoke(e).argmax() for e in held_out])
    assert agreement >= 0.95, agreement
