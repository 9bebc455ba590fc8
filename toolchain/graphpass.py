"""EditGraph passes on the int8 flatbuffer: the same outputs, bit for bit, with less work and fewer tensors.

In the style of Arm Vela's tflite_graph_optimiser: each pass has one signature
(`Pass`: rewrite the model's main subgraph in place, return how many rewrites
it made) and `optimize` runs the list in order until none rewrites anything.
Every pass keeps the same integer arithmetic on the same values, only arranged
with fewer operators, copies and tensors, so the outputs stay bit-exact;
`same_outputs` checks that with LiteRT (and the build keeps a rewrite only then). One pass makes a model runnable rather than smaller: TFLite Micro's
GATHER takes only float32 or int8 tables, so a constant int32 id map (a text
model's trimmed vocabulary) becomes a float32 table and a CAST back.
Attention's per-head products stay FULLY_CONNECTEDs in PASSES: one BATCH_MATMUL over the heads is bit-exact on
TFLite Micro (both kernels rescale alike there) but not on LiteRT, whose FULLY_CONNECTED with an activation as
weights rounds the rescaled sums differently from its BATCH_MATMUL (off by one on a few values in a thousand).
So that rewrite, `heads_as_batch_matmul`, is in MICRO_PASSES, which a TFLite Micro target's build runs after
PASSES and verifies with TFLite Micro's interpreter instead of LiteRT.
Nothing here needs TensorFlow.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgecc.memplan import METADATA_NAME
from edgecc.tflite_edit import add_tensor, opcode, pack, pruned, reshape_operator, tflite_schema, unpack

FLOAT_EXACT_LIMIT = 2**24  # every integer up to this magnitude is exact in float32
MAX_ROUNDS = 10
MAX_REWRITES = 10_000  # per pass and round
OPTIONS_TABLES = {"BATCH_MATMUL": "BatchMatMulOptions"}  # where the schema's name is not the kind in CamelCase


class EditGraph:
    """The main subgraph of a ModelT with its operator kinds, producers and consumers (rebuilt after each edit)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.subgraph = model.subgraphs[0]
        self.tensors = self.subgraph.tensors
        names = {value: key for key, value in vars(tflite_schema().BuiltinOperator).items() if not key.startswith("_")}
        codes = model.operatorCodes
        self.kinds = [names.get(max(codes[op.opcodeIndex].builtinCode, codes[op.opcodeIndex].deprecatedBuiltinCode), "")
                      for op in self.subgraph.operators]
        self.producer: dict[int, int] = {}
        self.consumers: dict[int, list[int]] = {}
        for index, op in enumerate(self.subgraph.operators):
            for tensor in op.outputs:
                self.producer[int(tensor)] = index
            for tensor in op.inputs:
                if tensor >= 0:
                    self.consumers.setdefault(int(tensor), []).append(index)
        self.ends = {int(t) for t in self.subgraph.inputs} | {int(t) for t in self.subgraph.outputs}

    def op(self, index: int) -> Any:
        return self.subgraph.operators[index]

    def shape(self, tensor: int) -> tuple[int, ...]:
        return tuple(int(d) for d in self.tensors[tensor].shape)

    def constant(self, tensor: int) -> np.ndarray | None:
        """The values of a constant tensor (None for an activation, or a type no pass reads)."""
        data = self.model.buffers[self.tensors[tensor].buffer].data
        if data is None or len(data) == 0:
            return None
        types = tflite_schema().TensorType
        dtype = {types.INT32: "<i4", types.INT64: "<i8", types.FLOAT32: "<f4", types.INT8: "i1"}.get(
            self.tensors[tensor].type)
        if dtype is None:
            return None
        return np.frombuffer(np.asarray(data, np.uint8).tobytes(), dtype).reshape(self.shape(tensor))

    def only_use(self, tensor: int, index: int) -> bool:
        """Is operator `index` the only reader of `tensor`, which is neither a graph input nor output?"""
        return self.consumers.get(tensor) == [index] and tensor not in self.ends

    def single_consumer(self, tensor: int, kind: str) -> int | None:
        """The operator of `kind` that alone reads the intermediate `tensor`, if so."""
        readers = self.consumers.get(tensor, [])
        if len(readers) == 1 and tensor not in self.ends and self.kinds[readers[0]] == kind:
            return readers[0]
        return None

    def remove(self, *indices: int) -> None:
        self.subgraph.operators = [op for i, op in enumerate(self.subgraph.operators) if i not in indices]


