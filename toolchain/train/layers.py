"""edgecc's transformer layers.

A transformer is built from plain Keras `Dense`, `Conv2D`, `Softmax` and `Add`
layers (which TF-MOT can already prune and quantize) plus the few weight-light
layers below for what Keras has no QAT-friendly layer for. Every tensor that the
int8 TFLite graph carries between ops is the output of one Keras layer, so a
quantizer per layer output later gives QAT the same rounding as the int8 graph.

Shapes stay static apart from the batch, so the batch-1 inference graph converts
to plain RESHAPE / TRANSPOSE / BATCH_MATMUL ops that every runtime has.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

from edgecc.train.tf import keras as _keras, tensorflow as _tensorflow

tf = _tensorflow()
keras = _keras()

PACKAGE = "edgecc"


_INT8_GRAPH = contextvars.ContextVar("edgecc_int8_graph", default=False)


@contextlib.contextmanager
def int8_graph() -> Iterator[None]:
    """Trace attention for the int8 TFLite graph: one FULLY_CONNECTED per head instead of a BATCH_MATMUL.

    TFLite's int8 BATCH_MATMUL with two activation inputs runs about 20x slower
    than the float one on the host (no XNNPACK path), while an int8
    FULLY_CONNECTED with an activation as its weights runs faster than float.
    Both compute the same products; the float graph keeps BATCH_MATMUL, its
    fastest form. Only a static batch of 1 (the inference graph) is split.
    """
    token = _INT8_GRAPH.set(True)
    try:
        yield
    finally:
        _INT8_GRAPH.reset(token)


def _per_head(x: Any) -> bool:
    return _INT8_GRAPH.get() and x.shape[0] == 1


def _split_heads(x: Any, heads: int) -> Any:
    """(batch, tokens, heads * head_dim) -> (batch, heads, tokens, head_dim)."""
    tokens, width = x.shape[1], x.shape[2]
    x = tf.reshape(x, (-1, tokens, heads, width // heads))
    return tf.transpose(x, (0, 2, 1, 3))


def _unstack(x: Any) -> list[Any]:
    """Split the leading axis; a single slice is a RESHAPE rather than an UNPACK (a pruned model may keep one head)."""
    return [tf.reshape(x, x.shape[1:])] if x.shape[0] == 1 else tf.unstack(x)


def _concat(parts: list[Any], axis: int) -> Any:
    return parts[0] if len(parts) == 1 else tf.concat(parts, axis=axis)


def _head_matrices(x: Any, heads: int) -> list[Any]:
    """(1, tokens, heads * head_dim) -> one (tokens, head_dim) matrix per head."""
    tokens, width = x.shape[1], x.shape[2]
    if heads == 1:
        return [tf.reshape(x, (tokens, width))]
    return tf.unstack(tf.transpose(tf.reshape(x, (tokens, heads, width // heads)), (1, 0, 2)))


def scores(query: Any, key: Any, heads: int) -> Any:
    """Scaled dot products per head, (batch, heads, tokens, tokens), from already scaled queries."""
    if _per_head(query):
        products = [tf.matmul(q, k, transpose_b=True) for q, k in zip(_head_matrices(query, heads),
                                                                      _head_matrices(key, heads))]
        tokens = query.shape[1]
        return tf.reshape(_concat(products, axis=0), (1, heads, tokens, tokens))
    return tf.matmul(_split_heads(query, heads), _split_heads(key, heads), transpose_b=True)


@keras.utils.register_keras_serializable(package=PACKAGE)
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned vector per token position (the sequence length is static)."""

    def build(self, input_shape: Any) -> None:
        self.positions = self.add_weight(
            name="positions",
            shape=(input_shape[1], input_shape[2]),
            initializer=keras.initializers.TruncatedNormal(stddev=0.02),
        )
        super().build(input_shape)

    def call(self, x: Any) -> Any:
        return x + self.positions


@keras.utils.register_keras_serializable(package=PACKAGE)
class TokenEmbedding(keras.layers.Layer):
    """A learned vector per token id: an int8 GATHER in TFLite.

    Keras' Embedding is not accepted by TF-MOT QAT; this layer gets a
    QuantizeConfig that rounds its table as the converter does. A trimmed
    vocabulary (`input_vocabulary` > 0) first maps each input id to a row of a
    smaller table through a constant int32 `id_map` (a second, int32 GATHER),
    so the tokenizer and its ids stay as they were.
    """

    def __init__(self, vocabulary_size: int, dim: int, input_vocabulary: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.vocabulary_size = vocabulary_size
        self.dim = dim
        self.input_vocabulary = input_vocabulary

    def build(self, input_shape: Any) -> None:
        self.table = self.add_weight(name="table", shape=(self.vocabulary_size, self.dim),
                                     initializer=keras.initializers.TruncatedNormal(stddev=0.02))
        if self.input_vocabulary:
            self.id_map = self.add_weight(name="id_map", shape=(self.input_vocabulary,), dtype="int32",
                                          initializer="zeros", trainable=False)
        super().build(input_shape)

    def call(self, ids: Any) -> Any:
        ids = tf.cast(ids, tf.int32)
        if self.input_vocabulary:
            ids = tf.gather(self.id_map, ids)
        return tf.gather(self.table, ids)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "vocabulary_size": self.vocabulary_size, "dim": self.dim,
                "input_vocabulary": self.input_vocabulary}


