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


@pytest.mark.parametrize(("heads", "form", "exact"),
                         [(1, "shared", True), (4, "per_head", True), (4, "shared", False), (4, "gated", True)])
def test_one_example_gives_the_mixing_its_own_attention_so_the_mixed_model_answers_it_alike(
        heads: int, form: str, exact: bool) -> None:
    """With one example, the mean attention is that example's attention (not symmetric): 'per_head' keeps every head's,
    so the mixed model must give the model's outputs on it exactly; 'shared' only with one head (four heads' mean is
    none of them); 'gated' too (its gate starts at 1/2 and its kernel at twice 'per_head's). On another example it
    differs (the mixing is constant)."""
    model = _vit(heads=heads)
    x = DIGITS.x[DIGITS.train_index[:2]]
    mixed = constant_mixing(model, x[:1], form)
    names = {layer.name for layer in mixed.layers}
    assert not [layer for layer in mixed.layers if isinstance(layer, (AttentionScores, AttentionContext))]
    assert not names & {"block0_query", "block0_key", "block1_query", "block1_key"}
    assert {"block0_context_mixing", "block1_context_mixing", "block0_value", "block0_attn_output"} <= names
    kernel = mixed.get_layer("block0_context_mixing").get_weights()[0]
    tokens = model.get_layer("block0_value").output.shape[1]
    assert kernel.shape == ((1 if form == "shared" else heads) * tokens,) * 2
    doubled = 2.0 if form == "gated" else 1.0
    assert not np.allclose(kernel, kernel.T) and np.allclose(kernel.sum(axis=0), doubled, atol=1e-5)  # softmax rows
    same = np.allclose(mixed.predict(x[:1], verbose=0), model.predict(x[:1], verbose=0), rtol=1e-4, atol=1e-5)
    assert same == exact
    assert not np.allclose(mixed.predict(x[1:], verbose=0), model.predict(x[1:], verbose=0), atol=1e-4)
    gone = sum(model.get_layer(f"block{i}_{name}").count_params() for i in (0, 1) for name in ("query", "key"))
    gates = sum(mixed.get_layer(f"block{i}_context_gate").count_params() for i in (0, 1)) if form == "gated" else 0
    assert gates == (0 if form != "gated" else 2 * (16 * 16 + 16))  # the block's input (16 wide) -> the values' 16
    assert mixed.count_params() == model.count_params() - gone + 2 * kernel.size + gates  # q, k out, mixing in


def test_sigmoid_attention_weighs_each_key_by_the_sigmoid_of_its_score_less_the_softmax_log_normaliser() -> None:
    """compress.mixing 'sigmoid' keeps the queries, keys and values: block0's new context must be, per head,
    sum_j sigmoid(q_i·k_j/sqrt(d) - L) v_j, with L the head's mean log sum_j exp(q_i·k_j/sqrt(d)) over the
    examples, recomputed here in numpy from the model's own projections."""
    model = _vit(heads=2)
    x = DIGITS.x[DIGITS.train_index[:6]]
    mixed = constant_mixing(model, x, "sigmoid")
    names = {layer.name for layer in mixed.layers}
    assert not [layer for layer in mixed.layers if isinstance(layer, (AttentionScores, AttentionContext))]
    assert {"block0_query", "block0_key", "block0_value", "block1_query"} <= names
    q, k, v = keras.Model(model.inputs, [model.get_layer(f"block0_{n}").output for n in ("query", "key", "value")]
                          ).predict(x, verbose=0)
    heads, head_dim = 2, q.shape[-1] // 2
    context = np.zeros_like(v)
    for h in range(heads):
        part = slice(h * head_dim, (h + 1) * head_dim)
        s = np.einsum("bid,bjd->bij", q[..., part], k[..., part]) / np.sqrt(head_dim)
        top = s.max(axis=-1, keepdims=True)
        normaliser = np.mean(top[..., 0] + np.log(np.exp(s - top).sum(axis=-1)))
        context[..., part] = np.einsum("bij,bjd->bid", 1 / (1 + np.exp(normaliser - s)), v[..., part])
    got = keras.Model(mixed.inputs, mixed.get_layer("block0_context_keys_summed").output).predict(x, verbose=0)
    np.testing.assert_allclose(got, context, rtol=1e-4, atol=1e-5)
    added = sum(mixed.get_layer(f"block{i}_context_{n}").count_params() for i in (0, 1) for n in ("scores", "spread"))
    assert mixed.count_params() == model.count_params() + added == model.count_params() + 2 * (16 * 2 + 2 + 2 * 16)


