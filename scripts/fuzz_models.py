"""Fuzz campaign: malformed int8 models against every TensorFlow-free command.

Each mutant of a real int8 model (tests/fixtures, plus any .tflite given) is made
either through the schema's object API (a bad tensor, buffer, opcode or subgraph
index, a bad dimension, an unknown builtin code, a buffer placed past the end of
the file, ...; re-packed with a flatbuffers Builder) or by raw byte mutation
(flips, 32-bit overwrites, truncation). LiteRT is asked whether it loads each
mutant (in a forked child: it may crash), then `check --target rpi4`, `check
--target stm32h7`, `profile`, `bench`, `shadow` and `verify` run on it, each in a
forked child of a process that imported edgecc once (a fresh `edgecc` process
costs about a second of imports) with a time limit. Counted: exit 0 on a model
LiteRT refuses, tracebacks, deaths by signal, hangs, exit codes other than 0/1/2.
The table goes to BENCHMARKS.md.

    python scripts/fuzz_models.py [--mutants 10000] [--seed 0] [MODEL.tflite ...]
"""

from __future__ import annotations

import argparse
import faulthandler
import hashlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import date
from multiprocessing import active_children, get_context
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SEEDS = ("vit_int8.tflite", "gelu_int8.tflite")
TIMEOUT_S = 60
WORKER_MUTANTS = 500  # mutants one worker process runs before a fresh one takes over (bounds its memory)
COMMANDS = ("check-rpi4", "check-stm32h7", "profile", "bench", "shadow", "verify")
# the runtime whose refusal each command must not hide; verify compares hashes, it does not judge a model
JUDGE = {"check-rpi4": "litert", "check-stm32h7": "tflm", "profile": "litert", "bench": "litert", "shadow": "litert"}
Mutation = Callable[[np.random.Generator, bytes], bytes]


def _interesting(rng: np.random.Generator, count: int) -> int:
    """An index just past the end, far past it, negative or the largest int32."""
    return int(rng.choice([count, count + int(rng.integers(1, 100)), -2, -int(rng.integers(3, 1000)), 2**31 - 1]))


def _object_mutation(change: Callable[[np.random.Generator, object], None]) -> Mutation:
    """A mutation of the schema's object API (ModelT), re-packed into a new flatbuffer."""
    def mutate(rng: np.random.Generator, content: bytes) -> bytes:
        import flatbuffers
        from ai_edge_litert import schema_py_generated as schema

        model = schema.ModelT.InitFromPackedBuf(content, 0)
        change(rng, model)
        builder = flatbuffers.Builder(len(content) + 1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())
    return mutate


def _pick(rng: np.random.Generator, items: list) -> object:
    return items[int(rng.integers(len(items)))]


def _tensor_buffer(rng, model) -> None:
    _pick(rng, model.subgraphs[0].tensors).buffer = _interesting(rng, len(model.buffers)) % 2**32


def _op_index(attribute: str) -> Callable[[np.random.Generator, object], None]:
    def change(rng, model) -> None:
        op = _pick(rng, model.subgraphs[0].operators)
        values = list(getattr(op, attribute))
        values[int(rng.integers(len(values)))] = _interesting(rng, len(model.subgraphs[0].tensors))
        setattr(op, attribute, values)
    return change


def _opcode_index(rng, model) -> None:
    _pick(rng, model.subgraphs[0].operators).opcodeIndex = _interesting(rng, len(model.operatorCodes)) % 2**32


def _subgraph_io(rng, model) -> None:
    subgraph = model.subgraphs[0]
    attribute = "inputs" if rng.random() < 0.5 else "outputs"
    setattr(subgraph, attribute, [_interesting(rng, len(subgraph.tensors))])


def _dimension(rng, model) -> None:
    tensors = [t for t in model.subgraphs[0].tensors if t.shape is not None and len(t.shape)]
    tensor = _pick(rng, tensors)
    shape = [int(d) for d in tensor.shape]
    shape[int(rng.integers(len(shape)))] = int(rng.choice([-1, -int(rng.integers(2, 2**31 - 1)), 0, 2**31 - 1,
                                                            2**20, int(rng.integers(2, 64))]))
    tensor.shape = shape


