"""How the Coral Edge TPU compiler partitions an int8 TFLite model.

When `edgetpu_compiler` is on PATH, edgecc runs it and reads its log and its
output model; otherwise it predicts the partition from the compiler's
documented rules, and says that it is a prediction. Sources of the rules:

- Coral, "TensorFlow models on the Edge TPU" (coral.ai/docs/edgetpu/models-intro),
  model requirements and the supported-operations table with its known
  limitations (also mirrored by Axis for the ARTPEC-7 Edge TPU:
  developer.axis.com/computer-vision/on-device/system-on-chip/artpec-7/supported-ops).
- The compiler maps one subgraph from the start of the model by default: from the
  first operation it cannot map, every later operation runs on the CPU and the log
  says "More than one subgraph is not supported" (models-intro; Coral's answers in
  google-coral/edgetpu issues #30 and #461; `-a` maps later parts, experimentally).
- Compiler status texts quoted in google-coral/edgetpu issues #25 (a matmul by a
  non-constant "filter"), #27 (fully-connected or softmax with a 2-D output) and
  #30 (tensor rank).
- Models the real compiler made: every CPU model / `*_edgetpu.tflite` pair in
  github:google-coral/test_data (`scripts/bench_edgetpu.py` scores this module
  on them; BENCHMARKS.md). Rules learnt from them say which pair shows them.

The single Edge TPU subgraph is a dataflow region, not a prefix of the operator
list: operators that run on the CPU before it (a float input's CAST and
QUANTIZE) feed it, and what does not depend on a CPU operator after it is still
mapped (movenet_single_pose_lightning_ptq: its input conversion stays on the CPU,
and its three heads map although ARG_MAX comes between them in the file).
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgecc.errors import EdgeccError
from edgecc.reader import Graph, Operator, Tensor, read_graph
from edgecc.targets import EdgeTpu

# TFLite builtins of the supported-operations table (Edge TPU runtime 14, compiler 16).
EDGETPU_OPS = (
    "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "EXPAND_DIMS",
    "FULLY_CONNECTED", "L2_NORMALIZATION", "LOGISTIC", "UNIDIRECTIONAL_SEQUENCE_LSTM", "MAXIMUM",
    "MAX_POOL_2D", "MEAN", "MINIMUM", "MUL", "PACK", "PAD", "PRELU", "QUANTIZE", "REDUCE_MAX",
    "REDUCE_MIN", "RELU", "RELU6", "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR",
    "RESIZE_NEAREST_NEIGHBOR", "RSQRT", "SLICE", "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT", "SQUEEZE",
    "STRIDED_SLICE", "SUB", "SUM", "SQUARED_DIFFERENCE", "TANH", "TRANSPOSE", "TRANSPOSE_CONV",
)

# Builtins outside the documented table that the real compiler mapped in a compiled pair:
# TILE (deeplab_mobilenet_edgetpu_slim_cityscapes_quant: 1x1 -> 33x33 pooled features, on the Edge TPU).
EVIDENCED_OPS = ("TILE",)

# What compiler 16 / runtime 14 cannot even load ("Op builtin_code out of range", "Didn't find op for builtin
# opcode ... version ..."): builtin codes from GELU (150) on (DESIGN.md; google-coral/edgetpu #862: code 151),
# and the operator versions (tensorflow/lite/tools/versioning/op_version.cc) compiler 16 was seen to refuse:
# CONV_2D v6 (google-coral/edgetpu #631), QUANTIZE v3 (#879), TRANSPOSE_CONV v4 (#845), EXP v2
# (google-coral/libedgetpu #71).
FIRST_UNKNOWN_BUILTIN = 150
NEWEST_VERSION = {"CONV_2D": 5, "QUANTIZE": 2, "TRANSPOSE_CONV": 3, "EXP": 1}
REJECTED = "the Edge TPU compiler would reject this model"
EDGETPU_CUSTOM_OP = "edgetpu-custom-op"

PREDICTION = "prediction from the Edge TPU compiler's documented rules"
EIGHT_BIT = ("INT8", "UINT8")
SOFTMAX_MAX_ELEMENTS = 16_000
# inputs that must be constant (filter and bias; TRANSPOSE_CONV also its output shape)
PARAMETER_INPUTS = {"CONV_2D": (1, 2), "DEPTHWISE_CONV_2D": (1, 2), "FULLY_CONNECTED": (1, 2),
                    "TRANSPOSE_CONV": (0, 1, 3)}
SUBGRAPH_STATUS = "More than one subgraph is not supported"
MAPPED_STATUS = "Mapped to Edge TPU"


@dataclass(frozen=True)
class EdgeTpuPlan:
    method: str                       # "edgetpu_compiler <version>" or a prediction
    on_tpu: tuple[bool, ...]          # per operator (graph order): does it run on the Edge TPU
    reasons: dict[int, str]           # operator index -> why it does not run on the Edge TPU
    segments: int                     # number of contiguous Edge TPU segments
    first_cpu_op: int | None          # the first CPU operator that takes an Edge TPU output: it ends the Edge TPU part
    cached_parameter_bytes: int       # parameter bytes that fit the on-chip memory
    streamed_parameter_bytes: int     # parameter bytes streamed from host memory every inference
    compiled_model: bytes | None = None  # model_edgetpu.tflite, when the compiler ran
    rejected: str | None = None       # why the compiler would refuse the whole model (then nothing is on the Edge TPU)


@dataclass(frozen=True)
class CompilerLog:
    """What `edgetpu_compiler -s` prints: figures, and operator statuses counted per operator type."""

    version: str
    subgraphs: int
    cached_bytes: int
    streamed_bytes: int
    statuses: tuple[tuple[str, int, str], ...]  # (operator, count, status)


def plan_edgetpu(graph: Graph, edgetpu: EdgeTpu, legal_ops: tuple[str, ...], content: bytes | None = None) -> EdgeTpuPlan:
    """The compiler's partition when it is installed and the model bytes are given, else a prediction."""
    compiler = shutil.which("edgetpu_compiler")
    if compiler and content is not None:
        return _compile(compiler, graph, content)
    why = "edgetpu_compiler not found" if compiler is None else "edgetpu_compiler not run: no model bytes given"
    return predict_edgetpu(graph, edgetpu, legal_ops, f"{PREDICTION} ({why})")


