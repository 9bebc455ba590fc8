"""Compression on three real tasks: each reference recipe built for rpi4, one row per task and stage.

For every task in `models/` (neu_det, cwru_bearing, trec) this runs `edgecc build
--target rpi4` on the data under ../shared/data (skipped, with the reason, when
absent), keeps the final `model.tflite`, `float.tflite` and `manifest.json` under
`benchmarks/models/<task>/` (git-ignored), writes every row to
`benchmarks/compression.json` and the table to BENCHMARKS.md. Accuracy is on each
task's fixed test split with the TFLite interpreter; host latency is int8 against
float TFLite on 1 thread, interleaved in the same process. Each row also carries edgecc check's rpi4 latency
estimate of its file (the target's estimate, which the brief judges device speed on; the host's depends on its
int8 instructions).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).parent))
from bench_estimator import ROOT, write_section  # noqa: E402
from bench_imbalance import host  # noqa: E402

from edgecc.build import build  # noqa: E402
from edgecc.check import assess  # noqa: E402
from edgecc.errors import EdgeccError  # noqa: E402
from edgecc.progress import Reporter  # noqa: E402
from edgecc.recipe import load_recipe  # noqa: E402

TASKS = ("neu_det", "cwru_bearing", "trec")
OUT = ROOT / "benchmarks"


def run_task(task: str, recipe_path: Path | None = None, out: Path | None = None,
             cache: Path | None = None) -> dict[str, Any]:
    """Build one task's recipe (default models/<task>.toml, kept in benchmarks/models/<task>; with edgecc's build
    `cache`, if given); returns its rows, or the reason it was skipped."""
    recipe_path = recipe_path or ROOT / "models" / f"{task}.toml"
    out = out or OUT / "models" / task
    data = load_recipe(recipe_path).recipe.data
    data_path = (recipe_path.parent / data.path).resolve()
    if not data_path.exists():
        return {"task": task, "skipped": f"data not found at {data_path}"}
    started = time.perf_counter()
    try:
        result = build("rpi4", recipe_path, out, Reporter(), cache=cache)
    except EdgeccError as err:
        return {"task": task, "skipped": f"build failed: {err}"}
    metrics = result.manifest["metrics"]
    records = metrics["stages"]
    teacher = records[0]
    estimate = {record["file"]: rpi4_estimate_ms(out / record["file"]) for record in records}
    rows = []
    for record in records:
        rows.append({
            "task": task, "stage": record["name"], "file": os.path.relpath(out / record["file"], ROOT),
            "chosen": record["file"] == "model.tflite", "accuracy": record["accuracy"],
            "validation_accuracy": record.get("validation", {}).get("accuracy"),
            "validation_task_metric": record.get("validation", {}).get("task_metric"),
            "student_validation": record.get("validation", {}).get("student_task_metric"),  # before int8
            "drop_points": round((teacher["accuracy"] - record["accuracy"]) * 100, 2),
            "bytes": record["bytes"], "gzip_bytes": record["gzip_bytes"], "parameters": record["parameters"],
            "size_ratio": round(teacher["bytes"] / record["bytes"], 2),
            "host_latency_ms": record["host_latency_ms"],
            "speedup_vs_float": record.get("speedup_vs_float", 1.0),
            "rpi4_estimate_ms": estimate[record["file"]],
            "rpi4_speedup_vs_float": round(estimate[teacher["file"]] / estimate[record["file"]], 2),
            "int8_weight_sparsity": _mean_sparsity(record.get("weight_sparsity", {})),
        })
    return {"task": task, "rows": rows, "build_seconds": round(time.perf_counter() - started),
            "date": date.today().isoformat(), "host": host(),
            "recipe": str(recipe_path.relative_to(ROOT)), "test_size": result.manifest["data"]["test_size"]}


def rpi4_estimate_ms(path: Path) -> float:
    """edgecc check's rpi4 latency estimate of a .tflite file (float or int8), in ms."""
    return assess(path.read_bytes(), "rpi4", measure_arena=False).latency.total_ms


def _mean_sparsity(per_tensor: dict[str, float]) -> float | None:
    return round(sum(per_tensor.values()) / len(per_tensor), 3) if per_tensor else None