def _same_quantization(a: Any, b: Any) -> bool:
    qa, qb = a.quantization, b.quantization

    def params(q: Any) -> tuple[tuple[float, ...], tuple[int, ...]]:
        if q is None or q.scale is None:
            return (), ()
        return tuple(float(s) for s in q.scale), tuple(int(z) for z in q.zeroPoint)
    return a.type == b.type and params(qa) == params(qb)


def _rewire(graph: EditGraph, old: int, new: int) -> None:
    """Every reader of tensor `old` reads `new` instead."""
    for index in graph.consumers.get(old, []):
        op = graph.op(index)
        op.inputs = np.array([new if int(t) == old else int(t) for t in op.inputs], np.int32)


def drop_identities(graph: EditGraph) -> int:
    """A RESHAPE to its input's own shape, or a QUANTIZE to its input's own type and quantization, copies bytes."""
    for index, kind in enumerate(graph.kinds):
        op = graph.op(index)
        if kind not in ("RESHAPE", "QUANTIZE"):
            continue
        source, target = int(op.inputs[0]), int(op.outputs[0])
        if target in graph.ends or not _same_quantization(graph.tensors[source], graph.tensors[target]):
            continue
        if graph.shape(source) == graph.shape(target):
            _rewire(graph, target, source)
            graph.remove(index)
            return 1
    return 0


def merge_reshapes(graph: EditGraph) -> int:
    """RESHAPE -> RESHAPE is one RESHAPE to the second's shape (the bytes never move)."""
    for index, kind in enumerate(graph.kinds):
        if kind != "RESHAPE":
            continue
        source = int(graph.op(index).inputs[0])
        first = graph.producer.get(source)
        if first is not None and graph.kinds[first] == "RESHAPE" and graph.only_use(source, index):
            op = graph.op(index)
            op.inputs = np.array([int(graph.op(first).inputs[0]), *op.inputs[1:]], np.int32)
            graph.remove(first)
            return 1
    return 0


def _kept_order(perm: tuple[int, ...], axis: int) -> bool:
    """Does `perm` without its entry `axis` keep the remaining axes in order?"""
    rest = [p for i, p in enumerate(perm) if i != axis]
    return rest == sorted(rest)


def unpack_through_transpose(graph: EditGraph) -> int:
    """TRANSPOSE -> UNPACK(axis a) is UNPACK(axis perm[a]) of the TRANSPOSE's input when the other axes keep
    their order (attention's per-head split of queries and keys): one copy of the whole tensor less."""
    for index, kind in enumerate(graph.kinds):
        if kind != "TRANSPOSE":
            continue
        op = graph.op(index)
        perm = graph.constant(int(op.inputs[1]))
        unpack_index = graph.single_consumer(int(op.outputs[0]), "UNPACK")
        if perm is None or unpack_index is None:
            continue
        perm = tuple(int(p) for p in perm)
        unpack_op = graph.op(unpack_index)
        axis = unpack_op.builtinOptions.axis % len(perm)
        if _kept_order(perm, axis):
            unpack_op.inputs = np.array([int(op.inputs[0])], np.int32)
            unpack_op.builtinOptions.axis = perm[axis]
            graph.remove(index)
            return 1
    return 0


def _split_groups(shape: tuple[int, ...], refined: tuple[int, ...]) -> list[list[int]] | None:
    """`refined`'s dimensions grouped per axis of `shape` (each group's product is that axis), or None when
    `refined` is not `shape` with axes split and 1s added or dropped."""
    groups: list[list[int]] = []
    position = 0
    for size in shape:
        group: list[int] = []
        product = 1
        while product < size:
            if position == len(refined) or size % (product * refined[position]):
                return None
            product *= refined[position]
            group.append(refined[position])
            position += 1
        groups.append(group)
    rest = refined[position:]
    if not groups or any(d != 1 for d in rest):
        return None
    groups[-1].extend(rest)
    return groups


