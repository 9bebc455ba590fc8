"""`edgecc tune`: search a recipe's compression space for the models that fit a target best.

The float teacher is trained once (or loaded from the build cache); each trial is one configuration of the
recipe's [compress] section (stage list, block/head/neuron/vocabulary fractions, sparsity and its pattern,
distillation and QAT epochs and learning rates), run as a build runs its stages, and measured as a build
measures its int8 model: task.metric with the TFLite interpreter on the validation split (build.held_out: held
out of the teacher's and every stage's training), and the target's estimated latency, flash and RAM, with every
budget of the recipe and the target judged (edgecc.selection). The search and the choice never see the test
split; each trial's test figures are recorded beside, for the report only.

A new study's first trial is the recipe's own configuration (when the search space holds it): the hand-written
recipe is a baseline in the table, and when it meets every budget the choice is never slower than it on the
target's estimate. Then Optuna's multi-objective sampler (NSGA-II by default) proposes the configurations; its
study lives in a SQLite file in the output folder, so an interrupted search resumes (same study name) and adds
trials. A trial whose first stage's float student is already further below the teacher than
budgets.max_accuracy_drop plus one standard error of that difference (edgecc.selection.metric_noise: on a few
hundred validation examples a point is often noise, and the later stages may win it back) is stopped there
(Optuna state PRUNED). With a Ray address, Ray Tune runs the trials
with the same Optuna search (ray.tune.search.optuna.OptunaSearch, the same sampler and storage); without one, no
Ray is needed.

The search space is data: a `[tune]` table in the recipe (TuneSection), each range or list left out derived
from the recipe; block and head fractions of a model the recipe sizes are asked as the whole numbers prune keeps
(COUNTED), so two trials are two models. The choice rule: among the trials that meet every budget, the smallest
estimated latency on the target (ties: the higher task.metric where the validation split tells them apart, as a
build chooses, then the smaller file); it is written as a normal recipe, best.toml.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape

from edgecc import schema
from edgecc.emit import write_json
from edgecc.errors import EdgeccError, one_line
from edgecc.progress import Reporter
from edgecc.recipe import DISTILLED, LATENCY_TIE, SPARSITY_PATTERNS, CompressSection, Recipe, load_recipe
from edgecc.schema import spec
from edgecc.selection import Candidate, select

SCALE_HINT = "pip install 'edgecc[scale]'"
STUDY_FILE = "study.sqlite3"
# The objectives, in the order Optuna sees them, with their directions.
OBJECTIVES = {"task_metric": "maximize", "latency_ms": "minimize", "flash_bytes": "minimize", "ram_bytes": "minimize"}
FRACTIONS = ("block_fraction", "head_fraction", "neuron_fraction", "vocabulary_fraction")
RANGES = (*FRACTIONS, "sparsity", "distill_epochs", "distill_learning_rate", "qat_epochs", "qat_learning_rate")
INTEGERS = ("distill_epochs", "qat_epochs")
# A block or head fraction is asked as the whole number prune keeps (round(n x fraction)) when the recipe sizes the
# model: 0.75 and 1.0 of two blocks are one model, and a sampler that counted them as two would waste trials on it.
COUNTED = {"block_fraction": "blocks", "head_fraction": "heads"}
LOG_SCALE = ("distill_learning_rate", "qat_learning_rate")
SEARCHED = ("stages", *RANGES, "sparsity_pattern", "select")  # compress fields a trial sets (select: always "last")
STAGE_JOIN = "+"
PATH_FIELDS = (("data", "path"), ("data", "test_path"), ("model", "path"))
RULE = ("the smallest estimated latency on the target among the trials that meet every budget (the recipe's "
        "accuracy budgets and the target's operators, RAM, flash and latency); ties, estimates within "
        f"{LATENCY_TIE:.0%} of the smallest: the higher task.metric where the validation split tells two apart "
        "(more than one standard error of the difference, the paired bootstrap a build chooses by), then the "
        "smaller file")
PREDICTED = "validation.npz"  # a completed trial's classes on the split it is judged on, for the choice's noise


@dataclass(frozen=True)
class TuneSection:
    """The `[tune]` table of a recipe: the search space and the search. A range is [low, high] (equal: fixed);
    an empty range or list is derived from the recipe (see `space`)."""

    trials: int = spec(20, minimum=1, doc="trials to finish (completed or stopped early), resumed ones included")
    sampler: str = spec("nsga2", choices=("nsga2", "tpe"), doc="Optuna's NSGA-II or multi-objective TPE sampler")
    population: int = spec(10, minimum=2, doc="NSGA-II's generation size; TPE's random start-up trials")
    early_stop: bool = spec(True, doc="stop a trial whose first stage's float student is already more than "
                                      "budgets.max_accuracy_drop points, plus one standard error of the "
                                      "difference, below the teacher")
    stages: tuple[tuple[str, ...], ...] = spec((), doc="candidate stage lists, e.g. [['prune', 'qat'], ['prune', "
                                                       "'ptq']]; empty: the recipe's (with prune) and prune+ptq, "
                                                       "prune+qat, prune+sparsify+qat")
    block_fraction: tuple[float, ...] = spec((), minimum=0.01, maximum=1.0,
                                             doc="empty: [1 / depth, 1]; with model.depth, asked as the blocks k "
                                                 "kept, k / depth in the range")
    head_fraction: tuple[float, ...] = spec((), minimum=0.01, maximum=1.0,
                                            doc="empty: [1 / heads, 1]; with model.heads, asked as the heads k "
                                                "kept, k / heads in the range")
    neuron_fraction: tuple[float, ...] = spec((), minimum=0.01, maximum=1.0, doc="empty: [0.125, 1]")
    vocabulary_fraction: tuple[float, ...] = spec((), minimum=0.01, maximum=1.0, doc="text only; empty: [0.1, 1]")
    sparsity: tuple[float, ...] = spec((), minimum=0.0, maximum=0.95, doc="magnitude pattern; empty: [0.3, 0.8]")
    sparsity_pattern: tuple[str, ...] = spec((), choices=SPARSITY_PATTERNS, doc="empty: both")
    distill_epochs: tuple[int, ...] = spec((), minimum=0, doc="empty: [half the recipe's, the recipe's]")
    distill_learning_rate: tuple[float, ...] = spec((), positive=True, maximum=1.0,
                                                    doc="log scale; empty: the recipe's / 3 to x 3")
    qat_epochs: tuple[int, ...] = spec((), minimum=1, doc="empty: [half the recipe's, the recipe's]")
    qat_learning_rate: tuple[float, ...] = spec((), positive=True, maximum=1.0,
                                                doc="log scale; empty: the recipe's / 3 to x 3")


@dataclass(frozen=True, kw_only=True)
class Space:
    """The resolved search space: candidate stage lists, a (low, high) per searched number, the patterns, and the
    model's block and head counts (COUNTED) where the recipe sizes the model: those fractions are asked as counts."""

    stages: tuple[tuple[str, ...], ...]
    ranges: dict[str, tuple[float, float]]
    patterns: tuple[str, ...]
    counts: dict[str, int] = field(default_factory=dict)

    def kept(self, name: str) -> tuple[int, int]:
        """The whole numbers k (at least 1) with k / count in a counted fraction's range (3-figure fractions)."""
        low, high = self.ranges[name]
        count = self.counts[name]
        return max(1, math.ceil(count * low - 1e-3)), math.floor(count * high + 1e-3)


