"""Which int8 model of a build becomes model.tflite: every distinct model judged against every budget.

The stages can leave the same bytes twice (`ptq` after `prune` quantizes the student `prune` already
quantized): those are one model, named after every stage that made it. Each distinct model gets the
recipe's budgets and the target's; the recipe's rule (compress.select) chooses among the models that
meet them all, so a later stage that loses accuracy does not replace an earlier one that met every budget.
The choice is made on the validation split (build.held_out), never on the test split, whose figures are then
reported out of sample; the test split's budgets give the build's verdict.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edgecc.check import Assessment
from edgecc.classmetrics import ClassMetrics, score
from edgecc.recipe import LATENCY_TIE, Recipe

if TYPE_CHECKING:
    from edgecc.train.compress import Stage

INT8_MODEL = "model.tflite"

def _floor(name: str, value: float | None, limit: float, detail: str) -> dict[str, Any]:
    """A figure that must reach `limit`; one that cannot be measured (None) fails."""
    ok = value is not None and value >= limit
    return {"name": name, "value": value, "unit": "", "limit": f">= {limit}", "status": "pass" if ok else "fail",
            "detail": detail}


def _drop(name: str, teacher: float, student: float, limit: float, detail: str) -> dict[str, Any]:
    """Points the int8 model loses against the float teacher, at most `limit`."""
    drop = (teacher - student) * 100
    return {"name": name, "value": round(drop, 3), "unit": "points", "limit": f"<= {limit}",
            "status": "pass" if drop <= limit + 1e-9 else "fail", "detail": detail}


@dataclass(frozen=True)
class Floor:
    """One absolute floor of the budgets with a model's figure; 0 is no floor."""

    field: str  # under [budgets]
    name: str  # as the verdicts list it
    limit: float
    value: float | None
    what: str  # what the figure is, said before where it was measured


def floors(recipe: Recipe, metrics: ClassMetrics) -> list[Floor]:
    """Every absolute floor (the accuracy floor first), with `metrics`' figures: the verdicts and the teacher's
    warning read the same list."""
    b = recipe.budgets
    recalls = {c.name: c.recall for c in metrics.classes}
    return [Floor("min_accuracy", "int8 accuracy", b.min_accuracy, metrics.score("accuracy"), ""),
            Floor("min_balanced_accuracy", "int8 balanced accuracy", b.min_balanced_accuracy,
                  metrics.score("balanced_accuracy"), "mean recall over the classes, "),
            Floor("min_macro_f1", "int8 macro-F1", b.min_macro_f1, metrics.score("macro_f1"),
                  "mean F1 over the classes, "),
            *(Floor(f"min_recall.{name}", f"int8 recall of '{name}'", limit, recalls.get(name), "")
              for name, limit in b.min_recall.items())]


def budget_verdicts(recipe: Recipe, teacher: ClassMetrics, student: ClassMetrics, fit: Assessment, *,
                    split: str = "test") -> list[dict[str, Any]]:
    """The recipe's budgets on one int8 model and the target check's, each with its figure and verdict.

    The accuracy floor and drop are always listed; the other budgets of the recipe when it sets them.
    `split` names the examples `teacher` and `student` were measured on.
    """
    b, task = recipe.budgets, recipe.task
    missing = f"no {split} example of this class to measure it"
    measured = f"{split} split, TFLite interpreter"
    accuracy, *others = floors(recipe, student)
    budgets = [_floor(accuracy.name, accuracy.value, accuracy.limit, measured),
               _drop("accuracy drop", teacher.score("accuracy"), student.score("accuracy"), b.max_accuracy_drop,
                     "float minus int8 TFLite")]
    budgets += [_floor(f.name, f.value, f.limit, f.what + measured if f.value is not None else missing)
                for f in others if f.limit]
    if b.max_metric_drop is not None:
        budgets.append(_drop(f"{task.metric} drop", teacher.score(task.metric, task.classes),
                             student.score(task.metric, task.classes), b.max_metric_drop,
                             "task.metric, float minus int8 TFLite"))
    for budget in fit.budgets:
        budgets.append({"name": f"{budget.name} on {fit.target.name}", "value": round(budget.value, 3),
                        "unit": budget.unit, "limit": f"<= {budget.limit:g}",
                        "status": "pass" if budget.ok else "fail", "detail": budget.detail})
    return budgets


def resolution_warning(recipe: Recipe, validation: ClassMetrics) -> str | None:
    """Why the choice may be a guess: one validation example moves a drop budget's figure by more than its limit.

    Accuracy moves by 100 / n points per example; a metric that weighs the classes alike (balanced accuracy,
    macro-F1) by about 100 / (k * the smallest class's count), the recall of named classes by 100 / the smallest
    named class's count. None when every drop budget can be resolved.
    """
    b, task = recipe.budgets, recipe.task
    counts = {c.name: c.support for c in validation.classes}
    found = []
    total = sum(counts.values())
    if total and 100 / total > b.max_accuracy_drop:
        found.append(f"budgets.max_accuracy_drop ({b.max_accuracy_drop:g} points; one example of {total} is "
                     f"{100 / total:.2f})")
    if b.max_metric_drop is not None and task.metric != "accuracy":
        named = task.classes if task.metric == "recall" and task.classes else tuple(counts)
        present = [counts[name] for name in named if counts.get(name)]
        if present:
            step = 100 / min(present) / (1 if task.metric == "recall" else len(counts))
            if step > b.max_metric_drop:
                found.append(f"budgets.max_metric_drop ({b.max_metric_drop:g} points of {task.metric}; one example "
                             f"of the smallest class, {min(present)} there, moves it by about {step:.2f})")
    if not found:
        return None
    return (f"the validation split that chooses model.tflite is too small to resolve {' or '.join(found)}, so the "
            "choice between models close to the budget is a guess; the test figures still judge the chosen model. "
            "Raise train.validation_fraction or add data")