def reshape_through_transpose(graph: EditGraph) -> int:
    """RESHAPE -> TRANSPOSE -> RESHAPE that only splits the transposed axes is RESHAPE -> TRANSPOSE, the split
    done before the transpose on the axes it comes from (attention's values, split per head): one operator less."""
    for index, kind in enumerate(graph.kinds):
        if kind != "TRANSPOSE":
            continue
        op = graph.op(index)
        source, transposed = int(op.inputs[0]), int(op.outputs[0])
        before, after = graph.producer.get(source), graph.single_consumer(transposed, "RESHAPE")
        perm = graph.constant(int(op.inputs[1]))
        if before is None or graph.kinds[before] != "RESHAPE" or not graph.only_use(source, index) \
                or after is None or perm is None:
            continue
        perm = tuple(int(p) for p in perm)
        target = int(graph.op(after).outputs[0])
        groups = _split_groups(graph.shape(transposed), graph.shape(target))
        if groups is None:
            continue
        inverse = {p: j for j, p in enumerate(perm)}
        new_source = [d for axis in range(len(perm)) for d in groups[inverse[axis]]]
        starts, offset = {}, 0
        for axis in range(len(perm)):
            starts[axis] = offset
            offset += len(groups[inverse[axis]])
        new_perm = [starts[perm[j]] + k for j in range(len(perm)) for k in range(len(groups[j]))]
        _set_reshape(graph, before, source, tuple(new_source))
        op.inputs = np.array([source, _int32_constant(graph, f"{graph.tensors[target].name.decode()}/perm", new_perm)],
                             np.int32)
        op.outputs = np.array([target], np.int32)
        graph.remove(after)
        return 1
    return 0


def _int32_constant(graph: EditGraph, name: str, values: list[int]) -> int:
    like = tflite_schema().TensorT()
    like.type = tflite_schema().TensorType.INT32
    return add_tensor(graph.model, like, name, (len(values),), np.array(values, "<i4").tobytes())


def _set_reshape(graph: EditGraph, index: int, tensor: int, shape: tuple[int, ...]) -> None:
    """RESHAPE `index` now writes `shape` into its output `tensor`."""
    graph.tensors[tensor].shape = np.array(shape, np.int32)
    graph.tensors[tensor].shapeSignature = None
    op = graph.op(index)
    op.inputs = np.array([int(op.inputs[0]), _int32_constant(graph, f"{graph.tensors[tensor].name.decode()}/shape",
                                                             list(shape))], np.int32)
    if op.builtinOptions is not None:
        op.builtinOptions.newShape = np.array(shape, np.int32)


def _through_reshapes(graph: EditGraph, tensor: int, kind: str) -> tuple[list[int], int] | None:
    """The RESHAPEs that alone carry `tensor` to the single operator of `kind` after them, and that operator."""
    passed: list[int] = []
    while True:
        reader = graph.single_consumer(tensor, "RESHAPE")
        if reader is None:
            end = graph.single_consumer(tensor, kind)
            return (passed, end) if end is not None else None
        passed.append(reader)
        tensor = int(graph.op(reader).outputs[0])


def _leading_axis(shape: tuple[int, ...], axis: int) -> bool:
    """Are the blocks along `axis` contiguous in memory (every axis before it of size 1)?"""
    return all(d == 1 for d in shape[:axis % len(shape)])


def softmax_per_part(graph: EditGraph) -> int:
    """CONCATENATION -> RESHAPEs -> SOFTMAX -> RESHAPEs -> UNPACK giving back the same parts is one SOFTMAX per
    part (attention's scores over its heads): softmax works row by row, so no row needs its neighbours."""
    for index, kind in enumerate(graph.kinds):
        if kind != "CONCATENATION":
            continue
        concat = graph.op(index)
        joined = int(concat.outputs[0])
        parts = [int(t) for t in concat.inputs]
        first = _through_reshapes(graph, joined, "SOFTMAX")
        if first is None or concat.builtinOptions.fusedActivationFunction != 0 \
                or not _leading_axis(graph.shape(joined), concat.builtinOptions.axis):
            continue
        reshapes_in, softmax = first
        second = _through_reshapes(graph, int(graph.op(softmax).outputs[0]), "UNPACK")
        if second is None:
            continue
        reshapes_out, unpack = second
        unpacked = graph.op(unpack)
        outs = [int(t) for t in unpacked.outputs]
        row = graph.shape(int(graph.op(softmax).inputs[0]))[-1]
        if len(outs) != len(parts) or not _leading_axis(graph.shape(int(unpacked.inputs[0])),
                                                        unpacked.builtinOptions.axis) \
                or any(graph.shape(p) != graph.shape(o) or graph.shape(p)[-1] != row for p, o in zip(parts, outs)) \
                or not all(_same_quantization(graph.tensors[p], graph.tensors[joined]) for p in parts):
            continue
        template = graph.op(softmax)
        per_part = []
        for part, out in zip(parts, outs):
            op = copy.deepcopy(template)
            op.inputs, op.outputs = np.array([part], np.int32), np.array([out], np.int32)
            per_part.append(op)
        operators = graph.subgraph.operators
        graph.subgraph.operators = operators[:unpack] + per_part + operators[unpack + 1:]
        graph.remove(index, *reshapes_in, softmax, *reshapes_out)
        return 1
    return 0


