"""Constant token mixing: each self-attention's softmax(q·kᵀ)·v replaced by M·v, M a constant matrix.

The Edge TPU multiplies only by constant weights, so the attention core (two activation operands) runs on
the CPU between Edge TPU segments; in a small text model over 32 tokens that is 10-12% of the MACs and
three CPU islands (BENCHMARKS.md, Edge TPU section). With M constant, the block's token mixing is a Dense
over the token axis (TRANSPOSE -> FULLY_CONNECTED -> TRANSPOSE in the int8 graph, with RESHAPEs per head),
which edgecc.lower turns into a CONV_2D 1x1 like every other Dense: the whole encoder maps.

M starts as the model's own attention averaged over the examples (what the block attends to on average): each
head's own (compress.mixing 'per_head', one Dense over the (head, token) axis whose kernel starts block-diagonal)
or the heads' mean ('shared'); the compression stage then distils the mixed student from the teacher. The query
and key projections go: they only fed the scores. The value and output projections stay. A constant M mixes every
input alike; 'gated' gives the mixing back a dependence on the input, as gMLP's spatial gating unit does (Liu et al.
2021): (M·v) ⊙ sigmoid(x·W + b), x the block's input, W and b starting at 0 (the gate at 1/2, M doubled, so the
model starts as 'per_head's), an element-wise MUL of two activations that the Edge TPU maps.

A softmax that adds a padding bias over the keys (MiniLM's MaskedSoftmax: 0 on real tokens, a negative value on
padding) keeps its mask as a per-token weight on the values, M·(w ⊙ v) with w 1 on real tokens and 0 on padding:
a MUL the Edge TPU maps, where exp(bias) would need EXP (whose int8 version the Edge TPU compiler refuses). w is
read off the bias by a constant rescaling, so the bias must take only 0 and one negative value on the examples
(read from them); anything else is refused by name. The rows of M are not renormalised for the padding (that
would divide by an activation); distillation adapts M to it.

'sigmoid' is not a constant mixing: it keeps each attention's queries and keys but weighs key j for query i by
sigmoid(q_i·k_j/sqrt(d) + b) instead of softmax (sigmoid attention, Ramapuram et al. 2024), written with operators
the Edge TPU maps: the products q_i ⊙ k_j (a MUL broadcast over (query, key)), summed per head by a Dense whose
kernel starts as the heads' 1/sqrt(d) blocks, a LOGISTIC, a Dense that spreads each head's weight over its
features (kernel starts as 0/1 blocks), the MUL by the values and a SUM over the keys (layers.KeySum). b starts at
minus the head's mean log normaliser of the softmax on the examples, where sigmoid(s - log Σ exp s) ≈ softmax(s) for
every key but the few it attends to most; distillation does the rest. A padding mask stays as the 0/1 weight on
the values, as above. It costs about (heads + 2)·tokens²·width MACs per block, which the Edge TPU runs in
microseconds but a CPU does not: a form for Edge TPU targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgecc.errors import EdgeccError
from edgecc.progress import Reporter
from edgecc.train.layers import KeySum, keras
from edgecc.train.prune import Wiring, bypassed, config_source, find_units, rebuilt

layers = keras.layers

MIXING_SUFFIX = "_mixing"  # the Dense over tokens that replaces AttentionContext `<context>`: `<context>_mixing`
GATE_SUFFIX = "_gate"  # 'gated': the Dense whose sigmoid multiplies the mixed values, `<context>_gate`


def _entry(layer: Any, *sources: str | list[Any]) -> dict[str, Any]:
    """A functional-model config entry for `layer`, reading the first output of each layer named in `sources` (or a
    [layer, node, tensor] reference)."""
    inbound = [[source, 0, 0, {}] if isinstance(source, str) else [*source, {}] for source in sources]
    return {**layers.serialize(layer), "name": layer.name, "inbound_nodes": [inbound]}


@dataclass(frozen=True)
class _Mixable:
    """One self-attention that `mix` can replace: its unit, the layers between its scores and its context (softmax,
    dropout), its key bias (tensor, softmax name) if any, its mean attention (heads, tokens, tokens) and each head's
    mean log normaliser of the softmax, log Σ_j exp(s_ij + bias_j) (heads,), which only 'sigmoid' reads."""

    unit: Any
    chain: list[str]
    bias: tuple[Any, str] | None
    mean: np.ndarray
    normaliser: np.ndarray | None


def _log_normaliser(scores: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Each head's mean over examples and queries of log Σ_j exp(s_ij + bias_j), read where p_ij is largest (a real
    token, bias 0): s_ij - log p_ij there, whatever the bias is elsewhere."""
    top = probs.argmax(axis=-1)[..., None]
    at_top = np.take_along_axis(scores, top, -1) - np.log(np.take_along_axis(probs, top, -1))
    return at_top[..., 0].mean(axis=(0, 2))