def final_row(result: dict[str, Any]) -> dict[str, Any]:
    """The build's model.tflite (rows of runs before the validation-split choice lack `chosen`: their last stage)."""
    return next((row for row in result["rows"] if row.get("chosen")), result["rows"][-1])


def verdicts(result: dict[str, Any]) -> list[str]:
    """The issue's acceptance checks for one task, each with the figures it compares."""
    rows = {row["stage"]: row for row in result["rows"]}
    teacher, final = result["rows"][0], final_row(result)
    lines = [
        f"float teacher accuracy {teacher['accuracy']:.4f}",
        f"final int8 within 1.0 point of the teacher: {final['drop_points']:+.2f} points "
        f"({'yes' if final['drop_points'] <= 1.0 else 'NO'})",
        f"final int8 at least 8x smaller than the float TFLite: {final['size_ratio']:.2f}x "
        f"({'yes' if final['size_ratio'] >= 8 else 'NO'})",
        speed_verdict("final int8", final.get("rpi4_speedup_vs_float"), final["speedup_vs_float"], 3),
    ]
    baseline = rows.get("int8 after ptq of the teacher")
    if baseline and baseline["drop_points"] > 0.5:
        recovered = (baseline["drop_points"] - final["drop_points"]) / baseline["drop_points"]
        lines.append(f"PTQ alone loses {baseline['drop_points']:.2f} points; the final model recovers "
                     f"{recovered:.0%} of that ({'yes' if recovered >= 0.5 else 'NO'}, at least half required)")
    elif baseline:
        lines.append(f"PTQ alone loses {baseline['drop_points']:.2f} points (not more than 0.5: no recovery needed)")
    pruned = rows.get("int8 after prune")
    if baseline and pruned:
        lines.append(f"structured pruning: int8 latency {baseline['host_latency_ms']:.3f} ms -> "
                     f"{pruned['host_latency_ms']:.3f} ms (PTQ of the teacher -> PTQ of the pruned student)")
    return lines


def speed_verdict(what: str, rpi4_ratio: float | None, host_ratio: float, required: float) -> str:
    """A speed goal judged on edgecc check's rpi4 estimate, as the brief judges device speed; the host's figure
    beside it only informs, since the host's int8 speed depends on its instructions (VNNI or not)."""
    host_figure = f"{host_ratio:.2f}x on this run's host"
    if rpi4_ratio is None:
        return (f"{what} at least {required:g}x faster than float: not judged, this run recorded no rpi4 estimate "
                f"({host_figure})")
    verdict = "yes" if rpi4_ratio >= required else "NO"
    return (f"{what} {rpi4_ratio:.2f}x faster than float on the rpi4 estimate ({verdict}, at least {required:g}x; "
            f"{host_figure})")


def table(results: list[dict[str, Any]], header: list[str], row: Callable[[dict[str, Any]], list[str]],
          verdicts: Callable[[dict[str, Any]], list[str]]) -> str:
    """A Markdown table with one row per task and model, then each task's verdicts (or why it was skipped)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for result in results:
        if "skipped" in result:
            notes.append(f"- {result['task']}: skipped, {result['skipped']}")
            continue
        lines += ["| " + " | ".join(row(r)) + " |" for r in result["rows"]]
        notes.append(f"- **{result['task']}** ({result['recipe']}, {result['test_size']} test examples, "
                     f"built in {result['build_seconds']} s on {result.get('date', 'an earlier day')}"
                     + (f" on {result['host']}" if "host" in result else ", machine not recorded") + "): "
                     + "; ".join(verdicts(result)) + ".")
    return "\n".join(lines + [""] + notes)


def with_earlier_rows(results: list[dict[str, Any]], path: Path, tasks: tuple[str, ...]) -> list[dict[str, Any]]:
    """`results` plus, for the tasks not run this time, their rows from the previous run's JSON, in task order;
    written back to `path` for the next run."""
    earlier = {r["task"]: r for r in json.loads(path.read_text())} if path.exists() else {}
    fresh = {r["task"]: r for r in results}
    rows = [fresh.get(task) or earlier[task] for task in tasks if task in fresh or task in earlier]
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def parse_tasks(description: str, tasks: tuple[str, ...]) -> argparse.Namespace:
    """The command line of a per-task benchmark: the tasks to run (default all) and the BENCHMARKS.md to write."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("tasks", nargs="*", metavar="TASK",
                        help=f"tasks to run (default all: {', '.join(tasks)}); the others keep their last rows")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--cache", type=Path, help="edgecc's teacher and stage cache (default: none, train everything)")
    parser.add_argument("--render", action="store_true", help=RENDER_HELP)
    args = parser.parse_args()
    unknown = sorted(set(args.tasks) - set(tasks))
    if unknown:
        parser.error(f"unknown task {', '.join(unknown)}; tasks are {', '.join(tasks)}")
    if args.render and args.tasks:
        parser.error("--render runs no task; give either tasks or --render")
    args.tasks = [] if args.render else args.tasks or list(tasks)
    return args


