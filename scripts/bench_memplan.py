"""edgecc's memory planner against TFLite Micro's own: the arena with and without edgecc's offline plan.

For each model: edgecc.memplan.plan_for_micro chooses the operator order and writes
edgecc's offsets as the OfflineMemoryAllocation metadata; the real TFLite Micro
interpreter measures the smallest arena of the model as given (TFLite Micro's own
planner) and with the plan (bisection, edgecc.arena), and runs both on the same
random inputs to compare every output bit for bit. The models: the committed test
fixtures, the default digits build for esp32s3 (`--digits-build DIR` reads an
existing build's model.tflite, any offline plan in it removed first; without it,
the script builds one with edgecc.build under benchmarks/models/), and the public
TFLite Micro example models, read by path from a tflite-micro git snapshot
(`--tflm-repo`, a git directory; nothing is copied into the repository).
Writes the BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_estimator import ROOT, write_section  # noqa: E402
from bench_imbalance import host  # noqa: E402

from edgecc.errors import EdgeccError  # noqa: E402
from edgecc.memplan import METADATA_NAME, OfflinePlan, micro_outputs, plan_for_micro  # noqa: E402
from edgecc.reader import read_graph  # noqa: E402
from edgecc.tflite_edit import pack, unpack  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
# the public TFLite Micro example models, by their path in github.com/tensorflow/tflite-micro
TFLM_MODELS = {
    "hello_world_int8": "tensorflow/lite/micro/examples/hello_world/models/hello_world_int8.tflite",
    "hello_world_float": "tensorflow/lite/micro/examples/hello_world/models/hello_world_float.tflite",
    "micro_speech": "tensorflow/lite/micro/examples/micro_speech/models/micro_speech_quantized.tflite",
    "micro_speech preprocessor": "tensorflow/lite/micro/examples/micro_speech/models/audio_preprocessor_int8.tflite",
    "person_detect": "tensorflow/lite/micro/models/person_detect.tflite",
    "person_detect_vela": "tensorflow/lite/micro/models/person_detect_vela.tflite",
    "keyword_scrambled_8bit": "tensorflow/lite/micro/models/keyword_scrambled_8bit.tflite",
    "mnist_lstm": "tensorflow/lite/micro/examples/mnist_lstm/trained_lstm.tflite",
    "mnist_lstm_int8": "tensorflow/lite/micro/examples/mnist_lstm/trained_lstm_int8.tflite",
    "micro_speech_lstm (xtensa)": "third_party/xtensa/examples/micro_speech_lstm/micro_speech_lstm.tflite",
    "dtln noise suppression": "tensorflow/lite/micro/examples/dtln/dtln_noise_suppression.tflite",
}
DTYPES = {"INT8": np.int8, "UINT8": np.uint8, "INT16": np.int16, "INT32": np.int32, "FLOAT32": np.float32}
INPUT_SETS = 3


def without_plan(content: bytes) -> bytes:
    """`content` without an OfflineMemoryAllocation entry (its buffer emptied), as the converter wrote it."""
    model = unpack(content)
    entries = model.metadata or []
    for entry in entries:
        if entry.name == METADATA_NAME.encode():
            model.buffers[entry.buffer].data = None
    model.metadata = [e for e in entries if e.name != METADATA_NAME.encode()] or None
    return pack(model)


def digits_model(build_dir: Path | None) -> bytes:
    """The default digits build for esp32s3 (built here when no folder is given), without its offline plan."""
    if build_dir is None:
        from edgecc.build import build
        from edgecc.progress import Reporter

        build_dir = ROOT / "benchmarks" / "models" / "memplan_digits_esp32s3"
        build("esp32s3", None, build_dir, Reporter(), cache=ROOT / "build" / "cache")
    return without_plan((build_dir / "model.tflite").read_bytes())


def inputs_for(content: bytes, seed: int = 0) -> list[list[np.ndarray]]:
    """Random inputs of every input tensor's type and shape (small ids for int32, e.g. token ids)."""
    graph, rng = read_graph(content), np.random.default_rng(seed)
    sets = []
    for _ in range(INPUT_SETS):
        values = []
        for t in graph.inputs:
            tensor = graph.tensors[t]
            dtype = np.dtype(DTYPES[tensor.dtype])
            if dtype.kind == "f":
                values.append(rng.standard_normal(tensor.shape).astype(dtype))
            else:
                info = np.iinfo(dtype)
                high = 2 if dtype == np.int32 else info.max + 1
                values.append(rng.integers(0 if dtype == np.int32 else info.min, high, tensor.shape).astype(dtype))
        sets.append(values)
    return sets


def identical_outputs(content: bytes, plan: OfflinePlan) -> bool:
    """TFLite Micro's outputs of the model as given and with the plan, each in its smallest arena, bit for bit."""
    assert plan.arena_without is not None and plan.arena_with is not None
    inputs = inputs_for(content)
    before = micro_outputs(content, inputs, plan.arena_without.bytes)
    after = micro_outputs(plan.content, inputs, plan.arena_with.bytes)
    return all(a.dtype == b.dtype and np.array_equal(a, b) for one, two in zip(before, after) for a, b in zip(one, two))


