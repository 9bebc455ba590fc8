"""The board service's cost per input on this host, against the bare interpreter call, for the committed models.

For each fixture model, a bundle as tests/test_rollout.py makes it (the model, its manifest, the board scripts),
and for each `--bundle` folder `edgecc build` wrote (e.g. a reference task's), its model.tflite and manifest.json;
then per input: the bare call (set the int8 input, invoke, read the output) against the service's whole handling
of one input as the line sends it (a text line for a model with a tokenizer, tokenized by the service; else one .npy
file: read, preprocess, quantize, invoke, one audit record, the gates) in the `full` stage (the candidate alone)
with each fsync policy and with the log in memory, and in the `shadow` stage (both models).
`--before REF` also measures the board scripts as they were at git revision REF. The overhead is set against
edgecc check's latency estimate of the same model on a Raspberry Pi 4. The tables go to BENCHMARKS.md.

    python scripts/bench_service.py [--inputs 2000] [--before REF] [--bundle BUILD_DIR ...]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_estimator import ROOT, write_section  # noqa: E402
from bench_imbalance import host  # noqa: E402
from test_rollout import make_bundle  # noqa: E402

from edgecc.board import serve  # noqa: E402
from edgecc.board.preprocess import Preprocessor  # noqa: E402
from edgecc.bundle import BOARD_FILES  # noqa: E402
from edgecc.check import assess  # noqa: E402
from edgecc.data import Dataset, Preprocessing  # noqa: E402
from edgecc.runtime import Model  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
MEMORY = "/dev/shm"  # a tmpfs on Linux
MODELS = {"vit_int8": ((8, 8, 1), 10), "gelu_int8": ((8, 8, 1), 10), "text_int8": ((8,), 3)}
INTERVAL_S = 1.0
# column: (stage, log in memory, fsync interval in seconds (0: every record)); "before" columns run --before's scripts
NOW = {"every record, disk": ("full", False, 0.0), f"interval {INTERVAL_S:g} s, disk": ("full", False, INTERVAL_S),
       "every record, log in memory": ("full", True, 0.0),
       f"shadow, interval {INTERVAL_S:g} s, disk": ("shadow", False, INTERVAL_S)}
BEFORE = {"every record, disk": ("full", False, 0.0), "every record, log in memory": ("full", True, 0.0)}
CHOSEN = f"interval {INTERVAL_S:g} s, disk"  # the overhead table's column
LINE = "What is the melting point of the steel in this weld seam ?"  # a text model's input, as the line sends it


def fixture_bundle(work: Path, name: str) -> Path:
    shape, classes = MODELS[name]
    text = len(shape) == 1
    pre = Preprocessing(raw="token ids" if text else "sensor values", layout="NL token ids" if text else "NHWC",
                        input_shape=shape, scale=1.0, offset=0.0)
    labels = tuple(f"c{i}" for i in range(classes))
    dataset = Dataset(name, np.zeros((1, *shape), np.float32), np.zeros(1, np.int64), labels, np.arange(1),
                      np.arange(0), pre)
    return make_bundle(work / name, FIXTURES / f"{name}.tflite", dataset)


def built_bundle(work: Path, source: Path) -> Path:
    """A copy of what the service reads from a build folder: its model and manifest."""
    folder = work / source.resolve().name
    folder.mkdir()
    for name in ("model.tflite", "manifest.json"):
        shutil.copyfile(source / name, folder / name)
    return folder


def example_input(folder: Path) -> str | np.ndarray:
    """One raw input: a line of text for a model with a tokenizer, token ids for one that takes them, else values in
    0..1 of the bundle's shape."""
    pre = json.loads((folder / "manifest.json").read_text())["preprocessing"]
    if "vocabulary" in pre:
        return LINE
    shape, rng = tuple(pre["model_input_shape"][1:]), np.random.default_rng(0)
    if np.dtype(pre["input_dtype"]).kind == "i" and not pre["input_quantization"]["scale"]:
        return rng.integers(0, 50, shape).astype(np.int32)
    return rng.random(shape, np.float32)


