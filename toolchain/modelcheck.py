"""Is a .tflite file a well-formed model? Checked before anything reads it.

The flatbuffers Python package reads fields lazily and trusts every offset, so
a corrupt file can make it read garbage, loop over a billion-element vector or
raise IndexError deep in the reader. This module first walks the flatbuffer with
bounds, like flatbuffers' C++ `Verifier` that LiteRT runs (every offset, vtable,
vector and string inside the file and aligned; a bounded number of tables),
then checks what LiteRT's InterpreterBuilder checks when it builds the graph:
indices in range (-1 is the optional input), known builtin codes and tensor
types, non-negative dimensions, constant buffers inside the file and as large as
the tensor's shape and type say; and what would make a runtime abort the process
instead of refusing the file: tensors read before anything writes them, missing
required inputs, quantization scales LiteRT's fixed-point kernels cannot take, a
TFLite Micro offline memory plan shorter than it says. Each problem is one line
naming where it is.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgecc.errors import EdgeccError

METADATA_NAME = "OfflineMemoryAllocation"  # the metadata entry of TFLite Micro's offline memory plan
QUANTIZED = ("INT8", "UINT8", "INT16", "INT4")  # integer types whose scale turns them into real numbers
MAX_TABLES = 1_000_000  # flatbuffers' Verifier default
MAX_TENSOR_BYTES = 2**31  # LiteRT sizes tensors in int and size_t; a larger one is corrupt, not real
VARIABLE_SIZE_TYPES = {"STRING", "RESOURCE", "VARIANT"}
BITS = {"INT2": 2, "INT4": 4, "UINT4": 4, "BOOL": 8, "INT8": 8, "UINT8": 8, "FLOAT8_E4M3FN": 8, "FLOAT8_E5M2": 8,
        "INT16": 16, "UINT16": 16, "FLOAT16": 16, "BFLOAT16": 16, "INT32": 32, "UINT32": 32, "FLOAT32": 32,
        "INT64": 64, "UINT64": 64, "FLOAT64": 64, "COMPLEX64": 64, "COMPLEX128": 128}


def _fail(message: str) -> None:
    raise EdgeccError(f"model: {message}")


@dataclass(frozen=True)
class _Table:
    """A verified table: its position, its vtable and the size of its inline data."""

    walk: _Walk
    pos: int
    vtable: int
    vtable_size: int
    size: int
    where: str

    def field(self, slot: int, size: int, name: str) -> int | None:
        """Position of field `slot` (a scalar or offset of `size` bytes), or None when absent."""
        entry = 4 + 2 * slot
        if entry + 2 > self.vtable_size:
            return None
        offset = self.walk.unpack("<H", self.vtable + entry)
        if offset == 0:
            return None
        if offset + size > self.size:
            _fail(f"{self.where} {name} lies outside its table")
        self.walk.need(self.pos + offset, size, f"{self.where} {name}")
        return self.pos + offset

    def table(self, slot: int, name: str) -> _Table | None:
        pos = self.field(slot, 4, name)
        return None if pos is None else self.walk.table(self.walk.offset(pos, f"{self.where} {name}"), f"{self.where} {name}")

    def vector(self, slot: int, item: int, name: str) -> tuple[int, int]:
        """(start, length) of a vector field; (0, 0) when absent."""
        pos = self.field(slot, 4, name)
        return (0, 0) if pos is None else self.walk.vector(self.walk.offset(pos, f"{self.where} {name}"), item,
                                                             f"{self.where} {name}")

    def string(self, slot: int, name: str) -> None:
        start, length = self.vector(slot, 1, name)
        if start and self.walk.content[start + length:start + length + 1] != b"\0":
            _fail(f"{self.where} {name} is a string without its terminating zero")
        try:  # flatbuffers strings are UTF-8; LiteRT's Python API fails on any other bytes
            self.walk.content[start:start + length].decode("utf-8")
        except UnicodeDecodeError:
            _fail(f"{self.where} {name} is not UTF-8 text")

    def tables(self, slot: int, name: str) -> list[_Table]:
        start, length = self.vector(slot, 4, name)
        return [self.walk.table(self.walk.offset(start + 4 * i, f"{self.where} {name}[{i}]"), f"{self.where} {name}[{i}]")
                for i in range(length)]


class _Walk:
    """Bounded reads of a flatbuffer: every position is checked before it is read."""

    def __init__(self, content: bytes) -> None:
        self.content = content
        self.tables = 0

    def need(self, pos: int, size: int, where: str, align: int = 0) -> None:
        """`size` bytes at `pos` lie inside the file, aligned as flatbuffers aligns them (`align`, else `size`)."""
        if pos < 0 or pos + size > len(self.content):
            _fail(f"{where} points outside the file (byte {pos} of {len(self.content)})")
        if pos % (align or min(size, 8)):
            _fail(f"{where} is misaligned (byte {pos})")

    def unpack(self, fmt: str, pos: int) -> int:
        return struct.unpack_from(fmt, self.content, pos)[0]

    def offset(self, pos: int, where: str) -> int:
        """Follow the unsigned offset stored at `pos`."""
        self.need(pos, 4, where)
        value = self.unpack("<I", pos)
        if value == 0 or value >= 2**31 or pos + value >= len(self.content):
            _fail(f"{where} points outside the file (offset {value} at byte {pos} of {len(self.content)})")
        return pos + value

    def vector(self, pos: int, item: int, where: str) -> tuple[int, int]:
        self.need(pos, 4, where)
        length = self.unpack("<I", pos)
        if pos + 4 + length * item > len(self.content):
            _fail(f"{where} has {length:,} elements, more than the file holds")
        return pos + 4, length

    def table(self, pos: int, where: str) -> _Table:
        self.tables += 1
        if self.tables > MAX_TABLES:
            _fail(f"more than {MAX_TABLES:,} tables (a corrupt file that repeats them)")
        self.need(pos, 4, where)
        vtable = pos - self.unpack("<i", pos)
        self.need(vtable, 4, f"{where}'s vtable", align=2)
        vtable_size, size = self.unpack("<H", vtable), self.unpack("<H", vtable + 2)
        if vtable_size < 4 or vtable_size % 2 or vtable + vtable_size > len(self.content):
            _fail(f"{where}'s vtable is corrupt (size {vtable_size})")
        if size < 4 or pos + size > len(self.content):
            _fail(f"{where} lies outside the file (size {size} at byte {pos})")
        return _Table(self, pos, vtable, vtable_size, size, where)


def _union(table: _Table, slot: int, name: str) -> None:
    """A union: its type byte, then the table it points at (verified as a table; LiteRT reads its fields)."""
    table.field(slot, 1, f"{name} type")
    table.table(slot + 1, name)


def _walk_structure(content: bytes) -> None:
    """Every table, vector and string edgecc and LiteRT read lies inside the file."""
    walk = _Walk(content)
    model = walk.table(walk.offset(0, "the root offset"), "the model")
    model.field(0, 4, "version")
    for i, code in enumerate(model.tables(1, "operator_codes")):
        code.field(0, 1, "deprecated_builtin_code")
        code.string(1, "custom_code")
        code.field(2, 4, "version")
        code.field(3, 4, "builtin_code")
    for s, subgraph in enumerate(model.tables(2, "subgraphs")):
        for tensor in subgraph.tables(0, "tensors"):
            tensor.vector(0, 4, "shape")
            tensor.field(1, 1, "type")
            tensor.field(2, 4, "buffer")
            tensor.string(3, "name")
            quantization = tensor.table(4, "quantization")
            if quantization is not None:
                for slot, (item, name) in enumerate([(4, "min"), (4, "max"), (4, "scale"), (8, "zero_point")]):
                    quantization.vector(slot, item, name)
                _union(quantization, 4, "details")
                quantization.field(6, 4, "quantized_dimension")
            tensor.field(5, 1, "is_variable")
            tensor.table(6, "sparsity")
            tensor.vector(7, 4, "shape_signature")
            tensor.field(8, 1, "has_rank")
            tensor.tables(9, "variant_tensors")
        subgraph.vector(1, 4, "inputs")
        subgraph.vector(2, 4, "outputs")
        for op in subgraph.tables(3, "operators"):
            op.field(0, 4, "opcode_index")
            for slot, name in ((1, "inputs"), (2, "outputs"), (8, "intermediates")):
                op.vector(slot, 4, name)
            _union(op, 3, "builtin_options")
            op.vector(5, 1, "custom_options")
            op.field(6, 1, "custom_options_format")
            op.vector(7, 1, "mutating_variable_inputs")
            op.field(9, 8, "large_custom_options_offset")
            op.field(10, 8, "large_custom_options_size")
            _union(op, 11, "builtin_options_2")
            op.field(13, 4, "debug_metadata_index")
        subgraph.string(4, "name")
    model.string(3, "description")
    for buffer in model.tables(4, "buffers"):
        buffer.vector(0, 1, "data")
        buffer.field(1, 8, "offset")
        buffer.field(2, 8, "size")
    model.vector(5, 4, "metadata_buffer")
    for metadata in model.tables(6, "metadata"):
        metadata.string(0, "name")
        metadata.field(1, 4, "buffer")
    for signature in model.tables(7, "signature_defs"):
        for slot, name in ((0, "inputs"), (1, "outputs")):
            for tensor_map in signature.tables(slot, name):
                tensor_map.string(0, "name")
                tensor_map.field(1, 4, "tensor_index")
        signature.string(2, "signature_key")
        signature.field(4, 4, "subgraph_index")


def _names(enum: type) -> dict[int, str]:
    return {value: key for key, value in vars(enum).items() if not key.startswith("_")}


def _indices(values: Any, count: int, where: str, optional: bool) -> None:
    for index in (values if values is not None else ()):
        if not (0 <= index < count or (optional and index == -1)):
            _fail(f"{where} names tensor {index}, but the subgraph has {count} tensors")


def offline_plan(data: bytes | None, where: str) -> list[int]:
    """The offsets of an OfflineMemoryAllocation entry (TFLite Micro's offline memory plan: version, subgraph, count,
    then count offsets, each a little-endian 32-bit word), refused whole unless its words are all there, as TFLite
    Micro reads as many as the header says."""
    data = b"" if data is None else bytes(data)
    count = struct.unpack_from("<i", data, 8)[0] if len(data) >= 12 else None
    if len(data) % 4 or count is None or len(data) // 4 != 3 + count:
        raise EdgeccError(f"{where}: the {METADATA_NAME} metadata (TFLite Micro's offline memory plan) is malformed: "
                          f"{len(data)} bytes, not a three-word header and as many 32-bit offsets as it says")
    return list(struct.unpack_from(f"<{count}i", data, 12))


def _stored_bytes(buffer: Any) -> int:
    """The constant data a buffer holds: inside the flatbuffer, or after it (offset and size, for large models)."""
    return len(buffer.data) if buffer.data is not None else (buffer.size if buffer.offset > 1 else 0)


def _check_tensor(model: Any, content: bytes, s: int, i: int, tensor: Any, types: dict[int, str]) -> None:
    where = f"tensor {i} of subgraph {s}"
    if tensor.type not in types:
        _fail(f"{where} has unknown type {tensor.type}")
    dtype = types[tensor.type]
    if not 0 <= tensor.buffer < len(model.buffers):
        _fail(f"{where} reads buffer {tensor.buffer}, but the model has {len(model.buffers)} buffers")
    shape = [int(d) for d in (tensor.shape if tensor.shape is not None else ())]
    if any(d < 0 for d in shape):
        _fail(f"{where} has a negative dimension in its shape {shape}")
    signature = [int(d) for d in (tensor.shapeSignature if tensor.shapeSignature is not None else ())]
    if signature and (len(signature) != len(shape) or any(g != d and g != -1 for g, d in zip(signature, shape))):
        _fail(f"{where}'s shape_signature {signature} does not match its shape {shape} (only -1 may differ)")
    elements = 1
    for d in shape:
        elements *= d
        if elements * BITS.get(dtype, 8) > 8 * MAX_TENSOR_BYTES:
            _fail(f"{where} has an impossible shape {shape} (over {MAX_TENSOR_BYTES:,} bytes)")
    stored = _stored_bytes(model.buffers[tensor.buffer])
    quantization = tensor.quantization
    if quantization is not None and quantization.scale is not None and quantization.zeroPoint is not None:
        scales, zero_points = len(quantization.scale), len(quantization.zeroPoint)
        if scales != zero_points:
            _fail(f"{where} has {scales} quantization scales but {zero_points} zero points")
        # runtimes divide by an activation's scale (a zero output scale makes LiteRT's convolution abort); a
        # constant's channel may have scale 0, all its weights zero, which LiteRT and TFLite Micro both run
        if dtype in QUANTIZED and (odd := [float(v) for v in quantization.scale
                                           if not ((0 <= v) if stored else (0 < v)) or not v < math.inf]):
            _fail(f"{where} ({dtype}) has quantization scale(s) {odd[:4]}; a {'constant' if stored else 'tensor'}'s "
                  f"scale must be {'finite and at least 0' if stored else 'positive and finite'}")
        # a 1-D tensor has one dimension to quantize along, whatever quantized_dimension says: TFLite Micro reads it
        # so (its person_detect example's biases say 3), where LiteRT refuses the model (runtime.litert_view)
        dimension = 0 if len(shape) == 1 else quantization.quantizedDimension
        if scales > 1 and not (0 <= dimension < len(shape) and shape[dimension] == scales):
            _fail(f"{where} has {scales} per-channel scales that do not match dimension "
                  f"{quantization.quantizedDimension} of its shape {shape}")
    if stored and dtype not in VARIABLE_SIZE_TYPES and tensor.sparsity is None:
        expected = -(-elements * BITS[dtype] // 8)
        if stored != expected:
            _fail(f"{where} ({dtype} {shape}) needs {expected:,} bytes of constant data, but buffer {tensor.buffer} "
                  f"holds {stored:,}")


def _check_graph(model: Any, content: bytes) -> None:
    """What LiteRT's InterpreterBuilder refuses: indices, types, shapes, buffers and operator codes."""
    from ai_edge_litert import schema_py_generated as schema

    builtins, types = _names(schema.BuiltinOperator), _names(schema.TensorType)
    subgraphs, buffers = model.subgraphs or [], model.buffers or []
    if not subgraphs:
        _fail("the model has no subgraphs")
    if not buffers:
        _fail("the model has no buffers (buffer 0, the empty one, is required)")
    for b, buffer in enumerate(buffers):
        if buffer.offset > 1 and buffer.offset + buffer.size > len(content):
            _fail(f"buffer {b} lies past the end of the file (bytes {buffer.offset:,}+{buffer.size:,} "
                  f"of {len(content):,})")
    for c, code in enumerate(model.operatorCodes or []):
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        if builtin not in builtins:
            _fail(f"operator code {c} has unknown builtin code {builtin}")
        if builtins[builtin] == "CUSTOM" and not code.customCode:
            _fail(f"operator code {c} is a custom operator without a name")
        if code.version < 1:
            _fail(f"operator code {c} ({builtins[builtin]}) has version {code.version}")
    for s, subgraph in enumerate(subgraphs):
        tensors = subgraph.tensors or []
        for i, tensor in enumerate(tensors):
            _check_tensor(model, content, s, i, tensor, types)
        _indices(subgraph.inputs, len(tensors), f"subgraph {s}'s inputs", optional=False)
        _indices(subgraph.outputs, len(tensors), f"subgraph {s}'s outputs", optional=False)
        kinds: list[str] = []  # each operator's builtin name
        for o, op in enumerate(subgraph.operators or []):
            where = f"operator {o} of subgraph {s}"
            if not 0 <= op.opcodeIndex < len(model.operatorCodes or []):
                _fail(f"{where} uses operator code {op.opcodeIndex}, but the model has "
                      f"{len(model.operatorCodes or [])} operator codes")
            _indices(op.inputs, len(tensors), f"{where}'s inputs", optional=True)
            _indices(op.outputs, len(tensors), f"{where}'s outputs", optional=True)
            _indices(op.intermediates, len(tensors), f"{where}'s intermediates", optional=False)
            code = model.operatorCodes[op.opcodeIndex]
            kind = builtins[max(code.builtinCode, code.deprecatedBuiltinCode)]
            kinds.append(kind)
            inputs = op.inputs if op.inputs is not None else ()
            for k in range(min(len(inputs), 0 if kind == "CUSTOM" else REQUIRED_INPUTS.get(kind, 1))):
                if inputs[k] == -1:
                    _fail(f"{where} ({kind})'s input {k} is -1, no tensor; {kind} needs a tensor there")
            _same_type(kind, op, tensors, types, where)
            _rescale(kind, op, tensors, types, where)
            for options in (op.builtinOptions, op.builtinOptions2):
                for name, value in vars(options).items() if options is not None else ():
                    if name.endswith("SubgraphIndex") and not 0 <= value < len(subgraphs):
                        _fail(f"{where} calls subgraph {value}, but the model has {len(subgraphs)} subgraphs")
        _data_flow(subgraph, buffers, kinds, s)
    for m, metadata in enumerate(model.metadata or []):
        if not 0 <= metadata.buffer < len(buffers):
            _fail(f"metadata {m} reads buffer {metadata.buffer}, but the model has {len(buffers)} buffers")
        if metadata.name == METADATA_NAME.encode():  # TFLite Micro reads it when it loads the model
            offline_plan(buffers[metadata.buffer].data, "model")
    for g, signature in enumerate(model.signatureDefs or []):
        if not 0 <= signature.subgraphIndex < len(subgraphs):
            _fail(f"signature {g} names subgraph {signature.subgraphIndex}, but the model has {len(subgraphs)}")
        count = len(subgraphs[signature.subgraphIndex].tensors or [])
        for tensor_map in (signature.inputs or []) + (signature.outputs or []):
            _indices([tensor_map.tensorIndex], count, f"signature {g}", optional=False)