def predict_edgetpu(graph: Graph, edgetpu: EdgeTpu, legal_ops: tuple[str, ...] = (), method: str = PREDICTION) -> EdgeTpuPlan:
    """The predicted partition: one Edge TPU subgraph of every operator the rules allow that does not depend on
    an operator left to the CPU after it (see the module's docstring)."""
    rejected = compiler_rejection(graph)
    if rejected:
        reasons = {i: f"{_name(op)}: {REJECTED}: {rejected}" for i, op in enumerate(graph.operators)}
        return EdgeTpuPlan(method, (False,) * len(graph.operators), reasons, 0, None, 0, 0, rejected=rejected)
    legal = tuple(legal_ops or EDGETPU_OPS) + EVIDENCED_OPS
    on_tpu: list[bool] = []
    reasons: dict[int, str] = {}
    mapped: set[int] = set()     # tensors the Edge TPU part computes
    after: dict[int, int] = {}   # tensors computed on the CPU from its outputs -> the CPU operator that ended it
    for i, op in enumerate(graph.operators):
        problem = operator_problem(graph, op, legal)
        inputs = [t for t in op.inputs if t >= 0]
        cause = next((after[t] for t in inputs if t in after), None)
        on_tpu.append(problem is None and cause is None)
        if on_tpu[-1]:
            mapped.update(op.outputs)
            continue
        if cause is None and any(t in mapped for t in inputs):
            cause = i  # the first CPU operator on this path out of the Edge TPU part
        if cause is not None:
            after.update((o, cause) for o in op.outputs)
        reasons[i] = problem or (f"{op.kind}: depends on op {cause}, which runs on the CPU after the Edge TPU part; "
                                 "the compiler maps nothing further (by default it builds a single Edge TPU subgraph)")
    first = _first_exit(graph, tuple(on_tpu))
    parameters = sum(graph.tensors[t].nbytes for t in _mapped_constants(graph, tuple(on_tpu)))
    cached = min(parameters, int(edgetpu.onchip_bytes.value))
    return EdgeTpuPlan(method, tuple(on_tpu), reasons, int(any(on_tpu)), first, cached, parameters - cached)


def compiler_rejection(graph: Graph) -> str | None:
    """Why compiler 16 would refuse to load the model at all: a builtin or an operator version it does not know."""
    from ai_edge_litert import schema_py_generated as schema

    codes = vars(schema.BuiltinOperator)
    for op in graph.operators:
        code = codes.get(op.kind, -1)
        if code >= FIRST_UNKNOWN_BUILTIN:
            return (f"{op.kind} is builtin code {code}, newer than compiler 16 / runtime 14 know "
                    f"(\"Op builtin_code out of range\")")
        if op.version > NEWEST_VERSION.get(op.kind, op.version):
            return (f"{op.kind} version {op.version} is newer than compiler 16 knows (at most version "
                    f"{NEWEST_VERSION[op.kind]}: \"Didn't find op for builtin opcode\")")
    return None


