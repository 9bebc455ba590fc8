"""edgecc's reference transformers on TFLite Micro: what the graph passes remove, and test accuracy with TFLite
Micro's own interpreter.

For each task given (default: digits, the built-in recipe, and trec; also neu_det,
cwru_bearing and minilm_trec_1block, models/minilm/trec.toml pruned to its first encoder block with
x·sigmoid(1.702x) for GELU, which TFLite Micro has no kernel for, built for esp32s3 only: its 9,157-row
embedding table alone is over the STM32H7's 2 MB of flash) and each microcontroller target (esp32s3,
stm32h7) this runs `edgecc build`
twice through `edgecc.build.build`, teachers and stages from `--cache` (so the second
trains nothing): with the graph passes (edgecc.graphpass, the default) and without. It
keeps the builds under `benchmarks/models/micro_<task>_<target>[_nopasses]/` (git-ignored)
and judges both model.tflite files with `edgecc.check.assess` on the target: operators and
tensors, the TFLite Micro arena (real interpreter, bisected), edgecc's lower bound of the
activations, the estimated latency; and the build's TFLite Micro test accuracy beside
LiteRT's. Writes `benchmarks/micro.json` and the BENCHMARKS.md section; tasks not run keep
their last rows. A new before/after figure is one more entry in FIGURES.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from bench_compression import command_line, parse_cached_tasks, table, with_earlier_rows  # noqa: E402
from bench_estimator import ROOT, write_section  # noqa: E402
from bench_imbalance import host, merged, relocatable, to_toml  # noqa: E402

from edgecc.arena import PERSISTENT_KINDS  # noqa: E402
from edgecc.build import build  # noqa: E402
from edgecc.check import Assessment, assess  # noqa: E402
from edgecc.errors import EdgeccError  # noqa: E402
from edgecc.progress import Reporter  # noqa: E402

OUT = ROOT / "benchmarks"
MODELS = ROOT / "models"
TASKS = {"digits": None, "trec": MODELS / "trec.toml", "neu_det": MODELS / "neu_det.toml",
         "cwru_bearing": MODELS / "cwru_bearing.toml", "minilm_trec_1block": MODELS / "minilm" / "trec.toml"}
# a task built from another's recipe with these [compress] fields changed (its teacher is that recipe's, cached)
DERIVED = {"minilm_trec_1block": {"block_fraction": 0.17, "gelu": "sigmoid"}}
DEFAULT_TASKS = ("digits", "trec")
TARGETS = ("esp32s3", "stm32h7")
TASK_TARGETS = {"minilm_trec_1block": ("esp32s3",)}  # where the model fits the board's flash
ARENA_GOAL = 0.30  # the goal: the TFLite Micro arena at least 30% smaller than today's

# figure name -> (column header, how it is read from an Assessment); each becomes a "before -> after" column
FIGURES: dict[str, tuple[str, Callable[[Assessment], float | int | None]]] = {
    "operators": ("operators", lambda fit: len(fit.graph.operators)),
    "tensors": ("tensors", lambda fit: len(fit.graph.tensors)),
    "arena": ("TFLite Micro arena (B)", lambda fit: fit.arena.bytes if fit.arena else None),
    "persistent": ("persistent structures (B)", lambda fit: fit.arena.tail_bytes if fit.arena else None),
    "lower_bound": ("activation lower bound (B)", lambda fit: fit.memory.lower_bound_bytes),
    "latency_ms": ("estimated latency (ms)", lambda fit: round(fit.latency.total_ms, 3)),
}


def figures(before: Assessment, after: Assessment) -> dict[str, Any]:
    """Every FIGURES entry of the model without and with the passes."""
    return {name: [read(before), read(after)] for name, (_, read) in FIGURES.items()}


def _build(target: str, recipe: Path | None, out: Path, cache: Path, passes: bool) -> tuple[dict[str, Any], bytes]:
    manifest = build(target, recipe, out, Reporter(), cache=cache, graph_passes=passes).manifest
    return manifest, (out / "model.tflite").read_bytes()


def recipe_for(task: str, scratch: Path) -> Path | None:
    """The task's recipe file; a DERIVED one is written to `scratch` (reading the data by absolute path)."""
    if task not in DERIVED:
        return TASKS[task]
    path = scratch / f"{task}.toml"
    path.write_text(to_toml(merged(relocatable(TASKS[task]), {"compress": DERIVED[task]})), encoding="utf-8")
    return path


def run_task(task: str, recipe: Path | None, cache: Path) -> dict[str, Any]:
    """Build the task for every target with and without the passes; its rows, or why it was skipped."""
    started = time.perf_counter()
    rows = []
    manifest: dict[str, Any] = {}
    try:
        for target in TASK_TARGETS.get(task, TARGETS):
            out = OUT / "models" / f"micro_{task}_{target}"
            manifest, after = _build(target, recipe, out, cache, passes=True)
            plain, before = _build(target, recipe, out.with_name(out.name + "_nopasses"), cache, passes=False)
            micro = manifest["metrics"]["tflite_micro"] or {"error": "not a TFLite Micro target"}
            fit_before, fit_after = assess(before, target), assess(after, target)
            rows.append({"task": task, "target": target, "rewrites": manifest["model"]["graph_passes"]["rewrites"],
                         "chosen": [plain["selection"]["chosen"], manifest["selection"]["chosen"]],
                         **figures(fit_before, fit_after),
                         "persistent_after": fit_after.arena.persistent if fit_after.arena else {},
                         "litert_accuracy": manifest["metrics"]["int8_accuracy"], "tflite_micro": micro})
    except EdgeccError as err:
        return {"task": task, "skipped": f"build failed: {err}"}
    return {"task": task, "rows": rows, "build_seconds": round(time.perf_counter() - started),
            "date": date.today().isoformat(), "host": host(), "recipe": manifest["recipe"]["name"],
            "test_size": manifest["data"]["test_size"]}