def constant_mixing(model: Any, x: np.ndarray, form: str = "per_head", *, keep: int = 0,
                    reporter: Reporter | None = None) -> Any:
    """A new model in which the self-attentions (prune.find_units) mix their values' tokens by constant matrices,
    the model's mean attention over `x`: each head's own (`form` 'per_head'; 'gated' adds the gate) or one averaged
    over the heads ('shared'). The `keep` attentions whose mixing alone changes the model's outputs on `x` the most
    stay as they are. Every other weight is copied."""
    attention, _ = find_units(model)
    if not attention:
        raise EdgeccError("compress.stages 'mix': the model has no self-attention that edgecc can replace "
                          "(AttentionScores -> softmax -> AttentionContext between Dense layers)")
    if keep >= len(attention):
        raise EdgeccError(f"compress.keep_attention: {keep} of the model's {len(attention)} self-attentions kept "
                          "leaves none for 'mix' to replace; keep fewer")
    nodes = {node.layer.name: node for node in Wiring(model).nodes}
    probs = [nodes[unit.context].call_args[0][0] for unit in attention]
    scores = [nodes[unit.scores].outputs for unit in attention]
    chains = [_chain(tensor, p) for tensor, p in zip(scores, probs)]
    biases = {id(bias[0]): bias[0] for _, bias in chains if bias is not None}
    read = probs + (scores if form == "sigmoid" else []) + list(biases.values())  # the scores: sigmoid's bias only
    computed = keras.Model(model.inputs, read).predict(x, batch_size=256, verbose=0)
    computed = computed if isinstance(computed, list) else [computed]
    n, scores_end = len(probs), len(read) - len(biases)
    bias_values = dict(zip(biases, computed[scores_end:]))
    normalisers = [_log_normaliser(s, p) for s, p in zip(computed[n:scores_end], computed)] or [None] * n
    mixable = [_Mixable(unit, chain, bias, p.mean(axis=0), normaliser)
               for unit, (chain, bias), p, normaliser in zip(attention, chains, computed[:n], normalisers)]
    if keep:
        reference = model.predict(x, batch_size=256, verbose=0)
        change = [float(np.mean((_mixed(model, [m], nodes, bias_values, form).predict(x, batch_size=256, verbose=0)
                                 - reference) ** 2)) for m in mixable]
        kept = set(np.argsort(change)[::-1][:keep].tolist())
        if reporter is not None:
            named = [f"{mixable[i].unit.context} (its mixing alone moves the outputs by {change[i]:.3g})"
                     for i in sorted(kept)]
            others = [f"{change[i]:.3g}" for i in range(len(change)) if i not in kept]
            reporter.info(f"mix keeps the attention of {', '.join(named)}; the others' changes: {', '.join(others)}")
        mixable = [m for i, m in enumerate(mixable) if i not in kept]
    return _mixed(model, mixable, nodes, bias_values, form)


