"""Folding each LayerNorm's scale and shift into the Dense layers that read it, before conversion.

`gamma * n + beta` read by a Dense (W, b) is `n` read by (diag(gamma) W, b + beta W),
and a mean over tokens in between (GlobalAveragePooling1D) commutes with both.
Unfolded, every norm ends in a MUL and an ADD: two more ops and two more 8-bit
roundings per norm in the int8 graph. A frozen norm (a constant in place of each
token's 1/sigma, set by `freeze_norms` before distillation) folds away entirely.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgecc.train.layers import LayerNorm, keras
from edgecc.train.prune import Wiring, bypassed, config_source, rebuilt


def _dense_readers(wiring: Wiring, node: Any) -> list[Any] | None:
    """The Dense layers that read `node`'s output in this model, directly or through a token mean; None if anything
    else does. (A layer's own outbound nodes would also list models it was once part of, such as pruning wrappers.)"""
    readers = []
    for consumer in wiring.consumers.get(id(node.outputs), []):
        if isinstance(consumer.layer, keras.layers.GlobalAveragePooling1D):
            readers += [c.layer for c in wiring.consumers.get(id(consumer.outputs), [])]
        else:
            readers.append(consumer.layer)
    if (not readers or id(node.outputs) in wiring.outputs
            or not all(type(r) is keras.layers.Dense and wiring.calls[id(r)] == 1 for r in readers)):
        return None
    return readers


def fold_norms(model: Any) -> Any:
    """The same function with every foldable LayerNorm's gamma and beta moved into its Dense readers.

    A frozen norm is linear as a whole, x -> (x - mean(x)) * scale * gamma + beta, so
    its centring and scale go into the readers too (`K - K.mean(axis=0)` subtracts
    each token's mean), and the norm leaves the graph.
    """
    changes: dict[str, dict[str, Any]] = {}
    weights: dict[str, list[np.ndarray]] = {}
    sources: dict[str, tuple[str, int, int]] = {}
    wiring, config = Wiring(model), model.get_config()
    for node in wiring.nodes:
        layer = node.layer
        foldable = isinstance(layer, LayerNorm) and (layer.affine or layer.frozen_scale)
        readers = _dense_readers(wiring, node) if foldable else None
        if readers is None or wiring.calls[id(layer)] != 1:
            continue
        width = node.outputs.shape[-1]
        gamma, beta = ((w.numpy() for w in (layer.gamma, layer.beta)) if layer.affine
                       else (np.ones(width, np.float32), np.zeros(width, np.float32)))
        if layer.frozen_scale:
            sources[layer.name] = config_source(config, layer.name)
            gamma = gamma * layer.frozen_scale
        else:
            changes[layer.name] = {"affine": False}
            weights[layer.name] = []
        for dense in readers:
            kernel = dense.kernel.numpy()
            bias = dense.bias.numpy() if dense.use_bias else np.zeros(kernel.shape[1], np.float32)
            folded = gamma[:, np.newaxis] * kernel
            if layer.frozen_scale:
                folded -= folded.mean(axis=0, keepdims=True)
            changes[dense.name] = {"use_bias": True}
            weights[dense.name] = [folded, bias + beta @ kernel]
    if not changes:
        return model
    return rebuilt(model, changes, weights, bypassed(config, set(sources), sources))


def freeze_norms(model: Any, x: np.ndarray) -> Any:
    """Every LayerNorm with each token's 1/sigma replaced by its mean over `x` (training examples).

    Distillation afterwards adapts the model to the constant; the frozen norms then
    fold away (`fold_norms`). A model that needs a per-token scale loses accuracy
    here that distillation may not win back, so the recipe asks for it.
    """
    norms = [layer for layer in model.layers if isinstance(layer, LayerNorm) and not layer.frozen_scale]
    if not norms:
        return model
    probe = keras.Model(model.inputs, [norm.input for norm in norms])
    inputs = probe.predict(x, batch_size=256, verbose=0)
    inputs = inputs if isinstance(inputs, list) else [inputs]
    changes = {}
    for norm, value in zip(norms, inputs):
        centred = value - norm.average(value).numpy()
        changes[norm.name] = {"frozen_scale": float(np.mean(norm.inverse_deviation(centred)))}
    return rebuilt(model, changes, {})
