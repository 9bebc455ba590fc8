"""Rewriting a user's tf_keras transformer into edgecc's layers, before any compression.

TF-MOT cannot prune or quantize MultiHeadAttention, LayerNormalization or the
TFOpLambda that `x + y` becomes, nor Keras' Embedding, so a user's model built from those standard
layers is rebuilt layer by layer from edgecc's: the same function, the same
weights, only in layers that compression and the int8 graph can handle.
Anything else is refused by name rather than guessed at.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import numpy as np

from edgecc.errors import EdgeccError
from edgecc.train.layers import AttentionContext, AttentionScores, LayerNorm, PositionEmbedding, TokenEmbedding, keras, tf

layers = keras.layers

# Re-created from their config with their weights: compression already handles these.
KEPT = tuple(getattr(layers, name) for name in (
    "Dense", "Conv1D", "Conv2D", "DepthwiseConv2D", "Dropout", "Activation", "ReLU", "Softmax",
    "Add", "Multiply", "Concatenate", "Reshape", "Flatten", "Permute",
    "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalMaxPooling1D", "GlobalMaxPooling2D",
    "AveragePooling1D", "AveragePooling2D", "MaxPooling1D", "MaxPooling2D",
    "BatchNormalization",
)) + (PositionEmbedding, AttentionScores, AttentionContext, LayerNorm, TokenEmbedding)

REWRITTEN = ("MultiHeadAttention (self-attention)", "LayerNormalization (last axis)", "Embedding",
             "x + y", "x * y", "x + constant (a position table)")

SUPPORTED = ", ".join([cls.__name__ for cls in KEPT] + list(REWRITTEN))

# The TFOpLambda functions that `x + y` and `x * y` in a functional model become.
ADD_OPS = ("__operators__.add", "math.add")
MULTIPLY_OPS = ("math.multiply", "__operators__.mul")

Apply = Callable[[tuple, dict], Any]


def rewrite_model(model: Any) -> Any:
    """The same function built from edgecc's layers (weights copied); raises EdgeccError naming any layer it cannot rewrite."""
    if not getattr(model, "_is_graph_network", False):
        raise EdgeccError(f"cannot rewrite model '{model.name}' ({type(model).__name__}): edgecc rewrites functional "
                          "and Sequential models with a known input shape, not subclassed or unbuilt ones")
    rewritten: dict[int, Any] = {}  # id(original tensor) -> its counterpart in the new model
    appliers: dict[int, Apply] = {}  # one per original layer, so a shared layer stays shared
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if node.is_input:
                outputs = _input(node.layer)
            else:
                if id(node.layer) not in appliers:
                    appliers[id(node.layer)] = _applier(node.layer)
                if type(node.layer) not in KEPT and any(getattr(t, "_keras_mask", None) is not None for t in node.keras_inputs):
                    raise _refuse(node.layer, "its input carries a Keras mask (from Embedding(mask_zero=True) or Masking) "
                                  "that edgecc's layers would not apply; use a padding token the model learns instead")
                args, kwargs = tf.nest.map_structure(lambda t: rewritten.get(id(t), t), (node.call_args, node.call_kwargs))
                outputs = appliers[id(node.layer)](args, kwargs)
            for old, new in zip(tf.nest.flatten(node.outputs), tf.nest.flatten(outputs)):
                rewritten[id(old)] = new
    inputs = tf.nest.map_structure(lambda t: rewritten[id(t)], model._nested_inputs)
    outputs = tf.nest.map_structure(lambda t: rewritten[id(t)], model._nested_outputs)
    return keras.Model(inputs, outputs, name=model.name)


def _refuse(layer: Any, why: str) -> EdgeccError:
    return EdgeccError(f"cannot rewrite layer '{layer.name}' ({type(layer).__name__}): {why}")


def _input(layer: Any) -> Any:
    """A new Input with the original's batch size, shape, dtype and name."""
    config = layer.get_config()
    return keras.Input(batch_shape=config["batch_input_shape"], dtype=config["dtype"], name=config["name"],
                       sparse=config.get("sparse", False), ragged=config.get("ragged", False))


def _applier(layer: Any) -> Apply:
    """How one original layer is applied in the new model."""
    if type(layer) in KEPT:
        return _kept(layer)
    if type(layer) is layers.MultiHeadAttention:
        return _attention(layer)
    if type(layer) is layers.LayerNormalization:
        return _layer_norm(layer)
    if type(layer) is layers.Embedding:
        return _embedding(layer)
    if type(layer).__name__ == "TFOpLambda":
        return _operator(layer)
    if type(layer) is layers.Lambda:
        raise _refuse(layer, "a Lambda layer runs arbitrary Python that edgecc cannot compress or load safely; "
                      f"build it from standard layers (edgecc supports {SUPPORTED})")
    raise _refuse(layer, f"edgecc supports {SUPPORTED}")


def _kept(layer: Any) -> Apply:
    """The layer re-created from its config, with its weights once it is built."""
    clone = type(layer).from_config(layer.get_config())

    def apply(args: tuple, kwargs: dict) -> Any:
        outputs = clone(*args, **kwargs)
        clone.set_weights(layer.get_weights())
        return outputs

    return apply