def _data_flow(subgraph: Any, buffers: list[Any], kinds: list[str], s: int) -> None:
    """Every tensor an operator reads, and every output of the subgraph, is written before it is read: an input, a
    constant, a variable, an empty tensor or an earlier operator's output. LiteRT and TFLite Micro allocate and run a
    model that breaks this, reading memory nothing wrote (LiteRT then refuses to return such an output, "Tensor data
    is null"), so it would pass a check and give no answer, or a wrong one, on the board. A custom operator's inputs
    are exempt: Vela's ethos-u operator takes its scratch memory as inputs, which nothing writes before it runs."""
    tensors = subgraph.tensors or []

    def available(t: int) -> bool:
        tensor = tensors[t]
        return bool(tensor.isVariable or _stored_bytes(buffers[tensor.buffer])
                    or 0 in (tensor.shape if tensor.shape is not None else ()))

    written = {int(t) for t in (subgraph.inputs if subgraph.inputs is not None else ())}
    for o, op in enumerate(subgraph.operators or []):
        for t in (int(t) for t in (op.inputs if op.inputs is not None else ()) if t >= 0):
            # e.g. weights whose buffer index was lost
            if t not in written and not available(t) and kinds[o] != "CUSTOM":
                _fail(f"operator {o} of subgraph {s} reads tensor {t}, which no earlier operator writes (nor is it "
                      f"an input, a constant or a variable; its buffer {tensors[t].buffer} holds no data)")
        written.update(int(t) for t in (op.outputs if op.outputs is not None else ()) if t >= 0)
    for t in (int(t) for t in (subgraph.outputs if subgraph.outputs is not None else ())):
        if t not in written and not available(t):
            _fail(f"subgraph {s}'s output tensor {t} is written by no operator (nor is it an input or a constant)")


