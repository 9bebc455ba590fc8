"""The TFLite Micro tensor arena, measured with the real TFLite Micro interpreter.

The recording allocator's "Arena allocation total" can be smaller than the
smallest arena that works, and a slightly too small arena can crash the
interpreter (SIGSEGV) instead of raising. So the smallest working arena is
found by bisection, each try in a forked child that may die without harm. All
of it runs in one worker process (`python -m edgecc.arena MODEL`), so a caller
that has threads (TensorFlow, progress bars) never forks itself.
"""

from __future__ import annotations

import faulthandler
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgecc.errors import EdgeccError, one_line
from edgecc.modelcheck import check_model_file
from edgecc.reader import Graph, read_graph

ALIGNMENT = 16
PROBE_ARENA = 256 * 1024 * 1024
TOTAL_PATTERN = re.compile(r"Arena allocation total (\d+) bytes")
SECTION_PATTERN = re.compile(r"Arena allocation (head|tail) (\d+) bytes")
KIND_PATTERN = re.compile(r"'([^']+)' used (\d+) bytes.*? for (\d+) ")
SOFTMAX_MIN_SCALE = 2.0**-26  # TFLite Micro's int8 softmax: input scale x beta x 2^(31 - 5 integer bits) must exceed 1


@dataclass(frozen=True)
class ArenaMeasurement:
    """Smallest arena (bytes) with which TFLite Micro allocates the model, how it was found, and what its
    recording allocator says fills it: the head (the non-persistent section: the activations' plan and the
    kernels' scratch buffers) and the tail (persistent runtime structures, by the kinds it records)."""

    bytes: int
    recorded_total: int
    tries: int
    method: str = "tflite-micro interpreter (host reference kernels), smallest arena found by bisection"
    head_bytes: int = 0
    tail_bytes: int = 0
    persistent: dict[str, int] = field(default_factory=dict)  # recorded kind -> bytes, "other" the unrecorded rest
    persistent_counts: dict[str, int] = field(default_factory=dict)  # recorded kind -> allocations (per op, tensor)


# the recording allocator's kinds of persistent allocation, for people (recording_micro_allocator.cc)
PERSISTENT_KINDS = {
    "NodeAndRegistration struct": "per-operator structures (NodeAndRegistration)",
    "Persistent buffer data": "operator data (kernels' persistent buffers)",
    "TfLiteEvalTensor data": "per-tensor structures (TfLiteEvalTensor)",
    "Persistent TfLiteTensor data": "input/output tensor structures (TfLiteTensor)",
    "Persistent TfLiteTensor quantization data": "their quantization data",
    "Persistent TfLiteTensor variable buffer data": "variable (state) tensors",
    "other": "allocator bookkeeping (not itemized by TFLite Micro)",
}


@dataclass(frozen=True)
class ArenaPart:
    """One share of the arena: what it is, its bytes, and how edgecc knows."""

    name: str
    bytes: int
    detail: str


def _allocations(n: int, count: int) -> str:
    """' (53 x 64 B)' for equal allocations, ' (42 allocations)' otherwise."""
    if not count:
        return ""
    return f" ({count} x {n // count:,} B)" if n % count == 0 else f" ({count} allocations)"