def _mixed(model: Any, mixable: list[_Mixable], nodes: dict[str, Any], bias_values: dict[int, np.ndarray],
           form: str) -> Any:
    """The model with the `mixable` attentions replaced by constant mixing (`bias_values`: each key bias on the
    examples, by the id of its tensor)."""
    config = model.get_config()
    gone: set[str] = set()
    sources: dict[str, tuple[str, int, int]] = {}
    added: dict[str, list[dict[str, Any]]] = {}  # the new layers, by the output projection that reads them
    weights: dict[str, list[np.ndarray]] = {}
    keeps: dict[int, str] = {}  # the per-token weight layer made from each padding bias
    for m in mixable:
        unit = m.unit
        gone |= {unit.scores, unit.context, *m.chain} | (set() if form == "sigmoid" else {unit.query, unit.key})
        values, entries = unit.value, []
        if m.bias is not None:
            tensor, softmax = m.bias
            if id(tensor) not in keeps:
                entries += _token_weight(tensor, bias_values[id(tensor)], softmax, config)
                keeps[id(tensor)] = entries[-1]["name"]
            values = f"{unit.context}_masked_values"
            entries.append(_entry(layers.Multiply(name=values), unit.value, keeps[id(tensor)]))
        width = int(nodes[unit.context].call_args[0][1].shape[-1])  # the values' (heads * head_dim)
        if form == "sigmoid":
            chain, started = _sigmoid_layers(unit, m, width, values)
            entries += [_entry(layer, *reads) for layer, reads in chain]
            last = chain[-1][0].name
        else:
            new, kernel = _mixing_layers(unit.context, m.mean, width, form)
            entries += [_entry(layer, source) for layer, source in zip(new, [values] + [layer.name for layer in new])]
            started, last = {unit.context + MIXING_SUFFIX: [kernel]}, new[-1].name
        weights |= {entry["name"]: [] for entry in entries} | started
        if form == "gated":
            gate = layers.Dense(width, activation="sigmoid", name=unit.context + GATE_SUFFIX)
            read = nodes[unit.value].call_args[0]  # what the value projection reads: the block's input
            block_input = read._keras_history
            gated = layers.Multiply(name=f"{unit.context}_gated")
            entries += [_entry(gate, [block_input.layer.name, block_input.node_index, block_input.tensor_index]),
                        _entry(gated, last, gate.name)]
            weights |= {gate.name: [np.zeros((int(read.shape[-1]), width), np.float32), np.zeros(width, np.float32)],
                        gated.name: []}
            last = gated.name
        added[unit.output] = entries
        sources[unit.context] = (last, 0, 0)
    config = bypassed(config, gone, sources)
    entries = []
    for entry in config["layers"]:
        entries += added.get(entry["name"], []) + [entry]  # each new chain just before the layer that reads it
    return rebuilt(model, {}, weights, {**config, "layers": entries})