@dataclass(frozen=True, kw_only=True)
class TuneOptions:
    """What `edgecc tune` was asked for (picklable: Ray's workers get it)."""

    target: str
    recipe: Path
    out: Path
    cache: Path
    trials: int | None = None  # None: the recipe's [tune] trials
    time_budget_s: float | None = None
    ray_address: str | None = None  # "local": start a local cluster
    cpus_per_trial: float = 1.0


@dataclass(frozen=True, kw_only=True)
class TuneResult:
    """The finished study: every trial's row, the Pareto front's trial numbers, the chosen one (None: no trial
    meets every budget), the closest when none does, and the trial that is the recipe as written (if any)."""

    out: Path
    rows: list[dict[str, Any]]
    front: list[int]
    chosen: dict[str, Any] | None
    closest: list[dict[str, Any]] = field(default_factory=list)
    recipe_trial: int | None = None
    why: str = ""  # the rule's reason for the choice

    def to_json(self) -> dict[str, Any]:
        return {"out": str(self.out), "rule": RULE, "chosen": self.chosen, "why": self.why, "front": self.front,
                "closest": self.closest, "recipe_trial": self.recipe_trial, "trials": self.rows}


def hopeless(y: np.ndarray, teacher: np.ndarray, student: np.ndarray, names: tuple[str, ...], limit: float, *,
             seed: int = 0) -> str | None:
    """Why a trial whose first stage's float student predicted `student` (the teacher `teacher`, the truth `y`)
    is hopeless, or None: its accuracy is more than `limit` points (budgets.max_accuracy_drop) below the teacher's
    plus one standard error of that difference. The later stages may win a point back, and on a few hundred
    examples a point is often noise: such a trial runs on, and only a clear miss is stopped."""
    from edgecc.selection import metric_noise

    accuracy, teacher_accuracy = float(np.mean(student == y)), float(np.mean(teacher == y))
    drop = (teacher_accuracy - accuracy) * 100
    noise = 100 * metric_noise(y, [teacher, student], names, "accuracy", seed=seed)[0, 1]
    if drop <= limit + noise:
        return None
    return (f"the float student's accuracy {accuracy:.4f} is already {drop:.2f} points below the teacher's "
            f"{teacher_accuracy:.4f}: more than budgets.max_accuracy_drop {limit} and one standard error of that "
            f"difference ({noise:.2f} points) together")


class _Hopeless(Exception):
    """Raised after a trial's first stage when its float student is already out of the accuracy budget."""


def _require(module: str) -> Any:
    """An optional dependency of edgecc[scale], or bad input saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise EdgeccError(f"edgecc tune needs {module.split('.')[0]}: {SCALE_HINT}") from None


# ---- the search space ----------------------------------------------------------------------------------------

def _sized(recipe: Recipe) -> bool:
    """Whether the recipe sets the model's depth and heads (a model it builds, not one loaded from model.path)."""
    return recipe.model.architecture in ("vit", "text") and not recipe.model.path


