"""Structured pruning removes whole heads and neurons exactly and makes the int8 model smaller and cheaper."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

pytest.importorskip("tf_keras")
from edgecc.train.tf import keras as load_keras  # noqa: E402

keras = load_keras()
from edgecc.train.convert import to_int8_tflite  # noqa: E402
from edgecc.errors import EdgeccError  # noqa: E402
from edgecc.progress import Reporter  # noqa: E402
from edgecc.train.prune import (  # noqa: E402
    AttentionUnit, FeedForwardUnit, find_units, head_importance, neuron_importance, prune, prune_to,
)
from edgecc.reader import read_graph  # noqa: E402
from edgecc.train.rewrite import rewrite_model  # noqa: E402
from edgecc.train.teacher import inference_graph  # noqa: E402
from edgecc.train.transformer import VitConfig, vision_transformer  # noqa: E402

layers = keras.layers
SMALL = VitConfig(stem_filters=(4,), stem_strides=(2,), dim=16, depth=2, heads=4, mlp_dim=32, dropout=0.0)
IMAGES = np.random.default_rng(0).random((16, 8, 8, 1), dtype=np.float32)
TOKENS, DIM = 6, 32


def randomised(model: Any, seed: int = 0) -> Any:
    """Every weight set to noise, so no bias is zero and no layer-norm parameter is one."""
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0.0, 0.3, w.shape).astype(w.dtype) for w in model.get_weights()])
    return model


def vit() -> Any:
    keras.utils.set_random_seed(0)
    return randomised(vision_transformer(SMALL, (8, 8, 1), 5))


def rewritten() -> Any:
    """A user's standard-layer model (MultiHeadAttention with value_dim != key_dim, x + y), rewritten."""
    inputs = keras.Input((TOKENS, DIM), name="features")
    x = inputs
    for i in range(2):
        h = layers.LayerNormalization(name=f"ln{i}_a")(x)
        x = x + layers.MultiHeadAttention(num_heads=4, key_dim=8, value_dim=6, name=f"attn{i}")(h, h)
        h = layers.LayerNormalization(name=f"ln{i}_b")(x)
        h = layers.Dense(48, activation="relu", name=f"up{i}")(h)
        x = x + layers.Dense(DIM, name=f"down{i}")(h)
    outputs = layers.Dense(3, name="logits")(layers.GlobalAveragePooling1D()(x))
    return rewrite_model(randomised(keras.Model(inputs, outputs)))


def features() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(8, TOKENS, DIM)).astype(np.float32)


def scale_head(model: Any, unit: AttentionUnit, head: int, factor: float) -> None:
    """Multiply one head's rows of the output projection, i.e. its whole contribution, by `factor`."""
    output = model.get_layer(unit.output)
    kernel = output.kernel.numpy()
    rows = kernel.shape[0] // unit.heads
    kernel[head * rows : (head + 1) * rows] *= factor
    output.kernel.assign(kernel)


def dense_shapes(model: Any) -> dict[str, tuple[int, int]]:
    return {layer.name: tuple(layer.kernel.shape) for layer in model.layers if isinstance(layer, layers.Dense)}


def test_finds_every_block_in_edgecc_vit() -> None:
    attention, feed_forward = find_units(vit())
    assert attention == [AttentionUnit(f"block{i}_scores", f"block{i}_context", f"block{i}_query", f"block{i}_key",
                                       f"block{i}_value", f"block{i}_attn_output", 4) for i in range(2)]
    assert feed_forward == [FeedForwardUnit(f"block{i}_mlp_up", f"block{i}_mlp_down", 32) for i in range(2)]


def test_finds_every_block_in_a_rewritten_standard_model() -> None:
    attention, feed_forward = find_units(rewritten())
    assert attention == [AttentionUnit(f"attn{i}_scores", f"attn{i}_context", f"attn{i}_query", f"attn{i}_key",
                                       f"attn{i}_value", f"attn{i}_output", 4) for i in range(2)]
    assert feed_forward == [FeedForwardUnit(f"up{i}", f"down{i}", 48) for i in range(2)]


def test_a_query_read_elsewhere_is_not_a_unit() -> None:
    """Slicing heads out of a projection that another layer also reads would change that layer."""
    from edgecc.train.layers import AttentionContext, AttentionScores

    inputs = keras.Input((TOKENS, DIM))
    query = layers.Dense(DIM)(inputs)
    probs = layers.Softmax()(AttentionScores(4)([query, layers.Dense(DIM)(inputs)]))
    context = AttentionContext(4)([probs, layers.Dense(DIM)(inputs)])
    model = keras.Model(inputs, layers.Add()([layers.Dense(DIM)(context), query]))
    assert find_units(model) == ([], [])


