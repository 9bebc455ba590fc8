"""Reading a .tflite flatbuffer with the TFLite schema, without TensorFlow.

`ai_edge_litert.schema_py_generated` is the schema compiled to Python; it
imports in a fraction of a second, so reports and checks can run on a board or
a CI runner that has no TensorFlow.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgecc.modelcheck import check_model_file


ITEMSIZE = {"INT8": 1, "UINT8": 1, "BOOL": 1, "INT16": 2, "FLOAT16": 2, "INT32": 4, "FLOAT32": 4,
            "INT64": 8, "FLOAT64": 8}


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    constant: bool
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    data_bytes: int = 0
    zero_fraction: float = 0.0  # share of a constant tensor's bytes that are zero (int8 weight sparsity)
    values: tuple[int, ...] | None = None  # a small constant integer tensor's values (sizes, axes, paddings, strides)
    variable: bool = False  # a state tensor the runtime keeps between invocations (an LSTM's hidden and cell state)

    @property
    def elements(self) -> int:
        count = 1
        for d in self.shape:
            count *= max(d, 1)
        return count

    @property
    def itemsize(self) -> int:
        return ITEMSIZE.get(self.dtype, 4)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's values (its buffer for constants)."""
        return self.data_bytes or self.elements * self.itemsize


@dataclass(frozen=True)
class Operator:
    kind: str  # the builtin's name; "CUSTOM" for a custom operator
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    version: int = 1
    custom_code: str = ""  # a custom operator's name (e.g. "edgetpu-custom-op")
    # builtin options by snake_case name (stride_w, dilation_h_factor, align_corners, axis, fused_activation, ...):
    # numbers and flags only; the fused activation by name ("NONE", "RELU", ...)
    options: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Graph:
    """The main subgraph of a model: its operators in execution order and its tensors."""

    operators: tuple[Operator, ...]
    tensors: tuple[Tensor, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op in self.operators:
            counts[op.kind] = counts.get(op.kind, 0) + 1
        return dict(sorted(counts.items()))

    def activation_tensors(self) -> list[Tensor]:
        """Tensors computed at run time (graph inputs and op outputs), not weights or biases."""
        produced = {i for op in self.operators for i in op.outputs} | set(self.inputs)
        return [t for i, t in enumerate(self.tensors) if i in produced and not t.constant]


def _enum_names(enum: type) -> dict[int, str]:
    return {value: key for key, value in vars(enum).items() if not key.startswith("_")}


def _ints(values: object) -> tuple[int, ...]:
    """An index vector of the object API (None when the file leaves it out)."""
    return tuple(int(v) for v in values) if values is not None else ()  # type: ignore[attr-defined]


SMALL_CONSTANT = 64  # elements: integer constants up to this size keep their values (shapes, sizes, axes, paddings)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _options(options: object, activations: dict[int, str]) -> dict[str, Any]:
    """An operator's builtin options as plain values; fused activations by name."""
    found: dict[str, Any] = {}
    for key, value in (vars(options) if options is not None else {}).items():
        if isinstance(value, (bool, int, float)):
            name = _snake(key)
            if name == "fused_activation_function":
                found["fused_activation"] = activations.get(int(value), str(value))
            else:
                found[name] = value
    return found


def _values(data: object, dtype: str) -> tuple[int, ...] | None:
    if data is None or dtype not in ("INT32", "INT64") or not len(data):  # type: ignore[arg-type]
        return None
    array = np.frombuffer(bytes(np.asarray(data, dtype=np.uint8)), dtype="<i4" if dtype == "INT32" else "<i8")
    return tuple(int(v) for v in array) if array.size <= SMALL_CONSTANT else None


def read_graph(content: bytes) -> Graph:
    """Parse the main subgraph; raises EdgeccError for bytes that are not a well-formed TFLite model."""
    from ai_edge_litert import schema_py_generated as schema

    check_model_file(content)  # every index and offset read below is in range
    model = schema.ModelT.InitFromPackedBuf(content, 0)
    subgraph = model.subgraphs[0]
    op_names = _enum_names(schema.BuiltinOperator)
    type_names = _enum_names(schema.TensorType)
    activations = _enum_names(schema.ActivationFunctionType)
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    tensors = []
    for t in subgraph.tensors or []:
        q = t.quantization
        data = model.buffers[t.buffer].data
        dtype = type_names.get(t.type, str(t.type))
        tensors.append(Tensor(
            name=t.name.decode() if isinstance(t.name, bytes) else str(t.name),
            dtype=dtype,
            shape=tuple(int(d) for d in (t.shape if t.shape is not None else ())),
            constant=data is not None and len(data) > 0,
            scale=tuple(float(s) for s in (q.scale if q is not None and q.scale is not None else ())),
            zero_point=tuple(int(z) for z in (q.zeroPoint if q is not None and q.zeroPoint is not None else ())),
            data_bytes=len(data) if data is not None else 0,
            zero_fraction=float(np.mean(np.asarray(data) == 0)) if data is not None and len(data) else 0.0,
            values=_values(data, dtype),
            variable=bool(t.isVariable),
        ))
    operators = []
    for op in subgraph.operators or []:
        code = model.operatorCodes[op.opcodeIndex]
        custom = code.customCode
        operators.append(Operator(
            op_names.get(codes[op.opcodeIndex], "CUSTOM"), _ints(op.inputs), _ints(op.outputs), version=int(code.version),
            custom_code=custom.decode(errors="replace") if isinstance(custom, bytes) else str(custom or ""),
            options=_options(op.builtinOptions, activations)))
    return Graph(tuple(operators), tuple(tensors), _ints(subgraph.inputs), _ints(subgraph.outputs))


def int8_weight_sparsity(content: bytes) -> dict[str, float]:
    """Share of zeros in each int8 weight matrix of a TFLite model (constant, two or more dimensions), by tensor name."""
    return {t.name: t.zero_fraction for t in read_graph(content).tensors
            if t.constant and t.dtype == "INT8" and len(t.shape) >= 2}


def constant_bytes_by_part(graph: Graph) -> dict[str, int]:
    """Bytes of the constant tensors (weights, embedding tables, id maps) of a TFLite graph, largest part first.

    A converted tensor is named `model/layer/...`; the layers of one encoder
    block (`block<i>_...`) are summed as `block<i>`, because the converter names
    a fused weight after any of the layers it came from. Unnamed constants
    (shapes, axes) are `other`.
    """
    parts: dict[str, int] = {}
    for tensor in graph.tensors:
        if tensor.constant:
            names = tensor.name.split("/")
            part = names[1].removeprefix("quant_") if len(names) > 1 else "other"  # QAT wraps layers as quant_<name>
            block = re.match(r"(block\d+)_", part)
            part = block.group(1) if block else part
            parts[part] = parts.get(part, 0) + tensor.nbytes
    return dict(sorted(parts.items(), key=lambda item: -item[1]))
