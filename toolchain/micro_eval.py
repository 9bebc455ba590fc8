"""A model's test split run with the TFLite Micro interpreter, beside LiteRT's figure on the same examples.

The board runs TFLite Micro's kernels, not LiteRT's, so a microcontroller build's
accuracy is measured with them (the `tflite_micro` package's host interpreter,
reference kernels), example by example, and compared with LiteRT's outputs: the
accuracy of each and how many outputs are bit-for-bit the same. Where they are not, the first operator whose output
differs is found (each prefix of the graph run as a model of its own by both), so a user sees that the two runtimes'
kernels round that operator differently (by how many quantization steps, on how many elements) rather than
suspecting the port.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgecc.arena import micro_interpreter
from edgecc.graphpass import EditGraph
from edgecc.memplan import METADATA_NAME
from edgecc.progress import Reporter
from edgecc.reader import read_graph
from edgecc.requantize import Operand, explain
from edgecc.runtime import Model, Quantization
from edgecc.tflite_edit import pack, pruned, unpack


@dataclass(frozen=True)
class MicroEvaluation:
    """Test accuracy with TFLite Micro and with LiteRT, and how far their outputs agree."""

    examples: int
    accuracy: float
    litert_accuracy: float
    same_predictions: int  # examples where both predict the same class
    identical_outputs: int  # examples whose quantized outputs are bit-for-bit equal
    first_difference: dict[str, Any] | None = None  # on the first example that differs: first_difference()'s
    method: str = "tflite-micro Python interpreter (host reference kernels), one example at a time"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class MicroModel:
    """The TFLite Micro interpreter with `content` allocated; one input and one output."""

    def __init__(self, content: bytes) -> None:
        self.interpreter = micro_interpreter(content)
        detail = self.interpreter.get_input_details(0)
        self.dtype = np.dtype(detail["dtype"])
        params = detail["quantization_parameters"]
        scales, zero_points = params.get("scales", []), params.get("zero_points", [])
        self.quantization = Quantization(float(scales[0]), int(zero_points[0])) if len(scales) else Quantization(0.0, 0)

    def raw(self, x: np.ndarray) -> np.ndarray:
        """The quantized output for one float example (no batch axis)."""
        self.interpreter.set_input(self.quantization.quantize(x[np.newaxis], self.dtype), 0)
        self.interpreter.invoke()
        return np.asarray(self.interpreter.get_output(0)).copy()


def evaluate_micro(content: bytes, x: np.ndarray, y: np.ndarray, reporter: Reporter | None = None) -> MicroEvaluation:
    """Run every example of (`x`, `y`) with TFLite Micro and with LiteRT and compare."""
    micro, litert = MicroModel(content), Model(content)
    same_predictions = identical = micro_right = litert_right = 0
    differing: int | None = None  # the first example whose outputs differ
    reporter = reporter or Reporter(quiet=True)
    with reporter.task("evaluating with TFLite Micro", len(x)) as advance:
        for i, (example, label) in enumerate(zip(x, y)):
            ours = micro.raw(example)
            litert.invoke(example)
            theirs = litert.interpreter.get_tensor(litert.output["index"])
            ours_class, theirs_class = int(np.argmax(ours)), int(np.argmax(theirs))
            same = ours.dtype == theirs.dtype and np.array_equal(ours, theirs)
            identical += int(same)
            differing = i if differing is None and not same else differing
            same_predictions += int(ours_class == theirs_class)
            micro_right += int(ours_class == int(label))
            litert_right += int(theirs_class == int(label))
            advance()
    count = max(len(x), 1)
    first = None if differing is None else {"example": differing, **(first_difference(content, x[differing]) or {})}
    return MicroEvaluation(examples=len(x), accuracy=micro_right / count, litert_accuracy=litert_right / count,
                           same_predictions=same_predictions, identical_outputs=identical, first_difference=first)


def first_difference(content: bytes, example: np.ndarray) -> dict[str, Any] | None:
    """The first operator, in execution order, whose output TFLite Micro and LiteRT compute differently on `example`
    (one float example, no batch axis): its index and kind, how many elements of its first output differ, of how
    many, by at most how many quantization steps, and the cause when edgecc.requantize finds it; None when every
    operator agrees."""
    graph = read_graph(content)
    computed: dict[int, np.ndarray] = {}  # the quantized input, then each agreeing operator's first output
    for index, op in enumerate(graph.operators):
        prefix = prefix_model(content, index)
        litert = Model(prefix)
        if index == 0:
            computed[int(graph.inputs[0])] = litert.input_quantization.quantize(example[np.newaxis],
                                                                                litert.input["dtype"])
        litert.invoke(example)
        raw = litert.interpreter.get_tensor(litert.output["index"])
        theirs = raw.astype(np.int64)
        ours = MicroModel(prefix).raw(example).astype(np.int64)
        if not np.array_equal(ours, theirs):
            return {"operator": index, "kind": op.kind, "elements_differing": int((ours != theirs).sum()),
                    "elements": int(ours.size), "max_steps": int(np.abs(ours - theirs).max()),
                    "cause": _cause(content, index, computed, ours, theirs)}
        computed[int(op.outputs[0])] = raw
    return None


def operands(graph: EditGraph, index: int, known: dict[int, np.ndarray]) -> tuple[list[Operand | None],
                                                                                Operand | None]:
    """Operator `index`'s inputs as edgecc.requantize operands, each with its values from `known` (activations) or
    its constant values, None where it has neither or no quantization; and its first output's quantization, as an
    operand without values (requantize reads only its scales and zero points)."""
    def operand(tensor: int, values: np.ndarray | None) -> Operand | None:
        q = graph.tensors[tensor].quantization
        if values is None or q is None or q.scale is None or not len(q.scale):
            return None
        return Operand(values, np.asarray(q.scale), np.asarray(q.zeroPoint))

    op = graph.op(index)
    inputs = [None if t < 0 else operand(t, known[t] if t in known else graph.constant(t))
              for t in (int(t) for t in op.inputs)]
    return inputs, operand(int(op.outputs[0]), np.zeros(0, np.int8))


def _cause(content: bytes, index: int, computed: dict[int, np.ndarray], ours: np.ndarray,
           theirs: np.ndarray) -> str | None:
    """Why operator `index`'s outputs differ, when edgecc.requantize recomputes it from its inputs: the graph's input,
    its constants, and the earlier operators' outputs `computed` (which both runtimes computed alike: every operator
    before it agreed)."""
    graph = EditGraph(unpack(content))
    inputs, output = operands(graph, index, computed)
    if output is None or any(o is None for o in inputs[:2]):
        return None
    return explain(graph.kinds[index], graph.op(index).builtinOptions, inputs, output, ours, theirs)


def prefix_model(content: bytes, last: int) -> bytes:
    """The model's operators up to `last` (execution order), as a model whose output is that operator's first output
    (without an offline memory plan: its offsets were for the whole graph)."""
    model = unpack(content)
    subgraph = model.subgraphs[0]
    subgraph.operators = subgraph.operators[: last + 1]
    subgraph.outputs = np.array(subgraph.operators[last].outputs[:1], np.int32)
    model.metadata = [entry for entry in model.metadata or [] if entry.name != METADATA_NAME.encode()] or None
    return pack(pruned(model))
