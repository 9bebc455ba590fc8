"""The memory planner: an operator order with a lower peak, and edgecc's buffer offsets written into the model.

TFLite Micro plans the activation arena itself when it prepares a model, but it
takes the converter's operator order as it is and reads an offline plan from the
model's metadata when there is one: the "OfflineMemoryAllocation" entry, a buffer
of little-endian int32 [version, subgraphs, n, offset of tensor 0, ..., offset of
tensor n-1], -1 for a tensor it should plan itself (tensorflow/lite/micro/
micro_allocation_info.cc and docs/memory_management.md in tflite-micro). Its
greedy planner keeps those offsets and places the kernels' scratch buffers
around them.

`plan_for_micro` chooses the order (a small beam search over the operators that
are ready, kept only when its plan is smaller than the converter's order's),
rewrites it into the flatbuffer (the same operators on the same tensors, so every
output is bit-exact) and writes the plan of edgecc.liveness. A model whose plan
cannot be written, or with which the real interpreter needs a larger arena, is
returned unchanged with the reason: TFLite Micro then plans it itself.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from edgecc.arena import PROBE_ARENA, ArenaMeasurement, measure_arena, micro_interpreter
from edgecc.errors import EdgeccError
from edgecc.liveness import MemoryPlan, aligned, lifetimes, plan_memory
from edgecc.modelcheck import METADATA_NAME, offline_plan
from edgecc.reader import Graph, read_graph
from edgecc.tflite_edit import pack, unpack

FORMAT_VERSION = 1
ONLINE = -1  # the offset that asks TFLite Micro to plan a tensor itself
BEAM_WIDTH = 16


@dataclass(frozen=True)
class OfflinePlan:
    """A model with edgecc's operator order and memory plan, or the model unchanged and why (`refused`)."""

    content: bytes
    order: tuple[int, ...]  # the operators of the given model, in the order the planned model runs them
    original: MemoryPlan  # the converter's order
    memory: MemoryPlan  # the chosen order: its plan is what the model carries
    refused: str | None = None
    arena_without: ArenaMeasurement | None = None  # the smallest TFLite Micro arena of the given model
    arena_with: ArenaMeasurement | None = None  # and of the model with edgecc's order and plan

    @property
    def reordered(self) -> bool:
        return self.order != tuple(range(len(self.order)))

    def to_json(self) -> dict[str, Any]:
        return {"written": self.refused is None, "refused": self.refused, "reordered": self.reordered,
                "lower_bound_bytes": {"given_order": self.original.lower_bound_bytes,
                                      "chosen_order": self.memory.lower_bound_bytes},
                "planned_bytes": {"given_order": self.original.planned_bytes,
                                  "chosen_order": self.memory.planned_bytes},
                "arena_bytes": {"without_plan": self.arena_without.bytes if self.arena_without else None,
                                "with_plan": self.arena_with.bytes if self.arena_with else None,
                                "method": self.arena_with.method if self.arena_with else None}}


def reordered_graph(graph: Graph, order: tuple[int, ...]) -> Graph:
    return replace(graph, operators=tuple(graph.operators[i] for i in order))


