"""Per-operator work: multiply-accumulates and bytes moved, read off the graph's shapes.

These are the inputs of the latency model; they are exact counts for the
matrix ops (convolutions, fully connected, batch matmul) and one operation per
element for the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgecc.reader import Graph, Operator, Tensor

FREE_OPS = {"RESHAPE", "SQUEEZE", "EXPAND_DIMS"}  # metadata changes: no arithmetic


@dataclass(frozen=True)
class OpCost:
    """What one operator computes and moves."""

    macs: int
    activation_bytes: int  # activations read and written
    weight_bytes: int  # constant tensors read

    @property
    def bytes_moved(self) -> int:
        return self.activation_bytes + self.weight_bytes


LOOKUPS = ("GATHER", "GATHER_ND", "EMBEDDING_LOOKUP")


def _macs(op: Operator, tensors: tuple[Tensor, ...]) -> int:
    inputs = [tensors[i] for i in op.inputs if i >= 0]
    out = tensors[op.outputs[0]] if op.outputs else None
    if out is None or not inputs or op.kind in FREE_OPS:
        return 0
    if op.kind == "CONV_2D" and len(inputs) > 1:  # filter [out_channels, kh, kw, in_channels]
        _, kh, kw, cin = inputs[1].shape
        return out.elements * kh * kw * cin
    if op.kind == "DEPTHWISE_CONV_2D" and len(inputs) > 1:  # filter [1, kh, kw, channels]
        return out.elements * inputs[1].shape[1] * inputs[1].shape[2]
    if op.kind == "TRANSPOSE_CONV" and len(inputs) > 2:  # filter [out_channels, kh, kw, in_channels]
        _, kh, kw, _ = inputs[1].shape
        return inputs[2].elements * kh * kw * inputs[1].shape[0]
    if op.kind == "FULLY_CONNECTED" and len(inputs) > 1:  # weights [units, depth]
        return out.elements * inputs[1].shape[-1]
    if op.kind == "BATCH_MATMUL" and len(inputs) > 1:
        a = inputs[0].shape
        depth = a[-1] if a[-2] == out.shape[-2] else a[-2]  # [.., M, K], or [.., K, M] when adjoint
        return out.elements * depth
    if op.kind in LOOKUPS:  # reads one row of the table per index: the output's elements, not the table's
        return out.elements
    return max(out.elements, max(t.elements for t in inputs))


def op_costs(graph: Graph) -> list[OpCost]:
    """One OpCost per operator, in execution order."""
    costs = []
    for op in graph.operators:
        used = [graph.tensors[i] for i in (*op.inputs, *op.outputs) if i >= 0]
        weights = sum(t.nbytes for t in used if t.constant)
        if op.kind in LOOKUPS and op.outputs:  # the rows it gathers, not the whole table (MiniLM's: 3 MB for 24 KB)
            weights = min(weights, graph.tensors[op.outputs[0]].nbytes)
        costs.append(OpCost(macs=_macs(op, graph.tensors),
                            activation_bytes=sum(t.nbytes for t in used if not t.constant), weight_bytes=weights))
    return costs
