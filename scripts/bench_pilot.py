"""`edgecc pilot report` on a 1,000,000-record audit log: wall time and peak memory, as a user runs it.

The log is generated into a temporary folder and removed afterwards: board-service records as the log
format writes them (predictions of three classes over the shadow, canary and full stages, about 2% of
them disagreeing, runtime errors, rejections, gate decisions, one torn last line). Each run is a fresh
`edgecc pilot report LOG --json --out ... --html ...` process (start-up and imports included); its peak
resident memory is the child's ru_maxrss. For scale, the table also gives the time this Python takes only
to parse every line with the json module, which no report of the log can avoid.

    python scripts/bench_pilot.py [--records 1000000] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_estimator import ROOT, write_section  # noqa: E402
from bench_imbalance import host  # noqa: E402

NAMES = ("ok", "crack", "scratch")


def generate(path: Path, records: int, seed: int = 0) -> list[str]:
    """Write the log; return the ids of one prediction in ten (they get field labels)."""
    rng = random.Random(seed)
    start = datetime(2026, 12, 1, tzinfo=timezone.utc)
    sha = {"baseline": "b" * 64, "candidate": "c" * 64}
    labelled = []

    def run(role: str, cls: int | None, ms: float, error: str | None = None) -> dict:
        return {"model_sha256": sha[role], "class": cls, "label": None if cls is None else NAMES[cls],
                "latency_ms": ms, "error": error}

    stages, third = ("shadow", "canary", "full"), records // 3
    with path.open("w") as f:
        for i in range(records):
            when = (start + timedelta(milliseconds=250 * i)).isoformat(timespec="microseconds")
            stage = stages[min(2, i // third)]
            if i in (third, 2 * third):
                record = {"kind": "decision", "id": f"d{i}", "time": when, "from": stages[i // third - 1],
                          "to": stage, "by": "gate", "reason": "every gate holds",
                          "evidence": {"inputs": i, "disagreement_upper": 0.021, "p99_ms": 1.9}}
            elif i % 500 == 7:
                record = {"kind": "rejected", "id": f"r{i}", "time": when, "input": f"/line/part{i}.png",
                          "reason": rng.choice(("not an image", "wrong size", "empty file"))}
            else:
                b = rng.choice((0, 0, 0, 1, 2))
                c = b if rng.random() < 0.98 else rng.randrange(3)
                cand = run("candidate", c, rng.lognormvariate(0.4, 0.2)) if i % 1000 else \
                    run("candidate", None, 0.3, "invoke failed")
                record = {"kind": "prediction", "id": f"p{i}", "time": when, "stage": stage,
                          "input": f"/line/part{i}.png", "input_sha256": f"{rng.getrandbits(256):064x}",
                          "answered_by": "baseline" if stage == "shadow" or (stage == "canary" and i % 5) else "candidate",
                          "baseline": run("baseline", b, rng.lognormvariate(1.6, 0.15)), "candidate": cand,
                          "agree": None if cand["error"] else b == c}
                if i % 10 == 0:
                    labelled.append(record["id"])
            f.write(json.dumps(record, separators=(",", ":")) + "\n")
        f.write('{"kind":"prediction","id":"torn","ti')
    return labelled


def timed(args: list[str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and peak resident bytes of one `edgecc` process."""
    exe = shutil.which("edgecc") or str(Path(sys.executable).with_name("edgecc"))
    start = time.perf_counter()
    process = subprocess.Popen([exe, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode not in (0, 1):
        raise SystemExit(f"edgecc {' '.join(args)} exited {process.returncode}: {process.stderr.read().decode()}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def parse_only(path: Path) -> float:
    """CPU seconds this Python takes only to parse every line of the log."""
    start = time.process_time()
    with path.open("rb") as f:
        for line in f:
            try:
                json.loads(line)
            except ValueError:
                pass
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgecc-bench-pilot-"))
    try:
        log, labels = work / "audit.jsonl", work / "labels.csv"
        ids = generate(log, options.records)
        labels.write_text("id,label\n" + "".join(f"{rid},{random.Random(rid).choice(NAMES)}\n" for rid in ids))
        size_mb = log.stat().st_size / 1e6
        common = [str(log), "--json", "--out", str(work / "report.json"), "--html", str(work / "report.html")]
        rows = []
        for what, extra in (("report, --json --html", []), (f"with --labels ({len(ids):,} ids)", ["--labels", str(labels)])):
            runs = [timed(["pilot", "report", *common, *extra]) for _ in range(options.runs)]
            rows.append(f"| {what} | {statistics.median(r[0] for r in runs):.1f} | "
                        f"{statistics.median(r[1] for r in runs):.1f} | {max(r[2] for r in runs) / 2**20:.0f} |")
        parse = parse_only(log)
        load = os.getloadavg()[0]  # other work on the machine slows every figure here
        summary = json.loads((work / "report.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    body = "\n".join([
        f"## Pilot report on a {options.records:,}-record audit log",
        "",
        f"`python scripts/bench_pilot.py --records {options.records} --runs {options.runs}`, {date.today().isoformat()}, "
        f"on {host()}, Python {sys.version.split()[0]}, load average {load:.1f} at the end. Log: {options.records:,} generated board-service records "
        f"({size_mb:.0f} MB; {summary['records'].get('prediction', 0):,} predictions, {summary['skipped']['count']} "
        "torn line), removed afterwards. Each run is a fresh `edgecc pilot report LOG --json --out FILE --html FILE` "
        f"process, {options.runs} runs; CPU time is the process's user + system time (wall time also counts the other work "
        "on a shared machine), peak memory its maximum resident set. Parsing every line with Python's json module "
        f"alone takes {parse:.1f} s of CPU here: no report of this log can take less in this Python.",
        "",
        "| command | median wall time (s) | median CPU time (s) | peak memory (MiB) |",
        "|---|---|---|---|",
        *rows,
    ])
    print(body)
    write_section(ROOT / "BENCHMARKS.md", "bench_pilot", body)


if __name__ == "__main__":
    main()
