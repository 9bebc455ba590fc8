"""Run the edgecc-built model on this board, from this directory alone.

    python run.py INPUTS.npy [--json] [--threads N] [--cpu]

INPUTS.npy holds raw examples, one per row, in the form manifest.json's
"preprocessing.raw" describes (token ids for text models, made with its
"tokenizer" and "vocabulary"); this script applies the manifest's scaling and
int8 quantization, runs the model and prints the predicted label of each example.

The model is model.tflite, or on an Edge TPU board the pipeline that
pipeline.json lists: segments run in order, each reading the tensors earlier
ones computed (the first CPU segment of a text model is the host pre-step, the
embedding lookup). Edge TPU segments run compiled (`<segment>_edgetpu.tflite`,
made by the command in pipeline.json's "compile") with the Edge TPU delegate,
CPU islands with the plain interpreter; `--cpu` runs every segment with the
plain interpreter (the same outputs, without the accelerator). Without a
pipeline, model_edgetpu.tflite runs with the delegate when it is present.
Needs numpy and ai-edge-litert (or tflite-runtime on older boards).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

try:
    from .preprocess import BadInput, Preprocessor, dequantize, quantize
except ImportError:  # run from the bundle folder as a script
    from preprocess import BadInput, Preprocessor, dequantize, quantize

HERE = Path(__file__).resolve().parent
EDGETPU_LIBRARY = "libedgetpu.so.1"


def interpreter(path: Path, threads: int, edgetpu: bool = False) -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter, load_delegate
    except ImportError:
        from tflite_runtime.interpreter import Interpreter, load_delegate
    if edgetpu:
        model = Interpreter(model_path=str(path), experimental_delegates=[load_delegate(EDGETPU_LIBRARY)])
    else:
        model = Interpreter(model_path=str(path), num_threads=threads)
    model.allocate_tensors()
    return model


def single_model(bundle: Path, threads: int, cpu: bool) -> Callable[[np.ndarray], np.ndarray]:
    compiled = bundle / "model_edgetpu.tflite"
    on_edgetpu = compiled.exists() and not cpu
    model = interpreter(compiled if on_edgetpu else bundle / "model.tflite", threads, edgetpu=on_edgetpu)
    source, sink = model.get_input_details()[0], model.get_output_details()[0]

    def run(q: np.ndarray) -> np.ndarray:
        model.set_tensor(source["index"], q.reshape(source["shape"]))
        model.invoke()
        return model.get_tensor(sink["index"])

    return run


def pipeline(bundle: Path, plan: dict[str, Any], threads: int, cpu: bool) -> Callable[[np.ndarray], np.ndarray]:
    """pipeline.json's segments in order; tensors pass between them by their index in the whole model."""
    files = [(bundle / s["file"], s["device"] == "edgetpu" and not cpu) for s in plan["segments"]]
    files = [(path.with_name(f"{path.stem}_edgetpu.tflite") if on_edgetpu else path, on_edgetpu)
             for path, on_edgetpu in files]
    missing = [path.name for path, _ in files if not path.exists()]
    if missing:
        sys.exit(f"run.py: {', '.join(missing)} missing: compile the Edge TPU segments here with "
                 f"`{plan['compile']}`, or pass --cpu to run every segment on the CPU")
    steps = [(interpreter(path, threads, edgetpu=on_edgetpu), segment["inputs"], segment["outputs"])
             for (path, on_edgetpu), segment in zip(files, plan["segments"])]
    (first,), (last,) = plan["inputs"], plan["outputs"]

    def run(q: np.ndarray) -> np.ndarray:
        values = {first: q}
        for model, inputs, outputs in steps:
            for detail, tensor in zip(model.get_input_details(), inputs):
                model.set_tensor(detail["index"], values[tensor].reshape(detail["shape"]))
            model.invoke()
            for detail, tensor in zip(model.get_output_details(), outputs):
                values[tensor] = model.get_tensor(detail["index"])
        return values[last]

    return run


def model_runner(bundle: Path = HERE, threads: int = 1, cpu: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """The quantized input -> the quantized output of the bundle in `bundle`, by its pipeline when it has one."""
    plan = bundle / "pipeline.json"
    if plan.exists():
        return pipeline(bundle, json.loads(plan.read_text()), threads, cpu)
    return single_model(bundle, threads, cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run model.tflite on raw examples with the manifest's preprocessing.")
    parser.add_argument("inputs", type=Path, help="a .npy file of raw examples, one per row")
    parser.add_argument("--json", action="store_true", help="print the predictions as JSON")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cpu", action="store_true", help="run every part of the model with the plain interpreter")
    args = parser.parse_args()

    pre = json.loads((HERE / "manifest.json").read_text())["preprocessing"]
    run = model_runner(HERE, args.threads, args.cpu)
    into, out = pre["input_quantization"], pre["output_quantization"]
    prepare, predictions = Preprocessor(pre), []
    for i, raw in enumerate(np.load(args.inputs)):
        try:
            x = prepare.array(raw)  # token ids for text models, else raw * scale + offset (standardized)
        except BadInput as err:
            sys.exit(f"run.py: {args.inputs}[{i}] {err}")
        q = quantize(x, into["scale"], into["zero_point"], np.dtype(pre["input_dtype"]))
        logits = dequantize(run(q.reshape(pre["model_input_shape"]))[0], out["scale"], out["zero_point"])
        predictions.append(int(np.argmax(logits)))
    labels = pre["label_names"]
    if args.json:
        print(json.dumps({"predictions": predictions, "labels": [labels[p] for p in predictions]}))
    else:
        for index, p in enumerate(predictions):
            print(index, labels[p])


if __name__ == "__main__":
    main()
