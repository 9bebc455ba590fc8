"""Tensor lifetimes and the activation memory they need.

The lower bound is the largest total of activation tensors alive at once: no
memory plan can do better. The plan places each tensor at the lowest offset that
does not overlap a tensor alive at the same time (first fit, the strategy of
TFLite's and TFLite Micro's greedy planners), trying a few placement orders and
keeping the smallest arena; its offsets are what edgecc.memplan writes into a
model as TFLite Micro's offline plan. Lifetimes follow TFLite Micro's
(micro_allocation_info.cc): a tensor is alive from the operator that writes it
through the last one that reads it, both included; graph inputs from the start,
graph outputs to the end. Variable (state) tensors are not activations: TFLite Micro keeps them for the
whole run outside the planned arena.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from edgecc.reader import Graph

ALIGNMENT = 16  # TFLite Micro's MicroArenaBufferAlignment(): every planned buffer starts and is sized on it
RANDOM_TRIES = 200  # perturbed placement orders tried at most while the plan is above the aligned lower bound
RANDOM_WORK = 5_000_000  # ... and within about this many span comparisons (first fit is quadratic)


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
    offsets: dict[int, int] = field(default_factory=dict, compare=False)  # tensor index -> byte offset in the plan
    aligned_lower_bound_bytes: int = 0  # the same with every tensor rounded up to ALIGNMENT, as TFLite Micro does


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
            for t in sorted(first) if not graph.tensors[t].constant and not graph.tensors[t].variable]


def aligned(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def place(spans: list[Lifetime]) -> dict[int, int]:
    """Byte offsets (tensor -> offset) of the first-fit placement that ends lowest over a few placement orders.

    The first is TFLite Micro's own order (greedy_memory_planner.cc: largest first, ties the later tensor first),
    so the plan is never larger than the one it makes itself; longest-lived first and largest area (bytes x
    lifetime) first often pack residual streams and per-head tensors tighter, and so does greedy by breadth
    (Pisarchyk and Lee, "Efficient Memory Management for Deep Neural Net Inference", 2020). While the best is
    above the aligned lower bound, seeded random perturbations of largest-first are tried too, within a fixed
    amount of work (the result is the same on every run). Ties keep the earlier order.
    """
    orders: tuple[Callable[[Lifetime], tuple[int, ...]], ...] = (
        lambda s: (-aligned(s.bytes), -s.tensor),
        lambda s: (-aligned(s.bytes), s.first),
        lambda s: (-(s.last - s.first), -s.bytes, s.first),
        lambda s: (-aligned(s.bytes) * (s.last - s.first + 1), s.first),
        lambda s: (s.first, -s.bytes),
    )
    bound = _aligned_bound(spans)
    best: dict[int, int] = {}
    best_end = -1
    rng = random.Random(0)
    perturbed = (sorted(spans, key=lambda s: (-aligned(s.bytes) * rng.uniform(0.5, 1.5), s.tensor))
                 for _ in range(min(RANDOM_TRIES, RANDOM_WORK // max(len(spans), 1) ** 2)))
    for ordered in itertools.chain((sorted(spans, key=key) for key in orders), [_by_breadth(spans)], perturbed):
        offsets = _first_fit(ordered)
        end = max((offsets[s.tensor] + aligned(s.bytes) for s in spans), default=0)
        if best_end < 0 or end < best_end:
            best, best_end = offsets, end
        if best_end <= bound:
            break
    return best


def _aligned_bound(spans: list[Lifetime]) -> int:
    """The most aligned bytes alive at once: no placement ends lower."""
    steps = {s.first for s in spans} | {s.last for s in spans}
    return max((sum(aligned(s.bytes) for s in spans if s.first <= i <= s.last) for i in steps), default=0)


def _by_breadth(spans: list[Lifetime]) -> list[Lifetime]:
    """The tensors of the operator with the most live bytes first, largest first, then of the next fullest one."""
    steps = sorted({s.first for s in spans} | {s.last for s in spans})
    live = {i: [s for s in spans if s.first <= i <= s.last] for i in steps}
    ordered: dict[int, Lifetime] = {}
    for i in sorted(steps, key=lambda i: (-sum(s.bytes for s in live[i]), i)):
        for span in sorted(live[i], key=lambda s: (-s.bytes, s.tensor)):
            ordered.setdefault(span.tensor, span)
    return list(ordered.values())


def _first_fit(spans: list[Lifetime]) -> dict[int, int]:
    """Each span in turn at the lowest offset clear of every placed span alive at the same time."""
    placed: list[tuple[int, int, Lifetime]] = []  # (offset, size, span), kept sorted by offset
    offsets: dict[int, int] = {}
    for span in spans:
        size = aligned(span.bytes)
        offset = 0
        for other_offset, other_size, other in placed:
            overlaps_in_time = not (other.last < span.first or span.last < other.first)
            if overlaps_in_time and other_offset < offset + size and offset < other_offset + other_size:
                offset = other_offset + other_size
        placed.append((offset, size, span))
        placed.sort(key=lambda p: p[0])
        offsets[span.tensor] = offset
    return offsets


def plan_memory(graph: Graph) -> MemoryPlan:
    spans = [s for s in lifetimes(graph) if s.bytes > 0]
    live = [sum(s.bytes for s in spans if s.first <= i <= s.last) for i in range(len(graph.operators))]
    offsets = place(spans)
    peak = max(range(len(live)), key=live.__getitem__) if live else 0
    return MemoryPlan(
        lower_bound_bytes=max(live, default=0),
        planned_bytes=max((offsets[s.tensor] + aligned(s.bytes) for s in spans), default=0),
        peak_op=peak,
        live_bytes=tuple(live),
        offsets=offsets,
        aligned_lower_bound_bytes=_aligned_bound(spans),
    )
