"""Edge TPU partition against the real compiler.

google-coral/test_data keeps CPU models beside the `*_edgetpu.tflite` files that
Coral's `edgetpu_compiler` made from them. The builtin and custom operators left
in a compiled file are what the compiler left on the CPU (its
`edgetpu-custom-op` holds the mapped part), so each pair scores edgecc's
prediction (`edgecc.edgetpu.predict_edgetpu`) per operator type. The files are
read from a git snapshot of the repository (the `fetch` tool's mirror, or any
clone's `.git`) with `git cat-file`, never copied; a blob the snapshot lacks (a
large file) leaves its pair out.

    python scripts/bench_edgetpu.py [--mirror PATH] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from edgecc.edgetpu import compiled_cpu_op_counts, cpu_op_counts, predict_edgetpu
from edgecc.reader import read_graph
from edgecc.targets import load_target

ROOT = Path(__file__).resolve().parents[1]

MIRROR = Path("/work/.mirror/google-coral+test_data/repo")
COMPILED = "_edgetpu.tflite"
COCOMPILED = "_cocompiled_with_"  # cocompilation/X_cocompiled_with_Y_edgetpu.tflite was compiled from X.tflite


@dataclass(frozen=True)
class PairScore:
    pair: str                       # the compiled file's path in the repository
    cpu_model: str                  # the CPU model it was compiled from
    operators: int
    predicted: dict[str, int]       # operators edgecc predicts on the CPU, per type
    compiler: dict[str, int]        # operators the compiler left on the CPU, per type
    rejected: str | None

    @property
    def agree(self) -> bool:
        return self.predicted == self.compiler

    def differences(self) -> str:
        kinds = sorted(set(self.predicted) | set(self.compiler))
        return ", ".join(f"{k} {self.predicted.get(k, 0)} vs {self.compiler.get(k, 0)}" for k in kinds
                         if self.predicted.get(k, 0) != self.compiler.get(k, 0))


def _git(mirror: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", "--git-dir", str(mirror), *args], input=stdin, capture_output=True, check=False)


def _present(mirror: Path) -> dict[str, str]:
    """The .tflite files of the snapshot's HEAD whose blobs it holds: path -> blob id."""
    listing = _git(mirror, "ls-tree", "-r", "HEAD")
    if listing.returncode != 0:
        raise FileNotFoundError(f"{mirror} is not a readable git snapshot: {listing.stderr.decode().strip()}")
    shas = {}
    for line in listing.stdout.decode().splitlines():
        meta, path = line.split("\t", 1)
        if path.endswith(".tflite"):
            shas[path] = meta.split()[2]
    check = _git(mirror, "cat-file", "--batch-check", stdin="".join(f"{sha}\n" for sha in shas.values()).encode())
    missing = {line.split()[0] for line in check.stdout.decode().splitlines() if line.endswith(" missing")}
    return {path: sha for path, sha in shas.items() if sha not in missing}


def _read(mirror: Path, shas: list[str]) -> list[bytes]:
    """The blobs' bytes, in one `git cat-file --batch`."""
    out = _git(mirror, "cat-file", "--batch", stdin="".join(f"{sha}\n" for sha in shas).encode()).stdout
    contents, at = [], 0
    for _ in shas:
        end = out.index(b"\n", at)
        size = int(out[at:end].split()[2])
        contents.append(out[end + 1:end + 1 + size])
        at = end + 1 + size + 1
    return contents


def pairs(present: dict[str, str]) -> list[tuple[str, str]]:
    """(CPU model, compiled model) paths that are both readable, in path order."""
    found = []
    for compiled in sorted(p for p in present if p.endswith(COMPILED)):
        cpu = [f"{compiled.removesuffix(COMPILED)}.tflite"]
        if COCOMPILED in compiled:  # co-compiled files lie in their own folder: find X.tflite by name
            name = compiled.rsplit("/", 1)[-1].split(COCOMPILED)[0] + ".tflite"
            cpu = [p for p in present if p.rsplit("/", 1)[-1] == name]
        if len(cpu) == 1 and cpu[0] in present:
            found.append((cpu[0], compiled))
    return found


def score(mirror: Path = MIRROR) -> list[PairScore]:
    """The predictor on every readable pair, against what the compiler left on the CPU."""
    edgetpu = load_target("coral-usb").edgetpu
    assert edgetpu is not None
    present = _present(mirror)
    found = pairs(present)
    paths = sorted({path for pair in found for path in pair})  # a co-compiled file's CPU model is read once
    graphs = dict(zip(paths, map(read_graph, _read(mirror, [present[path] for path in paths]))))
    scores = []
    for cpu_model, compiled in found:
        graph = graphs[cpu_model]
        plan = predict_edgetpu(graph, edgetpu)
        scores.append(PairScore(compiled, cpu_model, len(graph.operators), cpu_op_counts(graph, plan.on_tpu),
                                compiled_cpu_op_counts(graphs[compiled]), plan.rejected))
    return scores


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {n}" for k, n in counts.items()) or "none"


def table(scores: list[PairScore]) -> str:
    lines = ["| pair (compiled file) | ops | predicted on the CPU | compiler's CPU ops | agree | differences (predicted vs compiler) |",
             "|---|---|---|---|---|---|"]
    for s in scores:
        lines.append(f"| {s.pair} | {s.operators} | {_counts(s.predicted)} | {_counts(s.compiler)} | "
                     f"{'yes' if s.agree else 'NO'} | {s.differences() or '-'} |")
    return "\n".join(lines)


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_estimator import write_section  # the section writer every benchmark script shares

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", type=Path, default=MIRROR,
                        help="git directory of a google-coral/test_data snapshot (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    scores = score(args.mirror)
    head = _git(args.mirror, "rev-parse", "HEAD").stdout.decode().strip()
    agreeing = sum(s.agree for s in scores)
    body = "\n".join([
        "## Edge TPU partition against the real compiler",
        "",
        f"`python scripts/bench_edgetpu.py`, {date.today().isoformat()}, on {platform.machine()} "
        f"({platform.processor() or platform.system()}), google-coral/test_data at {head[:12]}. Each CPU model is "
        "partitioned by edgecc's prediction (no compiler installed) and compared per operator type with what "
        "Coral's `edgetpu_compiler` left on the CPU in the `_edgetpu.tflite` it made from that model (every operator "
        "of the compiled file but its `edgetpu-custom-op`). Co-compiled files are scored against their own CPU "
        "model. Pairs whose files the snapshot lacks are left out.",
        "",
        table(scores),
        "",
        f"{agreeing} of {len(scores)} pairs agree exactly.",
    ])
    print(body)
    write_section(args.out, "bench_edgetpu", body)


if __name__ == "__main__":
    main()