def _mixing_layers(context: str, attention: np.ndarray, width: int, form: str) -> tuple[list[Any], np.ndarray]:
    """The layers that mix the values' tokens (batch, tokens, heads * head_dim) by the mean `attention` (heads,
    tokens, tokens), in order, and the kernel of their Dense (named `<context>_mixing`).

    context[i] = sum_j P[i, j] v[j], and a Dense over tokens computes out[i] = sum_j v[j] K[j, i]: K = Pᵀ. 'shared'
    puts the tokens last (TRANSPOSE) and multiplies by the heads' mean P. 'per_head' puts (head, token) last and
    multiplies by the block-diagonal K of every head's own P, which distillation may then fill in (a head's values
    mixed into another's), all in one FULLY_CONNECTED that the Edge TPU maps. 'gated' is 'per_head' with the
    kernel doubled: its gate (_mixed) starts at sigmoid(0) = 1/2 everywhere."""
    heads, tokens = attention.shape[0], attention.shape[-1]
    mixing = layers.Dense(tokens * (1 if form == "shared" else heads), use_bias=False, name=context + MIXING_SUFFIX)
    if form == "shared":
        return [layers.Permute((2, 1), name=f"{context}_to_features"), mixing,
                layers.Permute((2, 1), name=f"{context}_to_tokens")], attention.mean(axis=0).T
    split = (tokens, heads, width // heads)  # (head, head_dim) as AttentionContext merges them
    return [layers.Reshape(split, name=f"{context}_split_heads"),
            layers.Permute((3, 2, 1), name=f"{context}_heads_last"),
            layers.Reshape((width // heads, heads * tokens), name=f"{context}_to_features"), mixing,
            layers.Reshape(split[::-1], name=f"{context}_per_head"),
            layers.Permute((3, 2, 1), name=f"{context}_tokens_first"),
            layers.Reshape((tokens, width), name=f"{context}_to_tokens")], \
        _block_diagonal([a.T for a in attention]) * (2.0 if form == "gated" else 1.0)  # the gate starts at 1/2


def _sigmoid_layers(unit: Any, m: _Mixable, width: int, values: str) -> tuple[list[tuple[Any, list[str]]],
                                                                             dict[str, list[Any]]]:
    """Sigmoid attention's layers in order, each with the names of the layers it reads (`values`: the value
    projection, or its masked values), and the starting weights of its two Dense layers.

    (batch, tokens, width) queries and keys -> products (batch, queries, keys, width) -> scores per head (batch,
    queries, keys, heads) -> sigmoid weights -> spread over each head's features (batch, queries, keys, width) ->
    times the values -> summed over the keys (batch, queries, width): the context AttentionContext gave, its
    features (head, head_dim) as it merges them."""
    context = unit.context
    heads, tokens = m.mean.shape[0], m.mean.shape[-1]
    head_dim = width // heads
    ones = np.kron(np.eye(heads, dtype=np.float32), np.ones((head_dim, 1), np.float32))  # (width, heads) 0/1 blocks
    names = [f"{context}_{part}" for part in ("query_rows", "key_columns", "products", "scores", "weights",
                                              "spread", "value_rows", "weighted", "keys_summed")]
    q_rows, k_cols, products, scores, probs, spread, v_rows, weighted, summed = names
    chain = [
        (layers.Reshape((tokens, 1, width), name=q_rows), [unit.query]),
        (layers.Reshape((1, tokens, width), name=k_cols), [unit.key]),
        (layers.Multiply(name=products), [q_rows, k_cols]),
        (layers.Dense(heads, name=scores), [products]),
        (layers.Activation("sigmoid", name=probs), [scores]),
        (layers.Dense(width, use_bias=False, name=spread), [probs]),
        (layers.Reshape((1, tokens, width), name=v_rows), [values]),
        (layers.Multiply(name=weighted), [spread, v_rows]),
        (KeySum(name=summed), [weighted]),
    ]
    assert m.normaliser is not None  # constant_mixing reads the scores for 'sigmoid'
    weights = {scores: [ones * head_dim**-0.5, -m.normaliser.astype(np.float32)], spread: [ones.T.copy()]}
    return chain, weights


def _block_diagonal(blocks: list[np.ndarray]) -> np.ndarray:
    size = blocks[0].shape[0]
    kernel = np.zeros((size * len(blocks),) * 2, np.float32)
    for i, block in enumerate(blocks):
        kernel[i * size:(i + 1) * size, i * size:(i + 1) * size] = block
    return kernel


def _token_weight(bias: Any, values: np.ndarray, softmax: str, config: dict[str, Any]) -> list[dict[str, Any]]:
    """The config entries of the layers that turn a padding bias (batch, 1, 1, tokens), 0 or one negative value, into
    the weight of each token (batch, tokens, 1), 1 or 0; the last gives it. `values` is the bias on the examples."""
    levels = np.unique(values)
    if len(levels) != 2 or levels[1] != 0 or not levels[0] < 0:
        found = ", ".join(f"{v:g}" for v in levels[:5]) + (", ..." if len(levels) > 5 else "")
        raise EdgeccError(f"compress.stages 'mix': softmax '{softmax}' adds a key bias that takes the values {found} "
                          "on the calibration examples; 'mix' keeps a padding mask only as 0 on real tokens and one "
                          "negative value on padding, seen in at least one example")
    source = config_source(config, softmax, 1)
    name = f"{source[0]}_token_weight"
    rescale = layers.Rescaling(scale=-1.0 / float(levels[0]), offset=1.0, name=f"{name}_levels")
    reshape = layers.Reshape((bias.shape[-1], 1), name=name)
    return [_entry(rescale, list(source)), _entry(reshape, rescale.name)]


def _chain(start: Any, end: Any) -> tuple[list[str], tuple[Any, str] | None]:
    """The layers from tensor `start` to tensor `end` (softmax, dropout), `end`'s first, and the key bias a softmax
    adds with that softmax's name (a padding mask, as MiniLM's MaskedSoftmax takes [scores, bias]), or None. Any
    other layer with a second input is refused: a constant mixing matrix would drop what it reads."""
    names, bias = [], None
    while end is not start:
        layer, node_index, _ = end._keras_history
        inputs = layer._inbound_nodes[node_index].keras_inputs
        if len(inputs) == 2 and isinstance(layer, layers.Softmax) and _is_key_bias(inputs[1], inputs[0]):
            bias = (inputs[1], layer.name)
        elif len(inputs) != 1:
            raise EdgeccError(f"compress.stages 'mix': attention layer '{layer.name}' also reads "
                              f"{', '.join(repr(t._keras_history.layer.name) for t in inputs[1:])}, which is not a "
                              "padding bias over the keys (batch, 1, 1, tokens); a constant token mixing cannot keep it")
        names.append(layer.name)
        end = inputs[0]
    return names, bias


def _is_key_bias(bias: Any, scores: Any) -> bool:
    """Whether `bias` varies only along the keys of `scores` (batch, heads, queries, keys): one weight per token."""
    return (len(bias.shape) == len(scores.shape) and bias.shape[-1] == scores.shape[-1]
            and all(d == 1 for d in bias.shape[1:-1]))
