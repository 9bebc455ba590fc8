"""Accuracy on the held-out test split and host latency, both with the real TFLite interpreter."""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from edgecc.progress import Reporter, native_output_silenced
from edgecc.reader import read_graph
from edgecc.runtime import Model, Quantization, interpreter_class

QAT_WRAPPER = re.compile(r"(?<![^/])quant_")  # TF-MOT's QuantizeWrapper names a layer quant_<name>


def predictions(model: Model, x: np.ndarray, reporter: Reporter, description: str) -> np.ndarray:
    """Predicted class per example, one interpreter call each (the graph has batch 1)."""
    out = np.empty(len(x), dtype=np.int64)
    with reporter.task(description, len(x)) as advance:
        for i, example in enumerate(x):
            out[i] = int(np.argmax(model.invoke(example)))
            advance()
    return out


@dataclass(frozen=True)
class Latency:
    """Wall time of `interpreter.invoke()` on this host, in milliseconds."""

    median_ms: float
    p90_ms: float
    runs: int
    threads: int

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


def host_latency(models: dict[str, Model], example: np.ndarray, runs: int = 300, warmup: int = 30) -> dict[str, Latency]:
    """Time each model on one example, interleaving them run by run.

    Interleaving puts every model under the same machine noise, so their ratio
    is meaningful even on a busy host where absolute figures are not.
    """
    samples: dict[str, list[float]] = {name: [] for name in models}
    for name, model in models.items():
        model.invoke(example)
    for step in range(warmup + runs):
        for name, model in models.items():
            start = time.perf_counter()
            model.interpreter.invoke()
            elapsed = (time.perf_counter() - start) * 1000
            if step >= warmup:
                samples[name].append(elapsed)
    return {
        name: Latency(float(np.median(s)), float(np.percentile(s, 90)), runs, models[name].threads)
        for name, s in samples.items()
    }


def layer_errors(float_content: bytes, int8_content: bytes, examples: np.ndarray) -> list[dict[str, object]]:
    """Relative RMS error of each int8 operator's output against the float teacher's same tensor.

    Both graphs come from the same Keras layers, so an operator's output tensor has the same name in both (a
    QAT student's layers are wrapped as quant_<name>: matched without that prefix); this shows where along the
    graph the int8 model departs from the teacher. For a pruned or distilled student that is compression and
    int8 rounding together; outputs that pruning narrowed differ in shape and are left out.
    """
    from ai_edge_litert.interpreter import OpResolverType

    graph = read_graph(int8_content)
    names = [(op.kind, graph.tensors[op.outputs[0]].name) for op in graph.operators if op.outputs]
    models = {}
    cls = interpreter_class()
    for key, content in (("float", float_content), ("int8", int8_content)):
        # without XNNPACK, so that every intermediate tensor is materialised and kept
        with native_output_silenced(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors")
            interpreter = cls(model_content=content, experimental_preserve_all_tensors=True,
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
            interpreter.allocate_tensors()
        details = {d["name"]: d for d in interpreter.get_tensor_details()}
        # each int8 operator output's tensor in this model, found once: in the float model, by its unwrapped name
        own = {name: name if key == "int8" else QAT_WRAPPER.sub("", name) for _, name in names}
        models[key] = (interpreter, {name: details[own[name]] for _, name in names if own[name] in details})
    squared_error = np.zeros(len(names))
    squared_signal = np.zeros(len(names))
    for example in examples:
        values = {}
        for key, (interpreter, outputs) in models.items():
            source = interpreter.get_input_details()[0]
            quantization = Quantization(*source["quantization"])
            interpreter.set_tensor(source["index"], quantization.quantize(example[np.newaxis], source["dtype"]))
            interpreter.invoke()
            values[key] = {name: Quantization(*d["quantization"]).dequantize(interpreter.get_tensor(d["index"]))
                           for name, d in outputs.items()}
        for i, (_, name) in enumerate(names):
            # the int8 graph splits attention per head, so a few same-named tensors differ in shape
            if name in values["float"] and name in values["int8"] and values["float"][name].shape == values["int8"][name].shape:
                reference = values["float"][name]
                squared_error[i] += float(np.sum((values["int8"][name] - reference) ** 2))
                squared_signal[i] += float(np.sum(reference ** 2))
    return [{"index": i, "op": kind, "tensor": name,
             "relative_rms_error": float(np.sqrt(squared_error[i] / squared_signal[i])) if squared_signal[i] else 0.0}
            for i, (kind, name) in enumerate(names)]