def test_keep_attention_keeps_the_attention_whose_mixing_moves_the_outputs_most() -> None:
    """block1's query is zeroed, so its attention is uniform whatever the input: its mixing is exact and moves
    nothing. Keeping one attention must keep block0's (not the last block's), and the model with block1 mixed then
    answers every example alike. Keeping both leaves nothing to mix: refused by name."""
    import io

    from rich.console import Console

    model = _vit(heads=2)
    query = model.get_layer("block1_query")
    query.set_weights([np.zeros_like(w) for w in query.get_weights()])
    x = DIGITS.x[DIGITS.train_index[:32]]
    log = io.StringIO()
    mixed = constant_mixing(model, x[:8], keep=1, reporter=Reporter(console=Console(file=log)))
    names = {layer.name for layer in mixed.layers}
    assert {"block0_scores", "block0_query", "block1_context_mixing"} <= names
    assert not names & {"block0_context_mixing", "block1_scores", "block1_query"}
    np.testing.assert_allclose(mixed.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-4, atol=1e-5)
    assert "mix keeps the attention of block0_context" in log.getvalue()
    with pytest.raises(EdgeccError, match="compress.keep_attention: 2 of the model's 2 self-attentions"):
        constant_mixing(model, x[:8], keep=2)


def test_a_model_without_attention_is_refused_by_name() -> None:
    inputs = keras.Input((8, 8, 1))
    plain = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs)))
    with pytest.raises(EdgeccError, match="'mix'"):
        constant_mixing(plain, DIGITS.x[:4])


def _masked_text_model(heads: int, tokens: int = 6, dim: int = 8, classes: int = 3) -> keras.Model:
    """MiniLM's form at toy size: a padding bias on the scores (PaddingBias, MaskedSoftmax), a GELU feed-forward,
    post-norm blocks and the mean over the real tokens (TokenMean); padding is id 0."""
    from edgecc.train.layers import LayerNorm, TokenEmbedding
    from edgecc.train.minilm import MaskedSoftmax, PaddingBias, TokenMean

    keras.utils.set_random_seed(0)
    ids = keras.Input((tokens,), dtype="int32")
    x = TokenEmbedding(20, dim, name="embedding")(ids)
    bias = PaddingBias(0, -20.0, name="padding_bias")(ids)
    q, k, v = (keras.layers.Dense(dim, name=name)(x) for name in ("query", "key", "value"))
    probs = MaskedSoftmax(axis=-1, name="softmax")([AttentionScores(heads, name="scores")([q, k]), bias])
    h = keras.layers.Dense(dim, name="output")(AttentionContext(heads, name="context")([probs, v]))
    x = LayerNorm(1e-6, name="attn_norm")(keras.layers.Add()([x, h]))
    h = keras.layers.Dense(dim, name="mlp_down")(keras.layers.Dense(2 * dim, activation="gelu", name="mlp_up")(x))
    x = LayerNorm(1e-6, name="mlp_norm")(keras.layers.Add()([x, h]))
    return keras.Model(ids, keras.layers.Dense(classes, name="logits")(TokenMean(0, name="pool")([x, ids])))


def _padded_ids(n: int, tokens: int = 6) -> np.ndarray:
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 20, (n, tokens)).astype(np.int32)
    ids[np.arange(tokens) >= rng.integers(2, tokens + 1, (n, 1))] = 0  # 2..tokens real tokens, then padding
    return ids


def test_a_padding_mask_stays_as_a_zero_weight_on_the_padded_tokens_values() -> None:
    """Padded keys get no attention in the model; in the mixed model their values are multiplied by exactly 0 and the
    real tokens' by 1, so one example of a one-head model is still answered alike (its attention is the mixing)."""
    model = _masked_text_model(heads=1)
    ids = _padded_ids(2)
    assert (ids[0] == 0).any() and (ids[0] != ids[1]).any()
    mixed = constant_mixing(model, ids[:1])
    assert {"softmax", "scores", "query", "key"}.isdisjoint(layer.name for layer in mixed.layers)
    np.testing.assert_allclose(mixed.predict(ids[:1], verbose=0), model.predict(ids[:1], verbose=0), atol=1e-5)
    values = keras.Model(mixed.inputs, [mixed.get_layer("context_masked_values").output,
                                        mixed.get_layer("value").output]).predict(ids, verbose=0)
    np.testing.assert_array_equal(values[0], values[1] * (ids != 0)[..., None])


def test_a_mask_that_the_examples_never_use_is_refused_by_name() -> None:
    """Without padding in the examples the bias is 0 everywhere, so the padded value it stands for is unknown."""
    with pytest.raises(EdgeccError, match="softmax 'softmax' adds a key bias that takes the values 0 "):
        constant_mixing(_masked_text_model(heads=2), np.full((4, 6), 3, np.int32))


