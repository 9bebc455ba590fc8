"""A user's transformer built from standard tf_keras layers is rewritten into edgecc's layers exactly."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

pytest.importorskip("tf_keras")
from edgecc.train.tf import keras as load_keras, tensorflow as load_tensorflow  # noqa: E402

keras = load_keras()
tf = load_tensorflow()
import edgecc.train.layers  # noqa: E402,F401  (registers edgecc's layers for loading)
from edgecc.errors import EdgeccError  # noqa: E402
from edgecc.train.rewrite import rewrite_model  # noqa: E402

layers = keras.layers
TOKENS, DIM, CLASSES = 6, 32, 5


def randomised(model: Any, seed: int = 0) -> Any:
    """Every weight set to noise, so biases and layer-norm parameters are not zeros and ones."""
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0.0, 0.3, w.shape).astype(w.dtype) for w in model.get_weights()])
    return model


def pre_norm_model() -> Any:
    """Two pre-norm blocks on (tokens, dim) inputs, a constant position table, residuals written x + y."""
    inputs = keras.Input((TOKENS, DIM), name="features")
    x = inputs + np.random.default_rng(1).normal(size=(TOKENS, DIM)).astype(np.float32)
    for i in range(2):
        h = layers.LayerNormalization(epsilon=1e-6, name=f"ln{i}_a")(x)
        x = x + layers.MultiHeadAttention(num_heads=4, key_dim=8, name=f"attn{i}")(h, h)
        h = layers.LayerNormalization(epsilon=1e-6, name=f"ln{i}_b")(x)
        h = layers.Dense(64, activation="gelu")(h)
        x = x + layers.Dense(DIM)(h)
    x = layers.LayerNormalization(epsilon=1e-6)(x)
    outputs = layers.Dense(CLASSES)(layers.GlobalAveragePooling1D()(x))
    return randomised(keras.Model(inputs, outputs))


def post_norm_text_model() -> Any:
    """Token ids, Embedding, post-norm block without biases, key_dim != value_dim, attention dropout."""
    ids = keras.Input((TOKENS,), dtype="int32", name="ids")
    x = layers.Embedding(50, DIM)(ids)
    x = layers.Add()([x, layers.Dense(DIM)(x)])
    attention = layers.MultiHeadAttention(num_heads=4, key_dim=8, value_dim=6, use_bias=False, dropout=0.1,
                                           name="attn")
    x = layers.LayerNormalization(epsilon=1e-6, center=False)(x + attention(x, x, x))
    h = layers.Dense(48, activation="relu")(x)
    x = layers.LayerNormalization(epsilon=1e-6, scale=False)(x + layers.Dense(DIM)(h) * x)
    outputs = layers.Dense(CLASSES, activation="softmax")(layers.Flatten()(x))
    return randomised(keras.Model(ids, outputs))


def max_difference(a: Any, b: Any, x: np.ndarray) -> float:
    return float(np.max(np.abs(a(x, training=False).numpy() - b(x, training=False).numpy())))


def layer_types(model: Any) -> set[str]:
    return {type(layer).__name__ for layer in model.layers}


@pytest.fixture(scope="module")
def pre_norm() -> tuple[Any, Any]:
    keras.utils.set_random_seed(0)
    model = pre_norm_model()
    return model, rewrite_model(model)


def test_pre_norm_transformer_is_rewritten_exactly(pre_norm: tuple[Any, Any]) -> None:
    model, rewritten = pre_norm
    x = np.random.default_rng(2).normal(size=(8, TOKENS, DIM)).astype(np.float32)
    assert max_difference(model, rewritten, x) < 1e-5
    assert not layer_types(rewritten) & {"MultiHeadAttention", "LayerNormalization", "TFOpLambda"}
    assert {"AttentionScores", "AttentionContext", "LayerNorm", "PositionEmbedding", "Add"} <= layer_types(rewritten)
    assert rewritten.input_shape == model.input_shape and rewritten.count_params() == model.count_params() + TOKENS * DIM
    names = {layer.name for layer in rewritten.layers}
    assert {"attn0_query", "attn0_scores", "attn1_output", "ln0_a"} <= names


def test_rewritten_model_round_trips_through_a_safe_keras_file(pre_norm: tuple[Any, Any], tmp_path: Path) -> None:
    rewritten = pre_norm[1]
    path = tmp_path / "rewritten.keras"
    rewritten.save(path)
    loaded = keras.models.load_model(path, safe_mode=True, compile=False)
    x = np.random.default_rng(3).normal(size=(2, TOKENS, DIM)).astype(np.float32)
    assert max_difference(rewritten, loaded, x) == 0.0


def test_post_norm_text_model_without_biases_and_with_unequal_head_sizes() -> None:
    keras.utils.set_random_seed(1)
    model = post_norm_text_model()
    rewritten = rewrite_model(model)
    ids = np.random.default_rng(4).integers(0, 50, size=(8, TOKENS)).astype(np.int32)
    assert max_difference(model, rewritten, ids) < 1e-5
    assert "TokenEmbedding" in layer_types(rewritten) and "Multiply" in layer_types(rewritten)
    assert not layer_types(rewritten) & {"MultiHeadAttention", "LayerNormalization", "TFOpLambda"}
    query, value = rewritten.get_layer("attn_query"), rewritten.get_layer("attn_value")
    assert (query.units, value.units, query.use_bias) == (32, 24, False)
    assert rewritten.get_layer("attn_dropout").rate == 0.1


def test_sequential_model_is_rewritten() -> None:
    model = randomised(keras.Sequential([
        keras.Input((TOKENS, DIM)), layers.Dense(DIM), layers.LayerNormalization(axis=2), layers.Flatten(), layers.Dense(3),
    ]))
    rewritten = rewrite_model(model)
    x = np.random.default_rng(5).normal(size=(4, TOKENS, DIM)).astype(np.float32)
    assert max_difference(model, rewritten, x) < 1e-5
    assert "LayerNorm" in layer_types(rewritten)


def test_shared_layer_stays_shared() -> None:
    inputs = keras.Input((TOKENS, DIM))
    dense = layers.Dense(DIM, name="shared")
    model = randomised(keras.Model(inputs, dense(dense(inputs))))
    rewritten = rewrite_model(model)
    assert rewritten.count_params() == model.count_params()
    x = np.random.default_rng(6).normal(size=(2, TOKENS, DIM)).astype(np.float32)
    assert max_difference(model, rewritten, x) < 1e-5


def cross_attention() -> Any:
    query, memory = keras.Input((TOKENS, DIM)), keras.Input((3, DIM))
    return keras.Model([query, memory], layers.MultiHeadAttention(2, 8, name="cross")(query, memory))


def masked_attention() -> Any:
    x = keras.Input((TOKENS, DIM))
    mask = keras.Input((TOKENS, TOKENS), dtype="bool")
    return keras.Model([x, mask], layers.MultiHeadAttention(2, 8, name="masked")(x, x, attention_mask=mask))


def keras_mask() -> Any:
    """Embedding(mask_zero=True) masks what follows; edgecc's LayerNorm would not pass the mask on."""
    ids = keras.Input((TOKENS,), dtype="int32")
    x = layers.Embedding(50, DIM, mask_zero=True)(ids)
    return keras.Model(ids, layers.GlobalAveragePooling1D()(layers.LayerNormalization(name="norm")(x)))