def measure(name: str, content: bytes) -> dict[str, Any]:
    started = time.perf_counter()
    row: dict[str, Any] = {"model": name, "bytes": len(content)}
    try:
        plan = plan_for_micro(content)
    except EdgeccError as err:
        return {**row, "refused": f"edgecc cannot read it: {err}"}
    graph = read_graph(content)
    row.update(operators=len(graph.operators), tensors=len(graph.tensors), refused=plan.refused,
               reordered=plan.reordered, lower_bound=plan.memory.lower_bound_bytes,
               aligned_bound=plan.memory.aligned_lower_bound_bytes,
               lower_bound_given=plan.original.lower_bound_bytes, planned=plan.memory.planned_bytes,
               without=plan.arena_without.bytes if plan.arena_without else None,
               with_plan=plan.arena_with.bytes if plan.arena_with else None,
               head_without=plan.arena_without.head_bytes if plan.arena_without else None,
               head_with=plan.arena_with.head_bytes if plan.arena_with else None)
    if plan.refused is None:
        row["identical"] = identical_outputs(content, plan)
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def git_blob(repo: Path, path: str) -> bytes:
    return subprocess.run(["git", "--git-dir", str(repo), "show", f"HEAD:{path}"], check=True,
                          capture_output=True).stdout


def _b(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def section(rows: list[dict[str, Any]], command: str, snapshot: str) -> str:
    lines = [
        "## Memory planner: TFLite Micro arena with and without edgecc's offline plan",
        "",
        f"`{command}` on {date.today().isoformat()}, {host()}. tflite-micro models from snapshot {snapshot}. "
        "Arenas are the smallest the real TFLite Micro interpreter (tflite-micro Python package, host reference "
        "kernels) allocates in, found by bisection; 'head' is its non-persistent section (activations and scratch). "
        "The plan is edgecc.memplan's operator order and offsets written as the OfflineMemoryAllocation metadata; it "
        "is kept only when the measured arena is not larger. 'same outputs': TFLite Micro's outputs on "
        f"{INPUT_SETS} random inputs, each model in its smallest arena, bit for bit.",
        "",
        "| model | ops | lower bound (given order) | lower bound (chosen) | planned | planned / aligned bound "
        "| arena, TFLM's plan | arena, edgecc's plan (candidate) | head without / with | same outputs | plan |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "operators" not in r:
            lines.append(f"| {r['model']} | - | - | - | - | - | - | - | - | - | not planned: {r['refused']} |")
            continue
        ratio = f"{r['planned'] / r['aligned_bound']:.3f}" if r["aligned_bound"] else "-"
        same = {True: "yes", False: "NO"}.get(r.get("identical"), "-")
        plan = (f"not written: {r['refused']}" if r["refused"]
                else "written" + (", reordered" if r["reordered"] else ", converter's order kept"))
        lines.append(f"| {r['model']} | {r['operators']} | {_b(r['lower_bound_given'])} | {_b(r['lower_bound'])} | "
                     f"{_b(r['planned'])} | {ratio} | {_b(r['without'])} | {_b(r['with_plan'])} | "
                     f"{_b(r['head_without'])} / {_b(r['head_with'])} | {same} | {plan} |")
    measured = [r for r in rows if r.get("without") is not None]
    larger = [f"{r['model']} by {r['with_plan'] - r['without']:,} B" for r in measured if r["with_plan"] > r["without"]]
    shipped_larger = [r["model"] for r in measured if r["refused"] is None and r["with_plan"] > r["without"]]
    loose = [r["model"] for r in rows if r.get("refused") is None and "planned" in r
             and r["planned"] > 1.05 * r["aligned_bound"]]
    lines += ["", f"Goals: the arena of the model edgecc writes never larger than with TFLite Micro's own planner: "
                  f"{'yes' if not shipped_larger else 'NO: ' + ', '.join(shipped_larger)} ({len(measured)} models "
                  "measured; a plan the interpreter measures larger is not written"
                  + (f": {', '.join(larger)}" if larger else "") + "); planned "
                  f"activations within 1.05x of the lower bound of the chosen order where the plan is written: "
                  f"{'yes' if not loose else 'NO: ' + ', '.join(loose)} ('planned / bound' divides by the bound with "
                  "every tensor rounded up to 16 bytes, as TFLite Micro aligns every buffer: no plan it accepts is "
                  "smaller)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tflm-repo", type=Path, required=True, help="a tflite-micro git directory (bare or .git)")
    parser.add_argument("--digits-build", type=Path, help="an edgecc build folder of the default recipe for esp32s3")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    models = {name: (FIXTURES / f"{name}.tflite").read_bytes() for name in ("vit_int8", "text_int8")}
    models["digits (default build, esp32s3)"] = digits_model(args.digits_build)
    models.update({name: git_blob(args.tflm_repo, path) for name, path in TFLM_MODELS.items()})
    rows = []
    for name, content in models.items():
        rows.append(measure(name, content))
        print(rows[-1], flush=True)
    snapshot = subprocess.run(["git", "--git-dir", str(args.tflm_repo), "rev-parse", "--short", "HEAD"],
                              check=True, capture_output=True, text=True).stdout.strip()
    command = "python scripts/bench_memplan.py --tflm-repo TFLITE_MICRO_GIT" + (
        " --digits-build DIR" if args.digits_build else "")
    write_section(args.out, "bench_memplan", section(rows, command, snapshot))


if __name__ == "__main__":
    main()
