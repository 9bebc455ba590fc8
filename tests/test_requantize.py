"""edgecc.requantize: the rescaling ways match their definitions in exact arithmetic, and each real interpreter's
operator outputs are recomputed by one of them (TFLite Micro's by two roundings, as the board's CMSIS-NN does)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from edgecc.graphpass import EditGraph, outputs, random_inputs
from edgecc.memplan import micro_outputs
from edgecc.micro_eval import operands
from edgecc.requantize import (RECOMPUTED, WAYS, Operand, explain, one_rounding, quantized_multiplier, recomputed,
                               two_roundings, way_of)
from edgecc.requantize import _fully_connected  # the sums a FULLY_CONNECTED rescales, for a hand-made output
from edgecc.tflite_edit import is_constant, pack, pruned, unpack

FIXTURES = Path(__file__).parent / "fixtures"
TWO_ROUNDINGS, ONE_ROUNDING = list(WAYS)[:2]


def _half_away(x: Fraction) -> int:
    return int(x + Fraction(1, 2)) if x >= 0 else -int(-x + Fraction(1, 2))


def test_the_two_rescalings_match_their_definitions_in_exact_arithmetic() -> None:
    """Two roundings: the high multiply rounds value x multiplier x 2^left / 2^31 half away from zero, then the
    shift rounds half away again; one rounding: value x multiplier / 2^(31 - shift), half up. Fractions, not bits."""
    rng = np.random.default_rng(0)
    values = rng.integers(-2**20, 2**20, 4000)
    reals = np.exp(rng.uniform(np.log(1e-5), np.log(0.99), 4000))
    twice, once = two_roundings(values, reals), one_rounding(values, reals)
    for value, real, two, one in zip(values, reals, twice, once):
        multiplier, shift = quantized_multiplier(float(real))
        high = _half_away(Fraction(int(value) * multiplier * 2 ** max(shift, 0), 2**31))
        assert two == _half_away(Fraction(high, 2 ** max(-shift, 0)))
        exact = Fraction(int(value) * multiplier, 2 ** (31 - shift))
        assert one == int((exact + Fraction(1, 2)).__floor__())
    assert (twice != once).any()  # the two ways do part, near halves


def test_the_multiplier_is_tflites_quantize_multiplier() -> None:
    for real in (0.5, 0.75, 1e-3, 0.0018831, 0.999999999):
        multiplier, shift = quantized_multiplier(real)
        assert 2**30 <= multiplier < 2**31
        assert multiplier * 2.0 ** (shift - 31) == pytest.approx(real, rel=2**-30)
    assert quantized_multiplier(0.0) == (0, 0)


def _single_operator(content: bytes, index: int) -> bytes:
    """Operator `index` alone, its activation inputs made the model's inputs."""
    model = unpack(content)
    subgraph = model.subgraphs[0]
    op = subgraph.operators[index]
    subgraph.operators = [op]
    subgraph.inputs = np.array([t for t in op.inputs if t >= 0 and not is_constant(model, int(t))], np.int32)
    subgraph.outputs = np.array(op.outputs[:1], np.int32)
    model.metadata = None
    return pack(pruned(model))


def _operands(content: bytes, values: list[np.ndarray]) -> tuple[str, object, list[Operand | None], Operand | None]:
    graph = EditGraph(unpack(content))
    inputs, output = operands(graph, 0, dict(zip((int(t) for t in graph.subgraph.inputs), values)))
    return graph.kinds[0], graph.op(0).builtinOptions, inputs, output


@pytest.mark.parametrize("name", ["vit_int8", "gelu_int8", "text_int8"])
def test_each_interpreter_computes_what_one_way_recomputes(name: str) -> None:
    """Every convolution, FULLY_CONNECTED, MUL and ADD of a real model, alone, on random int8 inputs: TFLite Micro's
    output is the two-roundings recomputation, element for element; LiteRT's is one of the ways."""
    content = (FIXTURES / f"{name}.tflite").read_bytes()
    graph = EditGraph(unpack(content))
    checked = explained = 0
    for index, kind in enumerate(graph.kinds):
        if kind not in RECOMPUTED:
            continue
        alone = _single_operator(content, index)
        inputs = random_inputs(alone, 4, seed=index)
        # LiteRT's FULLY_CONNECTED of two activations (attention's products) rescales in a way not modelled here
        modelled = kind != "FULLY_CONNECTED" or len(unpack(alone).subgraphs[0].inputs) == 1
        for values, micro, litert in zip(inputs, micro_outputs(alone, inputs), outputs(alone, inputs)):
            kind_, options, operands, output = _operands(alone, values)
            ways = recomputed(kind_, options, operands, output)
            assert way_of(ways, micro[0]) == TWO_ROUNDINGS, (name, index, kind)
            if modelled:
                assert way_of(ways, litert[0]) in WAYS, (name, index, kind)
                explained += explain(kind_, options, operands, output, micro[0], litert[0]) is not None
            checked += 1
    assert checked >= 8 and explained  # each way seen, and LiteRT's does part from TFLite Micro's somewhere


def test_an_operator_recomputed_wrongly_is_not_explained() -> None:
    """A way is named only when it gives every element: one element off, and nothing is claimed."""
    x = Operand(np.arange(-64, 64, dtype=np.int8).reshape(2, 64), np.array([0.02]), np.array([3]))
    w = Operand(np.ones((4, 64), np.int8), np.array([0.01]), np.array([0]))
    out = Operand(np.zeros(0, np.int8), np.array([0.05]), np.array([-2]))
    sums, as_tflite, _ = _fully_connected([x, w, None], out, None)
    right = np.clip(two_roundings(sums, as_tflite) - 2, -128, 127).astype(np.int8)
    ways = recomputed("FULLY_CONNECTED", None, [x, w, None], out)
    assert way_of(ways, right) == TWO_ROUNDINGS
    wrong = right.copy()
    wrong[0, 0] += 1
    assert way_of(ways, wrong) is None
    assert explain("FULLY_CONNECTED", None, [x, w, None], out, right, wrong) is None