def _swappable_product(graph: EditGraph, index: int) -> bool:
    """Is operator `index` a FULLY_CONNECTED of two per-tensor int8 activations, 2-D, without bias: a product of
    activations (attention's scores times values), whose two operands can trade places?"""
    if graph.kinds[index] != "FULLY_CONNECTED":
        return False
    op = graph.op(index)
    operands = [int(t) for t in op.inputs[:2]]
    bias = int(op.inputs[2]) if len(op.inputs) > 2 else -1
    options, schema = op.builtinOptions, tflite_schema()
    return (bias < 0 and not options.keepNumDims
            and options.weightsFormat == schema.FullyConnectedOptionsWeightsFormat.DEFAULT
            and all(len(graph.shape(t)) == 2 and graph.constant(t) is None
                    and graph.tensors[t].type == schema.TensorType.INT8
                    and graph.tensors[t].quantization is not None and len(graph.tensors[t].quantization.scale) == 1
                    for t in operands))


def transpose_into_products(graph: EditGraph) -> int:
    """CONCATENATION(axis 0) of products x_h . w_h^T -> TRANSPOSE(1, 0) is the CONCATENATION(axis 1) of the products
    w_h . x_h^T, the operands traded: the same integer sums, already transposed (attention's heads joined)."""
    for index, kind in enumerate(graph.kinds):
        if kind != "CONCATENATION" or graph.op(index).builtinOptions.fusedActivationFunction != 0:
            continue
        concat = graph.op(index)
        joined = int(concat.outputs[0])
        transpose = graph.single_consumer(joined, "TRANSPOSE")
        parts = [int(t) for t in concat.inputs]
        producers = [graph.producer.get(t) for t in parts]
        if transpose is None or len(graph.shape(joined)) != 2 or concat.builtinOptions.axis % 2 != 0 \
                or any(p is None or not _swappable_product(graph, p) or not graph.only_use(t, index)
                       for p, t in zip(producers, parts)):
            continue
        perm = graph.constant(int(graph.op(transpose).inputs[1]))
        if perm is None or tuple(int(p) for p in perm) != (1, 0):
            continue
        for producer, part in zip(producers, parts):
            op = graph.op(producer)
            op.inputs = np.array([int(op.inputs[1]), int(op.inputs[0]), *op.inputs[2:]], np.int32)
            graph.tensors[part].shape = np.array(graph.shape(part)[::-1], np.int32)
            graph.tensors[part].shapeSignature = None
        concat.builtinOptions.axis = 1
        concat.outputs = np.array([int(graph.op(transpose).outputs[0])], np.int32)
        graph.remove(transpose)
        return 1
    return 0


def gather_ids_for_micro(graph: EditGraph) -> int:
    """GATHER from a constant int32 table (a trimmed vocabulary's id map) as a float32 table and a CAST to int32:
    TFLite Micro's GATHER refuses int32 tables, takes float32 ones, and every id below 2^24 is exact in float32."""
    schema = tflite_schema()
    for index, kind in enumerate(graph.kinds):
        if kind != "GATHER":
            continue
        op = graph.op(index)
        if graph.tensors[int(op.inputs[0])].type != schema.TensorType.INT32:
            continue
        table = graph.constant(int(op.inputs[0]))
        if table is None or np.abs(table.astype(np.int64)).max(initial=0) >= FLOAT_EXACT_LIMIT:
            continue
        output = int(op.outputs[0])
        like = copy.deepcopy(graph.tensors[output])
        like.type, like.quantization = schema.TensorType.FLOAT32, None
        name = graph.tensors[output].name.decode()
        floats = add_tensor(graph.model, like, f"{name}/float_table", table.shape, table.astype("<f4").tobytes())
        gathered = add_tensor(graph.model, like, f"{name}/float", graph.shape(output))
        op.inputs = np.array([floats, *op.inputs[1:]], np.int32)
        op.outputs = np.array([gathered], np.int32)
        cast = _operator(graph, "CAST", 1, [gathered], [output], inDataType=schema.TensorType.FLOAT32,
                         outDataType=schema.TensorType.INT32)
        graph.subgraph.operators.insert(index + 1, cast)
        return 1
    return 0