@pytest.mark.parametrize("build, x", [(vit, IMAGES), (rewritten, features())], ids=["vit", "rewritten"])
def test_removing_silent_heads_and_neurons_is_exact(build: Any, x: np.ndarray) -> None:
    model = build()
    attention, feed_forward = find_units(model)
    scale_head(model, attention[0], 1, 0.0)
    scale_head(model, attention[1], 3, 0.0)
    down = model.get_layer(feed_forward[0].down)
    kernel = down.kernel.numpy()
    kernel[[2, 7]] = 0.0
    down.kernel.assign(kernel)
    before = model(x).numpy()
    width = feed_forward[0].width
    pruned = prune(model, {attention[0].scores: [0, 2, 3], attention[1].scores: [0, 1, 2]},
                   {feed_forward[0].up: [i for i in range(width) if i not in (2, 7)]})
    assert pruned.count_params() < model.count_params()
    np.testing.assert_allclose(pruned(x).numpy(), before, atol=1e-5, rtol=0)


def test_head_importance_ranks_a_louder_head_higher() -> None:
    model = vit()
    unit = find_units(model)[0][0]
    scale_head(model, unit, 2, 10.0)
    scale_head(model, unit, 0, 0.01)
    importance = head_importance(model, unit, IMAGES, model.predict(IMAGES, verbose=0))
    assert importance.shape == (4,)
    assert importance[2] > importance[0]
    assert np.argmax(importance) == 2
    kept = prune_to(model, 0.25, 1.0, IMAGES, model.predict(IMAGES, verbose=0))
    assert kept.get_layer(unit.scores).heads == 1
    np.testing.assert_allclose(kept.get_layer(unit.query).get_weights()[0],
                               model.get_layer(unit.query).get_weights()[0][:, 8:12])


def test_neuron_importance_is_zero_for_a_neuron_that_feeds_nothing() -> None:
    model = vit()
    unit = find_units(model)[1][0]
    down = model.get_layer(unit.down)
    kernel = down.kernel.numpy()
    kernel[5] = 0.0
    kernel[6] *= 10.0
    down.kernel.assign(kernel)
    importance = neuron_importance(model, unit, IMAGES)
    assert importance.shape == (32,)
    assert importance[5] == 0.0
    assert np.all(importance >= 0.0)


@pytest.fixture(scope="module")
def pruned_pair() -> tuple[Any, Any]:
    """The small ViT and the same model with half its heads and neurons removed by importance."""
    model = vit()
    return model, prune_to(model, 0.5, 0.5, IMAGES, model.predict(IMAGES, verbose=0))


def test_pruned_model_is_physically_smaller(pruned_pair: tuple[Any, Any]) -> None:
    model, pruned = pruned_pair
    assert pruned.count_params() < model.count_params()
    shapes = dense_shapes(pruned)
    for i in range(2):
        for part in ("query", "key", "value"):
            assert shapes[f"block{i}_{part}"] == (16, 8)
        assert shapes[f"block{i}_attn_output"] == (8, 16)
        assert shapes[f"block{i}_mlp_up"] == (16, 16)
        assert shapes[f"block{i}_mlp_down"] == (16, 16)
        assert pruned.get_layer(f"block{i}_scores").heads == pruned.get_layer(f"block{i}_context").heads == 2
    assert shapes["token_projection"] == dense_shapes(model)["token_projection"]
    assert shapes["logits"] == dense_shapes(model)["logits"]


def test_pruned_model_round_trips_in_safe_mode(pruned_pair: tuple[Any, Any], tmp_path: Path) -> None:
    pruned = pruned_pair[1]
    path = tmp_path / "pruned.keras"
    pruned.save(path)
    loaded = keras.models.load_model(path, safe_mode=True, compile=False)
    assert dense_shapes(loaded) == dense_shapes(pruned)
    np.testing.assert_allclose(loaded(IMAGES).numpy(), pruned(IMAGES).numpy(), atol=1e-6)


def test_prune_to_keeps_at_least_one_of_each() -> None:
    model = vit()
    pruned = prune_to(model, 0.01, 0.01, IMAGES, model.predict(IMAGES, verbose=0))
    attention, feed_forward = find_units(pruned)
    assert [u.heads for u in attention] == [1, 1]
    assert [u.width for u in feed_forward] == [1, 1]


