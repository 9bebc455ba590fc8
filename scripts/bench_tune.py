"""edgecc tune on three real tasks: the searched front and chosen model against the hand-written reference recipe.

For every task in `models/` (neu_det, cwru_bearing, trec) this runs `edgecc tune --target rpi4` on the task's
reference recipe (at most 40 trials, its [tune] defaults derived from the recipe), then builds the chosen
best.toml and the reference recipe itself (both with the same build cache, so the teacher is trained once; each
tune run trains its trials afresh in a cache of its own seeded with that cache's teachers, so on a cold cache each
tune run trains the teacher too),
and compares them on accuracy, size against the float TFLite and speed-up against float (rpi4 estimate, host). With
`--ray-address local` (or a cluster's address) the same study also runs through Ray Tune, and its wall time
and front are reported beside the in-process run. Outputs under `benchmarks/models/tune/<task>/` (git-ignored),
rows in `benchmarks/tune.json`, the section in BENCHMARKS.md. `--recipe FILE` runs one recipe of your own
instead of the tasks (a dry run: `--recipe tests/...toml --trials 2 --out /tmp/B.md`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from bench_compression import TASKS, run_task, with_earlier_rows  # noqa: E402
from bench_estimator import ROOT, write_section  # noqa: E402
from bench_imbalance import host, merged, relocatable, to_toml  # noqa: E402

from edgecc.errors import EdgeccError  # noqa: E402
from edgecc.progress import Reporter  # noqa: E402
from edgecc.recipe import load_recipe  # noqa: E402
from edgecc.tune import RULE, TuneOptions, TuneResult, tune  # noqa: E402

OUT = ROOT / "benchmarks"
CACHE = OUT / "models" / "cache"
# The search keeps the recipe's relative budgets (max_accuracy_drop: the "within 1 point") and drops its
# absolute floor: the reference recipes' min_accuracy was set from test figures, and the search is judged on the
# validation split, where trec's teacher itself scores 0.839 against its 0.85 floor (no trial could be chosen).
SEARCHED = {"budgets": {"min_accuracy": None}}


def _final(built: dict[str, Any]) -> dict[str, Any]:
    """The model.tflite row of a bench_compression build."""
    return next(row for row in built["rows"] if row["file"].endswith("model.tflite"))


def _front(result: TuneResult) -> list[dict[str, Any]]:
    return [{key: row[key] for key in ("number", "task_metric", "latency_ms", "flash_bytes", "ram_bytes", "compress")}
            for row in result.rows if row["number"] in result.front]


def run(task: str, recipe: Path, trials: int, ray_address: str | None, time_budget_s: float | None) -> dict[str, Any]:
    """Tune one recipe (and again through Ray when asked), then build the chosen and the reference recipes."""
    data = load_recipe(recipe).recipe.data
    if data.path and not (recipe.parent / data.path).exists():
        return {"task": task, "skipped": f"data not found at {(recipe.parent / data.path).resolve()}"}
    out = OUT / "models" / "tune" / task
    out.mkdir(parents=True, exist_ok=True)
    searched = out / f"{task}.toml"
    searched.write_text(to_toml(merged(relocatable(recipe), SEARCHED)), encoding="utf-8")
    options = TuneOptions(target="rpi4", recipe=searched, out=out / "study", cache=CACHE, trials=trials,
                          time_budget_s=time_budget_s)
    runs = {}
    for name, opts in [("in-process", options),
                       *([("ray", replace(options, out=out / "ray-study", ray_address=ray_address))] if ray_address else [])]:
        opts = replace(opts, cache=_teacher_only_cache(out / f"{name}-cache"))
        shutil.rmtree(opts.out, ignore_errors=True)  # a new study: an old one would be resumed, its time not compared
        started = time.perf_counter()
        try:
            result = tune(opts, Reporter())
        except EdgeccError as err:
            return {"task": task, "skipped": f"tune failed: {err}"}
        runs[name] = {"seconds": round(time.perf_counter() - started), "trials": len(result.rows),
                      "front": _front(result), "chosen": result.chosen}
    chosen = runs["in-process"]["chosen"]
    reference = run_task(task, recipe, out / "reference", cache=CACHE)
    best = run_task(task, options.out / "best.toml", out / "best", cache=CACHE) if chosen else None
    return {"task": task, "date": date.today().isoformat(), "recipe": str(recipe), "runs": runs,
            "reference": None if "skipped" in reference else _final(reference),
            "teacher": None if "skipped" in reference else reference["rows"][0],
            "best": _final(best) if best and "skipped" not in best else None}


def _teacher_only_cache(folder: Path) -> Path:
    """A fresh build cache holding CACHE's trained teachers and no stage: a tune run's trials are then trained, not
    read back from an earlier run's (the same seed samples the same configurations), so two runs' times compare."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if (CACHE / "teachers").is_dir():
        shutil.copytree(CACHE / "teachers", folder / "teachers")
    return folder