def _operator(graph: EditGraph, kind: str, version: int, inputs: list[int], outputs: list[int], **options: Any) -> Any:
    """A new operator of builtin `kind` (its `<Kind>Options` table, when it has one, set from `options`)."""
    schema = tflite_schema()
    op = schema.OperatorT()
    op.opcodeIndex = opcode(graph.model, getattr(schema.BuiltinOperator, kind), version)
    op.inputs, op.outputs = np.array(inputs, np.int32), np.array(outputs, np.int32)
    table = OPTIONS_TABLES.get(kind) or "".join(word.capitalize() for word in kind.split("_")) + "Options"
    if hasattr(schema.BuiltinOptions, table):
        op.builtinOptionsType = getattr(schema.BuiltinOptions, table)
        op.builtinOptions = getattr(schema, f"{table}T")()
        for name, value in options.items():
            setattr(op.builtinOptions, name, value)
    return op


def _unpacked(graph: EditGraph, parts: list[int], axis: int | None = None) -> int | None:
    """The UNPACK whose outputs are exactly `parts`, in order, each read by one operator and quantized as its input
    (along `axis`, if given)."""
    producer = graph.producer.get(parts[0])
    if producer is None or graph.kinds[producer] != "UNPACK":
        return None
    op = graph.op(producer)
    source = int(op.inputs[0])
    if [int(t) for t in op.outputs] != parts:
        return None
    for part in parts:
        if len(graph.consumers.get(part, [])) != 1 or part in graph.ends \
                or not _same_quantization(graph.tensors[part], graph.tensors[source]):
            return None
    return producer if axis is None or op.builtinOptions.axis % len(graph.shape(source)) == axis else None


def _heads_first(graph: EditGraph, unpack_index: int, name: str) -> tuple[int, list[Any]]:
    """The tensor an UNPACK splits into heads, with its heads axis moved first (a TRANSPOSE, unless it is first)."""
    op = graph.op(unpack_index)
    source = int(op.inputs[0])
    shape = graph.shape(source)
    axis = op.builtinOptions.axis % len(shape)
    if axis == 0:
        return source, []
    perm = [axis] + [a for a in range(len(shape)) if a != axis]
    moved = add_tensor(graph.model, graph.tensors[source], name, tuple(shape[a] for a in perm))
    return moved, [_operator(graph, "TRANSPOSE", 2, [source, _int32_constant(graph, f"{name}/perm", perm)], [moved])]