def test_prune_refuses_what_it_cannot_do() -> None:
    model = vit()
    with pytest.raises(EdgeccError, match="no prunable .* named block9_scores"):
        prune(model, {"block9_scores": [0]}, {})
    with pytest.raises(EdgeccError, match="heads of block0_scores"):
        prune(model, {"block0_scores": [0, 4]}, {})
    with pytest.raises(EdgeccError, match="neurons of block0_mlp_up"):
        prune(model, {}, {"block0_mlp_up": []})
    with pytest.raises(EdgeccError, match="head_fraction"):
        prune_to(model, 0.0, 0.5, IMAGES, np.zeros((16, 5), np.float32))


def test_trimmed_vocabulary_keeps_frequent_tokens_and_sends_the_rest_to_their_nearest_rows(tmp_path: Path) -> None:
    from edgecc.train.prune import trim_vocabulary
    from edgecc.train.transformer import text_transformer

    keras.utils.set_random_seed(0)
    config = VitConfig(stem_filters=(), stem_strides=(), dim=16, depth=1, heads=2, mlp_dim=16, dropout=0.0)
    model = text_transformer(config, 8, 100, 3)
    rng = np.random.default_rng(0)
    common = rng.integers(0, 20, size=(64, 8)).astype(np.int32)  # ids 0..19 only: the frequent ones
    trimmed = trim_vocabulary(model, common, 0.25, unknown_id=1)
    embedding = trimmed.get_layer("token_embedding")
    assert embedding.table.shape == (20, 16) and embedding.input_vocabulary == 100  # 25 asked, 20 used
    np.testing.assert_allclose(trimmed(common).numpy(), model(common).numpy(), atol=1e-5)
    full = model.get_layer("token_embedding").table.numpy()
    nearest = min(range(20), key=lambda k: float(np.sum((full[k] - full[77]) ** 2)))
    rare = common.copy()
    rare[:, 3] = 77  # unseen in training: read as the kept token nearest to it
    as_nearest = common.copy()
    as_nearest[:, 3] = nearest
    np.testing.assert_allclose(trimmed(rare).numpy(), model(as_nearest).numpy(), atol=1e-5)
    sizes = [len(to_int8_tflite(inference_graph(m), common[:8], per_channel=False)) for m in (model, trimmed)]
    saved_bytes = 80 * 16 - 100 * 4  # int8 rows dropped, less the int32 id map added
    assert sizes[0] - sizes[1] >= 0.5 * saved_bytes, sizes
    path = tmp_path / "trimmed.keras"
    trimmed.save(path)
    loaded = keras.models.load_model(path, safe_mode=True, compile=False)
    np.testing.assert_allclose(loaded(rare).numpy(), trimmed(rare).numpy(), atol=1e-6)


def test_every_dropped_token_reads_its_nearest_kept_row() -> None:
    from edgecc.train.prune import trim_vocabulary
    from edgecc.train.transformer import text_transformer

    keras.utils.set_random_seed(0)
    config = VitConfig(stem_filters=(), stem_strides=(), dim=16, depth=1, heads=2, mlp_dim=16, dropout=0.0)
    model = text_transformer(config, 8, 100, 3)
    full = model.get_layer("token_embedding").table.numpy()
    ids = np.repeat(np.arange(20, dtype=np.int32), np.arange(20, 0, -1))[np.newaxis]  # id 0 most used, 19 least
    trimmed = trim_vocabulary(model, ids, 0.1, unknown_id=1).get_layer("token_embedding")
    table, id_map = trimmed.table.numpy(), trimmed.id_map.numpy()
    assert len(table) == 10
    kept = [i for i in range(100) if np.array_equal(table[id_map[i]], full[i])]
    assert kept == list(range(10))
    for dropped in range(10, 100):  # 10..19 used in training but less than the kept ones, 20..99 never
        nearest = min(kept, key=lambda k: float(np.sum((full[k] - full[dropped]) ** 2)))
        np.testing.assert_array_equal(table[id_map[dropped]], full[nearest])
    assert len({int(id_map[i]) for i in range(20, 100)}) > 1  # not all folded into one row ([UNK]'s)
    # room for every used token: all 20 kept, and an [UNK] that training never used is added, not swapped in
    roomy = trim_vocabulary(model, ids, 0.5, unknown_id=50).get_layer("token_embedding")
    table, id_map = roomy.table.numpy(), roomy.id_map.numpy()
    assert len(table) == 21 and all(np.array_equal(table[id_map[i]], full[i]) for i in [*range(20), 50])