def _shape_signature(rng, model) -> None:
    tensor = _pick(rng, [t for t in model.subgraphs[0].tensors if t.shape is not None and len(t.shape)])
    signature = [int(d) for d in tensor.shape]
    signature[int(rng.integers(len(signature)))] = int(rng.choice([-1, -2, 0, 7]))
    tensor.shapeSignature = signature if rng.random() < 0.8 else signature + [1]


def _builtin_code(rng, model) -> None:
    code = _pick(rng, model.operatorCodes)
    code.builtinCode = int(rng.choice([int(rng.integers(220, 100_000)), -int(rng.integers(1, 100)), 32]))
    code.deprecatedBuiltinCode = int(rng.choice([code.deprecatedBuiltinCode, 127, -1]))


def _opcode_version(rng, model) -> None:
    _pick(rng, model.operatorCodes).version = int(rng.choice([0, -1, int(rng.integers(2, 100))]))


def _buffer_offset(rng, model) -> None:
    """Move a constant buffer out of the flatbuffer, as TFLite's >2 GB layout does, to a bad place."""
    buffer = _pick(rng, [b for b in model.buffers if b.data is not None and len(b.data)] or model.buffers)
    size = len(buffer.data) if buffer.data is not None else 16
    buffer.data = None
    buffer.offset = int(rng.choice([2**40, 2**20, int(rng.integers(2, 100_000))]))
    buffer.size = int(rng.choice([size, 2**40, int(rng.integers(1, 1000))]))


def _buffer_size(rng, model) -> None:
    buffer = _pick(rng, [b for b in model.buffers if b.data is not None and len(b.data)])
    cut = int(rng.integers(-8, 9)) or 1
    buffer.data = buffer.data[:cut] if cut < 0 else np.concatenate([buffer.data, np.zeros(cut, np.uint8)])


def _tensor_type(rng, model) -> None:
    _pick(rng, model.subgraphs[0].tensors).type = int(rng.integers(0, 40))


def _quantization(rng, model) -> None:
    tensor = _pick(rng, [t for t in model.subgraphs[0].tensors if t.quantization is not None
                         and t.quantization.scale is not None])
    q = tensor.quantization
    if rng.random() < 0.5:
        q.scale = list(q.scale) * int(rng.integers(2, 5))
    else:
        q.quantizedDimension = int(rng.integers(-3, 10))
        q.scale = list(q.scale) * 3
        q.zeroPoint = list(q.zeroPoint) * 3


def _drop(rng, model) -> None:
    attribute = _pick(rng, ["subgraphs", "buffers", "operatorCodes"])
    setattr(model, attribute, [])


def _repack(rng, model) -> None:
    """No change: the control, which LiteRT and every command must accept."""


def _byte_flips(rng: np.random.Generator, content: bytes) -> bytes:
    data = bytearray(content)
    for _ in range(int(rng.integers(1, 9))):
        data[int(rng.integers(len(data)))] = int(rng.integers(256))
    return bytes(data)