def heads_as_batch_matmul(graph: EditGraph) -> int:
    """Attention's per-head products (FULLY_CONNECTEDs of two activations, a SOFTMAX each, the heads joined by a
    CONCATENATION) as two BATCH_MATMULs over the heads and one SOFTMAX, all heads at once: about four operators
    and six tensors fewer per head. Both BATCH_MATMULs take their right operand transposed (adj_y), so TFLite
    Micro keeps no transposed copy of it in its persistent arena. For TFLite Micro only: its BATCH_MATMUL rescales
    the sums as its FULLY_CONNECTED does (bit for bit), LiteRT's does not (`optimize_verified` checks with the
    target's interpreter)."""
    for index, kind in enumerate(graph.kinds):
        if kind != "CONCATENATION" or graph.op(index).builtinOptions.fusedActivationFunction != 0:
            continue
        concat = graph.op(index)
        joined, parts = int(concat.outputs[0]), [int(t) for t in concat.inputs]
        contexts = [graph.producer.get(t) for t in parts]
        if len(parts) < 2 or len(graph.shape(joined)) != 2 or concat.builtinOptions.axis % 2 != 1 \
                or any(p is None or not _swappable_product(graph, p) or not graph.only_use(t, index)
                       for p, t in zip(contexts, parts)):
            continue
        probs = [int(graph.op(p).inputs[0]) for p in contexts]
        values = _unpacked(graph, [int(graph.op(p).inputs[1]) for p in contexts], axis=0)
        softmaxes = [graph.producer.get(t) for t in probs]
        if values is None or any(s is None or graph.kinds[s] != "SOFTMAX" or not graph.only_use(t, p)
                                 for s, t, p in zip(softmaxes, probs, contexts)):
            continue
        scores = [int(graph.op(s).inputs[0]) for s in softmaxes]
        products = [graph.producer.get(t) for t in scores]
        if any(p is None or not _swappable_product(graph, p) or not graph.only_use(t, s)
               for p, t, s in zip(products, scores, softmaxes)):
            continue
        queries = _unpacked(graph, [int(graph.op(p).inputs[0]) for p in products])
        keys = _unpacked(graph, [int(graph.op(p).inputs[1]) for p in products])
        betas = {float(graph.op(s).builtinOptions.beta) for s in softmaxes}
        if queries is None or keys is None or len(betas) != 1 or not all(
                _same_quantization(graph.tensors[group[0]], graph.tensors[t]) for group in (scores, probs, parts)
                for t in group) or not _same_quantization(graph.tensors[parts[0]], graph.tensors[joined]):
            continue
        name = graph.tensors[joined].name.decode()
        q, to_q = _heads_first(graph, queries, f"{name}/queries")
        k, to_k = _heads_first(graph, keys, f"{name}/keys")
        heads, tokens, width = graph.shape(q)[0], graph.shape(q)[1], graph.shape(parts[0])[1]
        s = add_tensor(graph.model, graph.tensors[scores[0]], f"{name}/scores", (heads, tokens, tokens))
        p = add_tensor(graph.model, graph.tensors[probs[0]], f"{name}/probs", (heads, tokens, tokens))
        c = add_tensor(graph.model, graph.tensors[parts[0]], f"{name}/contexts", (heads, tokens, width))
        ct = add_tensor(graph.model, graph.tensors[parts[0]], f"{name}/contexts_t", (tokens, heads, width))
        first = [*to_q, *to_k, _operator(graph, "BATCH_MATMUL", 2, [q, k], [s], adjX=False, adjY=True),
                 _operator(graph, "SOFTMAX", 2, [s], [p], beta=betas.pop())]
        last = [_operator(graph, "BATCH_MATMUL", 2, [p, int(graph.op(values).inputs[0])], [c], adjX=False, adjY=True),
                _operator(graph, "TRANSPOSE", 2, [c, _int32_constant(graph, f"{name}/perm", [1, 0, 2])], [ct]),
                reshape_operator(graph.model, ct, joined)]
        gone = {queries, keys, values, *products, *softmaxes, *contexts, index}
        start = min(products)
        operators = []
        for i, op in enumerate(graph.subgraph.operators):
            operators += first if i == start else []
            operators += last if i == index else []
            operators += [] if i in gone else [op]
        graph.subgraph.operators = operators
        return 1
    return 0


Pass = Callable[[EditGraph], int]
Runner = Callable[[bytes, list[list[np.ndarray]]], list[list[np.ndarray]]]  # a model's outputs for input sets
PASSES: tuple[Pass, ...] = (gather_ids_for_micro, drop_identities, unpack_through_transpose,
                            reshape_through_transpose, merge_reshapes, softmax_per_part, transpose_into_products)
# exact on TFLite Micro only, so run after PASSES on a TFLite Micro target's graph and verified with its interpreter
MICRO_PASSES: tuple[Pass, ...] = (heads_as_batch_matmul, drop_identities, merge_reshapes)


@dataclass
class PassReport:
    """Operators and tensors before and after, and how many rewrites each pass made."""

    operators_before: int
    tensors_before: int
    operators_after: int = 0
    tensors_after: int = 0
    rewrites: dict[str, int] = field(default_factory=dict)
    skipped: str | None = None  # why nothing was tried (several subgraphs), or why the rewrite was not kept

    def then(self, later: PassReport) -> PassReport:
        """This report followed by `later`'s, made on the graph this one left."""
        rewrites = dict(self.rewrites)
        for name, count in later.rewrites.items():
            rewrites[name] = rewrites.get(name, 0) + count
        return PassReport(self.operators_before, self.tensors_before, later.operators_after, later.tensors_after,
                          rewrites, "; ".join(filter(None, (self.skipped, later.skipped))) or None)

    def to_json(self) -> dict[str, Any]:
        return {"operators": [self.operators_before, self.operators_after],
                "tensors": [self.tensors_before, self.tensors_after], "rewrites": self.rewrites,
                "skipped": self.skipped}


