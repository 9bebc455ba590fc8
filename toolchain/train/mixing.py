"""Constant token mixing: each self-attention's softmax(q·kᵀ)·v replaced by M·v, M a constant matrix.

The Edge TPU multiplies only by constant weights, so the attention core (two activation operands) runs on
the CPU between Edge TPU segments; in a small text model over 32 tokens that is 10-12% of the MACs and
three CPU islands (BENCHMARKS.md, Edge TPU section). With M constant, the block's token mixing is a Dense
over the token axis (TRANSPOSE -> FULLY_CONNECTED -> TRANSPOSE in the int8 graph), which edgecc.lower turns
into a CONV_2D 1x1 like every other Dense: the whole encoder maps.

M starts as the model's own attention averaged over the examples and the heads (what the block attends to
on average), and the compression stage then distils the mixed student from the teacher. The query and key
projections go: they only fed the scores. The value and output projections stay.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgecc.errors import EdgeccError
from edgecc.train.layers import keras
from edgecc.train.prune import Wiring, bypassed, find_units, rebuilt

layers = keras.layers

MIXING_SUFFIX = "_mixing"  # the Dense over tokens that replaces AttentionContext `<context>`: `<context>_mixing`


def _entry(layer: Any, source: str) -> dict[str, Any]:
    """A functional-model config entry for `layer`, reading the first output of layer `source`."""
    return {**layers.serialize(layer), "name": layer.name, "inbound_nodes": [[[source, 0, 0, {}]]]}


def constant_mixing(model: Any, x: np.ndarray) -> Any:
    """A new model in which every self-attention (prune.find_units) mixes its values' tokens by a constant matrix,
    the model's mean attention over `x` and its heads. Every other weight is copied."""
    attention, _ = find_units(model)
    if not attention:
        raise EdgeccError("compress.stages 'mix': the model has no self-attention that edgecc can replace "
                          "(AttentionScores -> softmax -> AttentionContext between Dense layers)")
    wiring = Wiring(model)
    nodes = {node.layer.name: node for node in wiring.nodes}
    probs = [nodes[unit.context].call_args[0][0] for unit in attention]
    chains = [_chain(nodes[unit.scores].outputs, tensor) for unit, tensor in zip(attention, probs)]  # refuses a mask
    averaged = keras.Model(model.inputs, probs).predict(x, batch_size=256, verbose=0)
    averaged = averaged if isinstance(averaged, list) else [averaged]
    config = model.get_config()
    gone: set[str] = set()
    sources: dict[str, tuple[str, int, int]] = {}
    added: dict[str, list[dict[str, Any]]] = {}  # the new layers, by the output projection that reads them
    weights: dict[str, list[np.ndarray]] = {}
    for unit, chain, p in zip(attention, chains, averaged):
        gone |= {unit.query, unit.key, unit.scores, unit.context, *chain}
        names = (f"{unit.context}_to_features", unit.context + MIXING_SUFFIX, f"{unit.context}_to_tokens")
        new = (layers.Permute((2, 1), name=names[0]), layers.Dense(p.shape[-1], use_bias=False, name=names[1]),
               layers.Permute((2, 1), name=names[2]))
        added[unit.output] = [_entry(new[0], unit.value), _entry(new[1], names[0]), _entry(new[2], names[1])]
        # context[i] = sum_j P[i, j] v[j]; the Dense over tokens computes out[i] = sum_j v[j] K[j, i]: K = Pᵀ
        weights |= {names[0]: [], names[1]: [p.mean(axis=(0, 1)).T], names[2]: []}
        sources[unit.context] = (names[2], 0, 0)
    config = bypassed(config, gone, sources)
    entries = []
    for entry in config["layers"]:
        entries += added.get(entry["name"], []) + [entry]  # each new chain just before the layer that reads it
    return rebuilt(model, {}, weights, {**config, "layers": entries})


def _chain(start: Any, end: Any) -> list[str]:
    """The layers from tensor `start` to tensor `end` (softmax, dropout), `end`'s first. A layer with a second input
    (a padding mask added to the scores, as MiniLM's MaskedSoftmax does) is refused: a constant mixing matrix would
    drop the mask and mix padding into every token."""
    names = []
    while end is not start:
        layer, node_index, _ = end._keras_history
        inputs = layer._inbound_nodes[node_index].keras_inputs
        if len(inputs) != 1:
            raise EdgeccError(f"compress.stages 'mix': attention layer '{layer.name}' also reads "
                              f"{', '.join(repr(t._keras_history.layer.name) for t in inputs[1:])} (a padding mask?); "
                              "a constant token mixing cannot keep it, so 'mix' applies only to attention without one")
        names.append(layer.name)
        end = inputs[0]
    return names