def test_removing_a_block_keeps_the_rest_of_the_model_exactly() -> None:
    from edgecc.train.prune import block_importance, find_blocks, remove_blocks

    keras.utils.set_random_seed(0)
    model = vit()
    blocks = find_blocks(model)
    assert [b.output for b in blocks] == ["block0_mlp_residual", "block1_mlp_residual"]
    assert blocks[1].source[0] == "block0_mlp_residual" and "block1_query" in blocks[1].members
    reference = model.predict(IMAGES, verbose=0)
    bypassed = block_importance(model, blocks[0], IMAGES, reference)
    assert bypassed > 0
    shorter = remove_blocks(model, [blocks[0]])
    assert not [layer.name for layer in shorter.layers if layer.name.startswith("block0_")]
    assert shorter.get_layer("block1_attn_norm").input._keras_history.layer.name == "positions"
    # the shorter model is the original with block 0's two residual branches zeroed
    for name in ("block0_attn_output", "block0_mlp_down"):
        layer = model.get_layer(name)
        layer.set_weights([np.zeros_like(w) for w in layer.get_weights()])
    np.testing.assert_allclose(shorter.predict(IMAGES, verbose=0), model.predict(IMAGES, verbose=0), atol=1e-5)
    assert np.mean((shorter.predict(IMAGES, verbose=0) - reference) ** 2) == pytest.approx(bypassed, rel=1e-4)
    assert len(find_blocks(prune_to(vit(), 1.0, 1.0, IMAGES, reference, block_fraction=0.5))) == 1
    log = io.StringIO()  # each block's and each head's scoring pass is a step of a reported task
    prune_to(vit(), 0.5, 1.0, IMAGES, reference, block_fraction=0.5, reporter=Reporter(console=Console(file=log)))
    lines = log.getvalue().splitlines()
    assert any(line.startswith("scoring encoder blocks: block 2/2, mean squared output change ") for line in lines)
    assert any(line.startswith(f"scoring attention heads: head {SMALL.heads}/{SMALL.heads}, ") for line in lines)
    (first,) = find_blocks(prune_to(model, 1.0, 1.0, IMAGES, reference, block_fraction=0.5, first_blocks=True))
    assert first.output == "block0_mlp_residual"


def test_post_norm_blocks_are_found_and_removed() -> None:
    """MiniLM's BERT blocks (x = LN(x + attention), x = LN(x + FFN)): the norm after each sum belongs to the block."""
    from edgecc.train.minilm import minilm_model
    from edgecc.train.prune import find_blocks, remove_blocks

    keras.utils.set_random_seed(0)
    model = minilm_model(8)
    blocks = find_blocks(model)
    assert [b.output for b in blocks] == [f"block{i}_mlp_residual" for i in range(6)]
    assert blocks[0].source[0] == "embedding_norm" and "block0_attn_residual" in blocks[0].members
    shorter = remove_blocks(model, [blocks[1], blocks[2]])
    assert shorter.get_layer("block3_query").input._keras_history.layer.name == "block0_mlp_residual"
    ids = np.random.default_rng(0).integers(1, 1000, size=(2, 8)).astype(np.int32)
    assert shorter(ids).shape == (2, 384) and len(find_blocks(shorter)) == 4


def test_a_pruned_minilm_classifier_is_integer_only_in_int8() -> None:
    """MiniLM's padding mask and mean pooling come from GATHERs of quantized tables: no float tensor in the graph."""
    from edgecc.train.minilm import minilm_model
    from edgecc.train.prune import find_blocks, remove_blocks, trim_vocabulary

    keras.utils.set_random_seed(0)
    encoder = minilm_model(8)
    model = keras.Model(encoder.inputs, keras.layers.Dense(3, name="logits")(encoder.get_layer("pool").output))
    ids = np.random.default_rng(0).integers(1000, 1100, size=(16, 8)).astype(np.int32)
    ids[:, 5:] = 0  # padding
    model = trim_vocabulary(remove_blocks(model, find_blocks(model)[1:]), ids, 0.01, unknown_id=100)
    graph = read_graph(to_int8_tflite(inference_graph(model), ids, per_channel=False))
    assert {t.dtype for t in graph.activation_tensors()} <= {"INT8", "INT32", "BOOL"}
    assert graph.op_counts()["GATHER"] == 4  # id map, embedding rows and the two mask tables