# How many leading inputs a builtin operator cannot do without ("-1": no tensor). No builtin operator's first input
# is optional (LiteRT's RSQRT read a missing one and crashed, SIGSEGV); these need more, e.g. FULLY_CONNECTED's weights
# (a missing one crashed LiteRT now and then, SIGSEGV, before its own "was optional but was expected"); a later input,
# such as a bias, may be optional.
REQUIRED_INPUTS = {"FULLY_CONNECTED": 2, "CONV_2D": 2, "DEPTHWISE_CONV_2D": 2, "CONV_3D": 2, "TRANSPOSE_CONV": 3,
                   "BATCH_MATMUL": 2, "ADD": 2, "SUB": 2, "MUL": 2, "DIV": 2, "SQUARED_DIFFERENCE": 2, "MAXIMUM": 2,
                   "MINIMUM": 2}


# Operators that only move or select data: their first input and first output have one type. LiteRT's kernels
# for some of them copy bytes without checking, so a mismatch corrupts memory instead of failing to load.
DATA_MOVES = {"RESHAPE", "SQUEEZE", "EXPAND_DIMS", "TRANSPOSE", "PAD", "PADV2", "SLICE", "STRIDED_SLICE",
              "CONCATENATION", "PACK", "UNPACK", "SPLIT", "GATHER", "MAX_POOL_2D", "SPACE_TO_DEPTH",
              "DEPTH_TO_SPACE", "BROADCAST_TO", "TILE", "REVERSE_V2"}