def board_at(revision: str, work: Path) -> ModuleType:
    """serve.py as it was at git `revision`, imported with that revision's sibling board scripts (a package, so
    its relative imports find them and not today's)."""
    package = work / "before" / f"board_{revision.replace('-', '_').replace('.', '_')}"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in BOARD_FILES:
        source = subprocess.run(["git", "show", f"{revision}:toolchain/board/{name}"], cwd=ROOT, check=True,
                                capture_output=True).stdout
        (package / name).write_bytes(source)
    sys.path.insert(0, str(package.parent))
    return importlib.import_module(f"{package.name}.serve")


def per_input_ms(runs: dict[str, Callable[[], Any] | None], inputs: int) -> dict[str, float | None]:
    """Each run's fastest of 10 batches' mean wall time per call (None for a run that is None). The runs take turns
    within each of the 10 rounds, so that a slow spell of the machine falls on them alike; and on a shared machine
    a neighbour only ever adds time (as timeit's advice has it), while a median still moved by half from run to run
    here."""
    active = {name: run for name, run in runs.items() if run is not None}
    batches: dict[str, list[float]] = {name: [] for name in active}
    for _ in range(10):
        for name, run in active.items():
            start = time.perf_counter()
            for _ in range(inputs // 10):
                run()
            batches[name].append((time.perf_counter() - start) * 1000 / (inputs // 10))
    return {name: min(batches[name]) if name in batches else None for name in runs}


def read_file(path: Path) -> bytes:
    """A file's bytes through the thinnest calls Python has (os.open, os.read, os.close: one system call each)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def least_work(example: str | Path, pre: Preprocessor, log: int) -> Callable[[], None]:
    """The least any service must do per input besides the interpreter call: take the input in (a text line
    tokenized with the service's tokenizer; a .npy file's bytes read) and append one JSON record to the log."""
    take = functools.partial(pre.text, example) if isinstance(example, str) else functools.partial(read_file, example)

    def run() -> None:
        take()
        os.write(log, (json.dumps({"id": "r0000001", "class": 3}) + "\n").encode())
    return run


# The same least work for a file input in C (compiled with the system's `cc -O2` when there is one): open, read and
# close the file, append one JSON record; argv: the input file, the log, the inputs; prints microseconds per input.
NATIVE_LEAST = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
  static char data[1 << 20];
  char line[64];
  int log = open(argv[2], O_WRONLY | O_CREAT | O_APPEND, 0644), n = atoi(argv[3]);
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (int i = 0; i < n; i++) {
    int fd = open(argv[1], O_RDONLY);
    ssize_t got = read(fd, data, sizeof data);
    close(fd);
    if (got <= 0) return 1;
    int len = snprintf(line, sizeof line, "{\"id\":\"r%07d\",\"class\":%d}\n", i, data[got - 1] & 3);
    if (write(log, line, len) != len) return 1;
  }
  clock_gettime(CLOCK_MONOTONIC, &b);
  printf("%.3f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / 1e3 / n);
  return 0;
}
"""


def native_least_ms(example: Path, work: Path, inputs: int) -> float | None:
    """NATIVE_LEAST's time per input on `example`, the fastest of 10 runs, or None without a C compiler."""
    program = work / "native_least"
    if not program.exists():
        compiler = shutil.which("cc")
        if compiler is None:
            return None
        (work / "native_least.c").write_text(NATIVE_LEAST)
        subprocess.run([compiler, "-O2", "-o", str(program), str(work / "native_least.c")], check=True)
    runs = [subprocess.run([str(program), str(example), str(work / "native_least.jsonl"), str(inputs)], check=True,
                           capture_output=True, text=True).stdout for _ in range(10)]
    return min(float(us) for us in runs) / 1000


@contextlib.contextmanager
def service_run(board: ModuleType, folder: Path, column: tuple[str, bool, float], example: str | Path,
                name: str) -> Iterator[tuple[Any, Any] | None]:
    """`board`'s serve.py set up for the column's stage, log place and fsync policy, with its own rollout file
    `name`.toml in the bundle: (its Service, the Job of the input, a text line or an input file), or None when that
    serve.py rejects the input."""
    stage, in_memory, interval = column
    with tempfile.TemporaryDirectory(dir=MEMORY if in_memory else folder) as logs:
        toml = folder / f"{name}.toml"
        toml.write_text(f'baseline = "../{folder.name}_baseline.tflite"\nautomatic = false\n'
                        f'log = "{logs}/audit.jsonl"\nstate = "{logs}/state.json"\n')
        options = {"fsync_interval_s": interval} if interval else {}  # the scripts before --fsync fsync every record
        rollout = board.Rollout(board.gating.load(toml), **options)
        service = board.Service(rollout)
        if rollout.state["stage"] != stage:
            rollout.decide(stage, "command", "benchmark", {})
        job = board.Job(example.name, path=example) if isinstance(example, Path) else board.Job("line", text=example)
        try:
            yield None if "rejected" in service.handle(job) else (service, job)
        finally:
            rollout.log.close()


def measure(folder: Path, inputs: int, before: ModuleType | None) -> dict[str, Any]:
    """The bare call and the service per input on the bundle `folder`, its own model as the baseline. The bare call
    runs the interpreter of the service in the overhead column (`full`, `--fsync interval`): two interpreters of
    one model differed by 5% here, more than the service's own work on MiniLM."""
    shutil.copyfile(folder / "model.tflite", folder.parent / f"{folder.name}_baseline.tflite")
    example: str | Path = example_input(folder)
    pre = Preprocessor(json.loads((folder / "manifest.json").read_text())["preprocessing"])
    if isinstance(example, str):
        x = pre.text(example)
    else:
        x, example = example, folder.parent / f"{folder.name}_in.npy"
        np.save(example, x)
    content = (folder / "model.tflite").read_bytes()
    model = Model(content)
    q = model.input_quantization.quantize(x[np.newaxis], model.input["dtype"])

    boards = {"now": (serve, NOW), **({"before": (before, BEFORE)} if before else {})}
    with contextlib.ExitStack() as stack:
        log = os.open(folder / "least.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        stack.callback(os.close, log)
        services = {f"{when}: {label}": stack.enter_context(service_run(board, folder, column, example,
                                                                        f"rollout_{when}_{i}"))
                    for when, (board, columns) in boards.items() for i, (label, column) in enumerate(columns.items())}
        chosen = services[f"now: {CHOSEN}"]
        assert chosen is not None, f"{folder.name}: today's serve.py rejects its own example input"
        runs: dict[str, Callable[[], Any] | None] = {"bare": functools.partial(chosen[0].candidate.run, q),
                                                     "least": least_work(example, pre, log)}
        runs |= {name: None if s is None else functools.partial(s[0].handle, s[1]) for name, s in services.items()}
        times = per_input_ms(runs, inputs)
    return {"name": folder.name, "input": "text line" if isinstance(example, str) else ".npy file",
            "bare": times["bare"], "least": times["least"], "now": {label: times[f"now: {label}"] for label in NOW},
            "native": None if isinstance(example, str) else native_least_ms(example, folder.parent, inputs),
            "before": {label: times[f"before: {label}"] for label in BEFORE} if before else {},
            "rpi4": assess(content, "rpi4", measure_arena=False).latency}


def tables(rows: list[dict[str, Any]], revision: str | None) -> list[str]:
    """Per-input times, then the overhead against the bare call and against the rpi4 estimate."""
    before = [f"before ({revision}): {label}" for label in BEFORE] if revision else []
    now = [f"now: {label}" for label in NOW]
    lines = [f"| model | input | bare call | {' | '.join([*before, *now])} |",
             "|---|---|" + "---|" * (1 + len(before) + len(now))]
    for row in rows:
        figures = [*row["before"].values(), *row["now"].values()]
        lines.append(f"| {row['name']} | {row['input']} | {row['bare']:.3f} | "
                     + " | ".join("rejected" if ms is None else f"{ms:.3f}" for ms in figures) + " |")
    lines += ["", f"| model | overhead per input, now: {CHOSEN} (ms) | against the bare host call | least work per "
              "input, Python (ms) | against the bare host call | least work per input, C (ms) | against the bare host "
              "call | rpi4 estimate of the model (ms, band) | overhead against the rpi4 estimate |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        overhead, least, native, estimate = row["now"][CHOSEN] - row["bare"], row["least"], row["native"], row["rpi4"]
        lines.append(f"| {row['name']} | {overhead:.3f} | {overhead / row['bare']:+.0%} | {least:.4f} | "
                     f"{least / row['bare']:+.0%} | "
                     + ("n/a | n/a" if native is None else f"{native:.4f} | {native / row['bare']:+.0%}")
                     + f" | {estimate.total_ms:.4f} ({estimate.low_ms:.4f}-{estimate.high_ms:.4f}) | "
                     f"{overhead / estimate.total_ms:+.0%} |")
    worst = max(row["now"][CHOSEN] - row["bare"] for row in rows)
    under = [row["name"] for row in rows if row["now"][CHOSEN] - row["bare"] < 0.1 * row["bare"]]
    beyond = [row["name"] for row in rows if row["least"] >= 0.1 * row["bare"]]
    beyond_native = [row["name"] for row in rows if row["native"] is not None and row["native"] >= 0.1 * row["bare"]]
    return [*lines, "", f"The issue's target, under 10% of the bare host call with `--fsync interval {INTERVAL_S:g}`, "
                        f"holds for {', '.join(under) if under else 'none of these models'}; on this host it holds for "
                        f"any model whose call takes at least {10 * worst:.1f} ms (ten times the largest overhead "
                        "above). The least work per input is the least a Python service can do besides the call "
                        "(`least_work`: take the input in, append one JSON record, through Python's thinnest calls); "
                        "where it alone is 10% of the bare call or more, no Python service meets the target: "
                        f"{', '.join(beyond) if beyond else 'none of these models'}. The C column does the same "
                        "for a file input in C (NATIVE_LEAST, the system's cc -O2; n/a: a text line, whose tokenizer "
                        "has no C version here): where it is 10% of the bare call or more, no service that takes its "
                        "inputs as files meets the target on this host, in any language: "
                        f"{', '.join(beyond_native) if beyond_native else 'none of these models'}."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=2000)
    parser.add_argument("--before", metavar="REF", help="also measure the board scripts at this git revision")
    parser.add_argument("--bundle", type=Path, action="append", default=[], metavar="BUILD_DIR",
                        help="also a folder `edgecc build` wrote (model.tflite and manifest.json)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgecc-bench-service-"))
    try:
        before = board_at(args.before, work) if args.before else None
        folders = [fixture_bundle(work, name) for name in MODELS] + [built_bundle(work, b) for b in args.bundle]
        rows = [measure(folder, args.inputs, before) for folder in folders]
    finally:
        shutil.rmtree(work)
    body = "\n".join([
        "## Board service overhead per input",
        "",
        f"`python scripts/bench_service.py {' '.join(sys.argv[1:])}`, "
        f"{date.today().isoformat()}, on {host()}, Python {sys.version.split()[0]}, one interpreter thread. Per input "
        "in ms, the fastest of 10 batches, the columns taking turns in each of 10 rounds: the bare interpreter call "
        f"(set the int8 input, invoke, read the output; on the interpreter of the `{CHOSEN}` column's service) "
        "against serve.py's whole handling of one input as the line sends it (for a model with a tokenizer, the text "
        f"line \"{LINE}\", tokenized by the service; else one .npy file, read): preprocess, quantize, invoke, "
        "dequantize, one audit record written with one os.write, the gates; `full` runs the candidate alone, `shadow` "
        "both models. `rejected`: that revision's serve.py refuses the input. The audit log is on the temp directory's "
        "disk or in memory "
        f"({MEMORY}, where fsync returns at once), fsynced after every record (`--fsync every`, the default: a power "
        f"cut loses nothing answered) or at most every {INTERVAL_S:g} s (`--fsync interval {INTERVAL_S:g}`: a power "
        "cut loses at most that last second; a kill -9 loses nothing either way). "
        + (f"`before ({args.before})` is serve.py and its sibling scripts at that revision. " if args.before else "")
        + ("A row named after a `--bundle` folder is that build's own model.tflite and manifest.json. "
           if args.bundle else "")
        + "The overhead is a fixed cost per input (Python and numpy, plus the disk's fsync with `every`), so its share "
        "shrinks as the model grows: models whose call takes microseconds (the fixtures, the small reference tasks' "
        "builds) pay many times their call in Python. The last column sets the host-measured overhead against edgecc "
        "check's rpi4 latency estimate of the model (an estimate, not a measurement on a Pi; the Pi's Python is slower "
        "too).",
        "",
        *tables(rows, args.before),
    ])
    print(body)
    write_section(ROOT / "BENCHMARKS.md", "bench_service", body)


if __name__ == "__main__":
    main()