def _word_overwrite(rng: np.random.Generator, content: bytes) -> bytes:
    """An aligned 32-bit field (offset, length, index) set to an interesting value."""
    data = bytearray(content)
    pos = int(rng.integers(len(data) // 4)) * 4
    value = int(rng.choice([0, 1, -1, 2**31 - 1, -2**31, len(data), int(rng.integers(-2**31, 2**31))]))
    data[pos:pos + 4] = value.to_bytes(4, "little", signed=True)
    return bytes(data)


def _truncate(rng: np.random.Generator, content: bytes) -> bytes:
    return content[:int(rng.integers(0, len(content)))]


MUTATIONS: dict[str, Mutation] = {
    "tensor buffer index": _object_mutation(_tensor_buffer),
    "operator input index": _object_mutation(_op_index("inputs")),
    "operator output index": _object_mutation(_op_index("outputs")),
    "opcode index": _object_mutation(_opcode_index),
    "subgraph input/output": _object_mutation(_subgraph_io),
    "dimension": _object_mutation(_dimension),
    "shape signature": _object_mutation(_shape_signature),
    "builtin code": _object_mutation(_builtin_code),
    "opcode version": _object_mutation(_opcode_version),
    "buffer offset/size": _object_mutation(_buffer_offset),
    "constant data size": _object_mutation(_buffer_size),
    "tensor type": _object_mutation(_tensor_type),
    "quantization": _object_mutation(_quantization),
    "empty table list": _object_mutation(_drop),
    "re-pack (control)": _object_mutation(_repack),
    "byte flips": _byte_flips,
    "32-bit overwrite": _word_overwrite,
    "truncation": _truncate,
}


def mutant(seeds: list[bytes], seed: int, index: int) -> tuple[str, int, bytes]:
    """Mutant `index` of the campaign `seed`: its kind, which seed model it mutates, its bytes; the same every time."""
    rng = np.random.default_rng([seed, index])
    name = list(MUTATIONS)[index % len(MUTATIONS)]
    origin = int(rng.integers(len(seeds)))
    return name, origin, MUTATIONS[name](rng, seeds[origin])


@dataclass
class Outcome:
    """What one command did with one mutant."""

    code: int | None = None  # exit code; None when killed by a signal
    signal: int | None = None
    traceback: bool = False
    stderr: str = ""


def _in_child(action: Callable[[], int], timeout_s: int) -> Outcome:
    """Run `action` in a forked child (own process group, stdout/stderr captured, SIGALRM after the time limit)."""
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                faulthandler.disable()  # a crash is counted from the exit status, not dumped into the parent's stderr
                os.setpgid(0, 0)
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                signal.alarm(timeout_s)
                code = action()
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
            except BaseException:  # exactly what Python would print for an uncaught exception
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        try:
            os.killpg(pid, signal.SIGKILL)  # what the command started (the arena worker) goes with it
        except ProcessLookupError:
            pass
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if os.WIFSIGNALED(status):
        return Outcome(signal=os.WTERMSIG(status), stderr=stderr)
    return Outcome(code=os.WEXITSTATUS(status), traceback="Traceback (most recent call last)" in stderr, stderr=stderr)


def litert_loads(content: bytes) -> bool:
    """Does LiteRT's interpreter load the model and allocate its tensors?"""
    def load() -> int:
        from ai_edge_litert.interpreter import Interpreter

        Interpreter(model_content=content).allocate_tensors()
        return 0
    outcome = _in_child(load, TIMEOUT_S)
    return outcome.code == 0 and not outcome.traceback


def tflm_loads(content: bytes) -> bool:
    """Does TFLite Micro (stm32h7's runtime; it ignores operator versions) allocate the model in 256 MiB?"""
    def load() -> int:
        from tflite_micro import runtime

        runtime.Interpreter.from_bytes(content, arena_size=256 * 1024 * 1024)
        return 0
    outcome = _in_child(load, TIMEOUT_S)
    return outcome.code == 0 and not outcome.traceback


def _edgecc(args: list[str]) -> Callable[[], int]:
    def run() -> int:
        from edgecc.cli import main

        os.environ["COLUMNS"] = "200"
        sys.argv = ["edgecc", *args]
        main()
        return 0
    return run


def command_args(command: str, folder: Path, seed_model: Path, data: Path) -> list[str]:
    model = folder / "model.tflite"
    return {
        "check-rpi4": ["check", str(model), "--target", "rpi4"],
        "check-stm32h7": ["check", str(model), "--target", "stm32h7"],
        "profile": ["profile", str(model), "--target", "rpi4"],
        "bench": ["bench", str(model), "--runs", "2", "--warmup", "0", "--quiet"],
        "shadow": ["shadow", "--baseline", str(seed_model), "--candidate", str(model), "--data", str(data),
                   "--log", str(folder.parent / "audit.jsonl"), "--quiet"],
        "verify": ["verify", str(folder)],
    }[command]


def warm_imports() -> None:
    """Import what the commands import, once per worker, so that each forked child starts warm."""
    import ai_edge_litert.interpreter  # noqa: F401
    import edgecc.bench  # noqa: F401
    import edgecc.check  # noqa: F401
    import edgecc.cli  # noqa: F401
    import edgecc.shadow  # noqa: F401
    import edgecc.verify  # noqa: F401
    import flatbuffers  # noqa: F401

    with open(os.devnull, "w") as devnull:  # typer imports its parameter machinery on the first call
        saved, sys.stderr = sys.stderr, devnull
        try:
            edgecc.cli.app(["verify", "/nonexistent/edgecc-fuzz"], prog_name="edgecc")
        except SystemExit:
            pass
        finally:
            sys.stderr = saved


def run_mutant(job: tuple[int, int, list[str], tuple[str, ...]]) -> dict:
    """Make mutant `index`, ask LiteRT about it, run every command on it; a row of plain data."""
    seed, index, seed_paths, commands = job
    seeds = [Path(p).read_bytes() for p in seed_paths]
    kind, origin, content = mutant(seeds, seed, index)
    row = {"index": index, "kind": kind, "bytes": len(content), "litert": litert_loads(content),
           "tflm": tflm_loads(content), "commands": {}}
    with tempfile.TemporaryDirectory(prefix="edgecc-fuzz-") as work:
        folder = Path(work) / "build"
        folder.mkdir()
        (folder / "model.tflite").write_bytes(content)
        (folder / "manifest.json").write_text(json.dumps(
            {"artifacts": {"model.tflite": {"sha256": hashlib.sha256(content).hexdigest()}}}))
        seed_model = Path(seed_paths[origin])  # shadow's baseline: the model the mutant came from
        data = Path(work) / "inputs.npy"
        np.save(data, np.random.default_rng(index).random((2, *_input_shape(seeds[origin])), dtype=np.float32))
        for command in commands:
            start = time.perf_counter()
            outcome = _in_child(_edgecc(command_args(command, folder, seed_model, data)), TIMEOUT_S)
            row["commands"][command] = {"code": outcome.code, "signal": outcome.signal, "traceback": outcome.traceback,
                                        "seconds": time.perf_counter() - start,
                                        "stderr": outcome.stderr[-2000:] if outcome.traceback or outcome.signal else
                                        outcome.stderr.strip().splitlines()[-1:]}
    return row


def _input_shape(content: bytes) -> tuple[int, ...]:
    from edgecc.reader import read_graph

    graph = read_graph(content)
    return graph.tensors[graph.inputs[0]].shape[1:]


@dataclass
class Tally:
    """The campaign's counts, per command and in total."""

    mutants: int = 0
    refused_by_litert: int = 0
    refused_by_tflm: int = 0
    by_kind: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    counts: dict[str, Counter] = field(default_factory=dict)

    def add(self, row: dict) -> None:
        self.mutants += 1
        self.by_kind[row["kind"]] += 1
        self.refused_by_litert += not row["litert"]
        self.refused_by_tflm += not row["tflm"]
        for command, result in row["commands"].items():
            counts = self.counts.setdefault(command, Counter())
            hang = result["signal"] == signal.SIGALRM
            verdicts = {
                "exit 0": result["code"] == 0,
                "exit 1": result["code"] == 1 and not result["traceback"],
                "exit 2": result["code"] == 2,
                "exit 0, runtime refuses": result["code"] == 0 and command in JUDGE and not row[JUDGE[command]],
                "exit 0, LiteRT refuses": result["code"] == 0 and not row["litert"] and command in JUDGE,
                "traceback": result["traceback"],
                "signal": result["signal"] is not None and not hang,
                "hang": hang,
                "other exit code": result["code"] not in (0, 1, 2, None),
            }
            counts.update(name for name, hit in verdicts.items() if hit)
            bad = [name for name in ("exit 0, runtime refuses", "traceback", "signal", "hang", "other exit code")
                   if verdicts[name]]
            if bad:
                self.failures.append(f"mutant {row['index']} ({row['kind']}), {command}: {', '.join(bad)}: "
                                     f"{result['stderr']}")


def campaign(mutants: int, seed: int, models: list[Path], commands: tuple[str, ...] = COMMANDS,
             workers: int = 2, log: Callable[[str], None] = print, minutes: float = math.inf) -> Tally:
    """Run `mutants` mutants over `workers` processes; every row is logged as it arrives.

    After `minutes` no further mutant is counted (the table says how many ran), so a campaign fits a time budget.
    """
    tally = Tally()
    deadline = time.monotonic() + minutes * 60
    for start in range(0, mutants, workers * WORKER_MUTANTS):
        jobs = [(seed, i, [str(m) for m in models], commands)
                for i in range(start, min(mutants, start + workers * WORKER_MUTANTS))]
        for row in _rows(jobs, workers, stall_s=(len(commands) + 2) * TIMEOUT_S + 120):
            tally.add(row)
            log(json.dumps(row))
            if time.monotonic() > deadline:
                return tally
    return tally


def _rows(jobs: list[tuple], workers: int, stall_s: float) -> Iterator[dict]:
    """The rows of `jobs` as they finish, from a fresh pool of `workers` processes.

    The workers are spawned, not forked: the caller may have threads (a pytest-xdist worker has), and a fork of a
    threaded process can deadlock in the child. A pool per batch, not ProcessPoolExecutor's max_tasks_per_child,
    bounds a worker's life: with it, Python 3.11's pool stops replacing workers (CPython gh-115634) and the campaign
    hangs after workers x limit mutants. A worker that dies raises BrokenProcessPool; if no mutant finishes within
    `stall_s` (every command has its own alarm), the workers are killed and the campaign fails instead of hanging.
    """
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=warm_imports)
    stalled = False
    try:
        pending = {pool.submit(run_mutant, job) for job in jobs}
        while pending:
            done, pending = wait(pending, timeout=stall_s, return_when=FIRST_COMPLETED)
            if not done:
                stalled = True
                for process in active_children():
                    process.kill()
                raise RuntimeError(f"fuzz campaign: no mutant finished in {stall_s:.0f} s; its workers were killed")
            for future in done:
                yield future.result()
    finally:
        pool.shutdown(wait=not stalled, cancel_futures=True)


def _shown(path: Path) -> str:
    """A mutated model as the table names it: its path in the repository, else as given."""
    return str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)