DATA_INPUT = {"SPLIT": 1}  # SPLIT's first input is its axis, the data comes second (google-coral/test_data split_concat)


def _rescale(kind: str, op: Any, tensors: list[Any], types: dict[int, str], where: str) -> None:
    """LiteRT's 8-bit ADD and SUB rescale in fixed point (add.cc, sub.cc): twice the larger input scale over 2**20
    times the output scale, that product in float32, must lie strictly between 0 and 1, or the kernel aborts the
    process (QuantizeMultiplierSmallerThanOneExp's TFLITE_CHECK) instead of refusing the model."""
    if kind not in ("ADD", "SUB") or op.inputs is None or op.outputs is None:
        return
    if len(op.inputs) != 2 or not len(op.outputs):
        return
    operands = [tensors[t] for t in (*op.inputs, op.outputs[0]) if t >= 0]
    scales = [t.quantization.scale if t.quantization is not None else None for t in operands]
    if len(operands) != 3 or any(types.get(t.type) not in ("INT8", "UINT8") for t in operands) \
            or any(v is None or len(v) != 1 for v in scales):
        return
    (in1,), (in2,), (out,) = (np.asarray(v, np.float32) for v in scales)
    with np.errstate(over="ignore"):
        multiplier = float(2 * max(in1, in2)) / float(np.float32(1 << 20) * out)
    if not 0 < multiplier < 1:
        _fail(f"{where} ({kind}) cannot rescale inputs of scale {float(in1):g} and {float(in2):g} to an output of "
              f"scale {float(out):g}: twice the larger input scale over 2**20 times the output scale is "
              f"{multiplier:g}, and LiteRT's 8-bit {kind} needs it between 0 and 1")


