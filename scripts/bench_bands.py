"""Convolution stems in bands (patch-based inference, as in MCUNetV2) on TFLite Micro: does it shrink the arena?

A model whose activation peak lies in its first convolutions (an image model's stem: its input and the first
feature maps, all alive together) can run those convolutions band by band: each band of the stem's last output
rows computed from just the input rows it needs (a STRIDED_SLICE, then per layer a PAD for the rows and columns the
'same' padding adds at the image's edges, and the convolution with 'valid' padding), the bands joined by a
CONCATENATION. Every output value is computed from the same integers as before, so the outputs are bit-exact (the
real TFLite Micro interpreter checks it on random inputs). Each band recomputes its halo rows, and each copy of a
convolution is an operator of its own to TFLite Micro. For each model and each split (stem layers x bands) this
measures edgecc's activation lower bound and the smallest TFLite Micro arena (bisection, edgecc.arena), against the
model as given. The rewrite is an experiment kept here, not an edgecc pass. Models are read by path
(`--model NAME=PATH`, a build's model.tflite, its offline plan removed first; `--tflm-repo DIR` adds TFLite Micro's
person_detect from a git snapshot); nothing is copied into the repository. Writes the BENCHMARKS.md section.

    python scripts/bench_bands.py --model neu_det=build/neu_det/model.tflite --tflm-repo TFLITE_MICRO_GIT
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_estimator import ROOT, write_section  # noqa: E402
from bench_imbalance import host  # noqa: E402
from bench_memplan import TFLM_MODELS, without_plan  # noqa: E402

from edgecc.graphpass import EditGraph, _int32_constant, _operator, optimize, random_inputs, same_outputs  # noqa: E402
from edgecc.liveness import plan_memory  # noqa: E402
from edgecc.memplan import measured_arena, micro_outputs  # noqa: E402
from edgecc.reader import read_graph  # noqa: E402
from edgecc.requantize import same_padding  # noqa: E402
from edgecc.tflite_edit import add_tensor, one_dimension_quantized_along_it, tflite_schema, unpack  # noqa: E402

CONVOLUTIONS = ("CONV_2D", "DEPTHWISE_CONV_2D")
BAND_MARK = "/band"
LAYERS = (2, 3, 4)
BANDS = (2, 3, 4, 6, 8)
CHECKS = 3


@dataclass(frozen=True)
class Axis:
    """One convolution along one spatial axis: input and output extents, kernel, stride, padding before."""

    size: int
    out: int
    kernel: int
    stride: int
    before: int

    def padding(self, same: bool) -> tuple[int, int]:
        return same_padding(self.size, self.out, self.kernel, self.stride) if same else (0, 0)


def _axis(graph: EditGraph, index: int, axis: int) -> Axis:
    op = graph.op(index)
    options = op.builtinOptions
    kernel = graph.shape(int(op.inputs[1]))[axis]
    stride = options.strideH if axis == 1 else options.strideW
    size, out = graph.shape(int(op.inputs[0]))[axis], graph.shape(int(op.outputs[0]))[axis]
    before = Axis(size, out, kernel, stride, 0).padding(options.padding == 0)[0]
    return Axis(size, out, kernel, stride, before)


def stem(graph: EditGraph) -> list[int]:
    """The first chain of convolutions (each the only reader of the one before, no dilation), unless banded."""
    if any(BAND_MARK in tensor.name.decode() for tensor in graph.tensors):
        return []
    for index, kind in enumerate(graph.kinds):
        if kind not in CONVOLUTIONS:
            continue
        chain = [index]
        while True:
            options = graph.op(chain[-1]).builtinOptions
            if options.dilationHFactor != 1 or options.dilationWFactor != 1:
                chain.pop()
                break
            after = [graph.single_consumer(int(graph.op(chain[-1]).outputs[0]), k) for k in CONVOLUTIONS]
            following = next((a for a in after if a is not None), None)
            if following is None:
                break
            chain.append(following)
        return chain
    return []


def in_bands(layers: int, bands: int) -> Any:
    """A graph pass: the stem's first `layers` convolutions in `bands` bands of their last output's rows (or columns,
    where those are more)."""
    def rewrite(graph: EditGraph) -> int:
        chain = stem(graph)[:layers]
        if len(chain) < layers:
            return 0
        last = graph.op(chain[-1])
        result = int(last.outputs[0])
        shape = graph.shape(result)
        axis = 1 if shape[1] >= shape[2] else 2
        across = 3 - axis
        if shape[axis] < bands:
            return 0
        along = [_axis(graph, i, axis) for i in chain]
        others = [_axis(graph, i, across) for i in chain]
        edges = np.linspace(0, shape[axis], bands + 1).round().astype(int)
        name, source = graph.tensors[result].name.decode(), int(graph.op(chain[0]).inputs[0])
        operators, parts = [], []
        for band in range(bands):
            wanted = [(int(edges[band]), int(edges[band + 1]))]  # rows each layer outputs, from the last back
            needed = []
            for layer in reversed(along):
                start, stop = wanted[-1]
                low = start * layer.stride - layer.before
                high = (stop - 1) * layer.stride - layer.before + layer.kernel
                needed.append((low, high))
                wanted.append((max(low, 0), min(high, layer.size)))
            wanted.reverse()
            needed.reverse()
            tag = f"{name}{BAND_MARK}{band}"
            begin, end = [0] * 4, list(graph.shape(source))
            begin[axis], end[axis] = wanted[0]
            sliced_shape = list(graph.shape(source))
            sliced_shape[axis] = wanted[0][1] - wanted[0][0]
            current = add_tensor(graph.model, graph.tensors[source], f"{tag}/input", tuple(sliced_shape))
            operators.append(_operator(graph, "STRIDED_SLICE", 2, [
                source, _int32_constant(graph, f"{tag}/begin", begin), _int32_constant(graph, f"{tag}/end", end),
                _int32_constant(graph, f"{tag}/strides", [1, 1, 1, 1])], [current]))
            for layer, index in enumerate(chain):
                op = graph.op(index)
                pads = [[0, 0] for _ in range(4)]
                low, high = needed[layer]
                pads[axis] = [max(0, -low), max(0, high - along[layer].size)]
                pads[across] = list(others[layer].padding(op.builtinOptions.padding == 0))
                if any(p for pair in pads for p in pair):
                    padded_shape = list(graph.shape(current))
                    for dim in (1, 2):
                        padded_shape[dim] += sum(pads[dim])
                    padded = add_tensor(graph.model, graph.tensors[current], f"{tag}/pad{layer}", tuple(padded_shape))
                    like = tflite_schema().TensorT()
                    like.type = tflite_schema().TensorType.INT32
                    paddings = add_tensor(graph.model, like, f"{tag}/paddings{layer}", (4, 2),
                                          np.array(pads, "<i4").tobytes())
                    operators.append(_operator(graph, "PAD", 2, [current, paddings], [padded]))
                    current = padded
                out_shape = list(graph.shape(int(op.outputs[0])))
                out_shape[axis] = wanted[layer + 1][1] - wanted[layer + 1][0]
                out = add_tensor(graph.model, graph.tensors[int(op.outputs[0])], f"{tag}/conv{layer}", tuple(out_shape))
                conv = copy.deepcopy(op)
                conv.inputs = np.array([current, *(int(t) for t in op.inputs[1:])], np.int32)
                conv.outputs = np.array([out], np.int32)
                conv.builtinOptions.padding = 1  # VALID: the PAD above added what SAME did
                operators.append(conv)
                current = out
            parts.append(current)
        operators.append(_operator(graph, "CONCATENATION", 2, parts, [result], axis=axis, fusedActivationFunction=0))
        kept = []
        for index, op in enumerate(graph.subgraph.operators):
            kept += operators if index == chain[0] else []
            kept += [] if index in chain else [op]
        graph.subgraph.operators = kept
        return 1
    rewrite.__name__ = f"stem_in_{bands}_bands"
    return rewrite


def measure(name: str, content: bytes) -> dict[str, Any]:
    """The model as given against each split of its stem."""
    given = measured_arena(content)
    graph = read_graph(content)
    memory = plan_memory(graph)
    row: dict[str, Any] = {"name": name, "operators": len(graph.operators), "arena": given.bytes,
                           "persistent": given.tail_bytes, "bound": memory.lower_bound_bytes, "peak_op": memory.peak_op,
                           "stem": len(stem(EditGraph(unpack(content)))), "splits": []}
    inputs = random_inputs(one_dimension_quantized_along_it(content), CHECKS)
    for layers in LAYERS:
        for bands in BANDS:
            banded, _ = optimize(content, (in_bands(layers, bands),))
            if banded is content:
                continue
            arena = measured_arena(banded)
            split = read_graph(banded)
            row["splits"].append({"layers": layers, "bands": bands, "operators": len(split.operators),
                                  "bound": plan_memory(split).lower_bound_bytes, "arena": arena.bytes,
                                  "persistent": arena.tail_bytes,
                                  "exact": same_outputs(content, banded, inputs, micro_outputs)})
            print(name, row["splits"][-1], flush=True)
    return row


def section(rows: list[dict[str, Any]], command: str) -> str:
    lines = ["## Convolution stems in bands (patch-based inference) on TFLite Micro", "",
             f"`{command}`, {date.today().isoformat()}, on {host()}. {' '.join(__doc__.split(chr(10) * 2)[1].split())}",
             "",
             "| model | split (stem layers x bands) | operators | activation lower bound (B) | TFLite Micro arena (B) "
             "| persistent structures (B) | outputs bit-exact on TFLite Micro |", "|---|---|---|---|---|---|---|"]
    verdicts = []
    for row in rows:
        lines.append(f"| {row['name']} | as given (stem of {row['stem']}; activation peak at operator "
                     f"{row['peak_op']}) | {row['operators']} | {row['bound']:,} | {row['arena']:,} | "
                     f"{row['persistent']:,} | - |")
        for s in row["splits"]:
            change = (s["arena"] - row["arena"]) / row["arena"]
            lines.append(f"| {row['name']} | {s['layers']} x {s['bands']} | {s['operators']} | {s['bound']:,} | "
                         f"{s['arena']:,} ({change:+.1%}) | {s['persistent']:,} | {'yes' if s['exact'] else 'NO'} |")
        best = min(row["splits"], key=lambda s: s["arena"], default=None)
        if best is not None:
            verdicts.append(f"- **{row['name']}**: the smallest arena in bands is {best['arena']:,} B "
                            f"({best['layers']} layers x {best['bands']} bands), against {row['arena']:,} B as given "
                            f"({(best['arena'] - row['arena']) / row['arena']:+.1%}); the activation bound falls from "
                            f"{row['bound']:,} B to at best {min(s['bound'] for s in row['splits']):,} B, while the "
                            f"persistent structures grow from {row['persistent']:,} B to "
                            f"{best['persistent']:,} B at that split (each convolution copy keeps its own per-channel "
                            "multipliers and shifts, node and tensor structures).")
    return "\n".join([*lines, "", *verdicts])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                        help="a .tflite to measure (a build's model.tflite; its offline plan is removed first)")
    parser.add_argument("--tflm-repo", type=Path, help="a tensorflow/tflite-micro git directory: adds person_detect")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    models = []
    for given in args.model:
        name, _, path = given.partition("=")
        models.append((name, without_plan(Path(path).read_bytes())))
    if args.tflm_repo:
        models.append(("person_detect", subprocess.run(
            ["git", f"--git-dir={args.tflm_repo}", "show", f"HEAD:{TFLM_MODELS['person_detect']}"],
            check=True, capture_output=True).stdout))
    if not models:
        parser.error("give at least one --model NAME=PATH or --tflm-repo DIR")
    rows = [measure(name, content) for name, content in models]
    command = "python scripts/bench_bands.py " + " ".join(
        [*(f"--model {g.partition('=')[0]}=BUILD/model.tflite" for g in args.model),
         *(["--tflm-repo TFLITE_MICRO_GIT"] if args.tflm_repo else [])])
    body = section(rows, command)
    print(body)
    write_section(args.out, "bench_bands", body)


if __name__ == "__main__":
    main()
