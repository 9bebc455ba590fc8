"""The choice of model.tflite with and without the validation split's sampling noise, on builds already made.

For every build folder given (default: each folder under benchmarks/models whose manifest names a recipe file that
still exists), this reloads the recipe's data, runs each distinct int8 model of the build on the validation split the
build chose on (the manifest's data.validation_indices), checks that every figure is the manifest's (else the build
is skipped: its data or recipe changed since), and chooses again by the recipe's rule (compress.select): once with the
exact task.metric figures, once with differences within one standard error (selection.metric_noise) taken as ties
that the later stage wins. The table gives both choices, and the one the build made with the code of its day (a
0.3% faster latency estimate broke a metric tie then), with their test figures, which no choice saw. Builds whose
models gave the same figures (a target's variants of one training) are one row.

    python scripts/bench_select.py [BUILD_DIR ...] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_estimator import ROOT, write_section  # noqa: E402
from bench_imbalance import host  # noqa: E402

from edgecc.data import load_dataset  # noqa: E402
from edgecc.progress import Reporter  # noqa: E402
from edgecc.recipe import load_recipe  # noqa: E402
from edgecc.runtime import Model  # noqa: E402
from edgecc.classmetrics import score  # noqa: E402
from edgecc.selection import Candidate, metric_noise, select  # noqa: E402
from edgecc.evaluate import predictions  # noqa: E402

BUILDS = ROOT / "benchmarks" / "models"


def rechoose(folder: Path) -> dict[str, Any] | None:
    """Both choices of one build, or None when its recipe is gone or its figures cannot be reproduced."""
    manifest = json.loads((folder / "manifest.json").read_text())
    recipe_path = Path(manifest["recipe"].get("path") or "")
    validation = np.array(manifest["data"].get("validation_indices", []), dtype=np.int64)
    if not recipe_path.is_file() or not len(validation):
        return None
    recipe = load_recipe(recipe_path).recipe
    dataset = load_dataset(recipe.data, recipe.seed, recipe_path.parent)
    if len(dataset.y) <= validation.max():
        return None
    metric, classes = manifest["metrics"]["task_metric"]["name"], tuple(manifest["metrics"]["task_metric"]["classes"])
    students = manifest["metrics"]["stages"][1:]
    x, y = dataset.x[validation], dataset.y[validation]
    predicted = [predictions(Model((folder / r["file"]).read_bytes()), x, Reporter(), f"{folder.name}: {r['name']}")
                 for r in students]
    figures = [score(metric, classes, y, p, dataset.label_names) for p in predicted]
    if not np.allclose(figures, [r["validation"]["task_metric"] for r in students]):
        return None
    candidates = [Candidate(name=r["name"], failed=r["validation"]["failed_budgets"],
                            latency_ms=r["target_latency_ms"], metric=m, bytes=r["bytes"])
                  for r, m in zip(students, figures)]
    rule = manifest["selection"]["rule"]
    exact = select(candidates, rule).index
    noisy = select(candidates, rule, metric_noise(y, predicted, dataset.label_names, metric, classes,
                                                  seed=recipe.seed)).index
    return {"build": folder.name, "recipe": recipe_path.name, "metric": metric, "rule": rule,
            "validation_size": len(validation), "candidates": [c.name for c in candidates],
            "validation": figures, "test": [r["task_metric"] for r in students],
            "built": [c.name for c in candidates].index(manifest["selection"]["chosen"]), "exact": exact,
            "noise_aware": noisy}


def section(rows: list[dict[str, Any]], command: str) -> str:
    lines = ["## Choosing model.tflite with and without the validation split's noise", "",
             f"`{command}`, {date.today().isoformat()}, on {host()}. " + __doc__.split("\n\n")[1].replace("\n", " "),
             "", "| build | recipe | validation examples | as built (validation / test) | exact choice | noise-aware "
             "choice | noise-aware against exact, test (points) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        def cell(i: int) -> str:
            return f"{r['candidates'][i]} ({r['validation'][i]:.4f} / {r['test'][i]:.4f})"
        change = (r["test"][r["noise_aware"]] - r["test"][r["exact"]]) * 100
        lines.append(f"| {', '.join(r['builds'])} | {r['recipe']} | {r['validation_size']} | {cell(r['built'])} | "
                     f"{cell(r['exact'])} | {cell(r['noise_aware'])} | {change:+.2f} |")
    moved = [r for r in rows if r["exact"] != r["noise_aware"]]
    gained = sum((r["test"][r["noise_aware"]] - r["test"][r["exact"]]) * 100 for r in moved)
    rebuilt = [r for r in rows if r["built"] != r["noise_aware"]]
    since = sum((r["test"][r["noise_aware"]] - r["test"][r["built"]]) * 100 for r in rebuilt)
    lines += ["", f"The noise-aware rule chose another model than the exact one in {len(moved)} of {len(rows)} distinct "
                  f"builds (summed test task.metric change {gained:+.2f} points), and another than the build made in "
                  f"{len(rebuilt)} (summed test change {since:+.2f} points)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("builds", nargs="*", type=Path,
                        help="build folders (default: every one under benchmarks/models)")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    folders = args.builds or sorted(p.parent for p in BUILDS.glob("*/manifest.json"))
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for folder in folders:
        row = rechoose(folder)
        if row is None:
            print(f"{folder}: skipped (no recipe, no validation split, or figures that differ from the manifest's)")
            continue
        key = (row["recipe"], tuple(row["candidates"]), tuple(row["validation"]), tuple(row["test"]), row["built"])
        rows.setdefault(key, {**row, "builds": []})["builds"].append(row["build"])
    command = "python scripts/bench_select.py" + "".join(f" {f}" for f in args.builds)
    write_section(args.out, "bench_select", section(list(rows.values()), command))
    print(f"wrote the bench_select section of {args.out} ({len(rows)} distinct builds)")


if __name__ == "__main__":
    main()
