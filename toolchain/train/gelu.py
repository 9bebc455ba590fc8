"""GELU as x·σ(1.702x) (compress.gelu = "sigmoid"), so that a transformer's feed-forward maps to the Edge TPU.

The GELU builtin (code 150) is newer than the Edge TPU compiler (16), so a model with it goes to the CPU there: one
CPU island per encoder block (MiniLM: 6, each a round trip over the host link). x·σ(1.702x), Hendrycks and Gimpel's
sigmoid form of GELU (within 0.021 of it), is LOGISTIC and MUL in TFLite, which the Edge TPU maps. It is written as
Keras' swish (x·σ(x), which TF-MOT quantizes) of the Dense's output scaled by 1.702, with the 1/1.702 moved into the
Dense that reads it: swish(1.702 z) / 1.702 = z·σ(1.702 z). The compression stages then distil the student from the
exact-GELU teacher.
"""

from __future__ import annotations

from typing import Any

from edgecc.errors import EdgeccError
from edgecc.train.layers import keras
from edgecc.train.prune import Wiring, rebuilt

SCALE = 1.702


def sigmoid_gelu(model: Any) -> Any:
    """A copy of `model` in which every Dense with a GELU activation computes x·σ(1.702x) instead. Each such Dense
    must be read by one Dense alone (a transformer's feed-forward), which takes the 1/1.702; anything else is refused
    by name."""
    wiring = Wiring(model)
    changes: dict[str, dict[str, Any]] = {}
    weights: dict[str, list[Any]] = {}
    for node in wiring.nodes:
        layer = node.layer
        if layer.get_config().get("activation") != "gelu":
            continue
        reader = wiring.only_consumer(node.outputs)
        if not isinstance(layer, keras.layers.Dense) or reader is None or type(reader.layer) is not keras.layers.Dense:
            raise EdgeccError(f"compress.gelu 'sigmoid': layer {layer.name!r} has a GELU that is not a Dense's "
                              "activation read by one Dense alone (a transformer's feed-forward), so edgecc cannot "
                              "move its 1/1.702 into the next layer; use compress.gelu = 'exact'")
        changes[layer.name] = {"activation": "swish"}
        weights[layer.name] = [w * SCALE for w in weights.get(layer.name, layer.get_weights())]
        kernel, *bias = weights.get(reader.layer.name, reader.layer.get_weights())
        weights[reader.layer.name] = [kernel / SCALE, *bias]
    return rebuilt(model, changes, weights) if changes else model
