"""The memory planner (edgecc.memplan): operator order, the offline plan written into the model, refusals, and the
arena measured with the real TFLite Micro interpreter with and without the plan."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from edgecc.arena import arena_split
from edgecc.graphpass import random_inputs, same_outputs
from edgecc.liveness import ALIGNMENT, lifetimes, plan_memory
from edgecc.memplan import (ONLINE, execution_order, micro_outputs, plan_for_micro, read_offline_plan, reorder,
                            write_offline_plan)
from edgecc.reader import read_graph
from edgecc.tflite_edit import add_tensor, is_constant, pack, pruned, unpack

BRANCHES = 4


def branched_model(fixture: Path) -> bytes:
    """x -> BRANCHES parallel ADD(x, x), then summed in a chain, in the order a converter writes it: every branch
    first, so all of them are alive at once. Built from the fixture's int8 ADD (its quantization and options)."""
    model = unpack(fixture.read_bytes())
    graph = model.subgraphs[0]
    template = next(op for op in graph.operators
                    if model.operatorCodes[op.opcodeIndex].builtinCode == 0  # ADD
                    and not any(is_constant(model, int(t)) for t in op.inputs))
    like = graph.tensors[template.outputs[0]]
    shape = tuple(int(d) for d in like.shape)

    def add(a: int, b: int, name: str) -> int:
        out = add_tensor(model, like, name, shape)
        op = copy.deepcopy(template)
        op.inputs, op.outputs = np.array([a, b], np.int32), np.array([out], np.int32)
        operators.append(op)
        return out

    operators: list = []
    x = add_tensor(model, like, "x", shape)
    branches = [add(x, x, f"branch{k}") for k in range(BRANCHES)]
    total = branches[0]
    for k, branch in enumerate(branches[1:]):
        total = add(total, branch, f"sum{k}")
    graph.operators = operators
    graph.inputs, graph.outputs = np.array([x], np.int32), np.array([total], np.int32)
    return pack(pruned(model))


@pytest.fixture(scope="module")
def branched(tiny_models) -> bytes:
    return branched_model(tiny_models["vit_int8"])


@pytest.fixture(scope="module")
def vit_plan(tiny_models):
    """The committed int8 transformer planned, both arenas measured by the real TFLite Micro interpreter."""
    return plan_for_micro(tiny_models["vit_int8"].read_bytes())


def test_order_lowers_the_peak_of_a_branched_graph_bit_exact(branched: bytes) -> None:
    graph = read_graph(branched)
    order = execution_order(graph)
    assert order != tuple(range(len(graph.operators)))
    planned = plan_for_micro(branched)
    assert planned.refused is None and planned.order == order
    assert planned.memory.lower_bound_bytes < planned.original.lower_bound_bytes
    # the real interpreter agrees: a smaller arena, and the same outputs bit for bit (LiteRT and TFLite Micro)
    assert planned.arena_with.bytes < planned.arena_without.bytes
    inputs = random_inputs(branched, 3)
    assert same_outputs(branched, planned.content, inputs)
    before = micro_outputs(branched, inputs, planned.arena_without.bytes)
    after = micro_outputs(planned.content, inputs, planned.arena_with.bytes)
    assert all(np.array_equal(a, b) for one, two in zip(before, after) for a, b in zip(one, two))


def test_a_chain_keeps_the_converters_order(tiny_models) -> None:
    graph = read_graph(tiny_models["vit_int8"].read_bytes())
    assert execution_order(graph) == tuple(range(len(graph.operators)))
    with pytest.raises(Exception, match="every operator once"):
        reorder(tiny_models["vit_int8"].read_bytes(), (0, 0))


def test_the_plan_is_written_read_back_and_never_larger(tiny_models, vit_plan) -> None:
    content, planned = tiny_models["vit_int8"].read_bytes(), vit_plan
    assert planned.refused is None
    graph = read_graph(planned.content)
    offsets = read_offline_plan(planned.content)
    assert read_offline_plan(content) is None and len(offsets) == len(graph.tensors)
    spans = {s.tensor: s for s in lifetimes(graph) if s.bytes}
    assert {t for t, o in enumerate(offsets) if o != ONLINE} == set(spans)  # every activation, nothing else
    assert all(o % ALIGNMENT == 0 for o in offsets if o != ONLINE)
    assert max(offsets[t] + -(-s.bytes // ALIGNMENT) * ALIGNMENT for t, s in spans.items()) \
        == planned.memory.planned_bytes <= planned.original.planned_bytes
    assert planned.memory.planned_bytes <= 1.05 * planned.memory.aligned_lower_bound_bytes
    assert planned.arena_with.bytes <= planned.arena_without.bytes
    assert planned.arena_with.head_bytes >= planned.memory.planned_bytes  # TFLite Micro used the plan's region
    inputs = random_inputs(content, 2)
    before = micro_outputs(content, inputs, planned.arena_without.bytes)
    after = micro_outputs(planned.content, inputs, planned.arena_with.bytes)
    assert all(np.array_equal(a, b) for one, two in zip(before, after) for a, b in zip(one, two))


def test_the_arena_split_adds_up_to_the_measured_arena(vit_plan) -> None:
    planned = vit_plan
    memory = plan_memory(read_graph(planned.content))
    parts = arena_split(planned.arena_with, memory.lower_bound_bytes, memory.planned_bytes)
    assert sum(p.bytes for p in parts) == planned.arena_with.bytes
    assert [p.name for p in parts][0] == "planned activations" and parts[0].bytes == memory.planned_bytes
    assert all(p.bytes >= 0 for p in parts) and "per-operator structures (NodeAndRegistration)" in parts[2].detail
    assert f"({len(read_graph(planned.content).operators)} x " in parts[2].detail  # one per operator


def _two_subgraphs(content: bytes) -> bytes:
    model = unpack(content)
    model.subgraphs.append(copy.deepcopy(model.subgraphs[0]))
    return pack(model)


@pytest.mark.parametrize("spoil, reason", [
    (lambda c: write_offline_plan(c, [ONLINE] * len(read_graph(c).tensors)), "already carries"),
    (_two_subgraphs, "2 subgraphs"),
])
def test_a_plan_that_cannot_be_written_leaves_the_model_as_it_was(tiny_models, spoil, reason: str) -> None:
    content = spoil(tiny_models["vit_int8"].read_bytes())
    planned = plan_for_micro(content)
    assert planned.refused and reason in planned.refused
    assert planned.content == content  # nothing half-written: TFLite Micro plans it itself
    with pytest.raises(Exception, match=reason):
        write_offline_plan(content, [ONLINE])


def test_a_model_tflite_micro_cannot_run_keeps_its_own_planning(tiny_models) -> None:
    content = tiny_models["gelu_int8"].read_bytes()
    planned = plan_for_micro(content)
    assert planned.content == content and "GELU" in planned.refused


def test_check_reports_where_the_arena_goes(tiny_models) -> None:
    from edgecc.check import arena_line, assess

    result = assess(tiny_models["vit_int8"].read_bytes(), "stm32h7")
    split = result.to_json()["arena_split"]
    assert sum(p["bytes"] for p in split) == result.arena.bytes
    assert [p["name"] for p in split] == ["planned activations", "planner overhead and scratch",
                                          "persistent runtime structures", "allocation slack"]
    assert arena_line(result.arena_parts).startswith(f"TFLite Micro arena {result.arena.bytes:,} B = ")
