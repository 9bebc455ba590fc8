"""Tensor lifetimes and the activation memory they need.

The lower bound is the largest total of activation tensors alive at once: no
memory plan can do better. The greedy plan places tensors largest first at the
lowest offset that does not overlap a tensor alive at the same time (the
strategy of TFLite's and TFLite Micro's greedy planners), which is what a
runtime typically needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgecc.reader import Graph

ALIGNMENT = 16


@dataclass(frozen=True)
class Lifetime:
    tensor: int
    first: int  # index of the operator that produces it (-1: a graph input)
    last: int  # index of the last operator that reads it (len(ops): a graph output)
    bytes: int


@dataclass(frozen=True)
class MemoryPlan:
    lower_bound_bytes: int
    planned_bytes: int
    peak_op: int  # operator at which the lower bound is reached
    live_bytes: tuple[int, ...]  # activation bytes alive while each operator runs


def lifetimes(graph: Graph) -> list[Lifetime]:
    """When each activation tensor is first written and last read, in operator order."""
    first: dict[int, int] = {i: -1 for i in graph.inputs}
    last: dict[int, int] = {}
    for index, op in enumerate(graph.operators):
        for t in op.outputs:
            first.setdefault(t, index)
        for t in op.inputs:
            if t >= 0 and not graph.tensors[t].constant:
                last[t] = index
    end = len(graph.operators)
    for t in graph.outputs:
        last[t] = end
    return [Lifetime(t, first[t], last.get(t, first[t]), graph.tensors[t].nbytes)
            for t in sorted(first) if not graph.tensors[t].constant]


def _aligned(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def plan_memory(graph: Graph) -> MemoryPlan:
    spans = lifetimes(graph)
    live = [sum(s.bytes for s in spans if s.first <= i <= s.last) for i in range(len(graph.operators))]
    placed: list[tuple[int, int, Lifetime]] = []  # (offset, size, span)
    for span in sorted(spans, key=lambda s: -s.bytes):
        size = _aligned(span.bytes)
        offset = 0
        for other_offset, other_size, other in sorted(placed, key=lambda p: p[0]):
            overlaps_in_time = not (other.last < span.first or span.last < other.first)
            if overlaps_in_time and other_offset < offset + size and offset < other_offset + other_size:
                offset = other_offset + other_size
        placed.append((offset, size, span))
    peak = max(range(len(live)), key=live.__getitem__) if live else 0
    return MemoryPlan(
        lower_bound_bytes=max(live, default=0),
        planned_bytes=max((o + s for o, s, _ in placed), default=0),
        peak_op=peak,
        live_bytes=tuple(live),
    )
