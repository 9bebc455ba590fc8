"""Editing a TFLite flatbuffer in place: the object API of LiteRT's schema, and the few edits the graph passes share.

`unpack` gives the mutable object tree (ModelT) of a .tflite file, `pack` writes
it back; the helpers add operator codes, tensors and RESHAPEs, and `pruned` drops
what no operator uses any more. Used by the Edge TPU lowering (edgecc.lower) and
any pass that rewrites the int8 graph; nothing here needs TensorFlow.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np


def tflite_schema() -> Any:
    from ai_edge_litert import schema_py_generated as schema

    return schema


def unpack(content: bytes) -> Any:
    """The mutable object tree of a .tflite file."""
    return tflite_schema().ModelT.InitFromPackedBuf(content, 0)


def pack(model: Any) -> bytes:
    import flatbuffers

    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def opcode(model: Any, builtin: int, version: int) -> int:
    """The index of the operator code (builtin, version), added when the model has none."""
    schema = tflite_schema()
    for i, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin and code.version == version:
            return i
    code = schema.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), version
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def add_tensor(model: Any, like: Any, name: str, shape: tuple[int, ...], data: bytes | None = None) -> int:
    """A new tensor of the main subgraph with `like`'s type and quantization; a constant when `data` is given."""
    schema = tflite_schema()
    tensor = copy.deepcopy(like)
    tensor.name, tensor.shape, tensor.shapeSignature = name.encode(), np.array(shape, np.int32), None
    tensor.buffer = 0
    if data is not None:
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(data, np.uint8)
        model.buffers.append(buffer)
        tensor.buffer = len(model.buffers) - 1
    model.subgraphs[0].tensors.append(tensor)
    return len(model.subgraphs[0].tensors) - 1


def shape_constant(model: Any, name: str, shape: tuple[int, ...]) -> int:
    schema = tflite_schema()
    like = schema.TensorT()
    like.type = schema.TensorType.INT32
    return add_tensor(model, like, name, (len(shape),), np.array(shape, "<i4").tobytes())


def reshape_operator(model: Any, source: int, target: int) -> Any:
    """A RESHAPE from tensor `source` to tensor `target`'s shape."""
    schema = tflite_schema()
    tensors = model.subgraphs[0].tensors
    shape = tuple(int(d) for d in tensors[target].shape)
    op = schema.OperatorT()
    op.opcodeIndex = opcode(model, schema.BuiltinOperator.RESHAPE, 1)
    op.inputs = np.array([source, shape_constant(model, f"{tensors[target].name.decode()}/shape", shape)], np.int32)
    op.outputs = np.array([target], np.int32)
    op.builtinOptionsType = schema.BuiltinOptions.ReshapeOptions
    op.builtinOptions = schema.ReshapeOptionsT()
    op.builtinOptions.newShape = np.array(shape, np.int32)
    return op


def is_int8(tensor: Any) -> bool:
    return tensor.type == tflite_schema().TensorType.INT8


def is_constant(model: Any, index: int) -> bool:
    data = model.buffers[model.subgraphs[0].tensors[index].buffer].data
    return data is not None and len(data) > 0


def pruned(model: Any) -> Any:
    """`model` without the tensors, buffers and operator codes nothing uses any more (indices renumbered)."""
    subgraph = model.subgraphs[0]
    used = sorted({int(i) for op in subgraph.operators for i in (*op.inputs, *op.outputs) if i >= 0}
                  | {int(i) for i in subgraph.inputs} | {int(i) for i in subgraph.outputs})
    tensor_index = {old: new for new, old in enumerate(used)}
    subgraph.tensors = [subgraph.tensors[i] for i in used]
    tensors = [t for graph in model.subgraphs for t in graph.tensors or []]  # other subgraphs share the buffers
    kept_buffers = sorted({0} | {t.buffer for t in tensors} | {m.buffer for m in (model.metadata or [])})
    buffer_index = {old: new for new, old in enumerate(kept_buffers)}
    model.buffers = [model.buffers[i] for i in kept_buffers]
    for tensor in tensors:
        tensor.buffer = buffer_index[tensor.buffer]
    for entry in model.metadata or []:
        entry.buffer = buffer_index[entry.buffer]
    operators = [op for graph in model.subgraphs for op in graph.operators or []]
    codes = sorted({op.opcodeIndex for op in operators})
    code_index = {old: new for new, old in enumerate(codes)}
    model.operatorCodes = [model.operatorCodes[i] for i in codes]
    for op in operators:
        op.opcodeIndex = code_index[op.opcodeIndex]
    for op in subgraph.operators:
        op.inputs = np.array([tensor_index[int(i)] if i >= 0 else -1 for i in op.inputs], np.int32)
        op.outputs = np.array([tensor_index[int(i)] for i in op.outputs], np.int32)
    subgraph.inputs = np.array([tensor_index[int(i)] for i in subgraph.inputs], np.int32)
    subgraph.outputs = np.array([tensor_index[int(i)] for i in subgraph.outputs], np.int32)
    model.signatureDefs = None  # they name tensors of the whole model
    return model


def one_dimension_quantized_along_it(content: bytes) -> bytes:
    """The model with every 1-D tensor's quantized_dimension set to 0, the only dimension it has.

    TFLite Micro reads a 1-D tensor's per-channel scales along it whatever the field says, and its own person_detect
    example's biases say 3; LiteRT refuses such a model. Checking a TFLite Micro target's model with LiteRT (for its
    operators and versions) goes through this view; the file itself is left as it is.
    """
    model = unpack(content)
    changed = False
    for subgraph in model.subgraphs or []:
        for tensor in subgraph.tensors or []:
            q = tensor.quantization
            if q is not None and q.quantizedDimension and tensor.shape is not None and len(tensor.shape) == 1:
                q.quantizedDimension, changed = 0, True
    return pack(model) if changed else content
