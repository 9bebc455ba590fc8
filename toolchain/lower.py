"""Lowering an int8 TFLite model for the Edge TPU: exact rewrites, then a pipeline of Edge TPU and CPU segments.

The Edge TPU compiler maps one subgraph from the start of a model and only
operators it supports (edgecc.edgetpu). A transformer as the converter writes it
maps almost nothing: every Dense over tokens is a FULLY_CONNECTED with a
multi-dimensional output, the attention core multiplies two activations, and a
text model starts with a GATHER. So, working on the int8 flatbuffer itself (the
same for PTQ and QAT models, reference or the user's):

1. `lower_for_edgetpu` rewrites every FULLY_CONNECTED with constant int8 weights
   as RESHAPE -> CONV_2D 1x1 over (1, rows, 1, depth) -> RESHAPE, with the same
   weight bytes, bias, quantization and fused activation: the same integer
   arithmetic, so the same outputs (tests/test_lower.py compares them), and a
   form the Edge TPU maps. LayerNorm's means (products with a constant column)
   become such convolutions too, so whole norms map.
2. `split_for_edgetpu` schedules the operators into as few alternating segments
   as the data flow allows (every ready operator of the current kind before
   switching) and writes each segment as a model of its own: Edge TPU segments
   (every operator one the Edge TPU maps; compiled together with
   `edgetpu_compiler`, they share the on-chip parameter memory) and CPU islands
   (the attention core, a text model's embedding lookup as the host pre-step).
   Chained in order, the segments compute exactly what the whole model does,
   since every tensor keeps its quantization across the cut.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from edgecc.cost import op_costs
from edgecc.edgetpu import EDGETPU_OPS, compile_command, compiler_rejection, operator_problem, predict_edgetpu
from edgecc.errors import EdgeccError
from edgecc.reader import Graph, read_graph
from edgecc.targets import Target
from edgecc.tflite_edit import add_tensor, is_constant, is_int8, opcode, pack, pruned, reshape_operator, tflite_schema, unpack

CONV_2D_INT8_VERSION = 3  # op_version.cc: int8 CONV_2D with per-channel or per-tensor filters
PIPELINE_FILE = "pipeline.json"
MATRIX_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")  # what is worth an Edge TPU trip


def _convertible(model: Any, op: Any) -> bool:
    """A FULLY_CONNECTED of int8 activations by constant, symmetric int8 weights in the plain layout."""
    schema = tflite_schema()
    code = model.operatorCodes[op.opcodeIndex]
    if max(code.builtinCode, code.deprecatedBuiltinCode) != schema.BuiltinOperator.FULLY_CONNECTED:
        return False
    tensors = model.subgraphs[0].tensors
    x, w = tensors[op.inputs[0]], tensors[op.inputs[1]]
    options = op.builtinOptions
    return (is_constant(model, op.inputs[1]) and not is_constant(model, op.inputs[0])
            and is_int8(x) and is_int8(w) and is_int8(tensors[op.outputs[0]])
            and len(w.shape) == 2 and w.quantization is not None and not np.any(w.quantization.zeroPoint)
            and options is not None and options.weightsFormat == schema.FullyConnectedOptionsWeightsFormat.DEFAULT)


def _as_convolution(model: Any, op: Any) -> list[Any]:
    """RESHAPE -> CONV_2D 1x1 -> RESHAPE computing what the FULLY_CONNECTED `op` computes, from the same weight bytes."""
    schema = tflite_schema()
    tensors = model.subgraphs[0].tensors
    x, w, out = (tensors[i] for i in (op.inputs[0], op.inputs[1], op.outputs[0]))
    units, depth = (int(d) for d in w.shape)
    rows = int(np.prod(x.shape)) // depth
    name = out.name.decode()
    rows_in = add_tensor(model, x, f"{name}/rows", (1, rows, 1, depth))
    rows_out = add_tensor(model, out, f"{name}/conv", (1, rows, 1, units))
    filter_ = add_tensor(model, w, w.name.decode(), (units, 1, 1, depth))
    tensors[filter_].buffer = w.buffer  # the same bytes: (units, depth) row-major is (units, 1, 1, depth)
    bias = op.inputs[2] if len(op.inputs) > 2 else -1
    if bias < 0:  # the int8 CONV_2D kernel wants a bias: zeros at the scale of the products
        like = schema.TensorT()
        like.type = schema.TensorType.INT32
        like.quantization = schema.QuantizationParametersT()
        like.quantization.scale = np.asarray(x.quantization.scale, np.float32) * np.asarray(w.quantization.scale)
        like.quantization.zeroPoint = np.zeros(len(like.quantization.scale), np.int64)
        bias = add_tensor(model, like, f"{name}/bias", (units,), np.zeros(units, "<i4").tobytes())
    conv = schema.OperatorT()
    conv.opcodeIndex = opcode(model, schema.BuiltinOperator.CONV_2D, CONV_2D_INT8_VERSION)
    conv.inputs = np.array([rows_in, filter_, bias], np.int32)
    conv.outputs = np.array([rows_out], np.int32)
    conv.builtinOptionsType = schema.BuiltinOptions.Conv2DOptions
    options = schema.Conv2DOptionsT()
    options.padding = schema.Padding.VALID
    options.strideW = options.strideH = options.dilationWFactor = options.dilationHFactor = 1
    options.fusedActivationFunction = op.builtinOptions.fusedActivationFunction
    conv.builtinOptions = options
    return [reshape_operator(model, int(op.inputs[0]), rows_in), conv, reshape_operator(model, rows_out, int(op.outputs[0]))]


def lower_for_edgetpu(content: bytes) -> bytes:
    """The same int8 model with every FULLY_CONNECTED by constant weights as an exact CONV_2D 1x1 (module docstring)."""
    return _lowered(content)[0]


def _lowered(content: bytes) -> tuple[bytes, tuple[int, ...]]:
    """`lower_for_edgetpu`'s model, and for each of its operators the index of the given model's operator it comes
    from (a rewritten FULLY_CONNECTED gives three), so that figures of the lowered model map back to the file."""
    model = unpack(content)
    subgraph = model.subgraphs[0]
    operators, origins = [], []
    for i, op in enumerate(subgraph.operators):
        replaced = _as_convolution(model, op) if _convertible(model, op) else [op]
        operators += replaced
        origins += [i] * len(replaced)
    if len(operators) == len(subgraph.operators):
        return content, tuple(origins)
    subgraph.operators = operators
    return pack(pruned(model)), tuple(origins)


@dataclass(frozen=True)
class Segment:
    """Operators of the lowered model that one device runs in one go, as a model of their own."""

    index: int
    edgetpu: bool
    operators: tuple[int, ...]  # indices into the lowered model's operators
    inputs: tuple[int, ...]     # the lowered model's tensor indices, in the order of this model's inputs
    outputs: tuple[int, ...]    # the same for its outputs
    macs: int
    content: bytes
    parameter_bytes: int = 0         # constant bytes its operators read (weights, biases)
    cached_parameter_bytes: int = 0  # of those, what the Edge TPU's on-chip memory holds (co-compiled; CPU: 0)

    @property
    def file(self) -> str:
        return f"segment{self.index}_{'tpu' if self.edgetpu else 'cpu'}.tflite"

    @property
    def streamed_parameter_bytes(self) -> int:
        """Parameter bytes an Edge TPU segment streams over the host link every inference (a CPU island: none)."""
        return self.parameter_bytes - self.cached_parameter_bytes if self.edgetpu else 0

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "device": "edgetpu" if self.edgetpu else "cpu", "operators": len(self.operators),
                "macs": self.macs, "parameter_bytes": self.parameter_bytes,
                "cached_parameter_bytes": self.cached_parameter_bytes,
                "streamed_parameter_bytes": self.streamed_parameter_bytes,
                "inputs": list(self.inputs), "outputs": list(self.outputs)}


@dataclass(frozen=True)
class Pipeline:
    """The lowered model as segments run in order; what runs where."""

    segments: tuple[Segment, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    operators: int
    macs: int
    origins: tuple[int, ...] = ()  # per operator of the lowered model, the given model's operator it comes from
    crossing_bytes: int = 0        # activation bytes passed between Edge TPU segments and CPU islands, per inference

    @property
    def edgetpu_files(self) -> list[str]:
        return [s.file for s in self.segments if s.edgetpu]

    @property
    def edgetpu_segments(self) -> int:
        return sum(s.edgetpu for s in self.segments)

    @property
    def edgetpu_operators(self) -> int:
        return sum(len(s.operators) for s in self.segments if s.edgetpu)

    @property
    def edgetpu_mac_share(self) -> float:
        return sum(s.macs for s in self.segments if s.edgetpu) / max(self.macs, 1)

    @property
    def cached_parameter_bytes(self) -> int:
        return sum(s.cached_parameter_bytes for s in self.segments)

    @property
    def streamed_parameter_bytes(self) -> int:
        return sum(s.streamed_parameter_bytes for s in self.segments)

    def on_tpu_of_given(self) -> tuple[bool, ...]:
        """Per operator of the model given to `split_for_edgetpu`: whether the pipeline runs it on the Edge TPU
        (a rewritten FULLY_CONNECTED: when all three of its operators are)."""
        lowered = [False] * len(self.origins)
        for segment in self.segments:
            for i in segment.operators:
                lowered[i] = segment.edgetpu
        given = [True] * (max(self.origins) + 1 if self.origins else 0)
        for origin, on in zip(self.origins, lowered):
            given[origin] = given[origin] and on
        return tuple(given)

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": list(self.inputs), "outputs": list(self.outputs),
            "edgetpu_operators": self.edgetpu_operators, "operators": self.operators,
            "edgetpu_operator_share": round(self.edgetpu_operators / max(self.operators, 1), 4),
            "edgetpu_mac_share": round(self.edgetpu_mac_share, 4),
            "edgetpu_segments": self.edgetpu_segments, "cpu_segments": len(self.segments) - self.edgetpu_segments,
            "cached_parameter_bytes": self.cached_parameter_bytes,
            "streamed_parameter_bytes": self.streamed_parameter_bytes,
            "crossing_bytes": self.crossing_bytes,
            # co-compiled, the Edge TPU segments share the on-chip parameter memory
            "compile": " ".join(compile_command(self.edgetpu_files)),
            "segments": [s.to_json() for s in self.segments],
        }



def _schedule(graph: Graph, on_cpu: list[bool]) -> list[tuple[bool, list[int]]]:
    """Operators in alternating runs of one kind: each run takes every operator of its kind that becomes ready."""
    producer = {t: i for i, op in enumerate(graph.operators) for t in op.outputs}
    needs = [{producer[t] for t in op.inputs if t in producer} for op in graph.operators]
    remaining, done = list(range(len(graph.operators))), set()
    runs: list[tuple[bool, list[int]]] = []
    cpu = on_cpu[0] if on_cpu else False
    while remaining:
        taken: list[int] = []
        for _ in range(len(remaining)):  # a pass per dependency level at most
            ready = [i for i in remaining if on_cpu[i] == cpu and needs[i] <= done]
            if not ready:
                break
            for i in ready:
                if needs[i] <= done:
                    taken.append(i)
                    done.add(i)
            remaining = [i for i in remaining if i not in done]
        if taken:
            runs.append((cpu, taken))
        cpu = not cpu
    return runs


def _host_side(graph: Graph, runs: list[tuple[bool, list[int]]]) -> list[int]:
    """Edge TPU operators that a later CPU island needs when that island reads only what the model's inputs give
    without a matrix operator (a text model's mask arithmetic: GATHER on the ids, then SUM and DIV): on the CPU they
    let the island join the host pre-step instead of cutting the Edge TPU's work in two."""
    producer = {t: i for i, op in enumerate(graph.operators) for t in op.outputs}
    host: list[bool] = []  # no matrix operator in it or before it (operators come in execution order)
    for op in graph.operators:
        host.append(op.kind not in MATRIX_OPS and all(host[producer[t]] for t in op.inputs if t in producer))

    def ancestors(i: int) -> set[int]:
        found, todo = set(), [i]
        while todo:
            for t in graph.operators[todo.pop()].inputs:
                if t in producer and producer[t] not in found:
                    found.add(producer[t])
                    todo.append(producer[t])
        return found

    tpu = {i for cpu, ops in runs if not cpu for i in ops}
    return sorted({j for k, (cpu, ops) in enumerate(runs) if cpu and k > 0 and all(host[i] for i in ops)
                   for i in ops for j in ancestors(i) & tpu})


def _segment_model(content: bytes, graph: Graph, index: int, edgetpu: bool, operators: list[int],
                   later: set[int], macs: int) -> Segment:
    """The operators as a model of their own: inputs are what they read from before, outputs what is read after."""
    model = unpack(content)
    subgraph = model.subgraphs[0]
    produced = {t for i in operators for t in graph.operators[i].outputs}
    inputs = tuple(dict.fromkeys(t for i in operators for t in graph.operators[i].inputs
                                 if t >= 0 and t not in produced and not graph.tensors[t].constant))
    outputs = tuple(t for t in sorted(produced) if t in later)
    subgraph.operators = [subgraph.operators[i] for i in operators]
    subgraph.inputs, subgraph.outputs = np.array(inputs, np.int32), np.array(outputs, np.int32)
    return Segment(index, edgetpu, tuple(operators), inputs, outputs, macs, pack(pruned(model)))


def split_for_edgetpu(content: bytes, target: Target) -> Pipeline:
    """The int8 model, lowered (`lower_for_edgetpu`, which leaves a lowered model as it is), as Edge TPU segments and CPU islands, in as few segments as the
    data flow allows; an Edge TPU segment without a matrix operator (only reshapes or a concatenation between CPU
    operators) is not worth a trip to the accelerator and joins the CPU."""
    if target.edgetpu is None:
        raise EdgeccError(f"--target: {target.name} has no Edge TPU to split the model for")
    content, origins = _lowered(content)
    graph = read_graph(content)
    legal = tuple(target.legal_ops or EDGETPU_OPS)
    # an operator the compiler would refuse the whole model for (the GELU builtin, a too new version) goes to the CPU
    on_cpu = [operator_problem(graph, op, legal) is not None
              or compiler_rejection(Graph((op,), graph.tensors, (), ())) is not None for op in graph.operators]
    macs = [cost.macs for cost in op_costs(graph)]
    while True:
        runs = _schedule(graph, on_cpu)
        idle = [i for cpu, ops in runs if not cpu and not any(graph.operators[j].kind in MATRIX_OPS for j in ops)
                for i in ops] + _host_side(graph, runs)
        if not idle:
            break
        for i in idle:
            on_cpu[i] = True
    segments = []
    free = int(target.edgetpu.onchip_bytes.value)  # co-compiled: the on-chip memory goes to the segments in order
    for k, (cpu, ops) in enumerate(runs):
        later = {t for _, after in runs[k + 1:] for i in after for t in graph.operators[i].inputs} | set(graph.outputs)
        parameters = sum(graph.tensors[t].nbytes for t in {t for i in ops for t in graph.operators[i].inputs
                                                           if t >= 0 and graph.tensors[t].constant})
        segment = _segment_model(content, graph, k, not cpu, ops, later, sum(macs[i] for i in ops))
        segment = replace(segment, parameter_bytes=parameters, cached_parameter_bytes=min(parameters, free) if not cpu else 0)
        if segment.edgetpu:
            free -= segment.cached_parameter_bytes
            plan = predict_edgetpu(read_graph(segment.content), target.edgetpu, legal)
            if not all(plan.on_tpu):  # the rules above are the predictor's own: this would be a bug here
                raise RuntimeError(f"segment {k} is not mapped whole: {next(iter(plan.reasons.values()))}")
        segments.append(segment)
    return Pipeline(tuple(segments), graph.inputs, graph.outputs, len(graph.operators), sum(macs), origins,
                    _crossing_bytes(graph, segments))


def _crossing_bytes(graph: Graph, segments: list[Segment]) -> int:
    """Bytes of the tensors one device computes and the other reads: each crosses the host link once."""
    made_on = {t: s.edgetpu for s in segments for t in s.outputs}
    crossing = {t for s in segments for t in s.inputs if t in made_on and made_on[t] != s.edgetpu}
    return sum(graph.tensors[t].nbytes for t in crossing)
