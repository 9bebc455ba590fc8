"""Folding LayerNorm's gamma and beta into the Dense layers that read them: same function, fewer int8 ops."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow")
from edgecc.train.convert import to_int8_tflite  # noqa: E402
from edgecc.train.fold import fold_norms, freeze_norms  # noqa: E402
from edgecc.train.layers import LayerNorm, keras  # noqa: E402
from edgecc.reader import read_graph  # noqa: E402
from edgecc.train.teacher import inference_graph  # noqa: E402
from edgecc.train.transformer import VitConfig, vision_transformer  # noqa: E402

SMALL = VitConfig(stem_filters=(8,), stem_strides=(2,), dim=16, depth=2, heads=2, mlp_dim=32, dropout=0.0)


def test_folded_norms_compute_the_same_function_with_fewer_ops() -> None:
    keras.utils.set_random_seed(0)
    model = vision_transformer(SMALL, (8, 8, 1), 5)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, LayerNorm):  # trained-looking scales and shifts, which the converter cannot drop
            layer.set_weights([rng.uniform(0.5, 1.5, layer.gamma.shape), rng.normal(0, 0.3, layer.beta.shape)])
    x = rng.normal(size=(16, 8, 8, 1)).astype(np.float32)
    folded = fold_norms(model)
    norms = [layer for layer in folded.layers if isinstance(layer, LayerNorm)]
    assert len(norms) == 5 and not any(norm.affine for norm in norms)  # 2 per block and the final one
    np.testing.assert_allclose(folded(x).numpy(), model(x).numpy(), atol=1e-5)
    batch_one = keras.Input(batch_shape=(1, 8, 8, 1))
    unfolded = keras.models.clone_model(model, input_tensors=batch_one)
    unfolded.set_weights(model.get_weights())
    counts = [read_graph(to_int8_tflite(m, x, per_channel=False)).op_counts() for m in (unfolded, inference_graph(model))]
    assert counts[1]["MUL"] == counts[0]["MUL"] - 5 and counts[1]["ADD"] == counts[0]["ADD"] - 5, counts


def test_a_norm_read_by_anything_but_dense_stays_as_it_is() -> None:
    inputs = keras.Input((4, 8))
    norm = LayerNorm(name="norm")(inputs)
    outputs = keras.layers.Add()([norm, keras.layers.Dense(8)(norm)])
    model = keras.Model(inputs, outputs)
    assert fold_norms(model) is model


def test_only_readers_in_this_model_count() -> None:
    """A norm that another model also reads (as pruning wrappers do) still folds here."""
    keras.utils.set_random_seed(0)
    model = vision_transformer(SMALL, (8, 8, 1), 5)
    elsewhere = model.get_layer("final_norm").output
    keras.Model(model.inputs, keras.layers.Add()([elsewhere, elsewhere]))  # a second graph through final_norm
    folded = fold_norms(model)
    assert not folded.get_layer("final_norm").affine


def test_frozen_norms_fold_away_entirely() -> None:
    """Frozen norms are linear: after folding no norm layer, and no RSQRT, is left; the function is unchanged."""
    keras.utils.set_random_seed(0)
    model = vision_transformer(SMALL, (8, 8, 1), 5)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 8, 8, 1)).astype(np.float32)
    frozen = freeze_norms(model, x)
    scales = [layer.frozen_scale for layer in frozen.layers if isinstance(layer, LayerNorm)]
    assert len(scales) == 5 and all(scale > 0 for scale in scales)
    assert not np.allclose(frozen(x).numpy(), model(x).numpy(), atol=1e-3)  # a different function until distilled
    for layer in frozen.layers:
        if isinstance(layer, LayerNorm):
            layer.set_weights([rng.uniform(0.5, 1.5, layer.gamma.shape), rng.normal(0, 0.3, layer.beta.shape)])
    folded = fold_norms(frozen)
    assert not any(isinstance(layer, LayerNorm) for layer in folded.layers)
    np.testing.assert_allclose(folded(x).numpy(), frozen(x).numpy(), atol=1e-5)
    ops = read_graph(to_int8_tflite(inference_graph(frozen), x, per_channel=False)).op_counts()
    assert "RSQRT" not in ops, ops


def test_frozen_norms_fold_in_a_model_whose_layers_another_model_called_first() -> None:
    """TF-MOT's strip_pruning leaves a sparsified student whose layers were called first in the pruning wrapper's
    model, so a tensor's own history numbers its node 1 where this model's config numbers it 0. Folding refers to
    each bypassed norm's input as the config does; with the history's number, from_config waited for ever."""
    import signal

    keras.utils.set_random_seed(0)
    x = np.random.default_rng(1).normal(size=(16, 8, 8, 1)).astype(np.float32)
    frozen = freeze_norms(vision_transformer(SMALL, (8, 8, 1), 5), x)
    again = keras.models.clone_model(frozen, clone_function=lambda layer: layer)  # the same layers, called again
    assert again.get_layer("final_norm").get_input_at(1)._keras_history.node_index == 1  # its input in `again`

    def hung(*_: object) -> None:
        raise TimeoutError("fold_norms did not finish in 60 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        folded = fold_norms(again)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert not any(isinstance(layer, LayerNorm) for layer in folded.layers)
    np.testing.assert_allclose(folded(x).numpy(), again(x).numpy(), atol=1e-5)
