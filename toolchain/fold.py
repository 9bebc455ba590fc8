"""Folding each LayerNorm's scale and shift into the Dense layers that read it, before conversion.

`gamma * n + beta` read by a Dense (W, b) is `n` read by (diag(gamma) W, b + beta W),
and a mean over tokens in between (GlobalAveragePooling1D) commutes with both.
Unfolded, every norm ends in a MUL and an ADD: two more ops and two more 8-bit
roundings per norm in the int8 graph.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgecc.layers import LayerNorm, keras
from edgecc.prune import Wiring, rebuilt


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
    """The same function with every foldable LayerNorm's gamma and beta moved into its Dense readers."""
    changes: dict[str, dict[str, Any]] = {}
    weights: dict[str, list[np.ndarray]] = {}
    wiring = Wiring(model)
    for node in wiring.nodes:
        layer = node.layer
        readers = _dense_readers(wiring, node) if isinstance(layer, LayerNorm) and layer.affine else None
        if readers is None or wiring.calls[id(layer)] != 1:
            continue
        gamma, beta = (w.numpy() for w in (layer.gamma, layer.beta))
        changes[layer.name] = {"affine": False}
        weights[layer.name] = []
        for dense in readers:
            kernel = dense.kernel.numpy()
            bias = dense.bias.numpy() if dense.use_bias else np.zeros(kernel.shape[1], np.float32)
            changes[dense.name] = {"use_bias": True}
            weights[dense.name] = [gamma[:, np.newaxis] * kernel, bias + beta @ kernel]
    return rebuilt(model, changes, weights) if changes else model