def arena_split(arena: ArenaMeasurement, lower_bound: int, planned: int | None) -> list[ArenaPart]:
    """The measured arena as parts that add up to it: where the RAM goes.

    `lower_bound` is edgecc's bound on the activations alive at once in the model's operator order; `planned`
    the end of the offline plan the model carries, edgecc's or its author's (then the rest of the head is scratch).
    """
    activations = min(planned if planned is not None else lower_bound, arena.head_bytes)
    if planned is not None:
        rest = ("scratch buffers", "kernels' scratch buffers that TFLite Micro could not fit into the gaps of "
                f"the offline plan (the plan itself: {planned:,} B, lower bound {lower_bound:,} B)")
        what = "the offline plan the model carries (OfflineMemoryAllocation metadata; edgecc's unless its author's)"
    else:
        rest = ("planner overhead and scratch", "what TFLite Micro's own greedy plan needs above the lower bound, "
                "with the kernels' scratch buffers")
        what = "the lower bound: the most activation bytes alive at once in the model's operator order"
    counts = arena.persistent_counts
    persistent = ", ".join(f"{PERSISTENT_KINDS.get(kind, kind)} {n:,} B"
                           + _allocations(n, counts.get(kind, 0))
                           for kind, n in sorted(arena.persistent.items(), key=lambda kv: -kv[1]))
    return [
        ArenaPart("planned activations", activations, what),
        ArenaPart(rest[0], arena.head_bytes - activations, rest[1]),
        ArenaPart("persistent runtime structures", arena.tail_bytes,
                  "on the 64-bit host, whose pointers are 8 bytes (a 32-bit board's structures are smaller): "
                  + (persistent or "not itemized")),
        ArenaPart("allocation slack", arena.bytes - arena.head_bytes - arena.tail_bytes,
                  "what the smallest working arena needs beyond head and tail: temporary allocations while the "
                  "interpreter prepares the operators, and alignment"),
    ]


def _fd_output(action: object) -> str:
    """Run `action()` and return what native code wrote to fds 1 and 2 meanwhile.

    The output goes to a temporary file, not a pipe: this process reads it only after `action` returns, so
    a pipe would block the writer for good once its buffer (64 KiB, or 4 KiB under a user's pipe limit) fills.
    """
    with tempfile.TemporaryFile() as capture:
        saved = os.dup(1), os.dup(2)
        sys.stdout.flush()
        os.dup2(capture.fileno(), 1)
        os.dup2(capture.fileno(), 2)
        try:
            action()  # type: ignore[operator]
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
        capture.seek(0)
        return capture.read().decode(errors="replace")


