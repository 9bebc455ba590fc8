"""Run the edgecc-built model on this board, from this directory alone.

    python run.py INPUTS.npy [--json] [--threads N]

INPUTS.npy holds raw examples, one per row, in the form manifest.json's
"preprocessing.raw" describes (token ids for text models, made with its
"tokenizer" and "vocabulary"); this script applies the manifest's scaling and
int8 quantization, runs model.tflite (model_edgetpu.tflite with the Edge TPU
delegate when it is present) and prints the predicted label of each example.
Needs numpy and ai-edge-litert (or tflite-runtime on older boards).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent


def interpreter(threads: int) -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter, load_delegate
    except ImportError:
        from tflite_runtime.interpreter import Interpreter, load_delegate
    edgetpu_model = HERE / "model_edgetpu.tflite"
    if edgetpu_model.exists():
        return Interpreter(model_path=str(edgetpu_model), experimental_delegates=[load_delegate("libedgetpu.so.1")])
    return Interpreter(model_path=str(HERE / "model.tflite"), num_threads=threads)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run model.tflite on raw examples with the manifest's preprocessing.")
    parser.add_argument("inputs", type=Path, help="a .npy file of raw examples, one per row")
    parser.add_argument("--json", action="store_true", help="print the predictions as JSON")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    pre = json.loads((HERE / "manifest.json").read_text())["preprocessing"]
    model = interpreter(args.threads)
    model.allocate_tensors()
    source, sink = model.get_input_details()[0], model.get_output_details()[0]
    in_scale, in_zero = pre["input_quantization"]["scale"], pre["input_quantization"]["zero_point"]
    out_scale, out_zero = pre["output_quantization"]["scale"], pre["output_quantization"]["zero_point"]
    predictions = []
    for raw in np.load(args.inputs):
        if source["dtype"] == np.int32:  # text models take the token ids themselves
            q = raw.astype(np.int32)
        else:
            x = raw.astype(np.float32) * pre["scale"] + pre["offset"]
            if "standardize" in pre:  # per example, as "preprocessing.standardize" says
                x = (x - x.mean()) / (x.std() + 1e-3)
            q = np.clip(np.round(x / in_scale) + in_zero, -128, 127).astype(np.int8)
        model.set_tensor(source["index"], q.reshape(pre["model_input_shape"]))
        model.invoke()
        logits = (model.get_tensor(sink["index"])[0].astype(np.float32) - out_zero) * out_scale
        predictions.append(int(np.argmax(logits)))
    labels = pre["label_names"]
    if args.json:
        print(json.dumps({"predictions": predictions, "labels": [labels[p] for p in predictions]}))
    else:
        for index, p in enumerate(predictions):
            print(index, labels[p])


if __name__ == "__main__":
    main()