def test_sigmoid_gelu_computes_x_sigmoid_1702x_and_converts_without_the_gelu_builtin() -> None:
    from edgecc.train.convert import to_int8_tflite
    from edgecc.train.gelu import sigmoid_gelu
    from edgecc.train.teacher import inference_graph

    model = _masked_text_model(heads=2)
    changed = sigmoid_gelu(model)
    ids = _padded_ids(16)
    up = model.get_layer("mlp_up")
    z = keras.Model(model.inputs, up.input).predict(ids, verbose=0) @ up.get_weights()[0] + up.get_weights()[1]
    expected = (z / (1 + np.exp(-1.702 * z))) @ model.get_layer("mlp_down").get_weights()[0]
    got = keras.Model(changed.inputs, changed.get_layer("mlp_down").output).predict(ids, verbose=0)
    np.testing.assert_allclose(got, expected + model.get_layer("mlp_down").get_weights()[1], rtol=1e-4, atol=1e-5)
    assert not np.allclose(got, keras.Model(model.inputs, model.get_layer("mlp_down").output).predict(ids, verbose=0),
                           atol=1e-4)  # exact GELU differs
    kinds = read_graph(to_int8_tflite(inference_graph(changed), ids, False)).op_counts()
    assert "GELU" not in kinds and "LOGISTIC" in kinds


def test_a_gelu_read_by_more_than_one_layer_is_refused_by_name() -> None:
    from edgecc.train.gelu import sigmoid_gelu

    inputs = keras.Input((4,))
    h = keras.layers.Dense(8, activation="gelu", name="up")(inputs)
    model = keras.Model(inputs, keras.layers.Add()([keras.layers.Dense(8)(h), h]))
    with pytest.raises(EdgeccError, match="layer 'up' has a GELU"):
        sigmoid_gelu(model)


@pytest.mark.parametrize(("kind", "mixing"), [("vit", "per_head"), ("text", "per_head"), ("masked", "per_head"),
                                              ("masked", "gated"), ("text", "sigmoid"), ("masked", "sigmoid")])
def test_the_mixed_int8_model_maps_to_the_edge_tpu_whole(kind: str, mixing: str) -> None:
    """After 'mix' and 'ptq', no operator multiplies two activations but element-wise: lowered for coral-usb, the
    pipeline is one Edge TPU segment (after a text model's embedding lookup, the host pre-step) with every MAC but
    the lookup's. MiniLM's form ('masked': padding mask, GELU with compress.gelu = 'sigmoid', mean over the real
    tokens, then QAT) too: the mask's arithmetic on the ids joins the pre-step; and with the gated mixing's MUL, or
    sigmoid attention's element-wise products, LOGISTIC and SUM over the keys."""
    keras.utils.set_random_seed(0)
    config = VitConfig(stem_filters=(8,), stem_strides=(2,), dim=16, depth=2, heads=2, mlp_dim=32, dropout=0.0)
    if kind == "vit":
        model, data = vision_transformer(config, (8, 8, 1), 10), DIGITS
    else:
        model = text_transformer(config, 12, 40, 10) if kind == "text" else _masked_text_model(2, 12, 16, 10)
        ids = np.random.default_rng(0).integers(0, 40, (200, 12)).astype(np.int32) if kind == "text" else _padded_ids(200, 12)
        data = replace(DIGITS, x=ids, y=DIGITS.y[:200], train_index=np.arange(150), test_index=np.arange(150, 200))
    section = CompressSection(stages=("mix", "qat" if kind == "masked" else "ptq"), distill_epochs=1,  # QAT keeps them
                              calibration_samples=32, gelu="sigmoid" if kind == "masked" else "exact", mixing=mixing)
    calibration = data.x[data.train_index[:32]]
    (_, final) = run_stages(model, replace(data, train_index=data.train_index[:128]), section,
                            TrainSection(batch_size=64, augment_shift=0), 0, calibration, Reporter(quiet=True))
    graph = read_graph(final.int8)
    assert "BATCH_MATMUL" not in graph.op_counts() and "SOFTMAX" not in graph.op_counts()
    # the one-block 'masked' toy's sigmoid GELU, and a gate or sigmoid attention's weights per block
    blocks = 1 if kind == "masked" else 2
    assert graph.op_counts().get("LOGISTIC", 0) == (kind == "masked") + blocks * (mixing in ("gated", "sigmoid"))
    over_keys = [op for op in graph.operators if op.kind == "SUM" and len(graph.tensors[op.inputs[0]].shape) == 4]
    assert len(over_keys) == blocks * (mixing == "sigmoid")  # the masked toy's mean over real tokens sums too
    assert all(graph.tensors[op.inputs[1]].constant for op in graph.operators if op.kind == "FULLY_CONNECTED")
    pipeline = split_for_edgetpu(final.int8, load_target("coral-usb"))
    assert [s.edgetpu for s in pipeline.segments] == ([True] if kind == "vit" else [False, True])
    assert pipeline.edgetpu_mac_share > (0.98 if kind == "masked" else 0.99)  # the toy's pre-step: 16 wide
    lowered, original = Model(lower_for_edgetpu(final.int8)), Model(final.int8)
    for example in data.x[data.test_index[:8]]:  # the lowering stays exact
        assert np.array_equal(lowered.invoke(example), original.invoke(example))
