"""C++ sources for a TFLite Micro firmware build: the model, its op resolver, its arena.

A firmware project needs the model as a byte array in flash, a
MicroMutableOpResolver that registers exactly the operators the model uses
(registering every kernel wastes flash, registering too few fails at
AllocateTensors), and a tensor arena large enough for the target's kernels.
The resolver's method names are those of
tensorflow/lite/micro/micro_mutable_op_resolver.h in github.com/tensorflow/tflite-micro
(commit 90b983c2, 2026-08-20), the same source as the targets' `legal_ops`.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

from edgecc import __version__
from edgecc.errors import EdgeccError
from edgecc.reader import Graph, Tensor
from edgecc.targets import Target

ALIGNMENT = 16
BYTES_PER_LINE = 12

# TFLite BuiltinOperator name -> the MicroMutableOpResolver method that registers it (AddBuiltin)
BUILTIN_METHODS = {
    "ABS": "AddAbs", "ADD": "AddAdd", "ADD_N": "AddAddN", "ARG_MAX": "AddArgMax", "ARG_MIN": "AddArgMin",
    "ASSIGN_VARIABLE": "AddAssignVariable", "AVERAGE_POOL_2D": "AddAveragePool2D",
    "BATCH_MATMUL": "AddBatchMatMul", "BATCH_TO_SPACE_ND": "AddBatchToSpaceNd",
    "BROADCAST_ARGS": "AddBroadcastArgs", "BROADCAST_TO": "AddBroadcastTo", "CALL_ONCE": "AddCallOnce",
    "CAST": "AddCast", "CEIL": "AddCeil", "CONCATENATION": "AddConcatenation", "CONV_2D": "AddConv2D",
    "COS": "AddCos", "CUMSUM": "AddCumSum", "DEPTH_TO_SPACE": "AddDepthToSpace",
    "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D", "DEQUANTIZE": "AddDequantize", "DIV": "AddDiv",
    "DYNAMIC_UPDATE_SLICE": "AddDynamicUpdateSlice", "ELU": "AddElu", "EMBEDDING_LOOKUP": "AddEmbeddingLookup",
    "EQUAL": "AddEqual", "EXP": "AddExp", "EXPAND_DIMS": "AddExpandDims", "FILL": "AddFill",
    "FLOOR": "AddFloor", "FLOOR_DIV": "AddFloorDiv", "FLOOR_MOD": "AddFloorMod",
    "FULLY_CONNECTED": "AddFullyConnected", "GATHER": "AddGather", "GATHER_ND": "AddGatherNd",
    "GREATER": "AddGreater", "GREATER_EQUAL": "AddGreaterEqual", "HARD_SWISH": "AddHardSwish", "IF": "AddIf",
    "L2_NORMALIZATION": "AddL2Normalization", "L2_POOL_2D": "AddL2Pool2D", "LEAKY_RELU": "AddLeakyRelu",
    "LESS": "AddLess", "LESS_EQUAL": "AddLessEqual", "LOG": "AddLog", "LOGICAL_AND": "AddLogicalAnd",
    "LOGICAL_NOT": "AddLogicalNot", "LOGICAL_OR": "AddLogicalOr", "LOGISTIC": "AddLogistic",
    "LOG_SOFTMAX": "AddLogSoftmax", "MAXIMUM": "AddMaximum", "MAX_POOL_2D": "AddMaxPool2D",
    "MEAN": "AddMean", "MINIMUM": "AddMinimum", "MIRROR_PAD": "AddMirrorPad", "MUL": "AddMul",
    "NEG": "AddNeg", "NOT_EQUAL": "AddNotEqual", "PACK": "AddPack", "PAD": "AddPad", "PADV2": "AddPadV2",
    "PRELU": "AddPrelu", "QUANTIZE": "AddQuantize", "READ_VARIABLE": "AddReadVariable",
    "REDUCE_ALL": "AddReduceAll", "REDUCE_MAX": "AddReduceMax", "REDUCE_MIN": "AddReduceMin",
    "RELU": "AddRelu", "RELU6": "AddRelu6", "RESHAPE": "AddReshape", "RESIZE_BILINEAR": "AddResizeBilinear",
    "RESIZE_NEAREST_NEIGHBOR": "AddResizeNearestNeighbor", "REVERSE_V2": "AddReverseV2", "ROUND": "AddRound",
    "RSQRT": "AddRsqrt", "SELECT_V2": "AddSelectV2", "SHAPE": "AddShape", "SIN": "AddSin", "SLICE": "AddSlice",
    "SOFTMAX": "AddSoftmax", "SPACE_TO_BATCH_ND": "AddSpaceToBatchNd", "SPACE_TO_DEPTH": "AddSpaceToDepth",
    "SPLIT": "AddSplit", "SPLIT_V": "AddSplitV", "SQRT": "AddSqrt", "SQUARE": "AddSquare",
    "SQUARED_DIFFERENCE": "AddSquaredDifference", "SQUEEZE": "AddSqueeze", "STRIDED_SLICE": "AddStridedSlice",
    "SUB": "AddSub", "SUM": "AddSum", "SVDF": "AddSvdf", "TANH": "AddTanh", "TRANSPOSE": "AddTranspose",
    "TRANSPOSE_CONV": "AddTransposeConv", "UNIDIRECTIONAL_SEQUENCE_LSTM": "AddUnidirectionalSequenceLSTM",
    "UNPACK": "AddUnpack", "VAR_HANDLE": "AddVarHandle", "WHILE": "AddWhile", "ZEROS_LIKE": "AddZerosLike",
}

# custom op name in the model -> the MicroMutableOpResolver method that registers it (AddCustom);
# "ethos-u" is the op Vela puts on the NPU (GetString_ETHOSU in kernels/ethos_u/ethosu.cc)
CUSTOM_METHODS = {
    "ethos-u": "AddEthosU", "CIRCULAR_BUFFER": "AddCircularBuffer", "TFLM_DECODE": "AddDecode",
    "TFLite_Detection_PostProcess": "AddDetectionPostprocess", "SignalDelay": "AddDelay",
    "SignalEnergy": "AddEnergy", "SignalFftAutoScale": "AddFftAutoScale", "SignalFilterBank": "AddFilterBank",
    "SignalFilterBankLog": "AddFilterBankLog", "SignalFilterBankSquareRoot": "AddFilterBankSquareRoot",
    "SignalFilterBankSpectralSubtraction": "AddFilterBankSpectralSubtraction", "SignalFramer": "AddFramer",
    "SignalIrfft": "AddIrfft", "SignalOverlapAdd": "AddOverlapAdd", "SignalPCAN": "AddPCAN",
    "SignalRfft": "AddRfft", "SignalStacker": "AddStacker", "SignalWindow": "AddWindow",
}

# tensor types the TFLM API reads as plain C++ types (typeToTfLiteType in portable_type_to_tflitetype.h)
C_TYPES = {"INT8": "int8_t", "UINT8": "uint8_t", "INT16": "int16_t", "INT32": "int32_t", "INT64": "int64_t",
           "FLOAT32": "float", "BOOL": "bool"}


def arena_size(measured_bytes: int, target: Target) -> int:
    """The arena to build with: the measured arena plus the target's kernel margin, 16-byte aligned.

    `measured_bytes` is the host TFLite Micro measurement (`edgecc.arena`), or
    Vela's SRAM plan on Ethos-U, whose `ethos-u` op the host cannot run.
    """
    if target.arena is None:
        raise EdgeccError(f"target {target.name} has no [arena] table: it does not run TFLite Micro")
    return math.ceil((measured_bytes + target.arena.margin(measured_bytes)) / ALIGNMENT) * ALIGNMENT


def used_ops(model: bytes) -> dict[str, int]:
    """Operator counts by builtin name, or by custom name for CUSTOM ops, over every subgraph.

    The resolver needs the custom name (the reader only says CUSTOM) and the ops
    of IF / WHILE bodies, which live outside the main subgraph.
    """
    from ai_edge_litert import schema_py_generated as schema

    names = {value: key for key, value in vars(schema.BuiltinOperator).items() if not key.startswith("_")}
    parsed = schema.ModelT.InitFromPackedBuf(model, 0)
    counts: dict[str, int] = {}
    for subgraph in parsed.subgraphs:
        for op in subgraph.operators:
            code = parsed.operatorCodes[op.opcodeIndex]
            builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
            name = (code.customCode or b"").decode() if builtin == schema.BuiltinOperator.CUSTOM \
                else names.get(builtin, str(builtin))
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def resolver_methods(ops: dict[str, int]) -> dict[str, str]:
    """Op name -> resolver method; names every op TFLite Micro lacks, all at once."""
    methods = {**BUILTIN_METHODS, **CUSTOM_METHODS}
    missing = [name or "CUSTOM (unnamed)" for name in ops if name not in methods]
    if missing:
        raise EdgeccError(f"TFLite Micro has no kernel for {', '.join(missing)}: no firmware can run this model "
                          "(replace it with an operator TFLite Micro has; for GELU, ReLU or a tanh approximation)")
    return {name: methods[name] for name in ops}


# edgecc measures a TFLite Micro target's accuracy with TFLite Micro's own kernels (edgecc.micro_eval), whose
# requantization rounds twice; a firmware built to round otherwise computes some values a step apart
# (edgecc.requantize). CMSIS-NN's and ESP-NN's flags as their sources (2026) name them.
ROUNDING_GUARD = (
    "// edgecc measured this model's accuracy with TFLite Micro's default arithmetic: every requantization\n"
    "// rounded twice (gemmlowp's), as CMSIS-NN and ESP-NN also do by default. Built with TFLITE_SINGLE_ROUNDING,\n"
    "// CMSIS_NN_USE_SINGLE_ROUNDING or ESP-NN's CONFIG_NN_SKIP_NUDGE, some outputs come out one quantization step\n"
    "// apart (and with only one of the first two set, the reference and CMSIS-NN kernels disagree with each\n"
    "// other). Define EDGECC_ACCEPT_OTHER_ROUNDING to build so anyway, then measure the accuracy on the board.\n"
    "#if defined(__has_include)\n"
    "#if __has_include(\"sdkconfig.h\")\n"
    "#include \"sdkconfig.h\"  // ESP-IDF's project configuration: CONFIG_NN_SKIP_NUDGE\n"
    "#endif\n"
    "#endif\n"
    "#if !defined(EDGECC_ACCEPT_OTHER_ROUNDING) && \\\n"
    "    ((defined(TFLITE_SINGLE_ROUNDING) && (TFLITE_SINGLE_ROUNDING + 0)) || \\\n"
    "     defined(CMSIS_NN_USE_SINGLE_ROUNDING) || defined(CONFIG_NN_SKIP_NUDGE) || defined(SKIP_NUDGE))\n"
    "#error \"edgecc measured this model with TFLite Micro's double rounding, not another (see model_settings.h)\"\n"
    "#endif\n\n")


def _header(what: str, model: bytes, target: Target) -> str:
    return (f"// {what}\n"
            f"// Generated by edgecc {__version__} for target {target.name} ({target.description}).\n"
            f"// Model: {len(model):,} bytes, sha256 {hashlib.sha256(model).hexdigest()}.\n"
            "// Do not edit: regenerate with edgecc.\n")


def _model_data_h(model: bytes, target: Target) -> str:
    from edgecc.memplan import read_offline_plan

    plan = ("// It carries an offline memory plan (OfflineMemoryAllocation metadata; edgecc's, or Vela's on Ethos-U):\n"
            "// TFLite Micro's allocator places the activations at its offsets and plans the scratch buffers around them.\n"
            if read_offline_plan(model) is not None else "")
    return (_header("The model flatbuffer, linked into flash.", model, target) + plan + "\n"
            "#ifndef EDGECC_MODEL_DATA_H_\n#define EDGECC_MODEL_DATA_H_\n\n"
            "extern const unsigned char g_model_data[];\n"
            "extern const unsigned int g_model_data_len;\n\n"
            "#endif  // EDGECC_MODEL_DATA_H_\n")


def _model_data_cc(model: bytes, target: Target) -> str:
    """The bytes as hex literals; 16-byte alignment because TFLM reads the flatbuffer in place."""
    lines = ("    0x" + model[i:i + BYTES_PER_LINE].hex(",").replace(",", ", 0x") + ","
             for i in range(0, len(model), BYTES_PER_LINE))
    return (_header("The model flatbuffer, linked into flash.", model, target) + "\n"
            '#include "model_data.h"\n\n'
            f"alignas({ALIGNMENT}) const unsigned char g_model_data[] = {{\n" + "\n".join(lines) + "\n};\n"
            f"const unsigned int g_model_data_len = {len(model)};\n")


def _op_resolver_h(ops: dict[str, int], model: bytes, target: Target) -> str:
    methods = resolver_methods(ops)
    calls = "".join(f"  TF_LITE_ENSURE_STATUS(resolver.{methods[name]}());  // {name} x{count}\n"
                    for name, count in ops.items())
    return (_header("Registers exactly the operators the model uses.", model, target) + "\n"
            "#ifndef EDGECC_OP_RESOLVER_H_\n#define EDGECC_OP_RESOLVER_H_\n\n"
            '#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"\n\n'
            f"using EdgeccOpResolver = tflite::MicroMutableOpResolver<{len(ops)}>;\n\n"
            "inline TfLiteStatus RegisterOps(EdgeccOpResolver& resolver) {\n"
            f"{calls}  return kTfLiteOk;\n}}\n\n"
            "#endif  // EDGECC_OP_RESOLVER_H_\n")


def _tensor_constants(prefix: str, index: int, tensor: Tensor) -> str:
    """Shape, C++ type, scale and zero point of one graph input or output."""
    if tensor.dtype not in C_TYPES:
        raise EdgeccError(f"{prefix.lower()} {index} is {tensor.dtype}, a type the TFLite Micro API has no C++ type for")
    quantized = len(tensor.scale) == 1
    name = f"{prefix}{index}"
    dims = ", ".join(str(d) for d in tensor.shape) or "1"  # a scalar: C++ has no empty arrays
    return (f"// {prefix.lower()} {index}: \"{' '.join(tensor.name.split())}\", {tensor.dtype} {list(tensor.shape)}"
            f"{'' if quantized else ', not per-tensor quantized (scale 0)'}\n"
            f"using {name}Type = {C_TYPES[tensor.dtype]};\n"
            f"constexpr int k{name}Rank = {len(tensor.shape)};\n"
            f"constexpr int k{name}Dims[] = {{{dims}}};\n"
            f"constexpr int k{name}Elements = {tensor.elements};\n"
            f"constexpr float k{name}Scale = {tensor.scale[0] if quantized else 0.0!r}f;\n"
            f"constexpr int k{name}ZeroPoint = {tensor.zero_point[0] if quantized and tensor.zero_point else 0};\n\n")


def _model_settings_h(graph: Graph, arena_bytes: int, model: bytes, target: Target) -> str:
    inputs = "".join(_tensor_constants("Input", i, graph.tensors[t]) for i, t in enumerate(graph.inputs))
    outputs = "".join(_tensor_constants("Output", i, graph.tensors[t]) for i, t in enumerate(graph.outputs))
    margin = target.arena
    assert margin is not None  # write_micro_sources checked it
    origin = ("The tensor arena Arm's Vela compiler planned in SRAM for this model" if target.runtime == "ethos-u" else
              "The smallest arena the real TFLite Micro interpreter allocates this model in, measured on the\n"
              "// host by edgecc with reference kernels")
    return (_header("Arena size and the model's input and output tensors.", model, target) + "\n"
            "#ifndef EDGECC_MODEL_SETTINGS_H_\n#define EDGECC_MODEL_SETTINGS_H_\n\n"
            "#include <cstdint>\n\n"
            f"{'' if target.runtime == 'ethos-u' else ROUNDING_GUARD}"
            f"// {origin}, + the target's kernel margin\n"
            f"// ({margin.margin_bytes.value:,.0f} B + {margin.margin_fraction.value:.0%} of the measured arena, "
            "for its optimised kernels' scratch buffers), rounded up to 16 bytes.\n"
            f"constexpr int kTensorArenaSize = {arena_bytes};\n\n"
            f"constexpr int kNumInputs = {len(graph.inputs)};\n"
            f"constexpr int kNumOutputs = {len(graph.outputs)};\n\n"
            "// Quantized value q and real value x: x = (q - ZeroPoint) * Scale.\n"
            f"{inputs}{outputs}"
            "#endif  // EDGECC_MODEL_SETTINGS_H_\n")


def _main_cc(model: bytes, target: Target) -> str:
    npu = ("  // Ethos-U: the platform's startup code must have initialised the NPU driver (ethosu_init).\n"
           if target.runtime == "ethos-u" else "")
    return (_header("A minimal example: run the model once with TFLite Micro.", model, target) + "\n"
            "#include <cstdint>\n\n"
            '#include "model_data.h"\n'
            '#include "model_settings.h"\n'
            '#include "op_resolver.h"\n'
            '#include "tensorflow/lite/micro/micro_interpreter.h"\n'
            '#include "tensorflow/lite/micro/micro_log.h"\n'
            '#include "tensorflow/lite/micro/system_setup.h"\n'
            '#include "tensorflow/lite/schema/schema_generated.h"\n\n'
            "namespace {\n"
            "alignas(16) uint8_t tensor_arena[kTensorArenaSize];\n"
            "}  // namespace\n\n"
            "int main() {\n"
            f"{npu}"
            "  tflite::InitializeTarget();\n"
            "  const tflite::Model* model = tflite::GetModel(g_model_data);\n"
            "  if (model->version() != TFLITE_SCHEMA_VERSION) {\n"
            '    MicroPrintf("model schema %d, TFLite Micro expects %d", static_cast<int>(model->version()),\n'
            "                TFLITE_SCHEMA_VERSION);\n"
            "    return 1;\n"
            "  }\n\n"
            "  // static: off the small stack of a microcontroller\n"
            "  static EdgeccOpResolver resolver;\n"
            "  if (RegisterOps(resolver) != kTfLiteOk) return 1;\n\n"
            "  static tflite::MicroInterpreter interpreter(model, resolver, tensor_arena, kTensorArenaSize);\n"
            "  if (interpreter.AllocateTensors() != kTfLiteOk) {\n"
            '    MicroPrintf("AllocateTensors failed: kTensorArenaSize %d is too small?", kTensorArenaSize);\n'
            "    return 1;\n"
            "  }\n"
            '  MicroPrintf("arena: %d of %d bytes used", static_cast<int>(interpreter.arena_used_bytes()),\n'
            "              kTensorArenaSize);\n\n"
            "  // Fill the input with real data, quantized as q = round(x / kInput0Scale) + kInput0ZeroPoint;\n"
            "  // the zero point stands for x = 0.\n"
            "  Input0Type* input = interpreter.typed_input_tensor<Input0Type>(0);\n"
            "  for (int i = 0; i < kInput0Elements; ++i) input[i] = static_cast<Input0Type>(kInput0ZeroPoint);\n\n"
            "  if (interpreter.Invoke() != kTfLiteOk) return 1;\n\n"
            "  const Output0Type* output = interpreter.typed_output_tensor<Output0Type>(0);\n"
            "  int best = 0;  // argmax: dequantization keeps the order of the scores\n"
            "  for (int i = 1; i < kOutput0Elements; ++i) {\n"
            "    if (output[i] > output[best]) best = i;\n"
            "  }\n"
            '  MicroPrintf("predicted class %d", best);\n'
            "  return 0;\n"
            "}\n")


def write_micro_sources(directory: Path, model: bytes, graph: Graph, arena_bytes: int, target: Target) -> list[str]:
    """Write the C++ sources a TFLite Micro firmware build consumes; returns the file names written.

    `arena_bytes` is the arena to build with (see `arena_size`). Raises
    EdgeccError, before writing anything, when TFLite Micro lacks one of the
    model's operators or the target does not run TFLite Micro.
    """
    if target.arena is None:  # every TFLite Micro profile has one (load_target checks)
        raise EdgeccError(f"target {target.name} runs {target.runtime}, not TFLite Micro: it takes no C++ sources")
    if not graph.inputs or not graph.outputs:
        raise EdgeccError("the model has no inputs or no outputs")
    sources = {
        "model_data.h": _model_data_h(model, target),
        "model_data.cc": _model_data_cc(model, target),
        "op_resolver.h": _op_resolver_h(used_ops(model), model, target),
        "model_settings.h": _model_settings_h(graph, arena_bytes, model, target),
        "main.cc": _main_cc(model, target),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in sources.items():
        (directory / name).write_text(text, encoding="utf-8")
    return list(sources)