def lambda_layer() -> Any:
    inputs = keras.Input((TOKENS, DIM))
    return keras.Model(inputs, layers.Lambda(lambda t: t * 2, name="doubler")(inputs))


def tf_op() -> Any:
    inputs = keras.Input((TOKENS, DIM))
    return keras.Model(inputs, tf.nn.relu(inputs))


def unsupported_layer() -> Any:
    inputs = keras.Input((TOKENS, DIM))
    return keras.Model(inputs, layers.GRU(4, name="recurrent")(inputs))


@pytest.mark.parametrize(("build", "expected"), [
    (cross_attention, "'cross' (MultiHeadAttention): cross-attention"),
    (masked_attention, "'masked' (MultiHeadAttention): masked attention"),
    (keras_mask, "'norm' (LayerNormalization): its input carries a Keras mask"),
    (lambda_layer, "'doubler' (Lambda)"),
    (tf_op, "'tf.nn.relu' (TFOpLambda): the TensorFlow op tf.nn.relu"),
    (unsupported_layer, "'recurrent' (GRU): edgecc supports Dense"),
])
def test_layers_it_cannot_rewrite_are_named(build: Callable[[], Any], expected: str) -> None:
    with pytest.raises(EdgeccError, match=re.escape("cannot rewrite layer " + expected)):
        rewrite_model(build())


def test_user_model_loaded_from_a_safe_keras_file_is_rewritten(pre_norm: tuple[Any, Any], tmp_path: Path) -> None:
    """The real flow: the user's .keras file, loaded in safe mode (x + constant survives as a TFOpLambda)."""
    model = pre_norm[0]
    path = tmp_path / "user.keras"
    model.save(path)
    rewritten = rewrite_model(keras.models.load_model(path, safe_mode=True, compile=False))
    x = np.random.default_rng(7).normal(size=(4, TOKENS, DIM)).astype(np.float32)
    assert max_difference(model, rewritten, x) < 1e-5