def execution_order(graph: Graph) -> tuple[int, ...]:
    """An order of the operators that respects every data dependency and lowers the peak of live activations.

    A beam search over the operators ready to run, ranked by the peak so far and then the bytes alive after the
    step (ties: the converter's order); of the orders left at the end and the given one, the one whose plan is
    smallest wins, the given order on a tie, so a chain, or a graph the converter already ordered best, keeps it.
    """
    spans = {s.tensor: s for s in lifetimes(graph)}
    producer = {t: i for i, op in enumerate(graph.operators) for t in op.outputs}
    outputs = set(graph.outputs)
    needs = [0] * len(graph.operators)  # bit mask of the operators each one waits for
    readers: dict[int, int] = {}  # tensor -> bit mask of the operators that read it
    for i, op in enumerate(graph.operators):
        for t in op.inputs:
            if t in spans:
                readers[t] = readers.get(t, 0) | 1 << i
                if t in producer:
                    needs[i] |= 1 << producer[t]
    inputs_bytes = sum(spans[t].bytes for t in graph.inputs if t in spans and t in readers)
    beam: list[tuple[int, int, tuple[int, ...], int]] = [(0, inputs_bytes, (), 0)]  # (peak, live, order, done mask)
    for _ in graph.operators:
        steps: dict[int, tuple[int, int, tuple[int, ...], int]] = {}
        for peak, live, order, done in beam:
            for i, op in enumerate(graph.operators):
                bit = 1 << i
                if done & bit or needs[i] & ~done:
                    continue
                now = done | bit
                made = sum(spans[t].bytes for t in set(op.outputs) if t in spans)
                freed = sum(spans[t].bytes for t in set(op.inputs) | set(op.outputs)
                            if t in spans and t not in outputs and not readers.get(t, 0) & ~now)
                step = (max(peak, live + made), live + made - freed, (*order, i), now)
                if now not in steps or step < steps[now]:
                    steps[now] = step
        beam = sorted(steps.values())[:BEAM_WIDTH]
    given = tuple(range(len(graph.operators)))
    orders = [given, *(order for _, _, order, _ in beam if order != given)]  # min keeps the first of equals
    return min(orders, key=lambda order: (plan_memory(reordered_graph(graph, order)).planned_bytes,
                                          order != given))


def refusal(model: Any) -> str | None:
    """Why TFLite Micro could not take an offline plan from edgecc for this model (the object tree), if it could not."""
    if len(model.subgraphs) != 1:
        return (f"the model has {len(model.subgraphs)} subgraphs; edgecc plans one (control flow such as IF or WHILE "
                "runs its bodies from the same arena)")
    named = [(m.name or b"").decode(errors="replace") for m in model.metadata or []]
    if METADATA_NAME in named:
        return f"the model already carries an {METADATA_NAME} plan (its author's); edgecc does not overwrite it"
    return None


def offline_offsets(graph: Graph, memory: MemoryPlan) -> list[int]:
    """The metadata's offsets, one per tensor of the subgraph: edgecc's plan; ONLINE for what is not an activation
    (constants, an LSTM's state and intermediate tensors), which TFLite Micro keeps handling itself."""
    return [memory.offsets.get(t, ONLINE) for t in range(len(graph.tensors))]


def write_offline_plan(content: bytes, offsets: list[int]) -> bytes:
    """`content` with an OfflineMemoryAllocation metadata entry holding `offsets`."""
    from edgecc.tflite_edit import tflite_schema

    schema = tflite_schema()
    model = unpack(content)
    reason = refusal(model)
    if reason:
        raise EdgeccError(f"cannot write an offline memory plan: {reason}")
    buffer = schema.BufferT()
    words = np.array([FORMAT_VERSION, 1, len(offsets), *offsets], "<i4")
    buffer.data = np.frombuffer(words.tobytes(), np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME.encode(), len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]
    return pack(model)


def read_offline_plan(content: bytes) -> list[int] | None:
    """The offsets of the model's OfflineMemoryAllocation entry, as TFLite Micro reads them; None without one."""
    model = unpack(content)
    for entry in model.metadata or []:
        if entry.name == METADATA_NAME.encode():
            return offline_plan(model.buffers[entry.buffer].data, "model")
    return None


def carried_plan_bytes(content: bytes, graph: Graph) -> int | None:
    """The end of the offline plan the model carries (its planned activations), None without one."""
    offsets = read_offline_plan(content)
    if offsets is None or len(offsets) != len(graph.tensors):
        return None
    return max((o + aligned(graph.tensors[t].nbytes) for t, o in enumerate(offsets) if o != ONLINE), default=0)


def reorder(content: bytes, order: tuple[int, ...]) -> bytes:
    """`content` with the main subgraph's operators in `order` (the same operators: bit-exact outputs)."""
    if sorted(order) != list(range(len(order))):
        raise EdgeccError("an operator order must name every operator once")
    model = unpack(content)
    operators = model.subgraphs[0].operators
    model.subgraphs[0].operators = [operators[i] for i in order]
    return pack(model)