def _allocates(content: bytes, size: int) -> bool:
    """Does the model allocate in an arena of `size` bytes? Tried in a child that may crash."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            faulthandler.disable()  # a crash here is an expected answer, not a bug to report
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            from tflite_micro import runtime

            runtime.Interpreter.from_bytes(content, arena_size=size)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def _recorded(content: bytes) -> tuple[int, dict[str, int], dict[str, int]]:
    """Allocate once in a large arena and read the recording allocator: its total, head and tail, and the
    persistent allocations by kind."""
    from tflite_micro import runtime

    holder: list[object] = []

    def allocate() -> None:
        try:
            holder.append(runtime.Interpreter.from_bytes(content, arena_size=PROBE_ARENA))
        except Exception as err:  # the interpreter raises RuntimeError, its model parser others
            print(f"{type(err).__name__}: {err}", flush=True)

    log = _fd_output(allocate).strip()
    if not holder:
        reason = log.splitlines()[0] if log else "allocation failed"
        raise EdgeccError(f"TFLite Micro cannot allocate this model even in a 256 MiB arena: {reason}")
    log = _fd_output(holder[0].print_allocations)  # type: ignore[attr-defined]
    match = TOTAL_PATTERN.search(log)
    if not match:
        raise EdgeccError("TFLite Micro did not report its arena allocation")
    sections = {name: int(n) for name, n in SECTION_PATTERN.findall(log)}
    kinds = {name: (int(n), int(count)) for name, n, count in KIND_PATTERN.findall(log)}
    return int(match.group(1)), sections, kinds


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def smallest_arena(content: bytes) -> ArenaMeasurement:
    """Bisect for the smallest working arena, starting from the recorded total."""
    check_model_file(content)  # TFLite Micro trusts the file: a corrupt one can crash it or give a false arena
    total, sections, kinds = _recorded(content)
    tries = 0
    high = _align(total)
    while True:  # grow until it works: the total can fall short of what allocation needs
        tries += 1
        if _allocates(content, high):
            break
        high = _align(high + max(1024, high // 8))
        if high > PROBE_ARENA:
            raise EdgeccError("TFLite Micro allocates this model only in its recording run")
    low = _align(total * 49 // 50) - ALIGNMENT  # 2% below the total: expected to fail
    tries += 1
    if _allocates(content, low):  # rare: the total over-states the need; search further down
        low = 0
    while high - low > ALIGNMENT:  # both are multiples of ALIGNMENT, so middle lies strictly between
        middle = low + (high - low) // (2 * ALIGNMENT) * ALIGNMENT
        tries += 1
        if _allocates(content, middle):
            high = middle
        else:
            low = middle
    tail = sections.get("tail", 0)
    other = tail - sum(n for n, _ in kinds.values())
    persistent = {**{kind: n for kind, (n, _) in kinds.items()}, **({"other": other} if other > 0 else {})}
    return ArenaMeasurement(bytes=high, recorded_total=total, tries=tries, head_bytes=sections.get("head", 0),
                            tail_bytes=tail, persistent=persistent,
                            persistent_counts={kind: count for kind, (_, count) in kinds.items()})


def abort_cause(graph: Graph) -> str | None:
    """A known reason the TFLite Micro interpreter aborts the process while preparing `graph`, if any.

    Its int8 SOFTMAX Prepare turns the input scale into a multiplier that TFLITE_CHECKs to be above 1, and
    aborts otherwise: a softmax whose input calibration saw (almost) only zeros, e.g. an untrained model.
    The same kernels run on the board, so it would abort there too.
    """
    for index, op in enumerate(graph.operators):
        if op.kind == "SOFTMAX" and op.inputs:
            tensor = graph.tensors[op.inputs[0]]
            if tensor.dtype == "INT8" and tensor.scale and tensor.scale[0] <= SOFTMAX_MIN_SCALE:
                return (f"op {index} SOFTMAX: its int8 input scale {tensor.scale[0]:.3g} is at most 2^-26, so TFLite "
                        "Micro's softmax Prepare aborts (QuantizeMultiplierGreaterThanOne); it would on the board too")
    return None


def micro_interpreter(content: bytes, arena_bytes: int = PROBE_ARENA) -> Any:
    """The TFLite Micro interpreter with `content` allocated in `arena_bytes`; EdgeccError (one line) for a file it
    must not see, a model it would abort on or one it cannot allocate there."""
    check_model_file(content)  # TFLite Micro trusts the file: a corrupt one can crash it
    cause = abort_cause(read_graph(content))
    if cause:
        raise EdgeccError(f"TFLite Micro cannot run this model: {cause}")
    from tflite_micro import runtime

    from edgecc.progress import native_output_silenced  # not at the top: the arena worker process needs none of it

    try:
        with native_output_silenced():
            return runtime.Interpreter.from_bytes(content, arena_size=arena_bytes)
    except (RuntimeError, ValueError) as err:
        raise EdgeccError(f"TFLite Micro cannot allocate this model: {one_line(err)}") from None


def measure_arena(model: Path) -> ArenaMeasurement:
    """Measure in a worker process (safe to call from threaded programs)."""
    result = subprocess.run([sys.executable, "-m", "edgecc.arena", str(model)],
                            capture_output=True, text=True, timeout=600)
    if result.returncode < 0:  # killed by a signal: the interpreter aborted or crashed in its recording run
        raise EdgeccError(f"the TFLite Micro interpreter died with signal {-result.returncode} while allocating")
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise EdgeccError(lines[-1] if lines else "TFLite Micro arena measurement failed")
    return ArenaMeasurement(**json.loads(result.stdout))


def _worker(argv: list[str]) -> int:
    try:
        measurement = smallest_arena(Path(argv[0]).read_bytes())
    except EdgeccError as err:
        print(str(err), file=sys.stderr)
        return 2
    print(json.dumps(asdict(measurement)))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