def _name(op: Operator) -> str:
    return f"custom operator {op.custom_code}" if op.kind == "CUSTOM" and op.custom_code else op.kind


def cpu_op_counts(graph: Graph, on_tpu: tuple[bool, ...]) -> dict[str, int]:
    """Operators on the CPU per type (custom operators by name), as a compiled model's remaining operators read."""
    counts: dict[str, int] = {}
    for op, mapped in zip(graph.operators, on_tpu):
        if not mapped and op.custom_code != EDGETPU_CUSTOM_OP:
            counts[_label(op)] = counts.get(_label(op), 0) + 1
    return dict(sorted(counts.items()))


def compiled_cpu_op_counts(compiled: Graph) -> dict[str, int]:
    """What the real compiler left on the CPU: every operator of its output but its edgetpu-custom-op."""
    return cpu_op_counts(compiled, (False,) * len(compiled.operators))


def _label(op: Operator) -> str:
    return f"CUSTOM:{op.custom_code}" if op.kind == "CUSTOM" else op.kind


def operator_problem(graph: Graph, op: Operator, legal_ops: tuple[str, ...]) -> str | None:
    """Why the Edge TPU cannot run this operator by itself, or None when the rules allow it."""
    kind = op.kind
    inputs = [graph.tensors[i] for i in op.inputs if i >= 0]
    outputs = [graph.tensors[i] for i in op.outputs]
    if kind == "CUSTOM":
        return (f"{_name(op)}: not an Edge TPU operator; it runs on the CPU, which needs its kernel "
                "registered with the host's interpreter")
    # an LSTM's state tensors are kept by the runtime, not computed by operators; the int8 LSTM keeps its cell
    # state in int16, and the compiler maps it whole (keras_lstm_mnist_ptq)
    activations = [t for t in inputs + outputs if not t.constant and not t.variable]
    if kind in ("BATCH_MATMUL", "FULLY_CONNECTED") and len(inputs) >= 2 and not inputs[0].constant and not inputs[1].constant:
        return (f"{kind}: both inputs are activations (attention Q·Kᵀ or scores·V); the Edge TPU only "
                "multiplies by constant weights")
    if kind not in legal_ops:
        return f"{kind}: not in the Edge TPU's supported operations"
    for t in activations:
        if t.dtype not in EIGHT_BIT:
            return f"{kind}: tensor {t.name!r} is {t.dtype}; the Edge TPU runs only 8-bit (int8/uint8) tensors"
    for t in inputs:
        if t.constant and t.dtype not in EIGHT_BIT + ("INT32",):
            return f"{kind}: parameter {t.name!r} is {t.dtype}; the Edge TPU needs 8-bit parameters (int32 biases)"
    for t in inputs + outputs:
        if any(d < 0 for d in t.shape):
            return f"{kind}: tensor {t.name!r} has a dynamic shape {t.shape}; the Edge TPU needs static shapes"
    for t in activations:
        if any(d > 1 for d in t.shape[:-3]):
            return (f"{kind}: tensor {t.name!r} of shape {t.shape} has a dimension larger than 1 outside the "
                    "3 innermost; the Edge TPU maps only the 3 innermost dimensions")
    for i in PARAMETER_INPUTS.get(kind, ()):
        if i < len(op.inputs) and op.inputs[i] >= 0 and not graph.tensors[op.inputs[i]].constant:
            return f"{kind}: parameter {graph.tensors[op.inputs[i]].name!r} is not constant at compile time"
    return _limitation(kind, inputs, outputs)