def floor_warning(recipe: Recipe, teacher: ClassMetrics) -> str | None:
    """The recipe's absolute floors that the float teacher itself misses on the validation split, or None.

    No int8 model is then likely to meet them there, so every candidate fails them: the build's choice falls back
    to the fewest failed budgets and edgecc tune chooses no trial. A floor set from the test split's figures does
    this wherever the validation split is harder than the test split.
    """
    missed = [f"budgets.{f.field} {f.limit:g} (the teacher: {f.value:.4f})" for f in floors(recipe, teacher)
              if f.limit and f.value is not None and f.value < f.limit]
    if not missed:
        return None
    return (f"the float teacher itself is below {', '.join(missed)} on the validation split that chooses the model, so "
            "no int8 model is likely to meet it there: the build's choice falls back to the fewest failed budgets "
            "and edgecc tune chooses no trial (the test split still judges the chosen model by it). Set the floor "
            "from validation figures, or give it as a drop against the teacher (budgets.max_accuracy_drop, "
            "max_metric_drop)")


def validation_warnings(recipe: Recipe, teacher: ClassMetrics) -> list[str]:
    """What a person must know about choosing on this validation split (the teacher's figures on it): drop budgets it
    cannot resolve and floors the teacher itself misses. Build and tune both say these."""
    return [w for w in (resolution_warning(recipe, teacher), floor_warning(recipe, teacher)) if w]


