"""Where int8 rounding costs a pretrained encoder its accuracy: the MiniLM teachers, rounded in parts.

For each MiniLM task (models/minilm/*.toml; the teacher from `--cache`, else fine-tuned here) this wraps the float
teacher in edgecc's QAT graph (edgecc.train.qat.qat_model: TF-MOT fake quantization where the int8 TFLite graph
rounds, every range from the build's 256 calibration examples) without training it, once per way of rounding,
and scores it on the build's validation split (never the test split): everything rounded with one scale per Dense
kernel (what QAT started from before compress.per_channel reached it) or one per output unit (per_channel = true),
and, to say what is left, the same with the LayerNorms or the Dense layers left float. The two ways that round
everything are also converted to int8 TFLite and scored with the LiteRT interpreter. Each figure is one
conversion of one teacher on one split: rounding one more tensor in the QAT graph (MaskedSoftmax's padding-bias sum,
added on 2026-12-04) moved them by up to 1.6 points, so only larger differences say something. Writes
`benchmarks/quantization.json` and the BENCHMARKS.md section; tasks not run keep their last rows.
"""

from __future__ import annotations

import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_compression import command_line, parse_cached_tasks, with_earlier_rows  # noqa: E402
from bench_estimator import ROOT, write_section  # noqa: E402
from bench_imbalance import host  # noqa: E402

from edgecc.progress import Reporter  # noqa: E402
from edgecc.recipe import load_recipe  # noqa: E402

OUT = ROOT / "benchmarks"
TASKS = {"minilm_trec": ROOT / "models" / "minilm" / "trec.toml",
         "minilm_sms_spam": ROOT / "models" / "minilm" / "sms_spam.toml"}
NORMS = ("_residual", "embedding_norm")  # edgecc.train.minilm names each LayerNorm so
DENSE = ("_query", "_key", "_value", "_attn_output", "_mlp_up", "_mlp_down")
# (label, Dense kernels per channel, layers left float, also converted to int8 TFLite)
WAYS: tuple[tuple[str, bool, tuple[str, ...], bool], ...] = (
    ("everything, one scale per Dense kernel", False, (), True),
    ("everything, one scale per output unit (per_channel)", True, (), True),
    ("per_channel, LayerNorms left float", True, NORMS, False),
    ("per_channel, Dense layers left float", True, DENSE, False),
)


def _accuracy(predicted: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(predicted, axis=-1) == y))


def run_task(task: str, cache: Path) -> dict[str, Any]:
    from edgecc.build import calibration_examples, float_teacher, held_out, starting_teacher
    from edgecc.data import load_dataset
    from edgecc.runtime import Model
    from edgecc.train.qat import qat_model, to_int8_tflite_from_qat

    loaded = load_recipe(TASKS[task])
    recipe = loaded.recipe
    dataset = load_dataset(recipe.data, recipe.seed, loaded.path.parent)
    reporter = Reporter(quiet=False)
    started = time.perf_counter()
    teacher, record = float_teacher(starting_teacher(loaded, dataset, None), loaded, dataset, reporter, given=None,
                                    cache=cache)
    students, validation = held_out(dataset, recipe)
    calibration = calibration_examples(students, recipe)
    x, y = dataset.x[validation], dataset.y[validation]
    rows = [{"way": "float teacher", "fake_quant": _accuracy(teacher.predict(x, verbose=0), y), "int8": None}]
    names = [layer.name for layer in teacher.layers]
    for label, per_channel, left_float, convert in WAYS:
        reporter.info(f"{task}: {label}")
        only = {name for name in names if not any(part in name for part in left_float)}
        qat = qat_model(teacher, calibration, per_channel=per_channel, only=only if left_float else None)
        int8 = None
        if convert:
            model = Model(to_int8_tflite_from_qat(qat, calibration))
            int8 = _accuracy(np.array([model.invoke(example) for example in x]), y)
        rows.append({"way": label, "fake_quant": _accuracy(qat.predict(x, verbose=0), y), "int8": int8})
    return {"task": task, "recipe": recipe.name, "validation_size": len(validation), "teacher": record["source"],
            "seconds": round(time.perf_counter() - started), "date": date.today().isoformat(), "host": host(),
            "rows": rows}


def main() -> None:
    args = parse_cached_tasks(__doc__.splitlines()[0], tuple(TASKS), tuple(TASKS))
    results = with_earlier_rows([run_task(task, args.cache) for task in args.tasks], OUT / "quantization.json",
                                tuple(TASKS))
    lines = ["| task | rounded | validation accuracy, QAT graph before training | same, int8 TFLite "
             "| change from float |",
             "|---|---|---|---|---|"]
    notes = []
    for result in results:
        base = result["rows"][0]["fake_quant"]
        for row in result["rows"]:
            int8 = "" if row["int8"] is None else f"{row['int8']:.4f}"
            lines.append(f"| {result['task']} | {row['way']} | {row['fake_quant']:.4f} | {int8} | "
                         f"{100 * (row['fake_quant'] - base):+.2f} points |")
        notes.append(f"- **{result['task']}** ({result['recipe']}, teacher from the {result['teacher']}, "
                     f"{result['validation_size']} validation examples, {result['seconds']} s on {result['date']} on "
                     f"{result['host']}).")
    body = "\n".join([
        "## Where int8 rounding costs a pretrained encoder (MiniLM teachers)",
        "",
        f"{command_line('bench_quantization.py', args.tasks, '--tasks ')}. {__doc__.split(chr(10) + chr(10))[1]}",
        "",
        *lines,
        "",
        *notes,
    ])
    print(body)
    write_section(args.out, "bench_quantization", body)


if __name__ == "__main__":
    main()