def _limitation(kind: str, inputs: list[Tensor], outputs: list[Tensor]) -> str | None:
    """The per-operator known limitations of the supported-operations table that shapes can show."""
    if kind == "FULLY_CONNECTED" and math.prod(outputs[0].shape[:-1]) > 1:
        return (f"FULLY_CONNECTED: output {outputs[0].shape} is not one-dimensional; the Edge TPU maps a "
                "fully-connected layer only with a 1-D output (one row of activations at a time)")
    if kind == "SOFTMAX" and (_wide_dims(inputs[0]) > 1 or inputs[0].elements > SOFTMAX_MAX_ELEMENTS):
        return (f"SOFTMAX: input {inputs[0].shape} is not a 1-D tensor of at most {SOFTMAX_MAX_ELEMENTS:,} "
                "elements, the only softmax the Edge TPU maps")
    if kind == "MEAN":
        z = inputs[0].shape[-1] if inputs[0].shape else 1
        if len(inputs[0].shape) - 1 in _reduced_axes(inputs[0].shape, outputs[0].shape) and z > 1 and z % 4:
            return f"MEAN: reduces the innermost (z) dimension of size {z}; the Edge TPU needs a multiple of 4"
    if kind == "CONCATENATION" and any(t.constant for t in inputs) and len(inputs) != 2:
        return "CONCATENATION: a constant input is allowed only in a concatenation of exactly 2 inputs (zero padding)"
    if kind == "PRELU" and any(d > 1 for d in inputs[1].shape[:-1]):
        return f"PRELU: alpha {inputs[1].shape} must vary only along the innermost dimension"
    if kind == "RESIZE_BILINEAR" and len(inputs[0].shape) == 4 and len(outputs[0].shape) == 4:
        # "depending on input/output size ... may not be mapped to avoid loss in precision" (supported-operations
        # table). Compiled pairs: 6->12, 12->24, 24->48 (movenet) and 33->33 (deeplab slim) map; 33->513 (deeplab
        # slim and v3) and a 1x1 -> 33x33 broadcast (deeplabv3_mnv2: the slim variant uses TILE there) do not.
        sides = list(zip(inputs[0].shape[1:3], outputs[0].shape[1:3]))
        if any(o != i and (i <= 1 or o % i) for i, o in sides):
            return (f"RESIZE_BILINEAR: {inputs[0].shape[1:3]} -> {outputs[0].shape[1:3]} is not an integer upscale "
                    "of a side larger than 1; the compiler leaves such a resize on the CPU to avoid loss in precision")
    return None


def _wide_dims(tensor: Tensor) -> int:
    return sum(1 for d in tensor.shape if d > 1)


def _reduced_axes(shape: tuple[int, ...], reduced: tuple[int, ...]) -> set[int]:
    """Axes a reduction removed, read from its input and output shapes (with or without keepdims)."""
    if len(shape) == len(reduced):
        return {i for i, (a, b) in enumerate(zip(shape, reduced)) if a != b}
    kept, j = set(), 0
    for i, d in enumerate(shape):
        if j < len(reduced) and reduced[j] == d:
            kept.add(i)
            j += 1
    return set(range(len(shape))) - kept


def _first_exit(graph: Graph, on_tpu: tuple[bool, ...]) -> int | None:
    """The first CPU operator that takes a tensor the Edge TPU computed: where the Edge TPU part ends."""
    mapped = {t for op, on in zip(graph.operators, on_tpu) if on for t in op.outputs}
    return next((i for i, op in enumerate(graph.operators) if not on_tpu[i] and mapped & set(op.inputs)), None)


def _mapped_constants(graph: Graph, on_tpu: tuple[bool, ...]) -> set[int]:
    """Constant tensors read by mapped operators, each counted once."""
    return {i for op, mapped in zip(graph.operators, on_tpu) if mapped
            for i in op.inputs if i >= 0 and graph.tensors[i].constant}