def _derived(recipe: Recipe) -> dict[str, tuple[float, float]]:
    """The default ranges, around the recipe's own values."""
    m, c = recipe.model, recipe.compress
    sized = _sized(recipe)
    epochs, rate = max(1, c.distill_epochs), c.distill_learning_rate
    qat_epochs, qat_rate = max(1, c.qat_epochs or c.distill_epochs), c.qat_learning_rate or rate
    ranges = {
        "block_fraction": (round(1 / m.depth, 3) if sized else 0.5, 1.0),
        "head_fraction": (round(1 / m.heads, 3) if sized else 0.25, 1.0),
        "neuron_fraction": (0.125, 1.0),
        "sparsity": (0.3, 0.8),
        "distill_epochs": (max(1, epochs // 2), epochs),
        "distill_learning_rate": (rate / 3, min(1.0, rate * 3)),
        "qat_epochs": (max(1, qat_epochs // 2), qat_epochs),
        "qat_learning_rate": (qat_rate / 3, min(1.0, qat_rate * 3)),
    }
    if recipe.data.source == "text":
        ranges["vocabulary_fraction"] = (0.1, 1.0)
    return ranges


def space(section: TuneSection, recipe: Recipe, raw: dict[str, Any], source: Path) -> Space:
    """The search space of `section` over `recipe` (whose TOML data, read from `source`, is `raw`); every problem at
    once, named by its [tune] field, when a range is malformed or a candidate stage list cannot make a valid recipe."""
    problems = []
    ranges = _derived(recipe)
    for name in RANGES:
        written = getattr(section, name)
        if not written:
            continue
        if name == "vocabulary_fraction" and recipe.data.source != "text":
            problems.append(f"tune.{name}: applies to data.source 'text', not {recipe.data.source!r}")
        elif len(written) != 2:
            problems.append(f"tune.{name}: expected [low, high], got {list(written)}")
        elif written[0] > written[1]:
            problems.append(f"tune.{name}: low {written[0]} is above high {written[1]}")
        else:
            ranges[name] = (written[0], written[1])
    c = recipe.compress
    candidates = section.stages or tuple(dict.fromkeys(
        [*([c.stages] if "prune" in c.stages else []), ("prune", "ptq"), ("prune", "qat"), ("prune", "sparsify", "qat")]))
    counts = {"block_fraction": recipe.model.depth, "head_fraction": recipe.model.heads} if _sized(recipe) else {}
    result = Space(stages=candidates, ranges=ranges, patterns=section.sparsity_pattern or SPARSITY_PATTERNS,
                   counts=counts)
    for name, count in counts.items():
        low, high = result.kept(name)
        if low > high:
            problems.append(f"tune.{name}: [{ranges[name][0]:g}, {ranges[name][1]:g}] holds no whole number of the "
                            f"model's {count} {COUNTED[name]}")
    with tempfile.TemporaryDirectory(prefix="edgecc-tune-") as folder:
        for i, stages in enumerate(candidates):  # each list made into a recipe (middle values) and validated
            middle = {name: sum(bounds) / 2 for name, bounds in ranges.items()}
            try:
                trial_recipe(raw, source, overrides({"stages": STAGE_JOIN.join(stages), **middle}, result),
                             Path(folder), Path(folder) / "candidate.toml")
            except EdgeccError as err:
                problems.append(f"tune.stages[{i}]: {list(stages)} is not a valid compression "
                                f"({str(err).split(': ', 1)[-1]})")
    if problems:
        raise EdgeccError("; ".join(problems))
    return result


def _applicable(stages: tuple[str, ...], ranges: dict[str, tuple[float, float]]) -> list[str]:
    """The searched numbers a stage list uses, in the order they are asked (the same in every process)."""
    names = []
    if "prune" in stages:
        names += [name for name in FRACTIONS if name in ranges]
    if set(DISTILLED["compress.stages"]) & set(stages):  # every stage that distils (mix too)
        names += ["distill_epochs", "distill_learning_rate"]
    if "qat" in stages:
        names += ["qat_epochs", "qat_learning_rate"]
    return names


def ask(trial: Any, searched: Space) -> None:
    """Ask an Optuna trial (in-process, or Ray's OptunaSearch's define-by-run) for one configuration; a fixed
    number (low == high) is not asked. Its answers are `trial.params`, made into a recipe by `overrides`."""
    stages = tuple(trial.suggest_categorical("stages", [STAGE_JOIN.join(s) for s in searched.stages]).split(STAGE_JOIN))
    for name in _applicable(stages, searched.ranges):
        low, high = searched.kept(name) if name in searched.counts else searched.ranges[name]
        if low == high:
            continue
        if name in searched.counts:
            trial.suggest_int(COUNTED[name], low, high)
        elif name in INTEGERS:
            trial.suggest_int(name, int(low), int(high))
        else:
            trial.suggest_float(name, low, high, log=name in LOG_SCALE)
    if "sparsify" in stages:
        pattern = trial.suggest_categorical("sparsity_pattern", list(searched.patterns))
        low, high = searched.ranges["sparsity"]
        if pattern == "magnitude" and low != high:
            trial.suggest_float("sparsity", low, high)


def overrides(params: dict[str, Any], searched: Space) -> dict[str, Any]:
    """The [compress] fields of a trial from its answers (fixed numbers from their range), rounded as a person
    would write them; `select = "last"`: the build of the recipe makes the trial's model its model.tflite."""
    stages = tuple(params["stages"].split(STAGE_JOIN))
    fields: dict[str, Any] = {"stages": list(stages)}
    for name in _applicable(stages, searched.ranges):
        if name in searched.counts:
            value = params.get(COUNTED[name], searched.kept(name)[0]) / searched.counts[name]
        else:
            value = params.get(name, searched.ranges[name][0])
        fields[name] = int(value) if name in INTEGERS else float(f"{value:.3g}")
    if "sparsify" in stages:
        pattern = params.get("sparsity_pattern", searched.patterns[0])
        sparsity = params.get("sparsity", searched.ranges["sparsity"][0]) if pattern == "magnitude" else 0.5
        fields.update(sparsity_pattern=pattern, sparsity=float(f"{sparsity:.3g}"))
    fields["select"] = "last"
    return fields


def recipe_params(recipe: Recipe, searched: Space) -> tuple[dict[str, Any] | None, str]:
    """The recipe's own configuration as a trial's answers (what `ask` would be told), or None with the reason it
    lies outside the search space. A new study runs it first: the hand-written recipe is the baseline every other
    trial is measured against, and the choice can only improve on it (Optuna's enqueue_trial, a warm start)."""
    c = recipe.compress
    stages = tuple(c.stages)
    if stages not in searched.stages:
        return None, f"its stages {list(stages)} are not among the searched stage lists"
    effective = {name: getattr(c, name) for name in RANGES}
    effective["qat_epochs"] = c.qat_epochs or c.distill_epochs
    effective["qat_learning_rate"] = c.qat_learning_rate or c.distill_learning_rate
    numbers = _applicable(stages, searched.ranges)  # what `ask` asks, or fixes when a range is one value
    if "sparsify" in stages:
        if c.sparsity_pattern not in searched.patterns:
            return None, f"its sparsity_pattern {c.sparsity_pattern!r} is not searched"
        numbers += ["sparsity"] if c.sparsity_pattern == "magnitude" else []
    params: dict[str, Any] = {"stages": STAGE_JOIN.join(stages)}
    for name in numbers:
        low, high = searched.ranges[name]
        if name in searched.counts:  # the model prune makes: round(count x fraction) kept
            count, (least, most) = searched.counts[name], searched.kept(name)
            kept = max(1, round(count * effective[name]))
            if not least <= kept <= most:
                return None, (f"its {name} {effective[name]:g} keeps {kept} of {count} {COUNTED[name]}, and the "
                              f"searched [{low:g}, {high:g}] holds {least} to {most}")
            if least < most:
                params[COUNTED[name]] = kept
        elif not low <= effective[name] <= high:
            return None, f"its {name} {effective[name]:g} is outside the searched [{low:g}, {high:g}]"
        elif low < high:
            params[name] = effective[name]
    if "sparsify" in stages:
        params["sparsity_pattern"] = c.sparsity_pattern
    return params, ""


def trial_key(fields: dict[str, Any]) -> str:
    """A trial's folder name: the same configuration (asked twice, or by another process) is one folder."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


# ---- recipes -------------------------------------------------------------------------------------------------

def recipe_toml(data: dict[str, Any], header: str) -> str:
    """A recipe's TOML text from its data: top-level values first, then one [table] per section."""
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"{key} = {schema.toml_value(value)}" for key, value in data.items()
              if not isinstance(value, dict)]
    for key, table in data.items():
        if isinstance(table, dict):
            lines += ["", f"[{key}]", *(f"{name} = {schema.toml_value(value)}"
                                        for name, value in table.items())]
    return "\n".join(lines) + "\n"


def _applies_to(name: str, stages: tuple[str, ...]) -> bool:
    """Whether a compress field may be written with these stages (its `applies` on compress.stages)."""
    meta = {f.name: f.metadata for f in dataclasses.fields(CompressSection)}[name]
    allowed = meta.get("applies", {}).get("compress.stages")
    return allowed is None or bool(set(allowed) & set(stages))


def trial_recipe(raw: dict[str, Any], source: Path, fields: dict[str, Any], folder: Path, path: Path,
                 header: str = "") -> Any:
    """Write the recipe `raw` (read from `source`) with the [compress] `fields` to `path`, its data and model paths
    made relative to `folder`, and validate it as `edgecc build` does (EdgeccError when it is not valid)."""
    data = {key: (dict(value) if isinstance(value, dict) else value) for key, value in raw.items() if key != "tune"}
    stages = tuple(fields["stages"])
    kept = {k: v for k, v in data.get("compress", {}).items() if k not in SEARCHED and _applies_to(k, stages)}
    data["compress"] = {**kept, **fields}
    for section, name in PATH_FIELDS:
        value = data.get(section, {}).get(name)
        if value:
            where = (source.parent / Path(value).expanduser()).resolve()
            data[section][name] = os.path.relpath(where, folder.resolve())
    path.write_text(recipe_toml(data, header), encoding="utf-8")
    return load_recipe(path)


# ---- trials --------------------------------------------------------------------------------------------------

@dataclass
class Workbench:
    """What every trial of a process shares, made once: the data, the float teacher and its figures."""

    options: TuneOptions
    raw: dict[str, Any]
    searched: Space
    section: TuneSection
    loaded: Any
    target: Any
    dataset: Any = None
    teacher: Any = None
    cache_key: str | None = None
    calibration: Any = None
    teacher_metrics: Any = None  # on the split the trials are judged on (the validation split)
    teacher_predicted: Any = None  # the teacher's classes on that split
    teacher_test: Any = None  # on the test split, reported beside each trial's, never searched on
    students: Any = None  # what the stages train on (build.held_out)
    validation: Any = None  # the validation split's positions (build.held_out); empty: trials are judged on test
    float_bytes: int = 0

    @property
    def judged_on(self) -> str:
        return "validation" if len(self.validation) else "test"

    def prepare(self, reporter: Reporter) -> None:
        """Load the data and the teacher (trained and stored in the cache the first time) and measure it."""
        from edgecc.build import calibration_examples, float_teacher, held_out, starting_teacher
        from edgecc.classmetrics import class_metrics
        from edgecc.data import load_dataset
        from edgecc.evaluate import predictions
        from edgecc.recipe import check_class_names
        from edgecc.runtime import Model
        from edgecc.selection import validation_warnings
        from edgecc.train.convert import to_float_tflite
        from edgecc.train.teacher import inference_graph

        recipe = self.loaded.recipe
        self.dataset = load_dataset(recipe.data, recipe.seed, self.loaded.path.parent)
        check_class_names(recipe, self.dataset.label_names)
        model = starting_teacher(self.loaded, self.dataset, None)
        self.teacher, record = float_teacher(model, self.loaded, self.dataset, reporter, given=None,
                                             cache=self.options.cache)
        self.cache_key = record.get("cache_key")
        self.students, self.validation = held_out(self.dataset, recipe)
        self.calibration = calibration_examples(self.students, recipe)
        content = to_float_tflite(inference_graph(self.teacher))
        self.float_bytes, float_model = len(content), Model(content)
        (x, y), (test_x, test_y), names = self.split(), self.split(test=True), self.dataset.label_names
        self.teacher_predicted = predictions(float_model, x, Reporter(quiet=True), "")
        self.teacher_metrics = class_metrics(y, self.teacher_predicted, names)
        self.teacher_test = class_metrics(test_y, predictions(float_model, test_x, Reporter(quiet=True), ""), names)
        for warning in validation_warnings(recipe, self.teacher_metrics) if self.judged_on == "validation" else []:
            reporter.warning(warning)

    def split(self, test: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The examples trials are judged and chosen on (the validation split), or with `test` the test split."""
        index = self.validation if self.judged_on == "validation" and not test else self.dataset.test_index
        return self.dataset.x[index], self.dataset.y[index]

    def run(self, params: dict[str, Any], progress: Reporter | None = None) -> dict[str, Any]:
        """One trial: its recipe written and validated, its stages run (or taken from the cache), its int8 model
        measured and judged as a build judges it. Returns (and writes to figures.json) the trial's figures.
        `progress` sees the stages' training (a _Heartbeat keeps a log moving during a long trial)."""
        from edgecc.build import board_form, compressed_stages
        from edgecc.check import assess
        from edgecc.classmetrics import class_metrics
        from edgecc.evaluate import predictions
        from edgecc.runtime import Model
        from edgecc.selection import budget_verdicts, failures

        started = time.perf_counter()
        fields = overrides(params, self.searched)
        key = trial_key(fields)
        folder = self.options.out / "trials" / key
        folder.mkdir(parents=True, exist_ok=True)
        figures: dict[str, Any] = {"key": key, "params": params, "compress": fields}
        try:
            loaded = trial_recipe(self.raw, self.loaded.path, fields, folder, folder / "recipe.toml",
                                  f"edgecc tune trial {key} of {self.loaded.path.name}")
        except EdgeccError as err:
            return self._write(folder, {**figures, "status": "invalid", "reason": str(err)}, started)
        recipe = loaded.recipe
        x, y = self.split()
        limit = recipe.budgets.max_accuracy_drop

        checked = not self.section.early_stop

        def after_stage(name: str, student: Any) -> None:
            nonlocal checked
            if checked:  # the first stage only
                return
            checked = True
            why = hopeless(y, self.teacher_predicted, np.argmax(student.predict(x, verbose=0), axis=-1),
                           self.dataset.label_names, limit, seed=recipe.seed)
            if why:
                raise _Hopeless(f"after {name}, {why}")

        try:
            stages = compressed_stages(self.teacher, self.students, recipe, self.calibration,
                                       progress or Reporter(quiet=True), validation=self.validation,
                                       cache=self.options.cache, key=self.cache_key, after_stage=after_stage)
        except _Hopeless as err:
            return self._write(folder, {**figures, "status": "stopped", "reason": str(err)}, started)
        int8 = board_form(stages[-1].int8, self.target).content  # the form a build gives its int8 models
        model, names = Model(int8), self.dataset.label_names
        predicted = predictions(model, x, Reporter(quiet=True), "")
        np.savez(folder / PREDICTED, y=y, predicted=predicted, names=np.array(names))
        test_x, test_y = self.split(test=True)
        student = class_metrics(y, predicted, names)
        test = class_metrics(test_y, predictions(model, test_x, Reporter(quiet=True), ""), names)
        fit = assess(int8, self.target, latency_ms=recipe.budgets.max_latency_ms or None)
        budgets = budget_verdicts(recipe, self.teacher_metrics, student, fit, split=self.judged_on)
        measured = {b.name: b.value for b in fit.budgets}
        return self._write(folder, {
            **figures, "status": "complete", "judged_on": self.judged_on,
            "task_metric": student.score(recipe.task.metric, recipe.task.classes),
            "accuracy": student.score("accuracy"),
            "test_task_metric": test.score(recipe.task.metric, recipe.task.classes),
            "test_accuracy": test.score("accuracy"),
            "latency_ms": fit.latency.total_ms,
            "flash_bytes": int(measured.get("flash", len(int8))),
            "ram_bytes": int(measured.get("RAM", fit.memory.planned_bytes)),
            "bytes": len(int8), "parameters": stages[-1].parameters,
            "failed": failures(budgets, self.judged_on), "budgets": budgets,
        }, started)

    @staticmethod
    def _write(folder: Path, figures: dict[str, Any], started: float) -> dict[str, Any]:
        figures["seconds"] = round(time.perf_counter() - started, 2)
        write_json(folder / "figures.json", figures)
        return figures


def _workbench(options: TuneOptions, reporter: Reporter) -> Workbench:
    """The validated recipe, [tune] section and target, before any data is read (bad input fails fast)."""
    from edgecc.targets import load_target

    loaded = load_recipe(options.recipe)
    raw = schema.read(options.recipe, "recipe")
    tune_data = raw.get("tune", {})
    if not isinstance(tune_data, dict):
        raise EdgeccError(f"{options.recipe}: tune: expected a table, got {tune_data!r}")
    section = schema.parse(TuneSection, tune_data, f"{options.recipe} [tune]")
    searched = space(section, loaded.recipe, raw, options.recipe)
    return Workbench(options=options, raw=raw, searched=searched, section=section, loaded=loaded,
                     target=load_target(options.target))


_PER_PROCESS: dict[TuneOptions, Workbench] = {}


def _ray_trial(config: dict[str, Any], options: TuneOptions) -> None:
    """A Ray Tune trial: the worker's workbench (made on its first trial), one run, the objectives reported (NaN for
    a trial stopped early, whose status _searcher's class tells Optuna as pruned: Ray refuses a result without them)."""
    from ray import tune

    if options not in _PER_PROCESS:
        bench = _workbench(options, Reporter(quiet=True))
        bench.prepare(Reporter(quiet=True))
        _PER_PROCESS[options] = bench
    figures = _PER_PROCESS[options].run(config)
    complete = figures["status"] == "complete"
    values = {name: figures[name] if complete else math.nan for name in OBJECTIVES}
    tune.report({**values, "key": figures["key"], "status": figures["status"]})


def _searcher(**arguments: Any) -> Any:
    """Ray's OptunaSearch, but a trial stopped early (its status not 'complete') is told to Optuna as pruned, as
    in this process. Ray's own tells a trial pruned only when it reports no objective, and with several objectives
    its strict metric check refuses such a result before the searcher sees it (Ray 2.60)."""
    from ray.tune.search.optuna import OptunaSearch

    class StoppedArePruned(OptunaSearch):
        def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
            if result is not None and result.get("status", "complete") != "complete":
                result = None  # with no error: pruned
            super().on_trial_complete(trial_id, result, error)

    return StoppedArePruned(**arguments)


# ---- the study -----------------------------------------------------------------------------------------------

def _study(options: TuneOptions, bench: Workbench, reporter: Reporter) -> tuple[Any, Any, str]:
    """The Optuna study in out/study.sqlite3 (created, or loaded to resume), its sampler and storage URL.

    The sampler is seeded by the recipe's seed plus the trials the study already holds: a new study asks the same
    configurations every time (in this process or through Ray), a resumed one does not ask its first ones again.
    A trial still RUNNING in the storage was left so by a run that was killed (one tune runs a study at a time):
    it is marked FAILED, and the trials to run counted without it. A new study gets the recipe's own configuration
    queued as its first trial (Ray's OptunaSearch asks the same storage, so it runs it first too).
    """
    optuna = _require("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{(options.out / STUDY_FILE).resolve()}"
    study = optuna.create_study(study_name=study_name(bench), storage=url, directions=list(OBJECTIVES.values()),
                                load_if_exists=True)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)  # left running by a run that was stopped
    held = len(study.get_trials(deepcopy=False))
    section, seed = bench.section, bench.loaded.recipe.seed + held
    if section.sampler == "nsga2":
        study.sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=section.population)
    else:
        study.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=section.population)
    if not held:
        params, why = recipe_params(bench.loaded.recipe, bench.searched)
        if params is None:
            reporter.warning(f"the recipe's own configuration is not a trial: {why}")
        else:
            study.enqueue_trial(params)
            reporter.info("trial 0 is the recipe's own configuration")
    return study, study.sampler, url


def study_name(bench: Workbench) -> str:
    return f"{bench.loaded.recipe.name}@{bench.target.name}"


def _finished(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def _line(figures: dict[str, Any], metric: str) -> str:
    if figures["status"] != "complete":
        return f"{figures['status']}: {figures['reason']}"
    verdict = "meets every budget" if figures["failed"] == 0 else f"fails {figures['failed']} budget(s)"
    return (f"{metric} {figures['task_metric']:.4f}, {figures['latency_ms']:.3g} ms, flash {figures['flash_bytes']:,} B, "
            f"RAM {figures['ram_bytes']:,} B, {verdict} ({figures['seconds']:.1f} s)")


def _noise(rows: list[dict[str, Any]], bench: Workbench) -> np.ndarray | None:
    """`metric_noise` of the trials' int8 models on the split they were judged on (from each trial's PREDICTED);
    None when a trial has none (its folder written before trials kept them): differences then count as they are."""
    from edgecc.selection import metric_noise

    files = [bench.options.out / "trials" / r["key"] / PREDICTED for r in rows]
    if not files or not all(f.exists() for f in files):
        return None
    predicted = []
    for f in files:
        with np.load(f) as kept:  # closed at once: a long search reads every trial's file after each trial
            y, names = kept["y"], tuple(kept["names"].tolist())
            predicted.append(kept["predicted"])
    recipe = bench.loaded.recipe
    return metric_noise(y, predicted, names, recipe.task.metric, recipe.task.classes, seed=recipe.seed)


def _choose(rows: list[dict[str, Any]], bench: Workbench) -> tuple[dict[str, Any] | None, str]:
    """The module's RULE over the completed rows: the chosen row (None: none meets every budget) and why."""
    # select gives a tie to the later candidate: largest file first, so that a tie goes to the smaller file
    fitting = sorted((r for r in rows if r["status"] == "complete" and r["failed"] == 0), key=lambda r: -r["bytes"])
    if not fitting:
        return None, ""
    candidates = [Candidate(name=f"trial {r['number']}", failed=0, latency_ms=r["latency_ms"],
                            metric=r["task_metric"], bytes=r["bytes"]) for r in fitting]
    chosen = select(candidates, "fastest", _noise(fitting, bench), kept="the smaller file")  # a build's own rule
    return fitting[chosen.index], chosen.reason


def _best_so_far(rows: list[dict[str, Any]], bench: Workbench) -> str:
    best, _ = _choose(rows, bench)
    return (f"best so far: trial {best['number']} ({best['task_metric']:.4f}, {best['latency_ms']:.3g} ms)"
            if best else "best so far: none meets every budget")


def tune(options: TuneOptions, reporter: Reporter | None = None) -> TuneResult:
    """Run (or resume) the search and write its report; see the module's doc."""
    reporter = reporter or Reporter(quiet=True)
    _require("optuna")
    if options.ray_address is not None:
        _require("ray.tune")
    if options.out.exists() and not options.out.is_dir():
        raise EdgeccError(f"--out: {options.out} is a file, not a folder")
    if options.time_budget_s is not None and not options.time_budget_s > 0:
        raise EdgeccError(f"--time-budget: {options.time_budget_s} must be above 0 seconds")
    bench = _workbench(options, reporter)
    if options.ray_address is not None:
        _connect_ray(options.ray_address)
    options.out.mkdir(parents=True, exist_ok=True)
    study, sampler, url = _study(options, bench, reporter)
    total = options.trials or bench.section.trials
    done = len(_finished(study))
    remaining = max(0, total - done)
    reporter.info(f"edgecc tune {study_name(bench)}: {done} trial(s) already in {options.out / STUDY_FILE}, "
                  f"{remaining} to run" + (f" on Ray ({options.ray_address})" if options.ray_address else ""))
    if remaining:
        bench.prepare(reporter)
        if options.ray_address is None:
            _run_here(study, bench, remaining, reporter)
        else:
            _run_on_ray(options, bench, sampler, url, remaining, reporter)
    return report(study, bench)


class _Heartbeat(Reporter):
    """A trial's own reporter: silent, but each step of its training is a heartbeat of the tuning task, so a log
    gets its timed line (with the ETA) during a trial of many minutes too, not only when a trial ends.

    The share of the trial done never goes back: each of its stages is a task of its own that starts at 0, and a
    share that fell back to near 0 made the ETA hours long (a log once said "ETA 354h36m" in a 20-minute search)."""

    def __init__(self, advance: Callable[..., None]) -> None:
        super().__init__(quiet=True)
        self.advance = advance
        self.reached = 0.0

    @contextmanager
    def task(self, description: str, total: int, *, unit: str = "step") -> Iterator[Callable[..., None]]:
        done = 0

        def beat(steps: int = 1, status: str = "", *, partial: float = 0.0) -> None:
            nonlocal done
            done += steps
            self.reached = max(self.reached, min(0.99, (done + partial) / max(total, 1)))
            self.advance(0, partial=self.reached)

        yield beat


def _run_here(study: Any, bench: Workbench, remaining: int, reporter: Reporter) -> None:
    """The trials in this process, one after another; a Ctrl-C leaves the running trial FAILED in the study."""
    optuna = _require("optuna")
    metric = bench.loaded.recipe.task.metric
    rows = _rows(study, bench)
    with reporter.task("tuning", remaining, unit="trial") as advance:

        def objective(trial: Any) -> tuple[float, ...]:
            ask(trial, bench.searched)
            figures = bench.run(dict(trial.params), _Heartbeat(advance))
            rows.append({**figures, "number": trial.number})
            best = _best_so_far(rows, bench)
            reporter.info(escape(f"trial {trial.number} [{figures['key']}]: {_line(figures, metric)}; {best}"))
            advance(status=best)
            if figures["status"] != "complete":
                raise optuna.TrialPruned(figures["reason"])
            return tuple(figures[name] for name in OBJECTIVES)

        study.optimize(objective, n_trials=remaining, timeout=bench.options.time_budget_s, catch=())


def _reachable(address: str) -> None:
    """Bad input at once for a host:port nobody answers on (Ray itself retries for minutes before it gives up)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise EdgeccError(f"--ray-address: {address!r} is not HOST:PORT, ray://HOST:PORT, 'auto' or 'local'")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise EdgeccError(f"--ray-address: no Ray cluster reachable at {address!r} ({one_line(err)})") from None


def _connect_ray(address: str) -> None:
    """Join the Ray cluster at `address` ('local': start one here) unless this process already did."""
    ray = _require("ray")
    if ray.is_initialized():
        return
    if address not in ("local", "auto"):
        _reachable(address)
    try:
        ray.init(address=None if address == "local" else address, log_to_driver=False, include_dashboard=False)
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as err:
        raise EdgeccError(f"--ray-address: no Ray cluster reachable at {address!r} ({one_line(err)[:200]})") from None


class _Lock:
    """A threading.Lock that pickles as a new, unlocked lock (a lock held across a pickle means nothing)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> bool:
        return self._lock.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._lock.__exit__(*exc)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return _Lock, ()


def _picklable_locks(sampler: Any) -> None:
    """Swap the sampler's thread locks for ones that pickle (Optuna 5.1's NSGA-II sampler holds a threading.Lock,
    so Ray Tune could not pickle the search; subclassing would change the generation key Optuna stores)."""
    for name, value in vars(sampler).items():
        if isinstance(value, type(threading.Lock())):
            setattr(sampler, name, _Lock())


def _run_on_ray(options: TuneOptions, bench: Workbench, sampler: Any, url: str, remaining: int,
                reporter: Reporter) -> None:
    """The trials as Ray Tune trials, asked by OptunaSearch with the same sampler and the same study storage."""
    from functools import partial

    import optuna
    from ray import tune as ray_tune

    metric, quiet = bench.loaded.recipe.task.metric, reporter.quiet
    # Ray Tune runs each trial in its own working folder: the workers get absolute paths
    options = dataclasses.replace(options, recipe=options.recipe.resolve(), out=options.out.resolve(),
                                  cache=options.cache.resolve())

    class Lines(ray_tune.Callback):  # pickled with the tuner's state: it holds no console, only what it prints from
        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            key = (trial.last_result or {}).get("key")
            figures = json.loads((options.out / "trials" / key / "figures.json").read_text()) if key else None
            Reporter(quiet=quiet).info(escape(f"Ray trial {trial.trial_id}: "
                                              + (_line(figures, metric) if figures else "no result")))

    _picklable_locks(sampler)  # Ray Tune pickles the searcher with the tuner's state
    searcher = _searcher(space=partial(ask, searched=bench.searched), metric=list(OBJECTIVES),
                         mode=["max" if d == "maximize" else "min" for d in OBJECTIVES.values()],
                         sampler=sampler, study_name=study_name(bench), storage=optuna.storages.RDBStorage(url))
    trainable = ray_tune.with_resources(partial(_ray_trial, options=options), {"cpu": options.cpus_per_trial})
    tuner = ray_tune.Tuner(trainable, tune_config=ray_tune.TuneConfig(
        search_alg=searcher, num_samples=remaining, time_budget_s=options.time_budget_s),
        run_config=ray_tune.RunConfig(name="ray", storage_path=str((options.out / "ray").resolve()), verbose=0,
                                      callbacks=[Lines()]))
    tuner.fit()


# ---- the report ----------------------------------------------------------------------------------------------

def _rows(study: Any, bench: Workbench) -> list[dict[str, Any]]:
    """Every finished trial of the study with its figures (from its folder), in trial order."""
    rows = []
    for trial in _finished(study):
        key = trial_key(overrides(trial.params, bench.searched))
        path = bench.options.out / "trials" / key / "figures.json"
        if path.exists():
            rows.append({**json.loads(path.read_text(encoding="utf-8")), "number": trial.number})
    return rows


def report(study: Any, bench: Workbench) -> TuneResult:
    """Write pareto.json, pareto.md, pareto.html and (when a trial meets every budget) best.toml."""
    out = bench.options.out
    rows = _rows(study, bench)
    numbers = {t.number for t in study.best_trials}  # Optuna's Pareto front of the completed trials
    front = sorted(r["number"] for r in rows if r["number"] in numbers)
    chosen, why = _choose(rows, bench)
    closest = sorted((r for r in rows if r["status"] == "complete"),
                     key=lambda r: (r["failed"], -r["task_metric"], r["latency_ms"]))[:3] if chosen is None else []
    params, _ = recipe_params(bench.loaded.recipe, bench.searched)
    as_written = trial_key(overrides(params, bench.searched)) if params else None
    result = TuneResult(out=out, rows=rows, front=front, chosen=chosen, closest=closest, why=why,
                        recipe_trial=next((r["number"] for r in rows if r["key"] == as_written), None))
    summary = {"study": study_name(bench), "storage": str(out / STUDY_FILE), "recipe": str(bench.loaded.path),
               "target": bench.target.name, "objectives": OBJECTIVES, "task_metric": bench.loaded.recipe.task.metric,
               "teacher": {"accuracy": bench.teacher_metrics.score("accuracy") if bench.teacher_metrics else None,
                           "test_accuracy": bench.teacher_test.score("accuracy") if bench.teacher_test else None,
                           "float_tflite_bytes": bench.float_bytes or None},
               **result.to_json()}
    write_json(out / "pareto.json", summary)
    (out / "pareto.md").write_text(_markdown(summary), encoding="utf-8")
    (out / "pareto.html").write_text(_html(summary), encoding="utf-8")
    best = out / "best.toml"
    if chosen is not None:
        trial_recipe(bench.raw, bench.loaded.path, chosen["compress"], out, best,
                     f"edgecc tune: trial {chosen['number']} [{chosen['key']}] of {bench.loaded.path.name} for "
                     f"{bench.target.name}, chosen by {RULE}.\n`edgecc build --target {bench.target.name} "
                     f"--recipe {best}` builds it.")
    elif best.exists():
        best.unlink()  # an earlier run's choice no longer holds
    return result


COLUMNS = ("trial", "budgets", "metric", "test metric", "latency ms", "flash B", "RAM B", "s", "configuration")


def _cells(r: dict[str, Any], front: set[int], recipe_trial: int | None) -> list[str]:
    c = r["compress"]
    config = " ".join(f"{k}={'+'.join(v) if isinstance(v, list) else v}" for k, v in c.items() if k != "select")
    config = ("the recipe as written: " if r["number"] == recipe_trial else "") + config
    if r["status"] != "complete":
        return [str(r["number"]), r["status"], "", "", "", "", "", "", config]
    return [str(r["number"]) + (" *" if r["number"] in front else ""), "meets all" if r["failed"] == 0
            else f"fails {r['failed']}", f"{r['task_metric']:.4f}", f"{r['test_task_metric']:.4f}",
            f"{r['latency_ms']:.3g}", f"{r['flash_bytes']:,}", f"{r['ram_bytes']:,}", f"{r['seconds']:.1f}", config]


def _markdown(summary: dict[str, Any]) -> str:
    front = set(summary["front"])
    chosen = summary["chosen"]
    lines = [f"# edgecc tune: {summary['study']}", "",
             f"Recipe {summary['recipe']}, target {summary['target']}; study {summary['storage']} "
             f"({len(summary['trials'])} finished trials). Figures: {summary['task_metric']} of the int8 model "
             "(TFLite interpreter) on the validation split, which the search, the budgets and the choice use, and on "
             "the test split, reported only; latency, flash and RAM estimated for the target. `*`: on the Pareto "
             "front (no other trial is at least as good on all four and better on one).", "",
             f"Choice rule: {RULE}.", "",
             f"Chosen: trial {chosen['number']} [{chosen['key']}]"
             + (", the recipe as written" if chosen["number"] == summary["recipe_trial"] else "")
             + f", written to best.toml: {summary['why']}." if chosen else
             "Chosen: none; no trial meets every budget. Closest: " + ", ".join(
                 f"trial {r['number']} (fails {r['failed']}, {r['task_metric']:.4f})" for r in summary["closest"]),
             "", "| " + " | ".join(COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
    lines += ["| " + " | ".join(_cells(r, front, summary["recipe_trial"])) + " |" for r in summary["trials"]]
    return "\n".join(lines) + "\n"


def _svg(rows: list[dict[str, Any]], front: set[int], chosen: int | None) -> str:
    """Task metric against estimated latency: every completed trial, the front filled, the chosen one ringed."""
    done = [r for r in rows if r["status"] == "complete"]
    width, height, pad = 560, 320, 48
    if not done:
        return f'<svg width="{width}" height="{height}"><text x="{pad}" y="{pad}">no completed trial</text></svg>'
    xs, ys = [r["latency_ms"] for r in done], [r["task_metric"] for r in done]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)

    def at(r: dict[str, Any]) -> tuple[float, float]:
        x = pad + (r["latency_ms"] - x0) / ((x1 - x0) or 1) * (width - 2 * pad)
        y = height - pad - (r["task_metric"] - y0) / ((y1 - y0) or 1) * (height - 2 * pad)
        return x, y

    marks = []
    for r in done:
        x, y = at(r)
        fill = "#1f77b4" if r["number"] in front else "none"
        marks.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{fill}" stroke="#1f77b4">'
                     f'<title>trial {r["number"]}: {r["task_metric"]:.4f}, {r["latency_ms"]:.3g} ms</title></circle>')
        if r["number"] == chosen:
            marks.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="9" fill="none" stroke="#d62728" stroke-width="2"/>')
    axes = (f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>'
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>'
            f'<text x="{width / 2}" y="{height - 10}" text-anchor="middle">estimated latency, ms '
            f'({x0:.3g} to {x1:.3g})</text>'
            f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle">'
            f'task metric ({y0:.3f} to {y1:.3f})</text>')
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">{axes}{"".join(marks)}</svg>'


def _html(summary: dict[str, Any]) -> str:
    front = set(summary["front"])
    chosen = summary["chosen"]["number"] if summary["chosen"] else None
    table = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(r, front, summary["recipe_trial"]))
                    + "</tr>" for r in summary["trials"])
    return (f"<!doctype html><meta charset=utf-8><title>edgecc tune {html.escape(summary['study'])}</title>"
            f"<h1>edgecc tune: {html.escape(summary['study'])}</h1>"
            f"<p>Filled: the Pareto front; ringed: the chosen trial ({html.escape(RULE)}).</p>"
            f"{_svg(summary['trials'], front, chosen)}"
            f"<table border=1 cellpadding=3><tr>{''.join(f'<th>{h}</th>' for h in COLUMNS)}</tr>{table}</table>")