def _same_type(kind: str, op: Any, tensors: list[Any], types: dict[int, str], where: str) -> None:
    inputs = [i for i in (op.inputs if op.inputs is not None else ()) if i >= 0]
    outputs = [o for o in (op.outputs if op.outputs is not None else ()) if o >= 0]
    data = DATA_INPUT.get(kind, 0)
    if kind in DATA_MOVES and len(inputs) > data and outputs and tensors[inputs[data]].type != tensors[outputs[0]].type:
        _fail(f"{where} ({kind}) turns a {types.get(tensors[inputs[data]].type)} tensor into a "
              f"{types.get(tensors[outputs[0]].type)} one; it only moves data, so both must have one type")


def check_model_file(content: bytes) -> None:
    """Raise EdgeccError (one line naming the problem) unless `content` is a well-formed TFLite model."""
    from ai_edge_litert import schema_py_generated as schema

    if len(content) < 8 or content[4:8] != b"TFL3":
        raise EdgeccError("not a TFLite model (the file lacks the TFL3 identifier)")
    _walk_structure(content)
    try:  # the structure is sound; a field inside an options table can still point astray
        model = schema.ModelT.InitFromPackedBuf(content, 0)
    except (IndexError, TypeError, AttributeError, ValueError, struct.error) as err:
        raise EdgeccError(f"model: an operator's options are corrupt ({type(err).__name__}: {err})") from None
    _check_graph(model, content)