def _model(row: dict[str, Any] | None) -> str:
    if row is None:
        return "| - | - | - | - | - | - |"
    estimated = (f"{row['rpi4_speedup_vs_float']:.2f}x ({row['rpi4_estimate_ms']:.3g} ms)"
                 if "rpi4_estimate_ms" in row else "-")
    return (f"| {row['accuracy']:.4f} | {row['drop_points']:+.2f} | {row['size_ratio']:.2f}x | {estimated} | "
            f"{row['speedup_vs_float']:.2f}x ({row['host_latency_ms']:.3f} ms) | {row['bytes']:,} |")


def _faster(best: dict[str, Any]) -> str:
    """The speed goal, judged on the target's estimate (the host's int8 speed depends on its instructions); a row
    recorded before the estimate was kept is judged on the host."""
    estimated = "rpi4_speedup_vs_float" in best
    where, key = ("the rpi4 estimate", "rpi4_speedup_vs_float") if estimated else ("the host", "speedup_vs_float")
    return f"at least 5x faster than float on {where}: {'yes' if best[key] >= 5 else 'NO'}"


def _verdicts(r: dict[str, Any]) -> str:
    best, ref = r["best"], r["reference"]
    if best is None:
        return "no trial met every budget"
    goals = [f"within 1 point of the teacher: {'yes' if best['drop_points'] <= 1.0 else 'NO'}",
             f"at least 10x smaller than float: {'yes' if best['size_ratio'] >= 10 else 'NO'}",
             _faster(best)]
    if ref is not None:
        speed = "rpi4_estimate_ms" if "rpi4_estimate_ms" in best and "rpi4_estimate_ms" in ref else "host_latency_ms"
        as_good = (best["accuracy"] >= ref["accuracy"] and best["bytes"] <= ref["bytes"] and best[speed] <= ref[speed])
        goals.append(f"at least as good as the reference on accuracy, size and speed: {'yes' if as_good else 'NO'}")
    return "; ".join(goals)


def section(results: list[dict[str, Any]], command: str) -> str:
    lines = ["## Tuning the compression (edgecc tune)", "",
             f"`{command}`, on {host()}. "
             "Each task's reference recipe, without its min_accuracy floor (set from test figures; the search keeps "
             "max_accuracy_drop), is searched by `edgecc tune --target rpi4` (Optuna NSGA-II, the [tune] "
             "space derived from the recipe); objectives: task.metric on the validation split (TFLite interpreter; "
             "build.held_out, the split each build chooses its model on) and the rpi4 estimates of latency, flash "
             "and RAM. Choice rule: " + RULE + ". The chosen best.toml and the reference recipe are then built "
             "(`edgecc build`); the table is on the test split, which neither the search nor the choices saw: "
             "accuracy, drop against the float teacher, size, and speed-up against the float TFLite: on edgecc "
             "check's rpi4 estimate, which the goal is judged on, and on this host (1 thread, interleaved; its int8 "
             "speed depends on its instructions). The search's first trial is the reference recipe's own "
             "configuration. Goals (issue 16): the chosen model within 1 point, at least 10x smaller and 5x faster "
             "than float, and at least as good as the reference on all three.", "",
             "| task | model | accuracy | drop (points) | smaller than float | rpi4 estimate speed-up | host speed-up "
             "| bytes |",
             "|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in results:
        if "skipped" in r:
            notes.append(f"- {r['task']}: skipped, {r['skipped']}")
            continue
        lines.append(f"| {r['task']} | reference recipe " + _model(r["reference"]))
        lines.append(f"| {r['task']} | tuned (best.toml) " + _model(r["best"]))
        runs = "; ".join(f"{name}: {run['trials']} trials in {run['seconds']} s, {len(run['front'])} on the front"
                         + (f", chosen trial {run['chosen']['number']} ({run['chosen']['task_metric']:.4f}, "
                            f"{run['chosen']['latency_ms']:.3g} ms on rpi4)" if run["chosen"] else ", none chosen")
                         for name, run in r["runs"].items())
        notes.append(f"- **{r['task']}** ({r['date']}): {runs}. {_verdicts(r)}.")
    return "\n".join(lines + [""] + notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", nargs="*", metavar="TASK", help=f"tasks (default all: {', '.join(TASKS)})")
    parser.add_argument("--recipe", type=Path, help="tune this recipe instead of the tasks (named after its file)")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="per task: start no trial after this long (edgecc tune --time-budget); a study rerun "
                             "with the same --out resumes it")
    parser.add_argument("--ray-address", help="also run the study through Ray ('local': a local cluster)")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    unknown = sorted(set(args.tasks) - set(TASKS))
    if unknown:
        parser.error(f"unknown task {', '.join(unknown)}; tasks are {', '.join(TASKS)}")
    if args.recipe:
        results = [run(args.recipe.stem, args.recipe.resolve(), args.trials, args.ray_address, args.time_budget)]
    else:
        fresh = [run(task, ROOT / "models" / f"{task}.toml", args.trials, args.ray_address, args.time_budget)
                 for task in args.tasks or TASKS]
        results = with_earlier_rows(fresh, OUT / "tune.json", TASKS)
    body = section(results, " ".join(["python scripts/bench_tune.py", *sys.argv[1:]]))
    print(body)
    write_section(args.out, "bench_tune", body)


if __name__ == "__main__":
    main()
