"""Resident memory of LiteRT with a model, measured on this host, against edgecc check's RAM estimate for a Linux board.

For each model (the committed fixtures, and the model.tflite and float.tflite of every `--build` folder given, e.g. a
reference task's rpi4 build) a fresh Python process loads the interpreter from the file (model_path, as the bundle's
run.py does), allocates the tensors and runs one input of ones (token id 1: a real token), then reports its peak
resident set (VmHWM in /proc/self/status; ru_maxrss would carry the parent's peak across fork and exec): with LiteRT's
default XNNPACK delegate, which repacks the weights into its own layout, and with the builtin kernels
alone (OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES), which read them in place. A process that only imports numpy
and the interpreter is the baseline; the model's share is the difference. edgecc check's estimate for a Linux target
(rpi4 here) is the profile's runtime figure plus this share: model file + repacked weights (every constant tensor
once more) + the activation plan; the table sets the measured share against that part. Each figure is the median of
`--runs` processes. Measured on this host's 64-bit Python, not on a board.

    python scripts/bench_rss.py [--build benchmarks/models/neu_det ...] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from bench_estimator import ROOT, write_section  # noqa: E402
from bench_imbalance import host  # noqa: E402

from edgecc.check import assess  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
TARGET = "rpi4"
CHILD = """
import sys
import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType
mode, path = sys.argv[1], sys.argv[2]
if mode != "baseline":
    resolver = OpResolverType.AUTO if mode == "xnnpack" else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    model = Interpreter(model_path=path, num_threads=1, experimental_op_resolver_type=resolver)
    model.allocate_tensors()
    for detail in model.get_input_details():
        model.set_tensor(detail["index"], np.ones(detail["shape"], detail["dtype"]))
    model.invoke()
status = open("/proc/self/status").read().splitlines()
print(int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) * 1024)
"""
MODES = ("baseline", "xnnpack", "builtin")


def peak_rss(mode: str, path: Path, runs: int) -> int:
    """The median peak resident set in bytes of `runs` fresh processes doing `mode` with the model at `path`."""
    figures = []
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-c", CHILD, mode, str(path)], capture_output=True, text=True,
                              check=True)
        figures.append(int(done.stdout.split()[-1]))
    return int(statistics.median(figures))


def estimate_parts(path: Path) -> dict[str, int]:
    """edgecc check's RAM estimate for TARGET, split: the profile's runtime figure and the model's part."""
    result = assess(path.read_bytes(), TARGET, measure_arena=False)
    ram = next(b for b in result.budgets if b.name == "RAM")
    runtime = result.target.memory.runtime_ram_bytes.value
    return {"runtime": int(runtime), "model_part": int(ram.value - runtime), "detail": ram.detail}


def models(builds: list[Path]) -> dict[str, Path]:
    found = {p.stem: p for p in sorted(FIXTURES.glob("*.tflite"))}
    for build in builds:
        for name in ("model.tflite", "float.tflite"):
            if (build / name).exists():
                found[f"{build.name}/{name}"] = build / name
    return found


def measure(builds: list[Path], runs: int) -> dict[str, Any]:
    baseline = peak_rss("baseline", FIXTURES / "vit_int8.tflite", runs)
    rows = []
    for name, path in models(builds).items():
        rss = {mode: peak_rss(mode, path, runs) for mode in MODES[1:]}
        row = {"model": name, "file_bytes": path.stat().st_size, **rss, **estimate_parts(path)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"date": date.today().isoformat(), "host": host(), "python": sys.version.split()[0], "runs": runs,
            "baseline": baseline, "rows": rows}


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def section(result: dict[str, Any], command: str) -> str:
    base = result["baseline"]
    lines = ["## Resident memory of LiteRT with a model (Linux boards)", "",
             f"`{command}`, {result['date']}, on {result['host']}, Python {result['python']}. " + " ".join(
                 __doc__.split("\n\n")[1].split()), "",
             f"Baseline (Python, numpy and the interpreter imported, no model): {mib(base)} MiB.", "",
             "| model | file (KiB) | peak RSS, XNNPACK (MiB) | peak RSS, builtin kernels (MiB) | model's share, XNNPACK "
             "(MiB) | model's share, builtin (MiB) | check's model part (MiB) | peak (XNNPACK) / check's whole "
             "estimate |", "|---|---|---|---|---|---|---|---|"]
    worst, fixed = 0.0, min(r["xnnpack"] for r in result["rows"]) - base
    for r in result["rows"]:
        ratio = r["xnnpack"] / (r["runtime"] + r["model_part"])
        worst = max(worst, ratio)
        lines.append(f"| {r['model']} | {r['file_bytes'] / 1024:,.0f} | {mib(r['xnnpack'])} | {mib(r['builtin'])} | "
                     f"{mib(r['xnnpack'] - base)} | {mib(r['builtin'] - base)} | {mib(r['model_part'])} | "
                     f"{ratio:.2f} |")
    lines += ["", f"check's whole RAM estimate for {TARGET} (the profile's runtime figure, "
              f"{mib(result['rows'][0]['runtime'])} MiB, for the board's OS and runtime, plus the model part) covers "
              f"the peak measured here on every model: {'yes' if worst <= 1.0 else 'NO'} (largest peak / estimate "
              f"{worst:.2f}). Its model part alone leaves out what every interpreter costs whatever its model (the "
              f"smallest share here, {mib(fixed)} MiB with XNNPACK: kernel code and the delegate's set-up), which the "
              "runtime figure holds; beyond that, compare the shares with the model part row by row."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, action="append", default=[], help="an edgecc build folder (repeatable)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    missing = [b for b in args.build if not (b / "model.tflite").exists()]
    if missing:
        sys.exit(f"not a build folder (no model.tflite): {', '.join(map(str, missing))}")
    result = measure(args.build, args.runs)
    (ROOT / "benchmarks" / "rss.json").write_text(json.dumps(result, indent=2) + "\n")
    command = "python scripts/bench_rss.py" + "".join(
        f" --build {b.resolve().relative_to(ROOT) if b.resolve().is_relative_to(ROOT) else b}" for b in args.build)
    write_section(args.out, "bench_rss", section(result, command))


if __name__ == "__main__":
    main()
