"""Structured pruning: whole attention heads and feed-forward neurons removed, the dense model made smaller.

Unstructured sparsity leaves every matrix at its full size, so a CPU does the
same work; removing a head shrinks its query/key/value columns, its share of the
two attention matmuls and its rows of the output projection, and removing a
hidden neuron shrinks both feed-forward matrices. Units are found from how the
layers are wired, not from their names, so edgecc's reference models and users'
rewritten models are handled alike, and a layer counts as a unit only where the
surgery is exact: a head or neuron that contributes nothing can be removed
without changing the outputs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from edgecc.errors import EdgeccError
from edgecc.progress import Reporter
from edgecc.train.layers import AttentionContext, AttentionScores, LayerNorm, TokenEmbedding, keras

layers = keras.layers


@dataclass(frozen=True)
class AttentionUnit:
    """One self-attention: Dense q/k/v -> AttentionScores -> softmax -> AttentionContext -> Dense output."""

    scores: str
    context: str
    query: str
    key: str
    value: str
    output: str
    heads: int


@dataclass(frozen=True)
class FeedForwardUnit:
    """Two Dense layers with nothing but elementwise layers between them; `width` hidden neurons."""

    up: str
    down: str
    width: int


class Wiring:
    """The nodes of a functional model in execution order and who consumes each tensor."""

    def __init__(self, model: Any) -> None:
        self.nodes = [node for depth in sorted(model._nodes_by_depth, reverse=True)
                      for node in model._nodes_by_depth[depth] if not node.is_input]
        self.consumers: dict[int, list[Any]] = {}
        for node in self.nodes:
            for tensor in node.keras_inputs:
                self.consumers.setdefault(id(tensor), []).append(node)
        self.outputs = {id(t) for t in model.outputs}
        self.calls = Counter(id(node.layer) for node in self.nodes)

    def only_consumer(self, tensor: Any) -> Any | None:
        """The one node that reads `tensor`, or None when others (or the model's outputs) read it too."""
        users = self.consumers.get(id(tensor), [])
        return users[0] if len(users) == 1 and id(tensor) not in self.outputs else None

    def follow(self, tensor: Any, passes: Callable[[Any], bool]) -> tuple[Any | None, Any]:
        """The first sole consumer past a chain of layers that `passes` lets through, and the tensor it reads."""
        node = self.only_consumer(tensor)
        while node is not None and passes(node.layer):
            tensor = node.outputs
            node = self.only_consumer(tensor)
        return node, tensor

    def sole_dense(self, tensor: Any, consumer: Any) -> Any | None:
        """The unshared Dense layer that produced `tensor`, when `consumer` alone reads it."""
        layer = tensor._keras_history.layer
        if isinstance(layer, layers.Dense) and self.calls[id(layer)] == 1 and self.only_consumer(tensor) is consumer:
            return layer
        return None


def _within_head(layer: Any) -> bool:
    """Layers on (batch, heads, queries, keys) that never mix heads: dropout, softmax over queries or keys."""
    if isinstance(layer, layers.Dropout):
        return True
    return isinstance(layer, layers.Softmax) and all(a % 4 in (2, 3) for a in np.atleast_1d(layer.axis))


def _elementwise(layer: Any) -> bool:
    """Layers that treat each hidden neuron on its own (a softmax would couple them)."""
    if isinstance(layer, (layers.Dropout, layers.ReLU)):
        return True
    return isinstance(layer, layers.Activation) and layer.activation is not keras.activations.softmax


def _attention_unit(node: Any, wiring: Wiring) -> AttentionUnit | None:
    scores = node.layer
    query, key = node.call_args[0]
    q, k = wiring.sole_dense(query, node), wiring.sole_dense(key, node)
    context, probs = wiring.follow(node.outputs, _within_head)
    if q is None or k is None or context is None or not isinstance(context.layer, AttentionContext):
        return None
    context_probs, value = context.call_args[0]
    v = wiring.sole_dense(value, context)
    output = wiring.only_consumer(context.outputs)
    if (context_probs is not probs or context.layer.heads != scores.heads or wiring.calls[id(context.layer)] != 1
            or v is None or output is None or not isinstance(output.layer, layers.Dense)
            or wiring.calls[id(output.layer)] != 1):
        return None
    return AttentionUnit(scores.name, context.layer.name, q.name, k.name, v.name, output.layer.name, scores.heads)


def _feed_forward_unit(node: Any, wiring: Wiring) -> FeedForwardUnit | None:
    up = node.layer
    if wiring.calls[id(up)] != 1 or up.activation is keras.activations.softmax:
        return None
    down, _ = wiring.follow(node.outputs, _elementwise)
    if down is None or not isinstance(down.layer, layers.Dense) or wiring.calls[id(down.layer)] != 1:
        return None
    return FeedForwardUnit(up.name, down.layer.name, up.units)


def find_units(model: Any) -> tuple[list[AttentionUnit], list[FeedForwardUnit]]:
    """Every self-attention and every Dense -> Dense pair whose heads or hidden neurons can be removed exactly.

    Every tensor inside a unit must be read by the unit alone: a head or neuron
    that another layer also reads could not be sliced away. A Dense -> Dense pair
    outside the blocks (a classifier's hidden layer) is a unit too; the surgery
    is the same there.
    """
    if not getattr(model, "_is_graph_network", False):
        raise EdgeccError(f"cannot prune model '{model.name}': structured pruning needs a functional or Sequential model")
    wiring = Wiring(model)
    attention, feed_forward = [], []
    for node in wiring.nodes:
        if isinstance(node.layer, AttentionScores) and wiring.calls[id(node.layer)] == 1:
            unit = _attention_unit(node, wiring)
            if unit is not None:
                attention.append(unit)
        elif isinstance(node.layer, layers.Dense):
            unit = _feed_forward_unit(node, wiring)
            if unit is not None:
                feed_forward.append(unit)
    return attention, feed_forward


@dataclass(frozen=True)
class Block:
    """An encoder block: x + attention(...), then + feed-forward(...), each sum normalised after it in a post-norm
    block. Removing it passes x on unchanged: exactly what zeroing a pre-norm block's two branches computes, and
    for a post-norm block (BERT) an approximation that distillation then corrects."""

    output: str  # the Add (pre-norm) or LayerNorm (post-norm) that ends the block
    members: tuple[str, ...]
    source: tuple[str, int, int]  # layer, node and tensor index of the block's input


def _residual_add(wiring: Wiring, tensor: Any) -> tuple[Any, Any] | None:
    """The Add that adds `tensor` (past dropout) to one other tensor, and that other tensor."""
    node, branch = wiring.follow(tensor, lambda layer: isinstance(layer, layers.Dropout))
    if node is None or not isinstance(node.layer, layers.Add) or len(node.keras_inputs) != 2:
        return None
    others = [t for t in node.keras_inputs if t is not branch]
    return (node, others[0]) if len(others) == 1 else None


def _between(wiring: Wiring, start: Any, end: Any) -> list[Any] | None:
    """Nodes that read `start` (directly or not) and feed `end`, `end` included; None if any is also read elsewhere."""
    reached, after = {id(start)}, []
    for node in wiring.nodes:
        if any(id(t) in reached for t in node.keras_inputs):
            reached.add(id(node.outputs))
            after.append(node)
    needed, members = {id(t) for t in end.keras_inputs}, [end]
    for node in reversed(after[: after.index(end)] if end in after else []):
        if id(node.outputs) in needed:
            members.append(node)
            needed |= {id(t) for t in node.keras_inputs}
    inside = {id(node.outputs) for node in members}
    for node in members[1:]:
        if any(id(consumer.outputs) not in inside for consumer in wiring.consumers.get(id(node.outputs), [])):
            return None
    return members if end in after else None


def find_blocks(model: Any) -> list[Block]:
    """Every attention unit followed by a feed-forward unit, each on a residual Add, that can go as a whole."""
    wiring = Wiring(model)
    by_name = {node.layer.name: node for node in wiring.nodes}
    attention, feed_forward = find_units(model)
    config = model.get_config()
    blocks = []
    for unit in attention:
        first = _residual_add(wiring, by_name[unit.output].outputs)
        if first is None:
            continue
        middle, start = first
        post_norm = _sole_norm(wiring, middle)
        stream = post_norm or middle
        ends = [second[0] for ff in feed_forward
                if (second := _residual_add(wiring, by_name[ff.down].outputs)) and second[1] is stream.outputs]
        if len(ends) != 1:
            continue
        end = _sole_norm(wiring, ends[0]) if post_norm else ends[0]
        members = _between(wiring, start, end) if end else None
        if members is None:
            continue
        source = config_source(config, middle.layer.name, [id(t) for t in middle.keras_inputs].index(id(start)))
        blocks.append(Block(end.layer.name, tuple(node.layer.name for node in members), source))
    return blocks


def _sole_norm(wiring: Wiring, node: Any) -> Any | None:
    """The LayerNorm node that alone reads `node`'s output (a post-norm block's norm after its Add), else None.
    A pre-norm block's first Add has two readers, the next norm and the second Add."""
    readers = wiring.consumers.get(id(node.outputs), [])
    return readers[0] if len(readers) == 1 and isinstance(readers[0].layer, LayerNorm) else None


def _deviation(model: Any, x: np.ndarray, reference: np.ndarray) -> float:
    """Mean squared difference of the model's outputs on `x` from `reference` (the unablated outputs)."""
    return float(np.mean((model.predict(x, batch_size=256, verbose=0) - reference) ** 2))


def block_importance(model: Any, block: Block, x: np.ndarray, reference: np.ndarray) -> float:
    """Mean squared difference from `reference` of the outputs of the model without the block."""
    return _deviation(remove_blocks(model, [block]), x, reference)


def remove_blocks(model: Any, removed: list[Block]) -> Any:
    """A new model without the `removed` blocks; what read a block's output reads its input instead."""
    gone = {name for block in removed for name in block.members}
    return rebuilt(model, {}, {}, bypassed(model.get_config(), gone, {block.output: block.source for block in removed}))


def config_source(config: dict[str, Any], reader: str, position: int = 0) -> tuple[str, int, int]:
    """How layer `reader` (called once) refers to its input `position` in `config`: (layer, node, tensor), numbered
    as the config numbers them. A tensor's own _keras_history also counts its layer's calls in other models (a
    pruning wrapper's), which this model's config does not: a reference taken from it can name a node the config
    lacks, and tf_keras' from_config then waits for that node for ever (a hang, not an error)."""
    entry = next(e for e in config["layers"] if e["name"] == reader)
    name, node, tensor = entry["inbound_nodes"][0][position][:3]
    return name, node, tensor


def bypassed(config: dict[str, Any], gone: set[str], sources: dict[str, tuple[str, int, int]]) -> dict[str, Any]:
    """A model config without the layers `gone`; what read the output of layer `name` reads `sources[name]` instead."""
    config = {**config, "layers": [layer for layer in config["layers"] if layer["name"] not in gone]}
    for _ in sources:  # a source may itself be a removed layer's output
        sources = {name: sources.get(source[0], source) for name, source in sources.items()}
    references = [ref for layer in config["layers"] for node in layer["inbound_nodes"] for ref in node]
    for ref in references + config["output_layers"]:
        if ref[0] in sources:
            ref[0], ref[1], ref[2] = sources[ref[0]]
    return config


def _input_of(model: Any, name: str) -> Any:
    """The tensor that layer `name` reads in this model (the layer may also be used in other models)."""
    return next(node.keras_inputs[0] for node in Wiring(model).nodes if node.layer.name == name)


def _head_indices(width: int, heads: int, kept: list[int]) -> np.ndarray:
    """Feature indices of the kept heads in a (heads * head_dim) axis, heads outermost as AttentionContext merges them."""
    head_dim = width // heads
    return np.concatenate([np.arange(h * head_dim, (h + 1) * head_dim) for h in kept])


def _advanced(value: float, advance: Callable[..., None]) -> float:
    advance(1, f"mean squared output change {value:.3g}")
    return value


def head_importance(model: Any, unit: AttentionUnit, x: np.ndarray, reference: np.ndarray,
                    advance: Callable[..., None] = lambda *args, **kwargs: None) -> np.ndarray:
    """Per head, the mean squared difference from `reference` of the model's outputs with that head ablated.

    Zeroing a head's rows of the output projection is exactly what removing the
    head does, so this measures what pruning it costs against the teacher,
    interactions with the rest of the network included. The model's weights are
    restored afterwards.
    """
    kernel = model.get_layer(unit.output).kernel
    original = kernel.numpy()
    importance = []
    try:
        for head in range(unit.heads):
            ablated = original.copy()
            ablated[_head_indices(len(original), unit.heads, [head])] = 0.0
            kernel.assign(ablated)
            importance.append(_advanced(_deviation(model, x, reference), advance))
    finally:
        kernel.assign(original)
    return np.asarray(importance)


def neuron_importance(model: Any, unit: FeedForwardUnit, x: np.ndarray) -> np.ndarray:
    """Per hidden neuron, mean |activation| on `x` times the L2 norm of its row of the down projection.

    A neuron adds activation * row to the block's output, so this product bounds
    how much it moves the output on average: one forward pass scores all
    neurons (ablating each would need one pass per neuron), a dead ReLU or a
    zero row scores exactly 0, and a large activation feeding tiny weights
    is not mistaken for an important one.
    """
    activations = keras.Model(model.inputs, _input_of(model, unit.down)).predict(x, batch_size=256, verbose=0)
    mean_abs = np.abs(activations).reshape(-1, unit.width).mean(axis=0)
    return mean_abs * np.linalg.norm(model.get_layer(unit.down).kernel.numpy(), axis=1)


def _checked(kept: list[int], count: int, what: str) -> list[int]:
    indices = sorted(int(i) for i in kept)
    if not indices or indices[0] < 0 or indices[-1] >= count or len(set(indices)) != len(indices):
        raise EdgeccError(f"{what}: keep a non-empty set of distinct indices in 0..{count - 1}, not {list(kept)}")
    return indices


def prune(model: Any, keep_heads: dict[str, list[int]], keep_neurons: dict[str, list[int]]) -> Any:
    """A new, smaller model that keeps only the listed heads (keyed by AttentionUnit.scores) and neurons
    (keyed by FeedForwardUnit.up); units not named stay whole, every other weight is copied.

    The model is rebuilt from its own config with smaller `units` and `heads`,
    so it stays a plain functional model that saves, loads in safe mode and
    converts like the original.
    """
    attention, feed_forward = find_units(model)
    by_scores, by_up = {u.scores: u for u in attention}, {u.up: u for u in feed_forward}
    unknown = sorted(set(keep_heads) - set(by_scores)) + sorted(set(keep_neurons) - set(by_up))
    if unknown:
        raise EdgeccError(f"no prunable attention or feed-forward unit named {', '.join(unknown)}; units are "
                          f"{', '.join(list(by_scores) + list(by_up))}")
    columns: dict[str, np.ndarray] = {}  # Dense layer -> the output features it keeps
    rows: dict[str, np.ndarray] = {}  # Dense layer -> the input features it keeps
    heads: dict[str, int] = {}
    for name, kept in keep_heads.items():
        unit = by_scores[name]
        kept = _checked(kept, unit.heads, f"heads of {name}")
        heads[unit.scores] = heads[unit.context] = len(kept)
        for part in (unit.query, unit.key, unit.value):
            columns[part] = _head_indices(model.get_layer(part).units, unit.heads, kept)
        rows[unit.output] = columns[unit.value]
    for name, kept in keep_neurons.items():
        unit = by_up[name]
        columns[unit.up] = rows[unit.down] = np.asarray(_checked(kept, unit.width, f"neurons of {name}"))

    changes = {**{name: {"units": len(kept)} for name, kept in columns.items()},
               **{name: {"heads": count} for name, count in heads.items()}}
    weights = {}
    for name in set(rows) | set(columns):
        kernel, *bias = model.get_layer(name).get_weights()
        keep_in, keep_out = rows.get(name, slice(None)), columns.get(name, slice(None))
        weights[name] = [kernel[keep_in][:, keep_out], *(b[keep_out] for b in bias)]
    return rebuilt(model, changes, weights)


def rebuilt(model: Any, changes: dict[str, dict[str, Any]], weights: dict[str, list[np.ndarray]],
            config: dict[str, Any] | None = None) -> Any:
    """The model rebuilt from its own config (or an edited `config`) with `changes` to some layers' configs and their
    new `weights`; every other layer keeps its weights. It stays a plain functional model that saves and loads in
    safe mode."""
    config = config or model.get_config()
    for layer in config["layers"]:
        layer["config"].update(changes.get(layer["config"]["name"], {}))
    new = type(model).from_config(config)
    for layer in new.layers:
        layer.set_weights(weights[layer.name] if layer.name in weights else model.get_layer(layer.name).get_weights())
    return new


def trim_vocabulary(model: Any, ids: np.ndarray, fraction: float, unknown_id: int | None) -> Any:
    """Keep the embedding rows of the round(rows * fraction) tokens used most in `ids` (training token ids).

    Every dropped token reads the kept row nearest to its own (Euclidean), the
    smallest change to what the next layer sees. Sending a dropped token that
    training uses to [UNK] threw away enough that TREC's pruned student stayed
    further from its teacher on the training questions themselves; sending one
    training never uses there cost a pretrained encoder the words that only new
    text has (MiniLM's TREC teacher, its vocabulary trimmed to the training
    split's word pieces: 0.943 on the validation split with them read as [UNK],
    0.958 with the nearest row, 0.971 whole; half its questions hold such a piece).
    The [UNK] row (`unknown_id`, where the data has one) is always kept, for the
    words the tokenizer does not know. Input ids are unchanged: a constant id
    map inside TokenEmbedding sends them to the kept rows.
    """
    if not 0.0 < fraction <= 1.0:
        raise EdgeccError(f"vocabulary_fraction must be in (0, 1], not {fraction}")
    embeddings = [layer for layer in model.layers if isinstance(layer, TokenEmbedding)]
    if len(embeddings) != 1:
        raise EdgeccError(f"trimming the vocabulary needs exactly one TokenEmbedding, the model has {len(embeddings)}")
    layer = embeddings[0]
    table = layer.table.numpy()
    inputs = layer.input_vocabulary or len(table)
    rows_of_ids = layer.id_map.numpy() if layer.input_vocabulary else np.arange(inputs)
    counts = np.bincount(rows_of_ids[ids.ravel()], minlength=len(table))
    used = np.flatnonzero(counts)
    size = max(1, round(len(table) * fraction))
    kept = used[np.argsort(-counts[used], kind="stable")][:size]
    if unknown_id is not None and rows_of_ids[unknown_id] not in kept:
        kept = np.append(kept[: size - 1], rows_of_ids[unknown_id])
    kept = np.sort(kept)
    new_row = np.empty(len(table), np.int32)
    nearest = np.setdiff1d(np.arange(len(table)), kept)
    new_row[nearest] = _nearest_rows(table[nearest], table[kept])
    new_row[kept] = np.arange(len(kept))
    changes = {layer.name: {"vocabulary_size": len(kept), "input_vocabulary": inputs}}
    return rebuilt(model, changes, {layer.name: [table[kept], new_row[rows_of_ids]]})


def _nearest_rows(rows: np.ndarray, candidates: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Index of the nearest candidate (Euclidean) for each row, a chunk of rows at a time to bound memory."""
    squared = (candidates ** 2).sum(axis=1)
    return np.concatenate([np.argmin(squared - 2 * rows[i:i + chunk] @ candidates.T, axis=1)
                           for i in range(0, len(rows), chunk)] or [np.empty(0, np.int64)]).astype(np.int32)


def _most_important(importance: np.ndarray, count: int) -> list[int]:
    """Indices of the `count` (at least 1) highest scores, in ascending index order."""
    return sorted(np.argsort(-importance, kind="stable")[: max(1, count)].tolist())


def prune_to(model: Any, head_fraction: float, neuron_fraction: float, x: np.ndarray, reference: np.ndarray,
             block_fraction: float = 1.0, first_blocks: bool = False, *, reporter: Reporter | None = None) -> Any:
    """Keep the most important (or, with `first_blocks`, the first) round(blocks * block_fraction) encoder blocks,
    then the most important
    round(heads * head_fraction) heads of every attention and round(width * neuron_fraction) neurons
    of every feed-forward unit (at least one each).

    Units are scored once, blocks on the whole model and heads and neurons on the
    model left after removing blocks; distillation fine-tuning afterwards recovers
    what their removals cost together.
    """
    for what, fraction in (("head_fraction", head_fraction), ("neuron_fraction", neuron_fraction),
                           ("block_fraction", block_fraction)):
        if not 0.0 < fraction <= 1.0:
            raise EdgeccError(f"{what} must be in (0, 1], not {fraction}")
    reporter = reporter or Reporter(quiet=True)
    blocks = find_blocks(model) if block_fraction < 1.0 else []
    if blocks:
        scores = np.arange(len(blocks), 0, -1)
        if not first_blocks:  # one pass over x per block: minutes for a pretrained encoder, so reported
            with reporter.task("scoring encoder blocks", len(blocks), unit="block") as advance:
                scores = np.array([_advanced(block_importance(model, block, x, reference), advance)
                                   for block in blocks])
        kept = set(_most_important(scores, round(len(blocks) * block_fraction)))
        model = remove_blocks(model, [block for i, block in enumerate(blocks) if i not in kept])
    attention, feed_forward = find_units(model)
    with reporter.task("scoring attention heads", sum(u.heads for u in attention), unit="head") as advance:
        keep_heads = {u.scores: _most_important(head_importance(model, u, x, reference, advance),
                                                round(u.heads * head_fraction)) for u in attention}
    keep_neurons = {u.up: _most_important(neuron_importance(model, u, x), round(u.width * neuron_fraction))
                    for u in feed_forward}
    return prune(model, keep_heads, keep_neurons)