RENDER_HELP = "run no task: write the section again from the stored rows (after a change to how they are judged)"


def command_line(script: str, tasks: list[str], option: str = "") -> str:
    """How and where a per-task benchmark's section was made: the tasks run (after `option`, if the script names
    them with one) on this host, or none (every row as its note dates it: this host measured nothing)."""
    if not tasks:
        return f"`python scripts/{script} --render` (no task run: every row is the stored one its note dates)"
    return f"`python scripts/{script} {option}{' '.join(tasks)}` (the tasks run), on {host()}"


def parse_cached_tasks(description: str, tasks: tuple[str, ...], default: tuple[str, ...]) -> argparse.Namespace:
    """The command line of a benchmark that builds some tasks with edgecc's teacher and stage cache: `--tasks`
    (default `default`; the others keep their last rows), `--cache` and the BENCHMARKS.md to write (`--out`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tasks", nargs="+", choices=tasks,
                        help=f"tasks to build (default: {' '.join(default)}); the others keep their last rows")
    parser.add_argument("--cache", type=Path, default=ROOT / "build" / "cache", help="teacher and stage cache")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--render", action="store_true", help=RENDER_HELP)
    args = parser.parse_args()
    if args.render and args.tasks:
        parser.error("--render runs no task; give either --tasks or --render")
    args.tasks = [] if args.render else args.tasks or list(default)
    return args


def _row(r: dict[str, Any]) -> list[str]:
    sparsity = "" if r["int8_weight_sparsity"] is None else f"{r['int8_weight_sparsity']:.1%}"
    validation = "" if r.get("validation_accuracy") is None else f"{r['validation_accuracy']:.4f}"
    return [r["task"], r["stage"] + (" (model.tflite)" if r.get("chosen") else ""), validation,
            f"{r['accuracy']:.4f}", f"{r['drop_points']:+.2f}", f"{r['bytes']:,}",
            f"{r['gzip_bytes']:,}", f"{r['parameters']:,}", f"{r['size_ratio']:.2f}x",
            f"{r['speedup_vs_float']:.2f}x ({r['host_latency_ms']:.3f} ms)", sparsity]


def main() -> None:
    args = parse_tasks(__doc__.splitlines()[0], TASKS)
    results = with_earlier_rows([run_task(task, cache=args.cache) for task in args.tasks], OUT / "compression.json",
                                TASKS)
    header = ["task", "stage", "validation accuracy", "test accuracy", "drop (points)", "file bytes", "gzip bytes",
              "params", "smaller than float", "int8 speed-up vs float", "int8 weight sparsity"]
    body = "\n".join([
        "## Compression on real tasks",
        "",
        f"{command_line('bench_compression.py', args.tasks)}; each note dates "
        "its rows and names the machine where it was recorded (host speed depends on its int8 instructions). "
        "Each task is "
        "`edgecc build --target rpi4 --recipe models/<task>.toml`; the build chooses model.tflite on the "
        "validation split (held out of all training), then measures the task's fixed test split, both with the "
        "TFLite interpreter; the drop and the verdicts are on the test split. File sizes are TFLite files; "
        "'smaller than float' divides the float teacher's TFLite file by the row's. Host latency is the median "
        "of 300 interleaved `invoke()` calls on 1 thread, float and every int8 model in the same process; the speed-up divides the float teacher's "
        "latency by the row's. Sparsity is the mean share of zeros in the int8 weight matrices of the file. "
        "Models and manifests are kept under `benchmarks/models/<task>/`; rows in `benchmarks/compression.json`.",
        "",
        table(results, header, _row, verdicts),
    ])
    print(body)
    write_section(args.out, "bench_compression", body)


if __name__ == "__main__":
    main()