def check_plan(graph: Graph, offsets: list[int]) -> None:
    """Raise (an internal error) when two activations alive at the same time overlap in the plan."""
    spans = [s for s in lifetimes(graph) if s.bytes > 0 and offsets[s.tensor] != ONLINE]
    for i, a in enumerate(spans):
        for b in spans[i + 1:]:
            in_time = not (a.last < b.first or b.last < a.first)
            oa, ob = offsets[a.tensor], offsets[b.tensor]
            if in_time and oa < ob + aligned(b.bytes) and ob < oa + aligned(a.bytes):
                raise AssertionError(f"offline plan overlaps tensors {a.tensor} and {b.tensor}")


def plan_for_micro(content: bytes) -> OfflinePlan:
    """The model with edgecc's operator order and offline memory plan, or unchanged with the reason it is not.

    The real TFLite Micro interpreter measures the smallest arena with and without the plan, and the plan is
    kept only when it is not larger (TFLite Micro fits the kernels' scratch buffers around an offline
    plan, which can in rare cases cost more than its own joint plan).
    """
    graph = read_graph(content)
    original = plan_memory(graph)
    given = tuple(range(len(graph.operators)))
    reason = refusal(unpack(content))
    if reason:
        return OfflinePlan(content, given, original, original, refused=reason)
    order = execution_order(graph)
    planned = reorder(content, order) if order != given else content
    graph = read_graph(planned)
    memory = plan_memory(graph)
    offsets = offline_offsets(graph, memory)
    check_plan(graph, offsets)
    result = OfflinePlan(write_offline_plan(planned, offsets), order, original, memory)
    try:
        without, with_plan = measured_arena(content), measured_arena(result.content)
    except EdgeccError as err:
        return replace(result, content=content, order=given, memory=original,
                       refused=f"the TFLite Micro interpreter cannot allocate it: {err}")
    result = replace(result, arena_without=without, arena_with=with_plan)
    if with_plan.bytes > without.bytes:
        return replace(result, content=content, order=given, memory=original,
                       refused=f"measured, TFLite Micro's own plan needs the smaller arena ({without.bytes:,} B "
                               f"against {with_plan.bytes:,} B with edgecc's): it fits its kernels' scratch buffers "
                               "better around its own plan")
    return result


def memory_plan_line(plan: OfflinePlan) -> str:
    """What the planner did, for people."""
    arenas = (f"; TFLite Micro arena {plan.arena_without.bytes:,} B without it, {plan.arena_with.bytes:,} B with it "
              "(measured)" if plan.arena_without and plan.arena_with else "")
    if plan.refused:
        return f"memory plan: not written, TFLite Micro plans the arena itself ({plan.refused}){arenas}"
    order = "operators reordered" if plan.reordered else "the converter's operator order kept (already best)"
    return (f"memory plan: {order}; activations {plan.memory.planned_bytes:,} B planned, lower bound "
            f"{plan.memory.lower_bound_bytes:,} B (given order: {plan.original.lower_bound_bytes:,} B), written as "
            f"TFLite Micro's offline plan{arenas}")


@lru_cache(maxsize=4)  # a build's micro_rewrites measures the model that plan_for_micro then measures again
def measured_arena(content: bytes) -> ArenaMeasurement:
    """The smallest arena of `content` by the real TFLite Micro interpreter (edgecc.arena, in a worker process)."""
    with tempfile.TemporaryDirectory(prefix="edgecc-memplan-") as directory:
        path = Path(directory) / "model.tflite"
        path.write_bytes(content)
        return measure_arena(path)


def micro_outputs(content: bytes, inputs: list[list[np.ndarray]],
                  arena_bytes: int = PROBE_ARENA) -> list[list[np.ndarray]]:
    """Every output for each input set, run by the TFLite Micro interpreter in an arena of `arena_bytes`
    (EdgeccError, one line, for a model it cannot run or allocate there)."""
    interpreter = micro_interpreter(content, arena_bytes)
    count = len(read_graph(content).outputs)
    results = []
    for values in inputs:
        for index, value in enumerate(values):
            interpreter.set_input(value, index)
        interpreter.invoke()
        results.append([np.asarray(interpreter.get_output(i)).copy() for i in range(count)])
    return results
