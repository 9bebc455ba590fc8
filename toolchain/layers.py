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

from typing import Any

from edgecc.tf import keras as _keras, tensorflow as _tensorflow

tf = _tensorflow()
keras = _keras()

PACKAGE = "edgecc"


def _split_heads(x: Any, heads: int) -> Any:
    """(batch, tokens, heads * head_dim) -> (batch, heads, tokens, head_dim)."""
    tokens, width = x.shape[1], x.shape[2]
    x = tf.reshape(x, (-1, tokens, heads, width // heads))
    return tf.transpose(x, (0, 2, 1, 3))


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
        query = _split_heads(query, self.heads) * (head_dim**-0.5)
        return tf.matmul(query, _split_heads(key, self.heads), transpose_b=True)


@keras.utils.register_keras_serializable(package=PACKAGE)
class AttentionContext(_MultiHead):
    """Attention-weighted sum of the values, heads merged back: (batch, tokens, heads * head_dim)."""

    def call(self, inputs: list[Any]) -> Any:
        probs, value = inputs
        context = tf.matmul(probs, _split_heads(value, self.heads))
        tokens, width = value.shape[1], value.shape[2]
        return tf.reshape(tf.transpose(context, (0, 2, 1, 3)), (-1, tokens, width))


@keras.utils.register_keras_serializable(package=PACKAGE)
class LayerNorm(keras.layers.Layer):
    """Layer normalisation over the last axis, written out op by op.

    Keras' LayerNormalization is not accepted by TF-MOT QAT; this one computes the
    same function with the ops the int8 TFLite graph will contain.
    """

    def __init__(self, epsilon: float = 1e-5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape: Any) -> None:
        width = input_shape[-1]
        self.gamma = self.add_weight(name="gamma", shape=(width,), initializer="ones")
        self.beta = self.add_weight(name="beta", shape=(width,), initializer="zeros")
        super().build(input_shape)

    def call(self, x: Any) -> Any:
        centred = x - tf.reduce_mean(x, axis=-1, keepdims=True)
        variance = tf.reduce_mean(tf.square(centred), axis=-1, keepdims=True)
        return centred * tf.math.rsqrt(variance + self.epsilon) * self.gamma + self.beta

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "epsilon": self.epsilon}