def _compile(compiler: str, graph: Graph, content: bytes) -> EdgeTpuPlan:
    """Run `edgetpu_compiler -s -o DIR model.tflite` and read its log and its output model."""
    with tempfile.TemporaryDirectory(prefix="edgecc-edgetpu-") as tmp:
        model = Path(tmp) / "model.tflite"
        model.write_bytes(content)
        try:
            result = subprocess.run([compiler, "-s", "-o", tmp, str(model)], capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise EdgeccError("edgetpu_compiler did not finish within 10 minutes") from None
        compiled = Path(tmp) / "model_edgetpu.tflite"
        if result.returncode != 0 or not compiled.exists():
            lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
            raise EdgeccError(f"edgetpu_compiler failed: {lines[-1] if lines else f'exit code {result.returncode}'}")
        plan = plan_from_compiler(graph, read_graph(compiled.read_bytes()), parse_compiler_log(result.stdout))
        return dataclasses.replace(plan, compiled_model=compiled.read_bytes())


def compile_command(files: list[str], out_dir: str | None = None) -> list[str]:
    """`edgetpu_compiler` co-compiling a pipeline's Edge TPU segments in one call, in pipeline order: they share the
    on-chip parameter memory, which the compiler gives to the models in the order they are named (Coral docs, 'Edge
    TPU Compiler', parameter data caching); each `<segment>.tflite` gives `<segment>_edgetpu.tflite`."""
    return ["edgetpu_compiler", "-s", *(["-o", out_dir] if out_dir else []), *files]


def compile_segments(segments: dict[str, bytes]) -> dict[str, bytes] | None:
    """The Edge TPU segments co-compiled by `edgetpu_compiler` when it is on PATH (`<stem>_edgetpu.tflite` -> bytes),
    else None; as `_compile` does for one model."""
    compiler = shutil.which("edgetpu_compiler")
    if compiler is None or not segments:
        return None
    with tempfile.TemporaryDirectory(prefix="edgecc-edgetpu-") as tmp:
        for name, content in segments.items():
            (Path(tmp) / name).write_bytes(content)
        command = [compiler, *compile_command([str(Path(tmp) / name) for name in segments], tmp)[1:]]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise EdgeccError("edgetpu_compiler did not finish within 10 minutes") from None
        compiled = {f"{Path(name).stem}_edgetpu.tflite": Path(tmp) / f"{Path(name).stem}_edgetpu.tflite"
                    for name in segments}
        if result.returncode != 0 or not all(path.exists() for path in compiled.values()):
            lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
            raise EdgeccError(f"edgetpu_compiler failed: {lines[-1] if lines else f'exit code {result.returncode}'}")
        return {name: path.read_bytes() for name, path in compiled.items()}


def parse_compiler_log(text: str) -> CompilerLog:
    """Read the figures and the operator table from the compiler's `-s` output."""
    def figure(label: str) -> str:
        found = re.search(rf"^{re.escape(label)}:?\s+(.+?)\s*$", text, re.MULTILINE)
        if found is None:
            raise EdgeccError(f"edgetpu_compiler's log lacks {label!r}")
        return found.group(1)

    statuses = tuple((m.group(1), int(m.group(2)), m.group(3).strip())
                     for m in re.finditer(r"^([A-Z][A-Z0-9_]*)\s+(\d+)\s+(\S.*)$", text, re.MULTILINE))
    return CompilerLog(
        version=figure("Edge TPU Compiler version"),
        subgraphs=int(figure("Number of Edge TPU subgraphs")),
        cached_bytes=_bytes(figure("On-chip memory used for caching model parameters")),
        streamed_bytes=_bytes(figure("Off-chip memory used for streaming uncached model parameters")),
        statuses=statuses,
    )


def _bytes(text: str) -> int:
    """'3.53MiB' -> bytes (the compiler prints B, KiB, MiB or GiB)."""
    found = re.fullmatch(r"([\d.]+)\s*(B|KiB|MiB|GiB)", text)
    if found is None:
        raise EdgeccError(f"edgetpu_compiler's log has an unreadable size {text!r}")
    return round(float(found.group(1)) * 1024 ** ("B", "KiB", "MiB", "GiB").index(found.group(2)))


def plan_from_compiler(graph: Graph, compiled: Graph, log: CompilerLog) -> EdgeTpuPlan:
    """Per-operator placement from the compiled model, reasons from the log.

    The compiled model keeps the operators left to the CPU, with their output
    tensor names, and replaces each mapped part by one `edgetpu-custom-op`. The
    log counts statuses per operator type only, so a CPU operator takes its
    type's statuses in graph order, the operator's own reasons before "More than
    one subgraph is not supported" (which only follows the first CPU operator).
    """
    left = {(op.kind, compiled.tensors[o].name) for op in compiled.operators
            if op.custom_code != EDGETPU_CUSTOM_OP for o in op.outputs}
    on_tpu = tuple((op.kind, graph.tensors[op.outputs[0]].name) not in left for op in graph.operators)
    pending: dict[str, list[str]] = {}
    for kind, count, status in sorted(log.statuses, key=lambda s: s[2] == SUBGRAPH_STATUS):
        if status != MAPPED_STATUS:
            pending.setdefault(kind, []).extend([status] * count)
    reasons = {}
    for i, op in enumerate(graph.operators):
        if not on_tpu[i]:
            statuses = pending.get(op.kind, [])
            reasons[i] = f"{op.kind}: {statuses.pop(0) if statuses else 'left on the CPU'} (edgetpu_compiler)"
    first = _first_exit(graph, on_tpu)
    return EdgeTpuPlan(f"edgetpu_compiler {log.version}", on_tpu, reasons, log.subgraphs, first,
                       log.cached_bytes, log.streamed_bytes)