class _MultiHead(keras.layers.Layer):
    """A weightless attention step that splits its inputs into `heads` heads."""

    def __init__(self, heads: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.heads = heads

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "heads": self.heads}


@keras.utils.register_keras_serializable(package=PACKAGE)
class AttentionScores(_MultiHead):
    """Scaled dot products of queries and keys per head: (batch, heads, tokens, tokens)."""

    def call(self, inputs: list[Any]) -> Any:
        query, key = inputs
        head_dim = query.shape[-1] // self.heads
        return scores(query * (head_dim**-0.5), key, self.heads)


@keras.utils.register_keras_serializable(package=PACKAGE)
class AttentionContext(_MultiHead):
    """Attention-weighted sum of the values, heads merged back: (batch, tokens, heads * head_dim)."""

    def call(self, inputs: list[Any]) -> Any:
        probs, value = inputs
        if _per_head(value):
            # (p·v)ᵀ = vᵀ·pᵀ is FULLY_CONNECTED(input=vᵀ, weights=p); heads stay outermost in the merged features
            tokens, width = value.shape[1], value.shape[2]
            transposed = _unstack(tf.reshape(tf.transpose(tf.reshape(value, (tokens, width))),
                                             (self.heads, width // self.heads, tokens)))
            products = [tf.matmul(v, p, transpose_b=True)
                        for v, p in zip(transposed, _unstack(tf.reshape(probs, probs.shape[1:])))]
            return tf.reshape(tf.transpose(_concat(products, axis=0)), (1, tokens, width))
        context = tf.matmul(probs, _split_heads(value, self.heads))
        tokens, width = value.shape[1], value.shape[2]
        return tf.reshape(tf.transpose(context, (0, 2, 1, 3)), (-1, tokens, width))


@keras.utils.register_keras_serializable(package=PACKAGE)
class KeySum(keras.layers.Layer):
    """Sum over the keys: (batch, queries, keys, features) -> (batch, queries, features), one int8 SUM.

    The context of sigmoid attention (edgecc.train.mixing, compress.mixing 'sigmoid') written as element-wise
    products summed over the keys: operators the Edge TPU maps, where a matrix product of two activations is not.
    """

    def call(self, x: Any) -> Any:
        return tf.reduce_sum(x, axis=-2)


@keras.utils.register_keras_serializable(package=PACKAGE)
class LayerNorm(keras.layers.Layer):
    """Layer normalisation over the last axis, written out op by op.

    Keras' LayerNormalization is not accepted by TF-MOT QAT; this one computes the
    same function with the ops the int8 TFLite graph will contain.

    A frozen norm (`frozen_scale` > 0) multiplies by that constant instead of each
    token's 1/sigma: a linear map, which `fold.fold_norms` moves whole into the
    Dense layers that read it, so that no norm op (and no RSQRT, which runs
    outside XNNPACK in int8) is left in the graph.
    """

    def __init__(self, epsilon: float = 1e-5, affine: bool = True, frozen_scale: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.epsilon = epsilon
        self.affine = affine
        self.frozen_scale = frozen_scale

    def build(self, input_shape: Any) -> None:
        if self.affine:  # a norm whose gamma and beta were folded into the next Dense has none
            width = input_shape[-1]
            self.gamma = self.add_weight(name="gamma", shape=(width,), initializer="ones")
            self.beta = self.add_weight(name="beta", shape=(width,), initializer="zeros")
        super().build(input_shape)

    def scale_and_shift(self, normalised: Any) -> Any:
        return normalised * self.gamma + self.beta if self.affine else normalised

    def average(self, x: Any) -> Any:
        """Mean over the last axis as a product with a constant column: one int8 FULLY_CONNECTED.

        TFLite's int8 MEAN and SQUARED_DIFFERENCE kernels run ~20x slower than
        their float twins on the host; a fully connected op with a constant
        1/width weight is as fast as any other small Dense.
        """
        width = x.shape[-1]
        return tf.matmul(x, tf.constant(1.0 / width, shape=(width, 1)))

    def inverse_deviation(self, centred: Any) -> Any:
        """Each token's 1/sigma, the tensor that freezing replaces by a constant."""
        return tf.math.rsqrt(self.average(centred * centred) + self.epsilon)

    def call(self, x: Any) -> Any:
        centred = x - self.average(x)
        if self.frozen_scale:
            return self.scale_and_shift(centred * self.frozen_scale)
        return self.scale_and_shift(centred * self.inverse_deviation(centred))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "epsilon": self.epsilon, "affine": self.affine,
                "frozen_scale": self.frozen_scale}