def optimize(content: bytes, passes: tuple[Pass, ...] = PASSES) -> tuple[bytes, PassReport]:
    """`content` with `passes` run in order until none rewrites anything; the same bytes when none applies."""
    model = unpack(content)
    subgraph = model.subgraphs[0]
    report = PassReport(len(subgraph.operators), len(subgraph.tensors))
    report.operators_after, report.tensors_after = report.operators_before, report.tensors_before
    if len(model.subgraphs) != 1:
        report.skipped = f"{len(model.subgraphs)} subgraphs: the passes rewrite single-subgraph models only"
        return content, report
    if any(entry.name == METADATA_NAME.encode() for entry in model.metadata or []):
        # its offsets are indexed by tensor number: renumbered tensors would share buffers they must not
        report.skipped = f"the model carries an offline memory plan ({METADATA_NAME}): plan after the passes"
        return content, report
    for _ in range(MAX_ROUNDS):
        changed = 0
        for rewrite in passes:
            for _ in range(MAX_REWRITES):  # each rewrite removes or settles something: a bound, not a budget
                count = rewrite(EditGraph(model))
                if not count:
                    break
                report.rewrites[rewrite.__name__] = report.rewrites.get(rewrite.__name__, 0) + count
                changed += count
        if not changed:
            break
    if not report.rewrites:
        return content, report
    model = pruned(model)
    report.operators_after, report.tensors_after = len(model.subgraphs[0].operators), len(model.subgraphs[0].tensors)
    return pack(model), report


def optimize_verified(content: bytes, passes: tuple[Pass, ...] = PASSES, checks: int = 8,
                      run: Runner | None = None) -> tuple[bytes, PassReport]:
    """`optimize`, its result kept only when the interpreter `run` (LiteRT's `outputs` by default) gives
    bit-identical outputs on `checks` random inputs: a pass that went wrong costs the rewrite, never a different
    model (the report says so)."""
    rewritten, report = optimize(content, passes)
    if rewritten is not content and not same_outputs(content, rewritten, random_inputs(content, checks), run):
        report.skipped = "the rewritten graph's outputs differed from the original's: the original kept"
        report.operators_after, report.tensors_after = report.operators_before, report.tensors_before
        return content, report
    return rewritten, report


def random_inputs(content: bytes, count: int, seed: int = 0) -> list[list[np.ndarray]]:
    """`count` random input sets across each input's whole range (token ids within the rows of the tables they index)."""
    from edgecc.runtime import load_interpreter

    interpreter = load_interpreter(content)
    graph = EditGraph(unpack(content))
    rows = [graph.shape(int(graph.op(i).inputs[0]))[0] for i, kind in enumerate(graph.kinds)
            if kind == "GATHER" and int(graph.op(i).inputs[1]) in graph.ends]  # the tables the input ids index
    rng = np.random.default_rng(seed)
    sets = []
    for _ in range(count):
        values = []
        for detail in interpreter.get_input_details():
            dtype = np.dtype(detail["dtype"])
            if dtype.kind == "f":
                values.append(rng.standard_normal(detail["shape"]).astype(dtype))
            elif dtype == np.int32:  # token ids
                values.append(rng.integers(0, min(rows) if rows else 2, detail["shape"]).astype(dtype))
            else:
                info = np.iinfo(dtype)
                values.append(rng.integers(info.min, info.max + 1, detail["shape"]).astype(dtype))
        sets.append(values)
    return sets


def outputs(content: bytes, inputs: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
    """Every output of the model for each input set, with LiteRT."""
    from edgecc.runtime import load_interpreter

    interpreter = load_interpreter(content)
    results = []
    for values in inputs:
        for detail, value in zip(interpreter.get_input_details(), values):
            interpreter.set_tensor(detail["index"], value)
        interpreter.invoke()
        results.append([interpreter.get_tensor(d["index"]).copy() for d in interpreter.get_output_details()])
    return results


def same_outputs(original: bytes, rewritten: bytes, inputs: list[list[np.ndarray]], run: Runner | None = None) -> bool:
    """Do both models give every output bit for bit the same on `inputs` (with `run`, by default LiteRT)?"""
    run = run or outputs
    return all(a.dtype == b.dtype and np.array_equal(a, b)
               for one, two in zip(run(original, inputs), run(rewritten, inputs)) for a, b in zip(one, two))