def _change(pair: list[Any]) -> str:
    before, after = pair
    if before is None or after is None:  # a model TFLite Micro cannot allocate has no arena
        return " -> ".join("not allocated" if n is None else f"{n:,}" for n in pair)
    share = f" ({(after - before) / before:+.0%})" if before else ""
    return f"{before:,} -> {after:,}{share}"


def _micro(r: dict[str, Any]) -> str:
    micro = r["tflite_micro"]
    if "error" in micro:
        return f"does not run: {micro['error']}"
    first = micro.get("first_difference") or {}
    parted = (f"; they first part at {first['kind']} (operator {first['operator']}), {first['elements_differing']} of "
              f"{first['elements']} elements by at most {first['max_steps']} step(s)" if "operator" in first else "")
    parted += f": {first['cause']}" if first.get("cause") else ""
    return (f"{micro['accuracy']:.4f} (LiteRT {micro['litert_accuracy']:.4f}; same class on {micro['same_predictions']}"
            f"/{micro['examples']}, bit-identical {micro['identical_outputs']}{parted})")


def _row(r: dict[str, Any]) -> list[str]:
    return [r["task"], r["target"], *(_change(r.get(name, [None, None])) for name in FIGURES), _micro(r)]


def _persistent(kinds: dict[str, int]) -> str:
    """The persistent structures left after the passes, largest first: what an exact rewrite has yet to remove."""
    largest_first = sorted(kinds.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{PERSISTENT_KINDS.get(kind, kind)} {n:,}" for kind, n in largest_first)


def verdicts(result: dict[str, Any]) -> list[str]:
    """The issue's goals per target: arena 30% smaller, TFLite Micro accuracy equal to LiteRT's."""
    lines = []
    for r in result["rows"]:
        before, after = r["arena"]
        smaller = (before - after) / before if before and after else 0.0
        micro = r["tflite_micro"]
        equal = "error" not in micro and micro["accuracy"] == micro["litert_accuracy"]
        goal = "yes" if smaller >= ARENA_GOAL else "NO"
        if smaller < ARENA_GOAL and before and after:
            goal += f": {after - int(before * (1 - ARENA_GOAL)):,} B short of {int(before * (1 - ARENA_GOAL)):,} B"
        rewrites = ", ".join(f"{k} x{v}" for k, v in r["rewrites"].items()) or "none"
        chosen = r.get("chosen", [None, None])
        which = (f" (not the same model: without the passes the build chose {chosen[0]}, with them {chosen[1]}, "
                 "the figures compare the two builds' model.tflite)" if chosen[0] != chosen[1] else "")
        size = (f"arena {smaller:.1%} smaller than the build's without the passes{which} ({goal}, at least "
                f"{ARENA_GOAL:.0%})" if before else
                f"arena {after:,} B; TFLite Micro cannot allocate the build without the passes (no baseline for the "
                f"{ARENA_GOAL:.0%} goal)")
        lines.append(f"{r['target']}: {size}; persistent structures left (B): "
                     f"{_persistent(r.get('persistent_after', {})) or 'not measured'}; TFLite Micro accuracy equal "
                     f"to LiteRT's: {'yes' if equal else 'NO'}; rewrites {rewrites}")
    return lines


def main() -> None:
    args = parse_cached_tasks(__doc__.splitlines()[0], tuple(TASKS), tuple(DEFAULT_TASKS))
    with tempfile.TemporaryDirectory() as scratch:
        fresh = [run_task(task, recipe_for(task, Path(scratch)), args.cache) for task in args.tasks]
    results = with_earlier_rows(fresh, OUT / "micro.json", tuple(TASKS))
    body = "\n".join([
        "## Transformers on TFLite Micro: graph passes and the board's interpreter",
        "",
        f"{command_line('bench_micro.py', args.tasks, '--tasks ')}; each note dates its rows. "
        "Each task is `edgecc build --target esp32s3|stm32h7` with the graph "
        "passes (edgecc.graphpass: "
        "bit-exact rewrites of the int8 graph) and again without them (`graph_passes=False`); each pair of figures is "
        "without -> with. Operators and tensors are the model file's; the arena is the smallest in which the real "
        "TFLite Micro interpreter (host reference kernels) allocates the model, of which the persistent structures are "
        "its tail as TFLite Micro's recording allocator reports it (per operator, per tensor, kernel data and "
        "bookkeeping, on the 64-bit host; each note itemizes them after the passes); the lower bound is the most "
        "activation bytes alive at once in the graph's operator order (edgecc.liveness); latency is edgecc's estimate "
        "for the target, not a measurement. The last column is model.tflite's accuracy on the task's test split run by "
        "the TFLite Micro interpreter, with LiteRT's on the same examples. minilm_trec_1block is "
        "models/minilm/trec.toml with its student pruned to the first encoder block (compress.block_fraction 0.17) "
        "and x·sigmoid(1.702x) for GELU (compress.gelu, as TFLite Micro has no GELU kernel), from that recipe's "
        "cached teacher; it is built for esp32s3 only, as its embedding table alone is over the STM32H7's 2 MB of "
        "flash. Builds are kept under "
        "`benchmarks/models/micro_<task>_<target>[_nopasses]/`; rows in `benchmarks/micro.json`.",
        "",
        table(results, ["task", "target", *(header for header, _ in FIGURES.values()), "TFLite Micro test accuracy"],
              _row, verdicts),
    ])
    print(body)
    write_section(args.out, "bench_micro", body)


if __name__ == "__main__":
    main()