def _attention(layer: Any) -> Apply:
    """Self-attention as Dense q/k/v, AttentionScores, Softmax, AttentionContext and a Dense output.

    Keras scales the query by 1/sqrt(key_dim) as AttentionScores does, and its
    EinsumDense kernels are the Dense kernels with the heads axis folded in.
    """
    if layer._attention_axes != (1,):
        raise _refuse(layer, f"attention over axes {layer._attention_axes}; edgecc attends over the tokens "
                      "of a (batch, tokens, features) input only")
    output = layer._output_dense
    if len(output.kernel.shape) != 3:
        raise _refuse(layer, f"output_shape {layer._output_shape} is not a single feature axis")
    name, heads = layer.name, layer._num_heads
    projections = {part: getattr(layer, f"_{part}_dense") for part in ("query", "key", "value")}
    dense = {part: layers.Dense(int(np.prod(p.kernel.shape[1:])), use_bias=p.bias is not None, name=f"{name}_{part}")
             for part, p in projections.items()}
    dense["output"] = layers.Dense(output.kernel.shape[-1], use_bias=output.bias is not None, name=f"{name}_output")
    projections["output"] = output
    scores = AttentionScores(heads, name=f"{name}_scores")
    softmax = layers.Softmax(axis=-1, name=f"{name}_softmax")
    # MultiHeadAttention drops attention probabilities while training; keep that for fine-tuning.
    dropout = layers.Dropout(layer._dropout, name=f"{name}_dropout") if layer._dropout else None
    context = AttentionContext(heads, name=f"{name}_context")
    signature = inspect.signature(layer.call)

    def apply(args: tuple, kwargs: dict) -> Any:
        call = signature.bind(*args, **kwargs).arguments
        x = call["query"]
        if call["value"] is not x or (call.get("key") is not None and call["key"] is not x):
            raise _refuse(layer, "cross-attention (query, key and value are not the same tensor); "
                          "edgecc rewrites self-attention only")
        if call.get("attention_mask") is not None or call.get("use_causal_mask"):
            raise _refuse(layer, "masked attention (attention_mask or use_causal_mask); "
                          "edgecc rewrites unmasked self-attention only")
        if call.get("return_attention_scores"):
            raise _refuse(layer, "return_attention_scores=True; edgecc's attention returns only its output")
        probs = softmax(scores([dense["query"](x), dense["key"](x)]))
        if dropout is not None:
            probs = dropout(probs)
        y = dense["output"](context([probs, dense["value"](x)]))
        for part, p in projections.items():
            kernel = p.kernel.numpy()
            width = dense[part].units
            kernel = kernel.reshape(-1, width) if part == "output" else kernel.reshape(kernel.shape[0], width)
            dense[part].set_weights([kernel] + ([p.bias.numpy().reshape(-1)] if p.bias is not None else []))
        return y

    return apply


def _embedding(layer: Any) -> Apply:
    """TokenEmbedding with the same table (TF-MOT QAT refuses Keras' Embedding); masks were refused earlier."""
    embedding = TokenEmbedding(layer.input_dim, layer.output_dim, name=layer.name)

    def apply(args: tuple, kwargs: dict) -> Any:
        y = embedding(args[0])
        embedding.set_weights(layer.get_weights())
        return y

    return apply


def _layer_norm(layer: Any) -> Apply:
    """LayerNorm over the last axis; a missing gamma or beta is a gamma of 1 or a beta of 0."""
    norm = LayerNorm(epsilon=layer.epsilon, name=layer.name)

    def apply(args: tuple, kwargs: dict) -> Any:
        rank = args[0].shape.rank
        if layer.axis != [rank - 1]:
            raise _refuse(layer, f"normalises over axes {layer.axis} of a rank-{rank} input; "
                          "edgecc's LayerNorm normalises over the last axis only")
        y = norm(args[0])
        width = args[0].shape[-1]
        gamma = layer.gamma.numpy() if layer.gamma is not None else np.ones(width, np.float32)
        beta = layer.beta.numpy() if layer.beta is not None else np.zeros(width, np.float32)
        norm.set_weights([gamma, beta])
        return y

    return apply


def _operator(layer: Any) -> Apply:
    """`x + y` -> Add, `x * y` -> Multiply, `x + constant` -> a fixed PositionEmbedding."""
    op = layer.symbol
    if op not in ADD_OPS + MULTIPLY_OPS:
        raise _refuse(layer, f"the TensorFlow op tf.{op} is not a Keras layer that edgecc can compress; "
                      "write it with a Keras layer (e.g. layers.Activation, layers.Add)")

    def apply(args: tuple, kwargs: dict) -> Any:
        operands = [*args, *(v for k, v in kwargs.items() if k != "name")]
        tensors = [t for t in operands if hasattr(t, "_keras_history")]
        if len(operands) == 2 and len(tensors) == 2:
            merge = layers.Add if op in ADD_OPS else layers.Multiply
            return merge(name=layer.name)(tensors)
        if len(operands) == 2 and len(tensors) == 1 and op in ADD_OPS and tensors[0].shape.rank == 3:
            x = tensors[0]
            constant = np.asarray(next(t for t in operands if t is not x), np.float32)
            try:
                table = np.broadcast_to(constant, (1, *x.shape[1:]))[0]
            except ValueError:
                raise _refuse(layer, f"adds a constant of shape {constant.shape} that does not broadcast "
                              f"to one value per token position {tuple(x.shape[1:])}") from None
            # It was a constant in the user's model, so it stays fixed while fine-tuning.
            positions = PositionEmbedding(name=layer.name, trainable=False)
            y = positions(x)
            positions.set_weights([table])
            return y
        raise _refuse(layer, f"tf.{op} with operands {[getattr(t, 'shape', t) for t in operands]}; edgecc rewrites "
                      "x + y and x * y of two tensors, and x + a constant per token position")

    return apply
