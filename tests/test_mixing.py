"""Constant token mixing (compress.stages 'mix'): the surgery is exact where the attention is constant, and the
int8 model of a mixed transformer maps to the Edge TPU whole."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("tf_keras")
from edgecc.data import load_dataset  # noqa: E402
from edgecc.errors import EdgeccError  # noqa: E402
from edgecc.lower import lower_for_edgetpu, split_for_edgetpu  # noqa: E402
from edgecc.progress import Reporter  # noqa: E402
from edgecc.reader import read_graph  # noqa: E402
from edgecc.recipe import CompressSection, DataSection, TrainSection  # noqa: E402
from edgecc.runtime import Model  # noqa: E402
from edgecc.targets import load_target  # noqa: E402
from edgecc.train.compress import run_stages  # noqa: E402
from edgecc.train.layers import AttentionContext, AttentionScores, keras  # noqa: E402
from edgecc.train.mixing import constant_mixing  # noqa: E402
from edgecc.train.transformer import VitConfig, text_transformer, vision_transformer  # noqa: E402

DIGITS = load_dataset(DataSection(), seed=0)


def _vit(heads: int) -> keras.Model:
    keras.utils.set_random_seed(0)
    config = VitConfig(stem_filters=(8,), stem_strides=(2,), dim=16, depth=2, heads=heads, mlp_dim=32, dropout=0.0)
    return vision_transformer(config, (8, 8, 1), 10)


def test_one_example_of_a_one_head_model_gives_its_own_attention_so_the_mixed_model_answers_it_alike() -> None:
    """With one head and one example, the mean attention is that example's attention (not symmetric), so the mixed
    model must give the model's outputs on it exactly; on another example it differs (the mixing is constant)."""
    model = _vit(heads=1)
    x = DIGITS.x[DIGITS.train_index[:2]]
    mixed = constant_mixing(model, x[:1])
    names = {layer.name for layer in mixed.layers}
    assert not [layer for layer in mixed.layers if isinstance(layer, (AttentionScores, AttentionContext))]
    assert not names & {"block0_query", "block0_key", "block1_query", "block1_key"}
    assert {"block0_context_mixing", "block1_context_mixing", "block0_value", "block0_attn_output"} <= names
    kernel = mixed.get_layer("block0_context_mixing").get_weights()[0]
    assert not np.allclose(kernel, kernel.T) and np.allclose(kernel.sum(axis=0), 1.0, atol=1e-5)  # rows of softmax
    np.testing.assert_allclose(mixed.predict(x[:1], verbose=0), model.predict(x[:1], verbose=0), rtol=1e-4, atol=1e-5)
    assert not np.allclose(mixed.predict(x[1:], verbose=0), model.predict(x[1:], verbose=0), atol=1e-4)
    assert mixed.count_params() < model.count_params()  # the query and key projections are gone


def test_a_model_without_attention_is_refused_by_name() -> None:
    inputs = keras.Input((8, 8, 1))
    plain = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs)))
    with pytest.raises(EdgeccError, match="'mix'"):
        constant_mixing(plain, DIGITS.x[:4])


def test_attention_with_a_padding_mask_is_refused_rather_than_mixed_without_it() -> None:
    from edgecc.train.minilm import MaskedSoftmax, PaddingBias

    ids = keras.Input((6,), dtype="int32")
    x = keras.layers.Embedding(20, 8)(ids)
    q, k, v = (keras.layers.Dense(8, name=name)(x) for name in ("query", "key", "value"))
    scores = AttentionScores(2, name="scores")([q, k])
    probs = MaskedSoftmax(axis=-1, name="softmax")([scores, PaddingBias(0, -10.0, name="padding_bias")(ids)])
    out = keras.layers.Dense(3)(keras.layers.Dense(8, name="output")(AttentionContext(2, name="context")([probs, v])))
    with pytest.raises(EdgeccError, match="'softmax' also reads 'padding_bias'"):
        constant_mixing(keras.Model(ids, out), np.ones((4, 6), np.int32))


@pytest.mark.parametrize("kind", ["vit", "text"])
def test_the_mixed_int8_model_maps_to_the_edge_tpu_whole(kind: str) -> None:
    """After 'mix' and 'ptq', no operator multiplies two activations: lowered for coral-usb, the pipeline is one
    Edge TPU segment (after a text model's embedding lookup, the host pre-step) with every MAC but the lookup's."""
    keras.utils.set_random_seed(0)
    config = VitConfig(stem_filters=(8,), stem_strides=(2,), dim=16, depth=2, heads=2, mlp_dim=32, dropout=0.0)
    if kind == "vit":
        model, data = vision_transformer(config, (8, 8, 1), 10), DIGITS
    else:
        model = text_transformer(config, 12, 40, 10)
        ids = np.random.default_rng(0).integers(0, 40, (200, 12)).astype(np.int32)
        data = replace(DIGITS, x=ids, y=DIGITS.y[:200], train_index=np.arange(150), test_index=np.arange(150, 200))
    section = CompressSection(stages=("mix", "ptq"), distill_epochs=1, calibration_samples=32)
    calibration = data.x[data.train_index[:32]]
    (mix, _) = run_stages(model, replace(data, train_index=data.train_index[:128]), section,
                          TrainSection(batch_size=64, augment_shift=0), 0, calibration, Reporter(quiet=True))
    graph = read_graph(mix.int8)
    assert "BATCH_MATMUL" not in graph.op_counts() and "SOFTMAX" not in graph.op_counts()
    assert all(graph.tensors[op.inputs[1]].constant for op in graph.operators if op.kind == "FULLY_CONNECTED")
    pipeline = split_for_edgetpu(mix.int8, load_target("coral-usb"))
    assert [s.edgetpu for s in pipeline.segments] == ([True] if kind == "vit" else [False, True])
    assert pipeline.edgetpu_mac_share > 0.99
    lowered, original = Model(lower_for_edgetpu(mix.int8)), Model(mix.int8)
    for example in data.x[data.test_index[:8]]:  # the lowering stays exact
        assert np.array_equal(lowered.invoke(example), original.invoke(example))
