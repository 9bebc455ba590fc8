"""Reference transformer architectures, assembled from edgecc's layers.

Layer names follow `block{i}_{part}` so that later passes (head and neuron
pruning, per-layer reports) can find the query/key/value/output and feed-forward
kernels of each block by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgecc.train.layers import AttentionContext, AttentionScores, LayerNorm, PositionEmbedding, TokenEmbedding, keras

layers = keras.layers


@dataclass(frozen=True)
class VitConfig:
    """A small transformer: convolutional stem (or token embedding) -> tokens -> encoder blocks -> classifier."""

    stem_filters: tuple[int, ...]
    stem_strides: tuple[int, ...]
    dim: int
    depth: int
    heads: int
    mlp_dim: int
    dropout: float
    stem_kernel: tuple[int, int] = (3, 3)


def encoder_block(x: Any, index: int, heads: int, mlp_dim: int, dropout: float) -> Any:
    """Pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""
    name = f"block{index}"
    dim = x.shape[-1]
    h = LayerNorm(name=f"{name}_attn_norm")(x)
    query = layers.Dense(dim, name=f"{name}_query")(h)
    key = layers.Dense(dim, name=f"{name}_key")(h)
    value = layers.Dense(dim, name=f"{name}_value")(h)
    scores = AttentionScores(heads, name=f"{name}_scores")([query, key])
    probs = layers.Softmax(axis=-1, name=f"{name}_softmax")(scores)
    context = AttentionContext(heads, name=f"{name}_context")([probs, value])
    h = layers.Dense(dim, name=f"{name}_attn_output")(context)
    h = layers.Dropout(dropout, name=f"{name}_attn_dropout")(h)
    x = layers.Add(name=f"{name}_attn_residual")([x, h])

    h = LayerNorm(name=f"{name}_mlp_norm")(x)
    h = layers.Dense(mlp_dim, activation="relu", name=f"{name}_mlp_up")(h)
    h = layers.Dense(dim, name=f"{name}_mlp_down")(h)
    h = layers.Dropout(dropout, name=f"{name}_mlp_dropout")(h)
    return layers.Add(name=f"{name}_mlp_residual")([x, h])


def vision_transformer(
    config: VitConfig, input_shape: tuple[int, ...], num_classes: int, batch_size: int | None = None
) -> Any:
    """Build the classifier; `batch_size=1` gives the static inference graph."""
    inputs = keras.Input(shape=input_shape, batch_size=batch_size, name="image")
    x = inputs
    for i, (filters, stride) in enumerate(zip(config.stem_filters, config.stem_strides)):
        x = layers.Conv2D(filters, config.stem_kernel, strides=stride, padding="same", activation="relu",
                          name=f"stem{i}")(x)
    x = layers.Reshape((x.shape[1] * x.shape[2], x.shape[3]), name="tokens")(x)
    x = layers.Dense(config.dim, name="token_projection")(x)
    return keras.Model(inputs, _encoder_and_head(x, config, num_classes), name="vit")


def text_transformer(
    config: VitConfig, sequence_length: int, vocabulary_size: int, num_classes: int, batch_size: int | None = None
) -> Any:
    """Token ids -> embeddings -> encoder blocks -> mean over tokens -> classifier (stem fields unused)."""
    inputs = keras.Input(shape=(sequence_length,), batch_size=batch_size, dtype="int32", name="tokens")
    x = TokenEmbedding(vocabulary_size, config.dim, name="token_embedding")(inputs)
    return keras.Model(inputs, _encoder_and_head(x, config, num_classes), name="text_transformer")


def _encoder_and_head(tokens: Any, config: VitConfig, num_classes: int) -> Any:
    x = PositionEmbedding(name="positions")(tokens)
    for i in range(config.depth):
        x = encoder_block(x, i, config.heads, config.mlp_dim, config.dropout)
    x = LayerNorm(name="final_norm")(x)
    x = layers.GlobalAveragePooling1D(name="pool")(x)
    return layers.Dense(num_classes, name="logits")(x)
