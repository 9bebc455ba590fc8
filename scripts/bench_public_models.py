"""`edgecc check` on public models that nothing in edgecc was tuned on: a verdict for each, never an internal error.

Every CPU model (`.tflite`, not a compiled `_edgetpu.tflite`) of a google-coral/test_data snapshot and of a
tensorflow/tflite-micro snapshot, read with git from the snapshots (the `fetch` tool's mirrors, or any clone's
`.git`; blobs a snapshot lacks are left out) into a temporary folder that is removed afterwards, is checked for
rpi4, stm32h7 and coral-usb by `edgecc check MODEL --target T --json`, each a fresh process as a user runs it. Per
target it counts exit 0 (fits), 1 (a budget is exceeded: which), 2 (bad input: the one-line message) and anything
else (3 is an internal error, a bug). The tables go to BENCHMARKS.md.

    python scripts/bench_public_models.py --coral-repo DIR --tflm-repo DIR [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_edgetpu import COMPILED, _git, _present, _read  # noqa: E402
from bench_estimator import ROOT, write_section  # noqa: E402
from bench_imbalance import host  # noqa: E402

from edgecc.errors import EdgeccError  # noqa: E402
from edgecc.reader import read_graph  # noqa: E402

TARGETS = ("rpi4", "stm32h7", "coral-usb")
GROUPED = 10  # a folder with more models than this (tflite-micro's per-operator integration tests) gets one row


@dataclass(frozen=True)
class Verdict:
    code: int
    words: str  # "fits", the budgets exceeded, or the bad-input message

    @property
    def cell(self) -> str:
        return {0: "fits", 1: f"over: {self.words}", 2: f"refused: {self.words}"}.get(
            self.code, f"EXIT {self.code}: {self.words}")


def check(exe: str, model: Path, target: str) -> Verdict:
    run = subprocess.run([exe, "check", str(model), "--target", target, "--json"], capture_output=True, text=True,
                         check=False)
    if run.returncode in (0, 1):
        budgets = json.loads(run.stdout)["budgets"]
        return Verdict(run.returncode, ", ".join(b["name"] for b in budgets if not b["ok"]) or "fits")
    message = run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "(no message)"
    return Verdict(run.returncode, message.removeprefix("edgecc: error: ")[:140].replace("|", "/"))


def models(repo: Path, label: str, work: Path) -> list[tuple[str, Path]]:
    """The snapshot's readable CPU models, written under `work`: (label:path, file)."""
    present = {p: sha for p, sha in _present(repo).items() if not p.endswith(COMPILED)}
    paths = sorted(present)
    found = []
    for path, content in zip(paths, _read(repo, [present[p] for p in paths])):
        file = work / label / path
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(content)
        found.append((f"{label}:{path}", file))
    return found


def _operators(file: Path) -> str:
    try:
        return str(len(read_graph(file.read_bytes()).operators))
    except EdgeccError:  # an invalid model: check's verdict says why
        return "-"


def tables(results: dict[str, dict[str, Verdict]], files: dict[str, Path]) -> list[str]:
    lines = ["| target | models | exit 0 (fits) | exit 1 (budget exceeded) | exit 2 (bad input) | other exits |",
             "|---|---|---|---|---|---|"]
    for target in TARGETS:
        codes = Counter(v[target].code for v in results.values())
        over = Counter(name for v in results.values() if v[target].code == 1 for name in v[target].words.split(", "))
        lines.append(f"| {target} | {len(results)} | {codes[0]} | {codes[1]} ("
                     + ", ".join(f"{n} {k}" for k, n in over.most_common()) + f") | {codes[2]} | "
                     + str(sum(n for c, n in codes.items() if c not in (0, 1, 2))) + " |")
    folders = Counter(name.rsplit("/", 1)[0] for name in results)
    lines += ["", "| model | bytes | operators | " + " | ".join(TARGETS) + " |",
              "|---|---|---|" + "---|" * len(TARGETS)]
    for name in sorted(results):
        folder = name.rsplit("/", 1)[0]
        if folders[folder] > GROUPED:
            continue
        lines.append(f"| {name} | {files[name].stat().st_size:,} | {_operators(files[name])} | "
                     + " | ".join(results[name][t].cell for t in TARGETS) + " |")
    for folder in sorted(f for f, n in folders.items() if n > GROUPED):
        mine = [v for name, v in results.items() if name.rsplit("/", 1)[0] == folder]
        cells = []
        for target in TARGETS:
            counts = Counter(v[target].cell for v in mine)
            cells.append("; ".join(f"{cell} x{n}" for cell, n in counts.most_common()))
        lines.append(f"| {folder}/ ({len(mine)} models) | | | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coral-repo", type=Path, required=True, help="git directory of google-coral/test_data")
    parser.add_argument("--tflm-repo", type=Path, required=True, help="git directory of tensorflow/tflite-micro")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    exe = shutil.which("edgecc") or str(Path(sys.executable).with_name("edgecc"))
    snapshots = {label: _git(repo, "rev-parse", "--short", "HEAD").stdout.decode().strip()
                 for label, repo in (("coral", args.coral_repo), ("tflite-micro", args.tflm_repo))}
    work = Path(tempfile.mkdtemp(prefix="edgecc-public-models-"))
    start = time.perf_counter()
    try:
        found = models(args.coral_repo, "coral", work) + models(args.tflm_repo, "tflite-micro", work)
        files = dict(found)
        jobs = [(name, target) for name in files for target in TARGETS]
        with ThreadPoolExecutor(max_workers=2) as pool:
            verdicts = list(pool.map(lambda job: check(exe, files[job[0]], job[1]), jobs))
        results: dict[str, dict[str, Verdict]] = {}
        for (name, target), verdict in zip(jobs, verdicts):
            results.setdefault(name, {})[target] = verdict
        body = "\n".join([
            "## `edgecc check` on public models nothing was tuned on",
            "",
            f"`python scripts/bench_public_models.py --coral-repo DIR --tflm-repo DIR`, {date.today().isoformat()}, on "
            f"{host()}, {time.perf_counter() - start:.0f} s. Every CPU model of google-coral/test_data (snapshot "
            f"{snapshots['coral']}) and tensorflow/tflite-micro (snapshot {snapshots['tflite-micro']}) that the "
            "snapshots hold (files of 4 MB and more are absent from them), each checked by `edgecc check MODEL "
            "--target T --json` in a fresh process. A verdict is fits (exit 0), the budgets exceeded (exit 1) or the "
            "bad-input message (exit 2); any other exit is a bug. Folders of more than "
            f"{GROUPED} models (tflite-micro's per-operator integration tests) are one row each, with each verdict's "
            "count.",
            "",
            *tables(results, files),
        ])
    finally:
        shutil.rmtree(work)
    print(body)
    write_section(args.out, "bench_public_models", body)


if __name__ == "__main__":
    main()
