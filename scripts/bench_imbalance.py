"""Imbalanced data no recipe was tuned on: reference recipes copied as a new user would, with and without
the imbalance handling.

Data sets (read by path from ../shared/data; nothing is copied):
- neu_det_10pct: NEU-DET steel surface defects (Song and Yan, Northeastern University; free for research),
  `models/neu_det.toml` with 90% of the training images of five of the six classes left out through
  `data.exclude`: they keep every tenth image (n = 10, 20, .., 240; crazing keeps all 240), so five defect
  classes have 24 training images against 240. The fixed test split (n = 241..300, 60 per class) is
  unchanged, so every class's recall is measured on 60 images. `neu_det` is the same recipe on the balanced
  set, for reference. `neu_det_first24` keeps n = 1..24 instead: NEU's images are numbered in capture
  order and neighbours look alike, so one block of 24 shows fewer of a class's variations than 24 spread
  over the class (a harder and less likely sample of a rare class; with handling and mixup only).
- sms_spam: the SMS Spam Collection (Almeida and Gomez Hidalgo, UCI, CC BY 4.0), 13% spam, as it is,
  with the from-scratch text recipe `models/trec.toml` copied to it (a seeded, stratified 20% test split).
  No from-scratch recipe here was made for it.

"with handling" is the recipe as a new user gets it now (train.balance = "sampling": every epoch of the
teacher, distillation and QAT draws each class as often as the largest; task.metric = balanced_accuracy for
early stopping and the choice of the final stage); "with, mixup" adds train.mixup = 0.2 (every training image
of an epoch blended with another, its target alike; off by default); "without" sets train.balance = "none"
and task.metric = "accuracy", which is what every build did before issue 12. Mixup is off by default because
of neu_det_first24: with it, 0.7222 balanced accuracy and 0.0667 worst-class recall (below); without it, in
this script's previous run (2026-12-03, BENCHMARKS.md at commit ab56b9c), 0.8333 and 0.4167 (one seed each).
Every build is `edgecc build --target rpi4` through `edgecc.build.build`; model.tflite is chosen on the
validation split (train.validation_fraction 0.1 of the training split, at least train.validation_min_per_class
= 5 images of each class), and figures are on the test split with the TFLite interpreter. The builds the goal
compares (neu_det and neu_det_10pct with handling, and neu_det_10pct with mixup) run with seeds 0, 1 and 2
(the recipe's seed: the validation split, the initial weights and every draw), since one class's recall on 60
test images has a standard error of about 5 points; the others with seed 0. One rebuild of neu_det_10pct with
mixup (seed 0) with the cache its first build filled (teacher and stages) times the cache.

    python scripts/bench_imbalance.py [--out BENCHMARKS.md] [--from-json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import tomllib
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_estimator import ROOT, write_section  # noqa: E402

from edgecc.build import build  # noqa: E402
from edgecc.progress import Reporter  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "benchmarks"
NEU_CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")
# of every class but the first, the training images (n = 1..240) whose number does not end in 0; the test
# split is n = 241..300
NEU_DROPPED = [f"{c}_{n}.jpg" for c in NEU_CLASSES[1:] for n in ("[1-9]", "[1-9][1-9]", "1[0-9][1-9]", "2[0-3][1-9]")]
# of every class but the first, training images n = 25..240: a block of 24 in capture order is kept
NEU_DROPPED_BLOCK = [f"{c}_{n}.jpg" for c in NEU_CLASSES[1:]
                     for n in ("2[5-9]", "[3-9][0-9]", "1[0-9][0-9]", "2[0-3][0-9]", "240")]
SMS_DATA = {"source": "text", "path": str(DATA / "sms_spam" / "SMSSpamCollection"), "format": "tsv",
            "header": True, "label_column": "0", "text_column": "1", "encoding": "utf-8", "test_fraction": 0.2}
WITHOUT = {"train": {"balance": "none"}, "task": {"metric": "accuracy"}}
WITH = {"task": {"metric": "balanced_accuracy"}}
MIXUP = {"train": {"mixup": 0.2}}
SEEDS = (0, 1, 2)  # one recall of 60 test images has a standard error of about 5 points: one seed cannot resolve 5


def merged(base: dict[str, Any], *changes: dict[str, Any]) -> dict[str, Any]:
    """The base recipe's tables with each change's fields set; a None value removes a field."""
    merged = {key: dict(value) if isinstance(value, dict) else value for key, value in base.items()}
    for change in changes:
        for table, fields in change.items():
            section = merged.setdefault(table, {})
            for name, value in fields.items():
                if value is None:
                    section.pop(name, None)
                else:
                    section[name] = value
    return merged


def relocatable(recipe_file: Path) -> dict[str, Any]:
    """The recipe file's tables with its data paths made absolute, so that a copy written elsewhere reads the same
    data."""
    recipe = tomllib.loads(recipe_file.read_text(encoding="utf-8"))
    for field in ("path", "test_path"):
        if field in recipe.get("data", {}):
            recipe["data"][field] = (recipe_file.parent / recipe["data"][field]).resolve().as_posix()
    return recipe


def to_toml(recipe: dict[str, Any]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)  # a JSON string or number is a TOML one

    top = [f"{k} = {value(v)}" for k, v in recipe.items() if not isinstance(v, dict)]
    tables = [f"[{k}]\n" + "\n".join(f"{n} = {value(x)}" for n, x in v.items())
              for k, v in recipe.items() if isinstance(v, dict)]
    return "\n\n".join(["\n".join(top), *tables]) + "\n"


def recipes() -> list[tuple[str, str, dict[str, Any]]]:
    """(data set, handling, recipe) for every build, the recipes' paths made absolute; the builds the goal compares
    once for each of SEEDS (the recipe's seed sets the validation split, the initial weights and every draw)."""
    neu = tomllib.loads((ROOT / "models" / "neu_det.toml").read_text())
    neu["data"]["path"] = str(DATA / "neu_det" / "images")
    trec = tomllib.loads((ROOT / "models" / "trec.toml").read_text())
    sms = merged(trec, {"data": {**SMS_DATA, "test_path": None, "label_pattern": None}})
    sms["name"] = "sms-spam-transformer"
    few = {"data": {"exclude": NEU_DROPPED}}
    compared = [("neu_det", "with", merged(neu, WITH)), ("neu_det_10pct", "with", merged(neu, few, WITH)),
                ("neu_det_10pct", "with, mixup", merged(neu, few, WITH, MIXUP))]
    return [
        *((d, h, {**r, "seed": seed}) for d, h, r in compared for seed in SEEDS),
        ("neu_det_10pct", "without", merged(neu, few, WITHOUT)),
        ("neu_det_first24", "with, mixup", merged(neu, {"data": {"exclude": NEU_DROPPED_BLOCK}}, WITH, MIXUP)),
        ("sms_spam", "with", merged(sms, WITH)),
        ("sms_spam", "without", merged(sms, WITHOUT)),
    ]


def _figures(record: dict[str, Any]) -> dict[str, Any]:
    classes = record["classes"]
    recalls = {c["name"]: c["recall"] for c in classes["per_class"] if c["recall"] is not None}
    worst = min(recalls, key=recalls.get)
    return {"accuracy": classes["accuracy"], "balanced_accuracy": classes["balanced_accuracy"],
            "macro_f1": classes["macro_f1"], "worst_recall": recalls[worst], "worst_class": worst}


def run_one(data_set: str, handling: str, recipe: dict[str, Any], work: Path, cache: Path) -> dict[str, Any]:
    """Build one recipe for rpi4; the teacher's and the final model's figures."""
    seed = recipe.get("seed", 0)
    slug = f"{data_set}_{handling.replace(', ', '_').replace(' ', '_')}{f'_seed{seed}' if seed else ''}"
    path = work / f"{slug}.toml"
    path.write_text(to_toml(recipe))
    out = OUT / "models" / f"imbalance_{slug}"
    started = time.perf_counter()
    result = build("rpi4", path, out, Reporter(), cache=cache)
    seconds = time.perf_counter() - started
    manifest = result.manifest
    stages = manifest["metrics"]["stages"]
    final = next(r for r in stages if r["file"] == "model.tflite")
    return {"data_set": data_set, "handling": handling, "seed": seed,
            "metric": recipe.get("task", {}).get("metric", "accuracy"),
            "seconds": round(seconds), "final_stage": final["name"], "training": manifest["training"],
            "train_counts": manifest["data"].get("examples_per_class"),
            "teacher": _figures(stages[0]), "final": _figures(final),
            "budgets_failed": [b["name"] for b in manifest["budgets"] if b["status"] == "fail"],
            "warnings": manifest["warnings"], "teacher_source": manifest.get("teacher", {}).get("source"),
            "judged_on": manifest["selection"]["judged_on"], "judged_on_size": manifest["selection"]["judged_on_size"]}


def cached_rebuild(data_set: str, handling: str, recipe: dict[str, Any], work: Path, cache: Path) -> dict[str, Any]:
    """The same recipe built again with the cache its first build filled: the time the teacher cache saves."""
    again = run_one(data_set, handling, recipe, work, cache)
    return {"seconds": again["seconds"], "teacher_source": again["teacher_source"]}


def table(rows: list[dict[str, Any]]) -> str:
    header = ["data set", "imbalance handling", "seed", "recipe metric", "model", "accuracy", "balanced accuracy",
              "worst-class recall", "build (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        for model in ("teacher", "final"):
            f = r[model]
            name = "float teacher" if model == "teacher" else f"final int8 ({r['final_stage']})"
            lines.append(f"| {r['data_set']} | {r['handling']} | {r['seed']} | {r['metric']} | {name} | "
                         f"{f['accuracy']:.4f} | "
                         f"{f['balanced_accuracy']:.4f} | {f['worst_recall']:.4f} ({f['worst_class']}) | "
                         f"{r['seconds'] if model == 'final' else ''} |")
    return "\n".join(lines)


def runs_of(rows: list[dict[str, Any]], data_set: str, handling: str) -> list[dict[str, Any]]:
    """The rows of one data set and handling, one per seed."""
    return [r for r in rows if (r["data_set"], r["handling"]) == (data_set, handling)]


def across_seeds(rows: list[dict[str, Any]], data_set: str, handling: str, figure: str) -> str:
    """The final models' `figure` for each seed, then their mean: "0.7500, 0.8500 (seeds 0, 1; mean 0.8000)"."""
    runs = runs_of(rows, data_set, handling)
    values = [r["final"][figure] for r in runs]
    if len(runs) == 1:
        return f"{values[0]:.4f} (seed {runs[0]['seed']})"
    return (f"{', '.join(f'{v:.4f}' for v in values)} (seeds {', '.join(str(r['seed']) for r in runs)}; "
            f"mean {np.mean(values):.4f})")


def mean_final(rows: list[dict[str, Any]], data_set: str, handling: str, figure: str) -> float:
    return float(np.mean([r["final"][figure] for r in runs_of(rows, data_set, handling)]))


def verdicts(rows: list[dict[str, Any]], rebuild: dict[str, Any], first_seconds: int) -> list[str]:
    lines = []
    gap = (mean_final(rows, "neu_det", "with", "worst_recall")
           - mean_final(rows, "neu_det_10pct", "with", "worst_recall")) * 100
    lines.append(f"neu_det_10pct with handling: final int8 worst-class recall "
                 f"{across_seeds(rows, 'neu_det_10pct', 'with', 'worst_recall')} against the balanced set's "
                 f"{across_seeds(rows, 'neu_det', 'with', 'worst_recall')}: the mean {gap:.1f} points lower "
                 f"({'yes' if gap <= 5 else 'NO'}, within 5 required); with mixup "
                 f"{across_seeds(rows, 'neu_det_10pct', 'with, mixup', 'worst_recall')}; without handling "
                 f"{across_seeds(rows, 'neu_det_10pct', 'without', 'worst_recall')}")
    lines.append(f"neu_det_10pct with handling: final int8 balanced accuracy "
                 f"{across_seeds(rows, 'neu_det_10pct', 'with', 'balanced_accuracy')}; with mixup "
                 f"{across_seeds(rows, 'neu_det_10pct', 'with, mixup', 'balanced_accuracy')}; on the balanced set "
                 f"{across_seeds(rows, 'neu_det', 'with', 'balanced_accuracy')}")
    for r in rows:
        if r["handling"] == "without":
            continue
        metric = r["metric"]
        drop = (r["teacher"][metric] - r["final"][metric]) * 100
        lines.append(f"{r['data_set']} {r['handling']} (seed {r['seed']}): final int8 {metric} "
                     f"{r['final'][metric]:.4f} against the teacher's {r['teacher'][metric]:.4f}, {abs(drop):.2f} "
                     f"points {'lower' if drop > 0 else 'higher'} "
                     f"({'yes' if drop <= 1 else 'NO'}, within 1 required); chosen on {r['judged_on_size']} "
                     f"{r['judged_on']} examples")
    ratio = rebuild["seconds"] / max(first_seconds, 1)
    lines.append(f"rebuild of neu_det_10pct with mixup from the cache (teacher from: {rebuild['teacher_source']}): "
                 f"{rebuild['seconds']} s against {first_seconds} s, {ratio:.2f} of the first build "
                 f"({'yes' if ratio < 1 / 3 else 'NO'}, under a third required)")
    return lines


def host() -> str:
    """The CPU model and whether it has int8 dot-product instructions (VNNI), which set TFLite's int8 speed."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    vnni = [name for name in ("avx512_vnni", "avx_vnni") if name in flags]
    return f"{model}, {os.cpu_count()} cores, int8 ISA: {', '.join(vnni) if vnni else 'no VNNI'}"


def measure() -> dict[str, Any]:
    """Every build of `recipes()` and the cached rebuild, with the date and the machine."""
    work = Path(tempfile.mkdtemp(prefix="edgecc-imbalance-"))
    try:
        cache = work / "cache"
        rows = [run_one(d, h, r, work, cache) for d, h, r in recipes()]
        again = next((d, h, r) for d, h, r in recipes() if (d, h) == ("neu_det_10pct", "with, mixup"))
        rebuild = cached_rebuild(*again, work, cache)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"date": date.today().isoformat(), "host": host(), "rows": rows, "rebuild": rebuild}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--from-json", action="store_true",
                        help="write the section from benchmarks/imbalance.json, the last run's rows, without building")
    args = parser.parse_args()
    if args.from_json:
        result = json.loads((OUT / "imbalance.json").read_text())
    else:
        missing = [p for p in (DATA / "neu_det" / "images", DATA / "sms_spam" / "SMSSpamCollection") if not p.exists()]
        if missing:
            sys.exit(f"data not found: {', '.join(map(str, missing))}")
        result = measure()
        OUT.mkdir(exist_ok=True)
        (OUT / "imbalance.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = result["rows"]
    first = next(r for r in rows if (r["data_set"], r["handling"]) == ("neu_det_10pct", "with, mixup"))
    body = "\n".join([
        "## Imbalanced data no recipe was tuned on",
        "",
        f"`python scripts/bench_imbalance.py`, {result['date']}, on {result['host']}.",
        "",
        *"\n\n".join(__doc__.split("\n\n")[1:3]).splitlines(),
        "",
        table(rows),
        "",
        *(f"- {line}." for line in verdicts(rows, result["rebuild"], first["seconds"])),
        "",
        "Training examples per class and the warnings of every build are in `benchmarks/imbalance.json`.",
    ])
    print(body)
    write_section(args.out, "bench_imbalance", body)


if __name__ == "__main__":
    main()