def table(tally: Tally, argv: list[str], seconds: float, asked: int, models: list[Path]) -> str:
    columns = ["exit 0", "exit 1", "exit 2", "exit 0, runtime refuses", "exit 0, LiteRT refuses", "traceback", "signal", "hang",
               "other exit code"]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    rows = [f"| {command} | " + " | ".join(str(counts[c]) for c in columns) + " |"
            for command, counts in tally.counts.items()]
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip() or "unknown"  # the verifier's fixes change the table
    return "\n".join([
        "## Fuzzing the TensorFlow-free commands with malformed models",
        "",
        f"`python scripts/fuzz_models.py {' '.join(argv)}` at revision {revision}, {date.today().isoformat()}, "
        f"on {cpu} "
        f"({os.cpu_count()} cores, 2 workers), {seconds / 60:.0f} min. {tally.mutants:,} mutants"
        f"{f' (of {asked:,} asked: the --minutes budget ran out)' if tally.mutants < asked else ''} of "
        f"{', '.join(_shown(m) for m in models)} ({len(MUTATIONS)} kinds, {tally.mutants // len(MUTATIONS):,}+ each); "
        "LiteRT "
        f"refuses {tally.refused_by_litert:,}, TFLite Micro {tally.refused_by_tflm:,}. Each command ran in a forked "
        f"child with a {TIMEOUT_S} s limit. \"Runtime\" is the target's: LiteRT, or TFLite Micro for stm32h7 (it "
        "ignores operator versions, so it runs some models LiteRT refuses). `verify` compares hashes with a "
        "matching manifest, so its exit 0 is right for any bytes.",
        "",
        "| command | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
        *rows,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", type=Path, help="more int8 .tflite models to mutate")
    parser.add_argument("--mutants", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", type=Path, default=Path("fuzz-log.jsonl"), help="one JSON row per mutant")
    parser.add_argument("--commands", default=",".join(COMMANDS), help="comma-separated, from: " + ", ".join(COMMANDS))
    parser.add_argument("--minutes", type=float, default=math.inf, help="stop counting after this long")
    args = parser.parse_args()
    commands = tuple(args.commands.split(","))
    if set(commands) - set(COMMANDS):
        parser.error(f"--commands: unknown {', '.join(sorted(set(commands) - set(COMMANDS)))}")
    start = time.perf_counter()
    with args.log.open("w") as log:
        models = [FIXTURES / s for s in SEEDS] + args.models
        tally = campaign(args.mutants, args.seed, models, commands,
                         log=lambda line: (log.write(line + "\n"), log.flush()), minutes=args.minutes)
    for failure in tally.failures:
        print(failure)
    body = table(tally, sys.argv[1:], time.perf_counter() - start, args.mutants, models)
    print(body)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_estimator import write_section

    write_section(ROOT / "BENCHMARKS.md", "fuzz", body)


if __name__ == "__main__":
    main()