def failures(budgets: list[dict[str, Any]], split: str) -> int:
    """How many budgets a model fails. On the validation split, where the choice is made, a budget that cannot be
    measured there (no validation example of a named class) is not counted: it tells no model from another, and
    the test split still judges the chosen model by it."""
    return sum(b["status"] != "pass" and (split == "test" or b["value"] is not None) for b in budgets)


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One distinct int8 model of the build, as the choice of the final model sees it."""

    name: str
    failed: int  # how many of its budgets it fails
    latency_ms: float  # estimated on the target
    metric: float  # task.metric on the split the choice is made on (the validation split)
    bytes: int

    @property
    def meets_budgets(self) -> bool:
        return self.failed == 0


@dataclass(frozen=True, kw_only=True)
class Selection:
    """Which candidate becomes model.tflite, by which rule, and why."""

    index: int
    rule: str
    met: tuple[str, ...]  # the candidates that meet every budget
    reason: str

    def to_json(self, chosen: str) -> dict[str, Any]:
        return {"rule": self.rule, "chosen": chosen, "file": INT8_MODEL, "meeting_every_budget": list(self.met),
                "reason": self.reason}


def metric_noise(y: np.ndarray, predicted: Sequence[np.ndarray], names: Sequence[str], metric: str,
                 classes: Sequence[str] = (), *, resamples: int = 400, seed: int = 0) -> np.ndarray:
    """The standard error of the difference in task.metric between every two models on the same examples:
    `noise[i, j]` for models i and j, by a paired bootstrap that keeps each class's count (the validation split is
    drawn by class).

    Why: on a validation split of a few hundred examples two models a point apart are often the same model seen
    through sampling noise (neu_det's 144 validation images: two examples are 1.4 points of balanced accuracy, one
    standard error of that difference 1.7), so the choice must not follow such a difference.
    """
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == c) for c in range(len(names))]
    scores = np.empty((resamples, len(predicted)))
    for r in range(resamples):
        pick = np.concatenate([rng.choice(members, len(members)) for members in by_class if len(members)])
        scores[r] = [score(metric, classes, y[pick], p[pick], names) for p in predicted]
    return (scores[:, :, None] - scores[:, None, :]).std(axis=0, ddof=1)


def _top(pool: list[int], candidates: list[Candidate]) -> int:
    """The candidate of `pool` with the highest task.metric (the later stage of equals)."""
    return max(pool, key=lambda i: (candidates[i].metric, i))


def _level(pool: list[int], candidates: list[Candidate], noise: np.ndarray | None) -> list[int]:
    """The candidates of `pool` whose task.metric the split cannot tell from the highest: within one standard error
    of the difference (`metric_noise`), or equal to it when there is no noise estimate."""
    top = _top(pool, candidates)
    return [i for i in pool if candidates[top].metric - candidates[i].metric
            <= (0.0 if noise is None else noise[top, i]) + 1e-12]


def _near_fastest(pool: list[int], candidates: list[Candidate]) -> list[int]:
    """The candidates of `pool` whose estimated latency is within LATENCY_TIE of the smallest: the estimate does
    not resolve a closer difference."""
    fastest = min(candidates[i].latency_ms for i in pool)
    return [i for i in pool if candidates[i].latency_ms <= fastest * (1 + LATENCY_TIE)]


def _by_rule(pool: list[int], candidates: list[Candidate], rule: str, noise: np.ndarray | None) -> int:
    """The recipe's rule (recipe.SELECT_RULES) within `pool`; what it cannot tell apart goes to the latest stage,
    which the recipe built to improve on the earlier ones."""
    if rule == "smallest":
        fewest = min(candidates[i].bytes for i in pool)
        return max(_level([i for i in pool if candidates[i].bytes == fewest], candidates, noise))
    if rule == "fastest":
        return max(_level(_near_fastest(pool, candidates), candidates, noise))
    if rule == "best":
        return max(_near_fastest(_level(pool, candidates, noise), candidates))
    return max(pool)  # "last"


def _tie_note(pool: list[int], index: int, candidates: list[Candidate], noise: np.ndarray | None, kept: str) -> str:
    """Why a model below the highest task.metric was chosen: the split does not resolve the difference."""
    top = _top(pool, candidates)
    if noise is None or candidates[index].metric >= candidates[top].metric:
        return ""
    return (f" (its task.metric {candidates[index].metric:.4g} is within one standard error, "
            f"{noise[top, index] * 100:.2f} points, of {candidates[top].name}'s {candidates[top].metric:.4g}: the "
            f"split does not tell them apart, and {kept} is kept)")


def select(candidates: list[Candidate], rule: str, noise: np.ndarray | None = None, *,
           kept: str = "the later stage") -> Selection:
    """The final model by the recipe's rule among the candidates (in stage order) that meet every budget.

    When none does, the build fails, and model.tflite is the candidate closest to its budgets: among those
    that fail the fewest, the highest task.metric (then the rule), so a compressed student that lost accuracy
    does not replace the PTQ model that missed the same budgets by less. `noise` (`metric_noise` of the
    candidates, on the split they are judged on) makes task.metric differences within one standard error ties,
    which go to the later candidate (`kept` names it in the reason).
    """
    met = [i for i, c in enumerate(candidates) if c.meets_budgets]
    names = tuple(candidates[i].name for i in met)
    if not met:
        fewest = min(c.failed for c in candidates)
        closest = [i for i, c in enumerate(candidates) if c.failed == fewest]
        index = _by_rule(_level(closest, candidates, noise), candidates, rule, noise)
        top = max(candidates[i].metric for i in closest)
        return Selection(index=index, rule=rule, met=(),
                         reason=f"no model meets every budget: the highest task.metric ({top:.4g}) of the "
                                f"{len(closest)} model(s) that fail the fewest ({fewest})"
                                + _tie_note(closest, index, candidates, noise, kept))
    index = _by_rule(met, candidates, rule, noise)
    c = candidates[index]
    pool = _near_fastest(met, candidates) if rule == "fastest" else met
    fastest = min(candidates[i].latency_ms for i in met)
    why = {"fastest": f"the smallest estimated latency on the target ({c.latency_ms:.4g} ms)"
                      if c.latency_ms == fastest else
                      f"the highest task.metric ({max(candidates[i].metric for i in pool):.4g}) of the {len(pool)} "
                      f"whose estimated latency on the target ({c.latency_ms:.4g} ms) is within {LATENCY_TIE:.0%} of "
                      f"the smallest ({fastest:.4g} ms), closer than the estimate resolves,",
           "best": f"the highest task.metric ({max(candidates[i].metric for i in met):.4g})",
           "smallest": f"the fewest bytes ({c.bytes:,})",
           "last": "the latest stage"}[rule]
    note = _tie_note(pool, index, candidates, noise, kept) if rule in ("fastest", "best") else ""
    return Selection(index=index, rule=rule, met=names,
                     reason=f"{why}{note} of the {len(met)} model(s) that meet every budget")


def distinct_models(stages: list[Stage]) -> list[tuple[Stage, ...]]:
    """The stages grouped by identical int8 bytes (a `ptq` after `prune` quantizes the same student: one model),
    in the order of each group's last stage, so that the last group holds the recipe's last stage."""
    groups: dict[bytes, list[int]] = {}
    for i, stage in enumerate(stages):
        groups.setdefault(stage.int8, []).append(i)
    return [tuple(stages[i] for i in group) for group in sorted(groups.values(), key=lambda group: group[-1])]


def model_name(group: tuple[Stage, ...]) -> str:
    """'int8 after prune = ptq': every stage that produced this model."""
    return "int8 after " + " = ".join(stage.name for stage in group)


def stage_files(models: list[tuple[Stage, ...]], chosen: int) -> list[str]:
    """The file each distinct int8 model is kept in: the chosen one is the build's model.tflite."""
    return [INT8_MODEL if i == chosen else
            f"stage{i}_{re.sub(r'[^a-z0-9]+', '_', '_'.join(stage.name for stage in group))}.tflite"
            for i, group in enumerate(models)]
