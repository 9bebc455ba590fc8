"""Per-class figures of a classifier on a test split, and the warnings a person must see.

Accuracy alone hides a model that has collapsed onto the majority class of an imbalanced data set
(0.74 accurate while never finding a defect). These figures and warnings say so in the manifest,
the report and on stderr. Pure numpy: it runs without TensorFlow.

A figure that divides by zero (precision of a class never predicted, recall of a class with no
test examples) is None, never NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

# Collapse: one class takes more than COLLAPSE_SHARE of all predictions AND more than COLLAPSE_SHARE of
# the examples of the other classes are predicted as it. A decent model on imbalanced data predicts its
# majority class often, but not for most of the other classes' examples; a balanced decent model
# predicts no class for most inputs; so neither fires it.
COLLAPSE_SHARE = 0.5
# A student this many points more accurate than its float teacher suggests the teacher stopped too early.
STUDENT_MARGIN_POINTS = 3.0


@dataclass(frozen=True, kw_only=True)
class ClassFigures:
    """One class's figures; None where the denominator is zero."""

    name: str
    support: int  # test examples of this class
    predicted: int  # test examples predicted as this class
    precision: float | None
    recall: float | None
    f1: float | None


@dataclass(frozen=True, kw_only=True)
class ClassMetrics:
    """Per-class figures of one model on one test split; `confusion[t][p]` counts class t predicted as p."""

    classes: tuple[ClassFigures, ...]
    confusion: np.ndarray
    accuracy: float | None
    balanced_accuracy: float | None  # mean recall over the classes that have test examples
    macro_f1: float | None  # mean F1 over the classes that have test examples
    majority_baseline: float | None  # accuracy of always predicting the most frequent test class
    majority_class: str | None
    warnings: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "per_class": [asdict(c) for c in self.classes],
            "confusion": self.confusion.tolist(),
            "confusion_axes": "rows: true class, columns: predicted class, in the order of per_class",
            "accuracy": self.accuracy,
            "balanced_accuracy": self.balanced_accuracy,
            "macro_f1": self.macro_f1,
            "majority_baseline": self.majority_baseline,
            "majority_class": self.majority_class,
            "warnings": list(self.warnings),
        }


    def score(self, metric: str, classes: Sequence[str] = ()) -> float:
        """The recipe's metric (recipe.TaskSection): accuracy, balanced_accuracy, macro_f1, or recall, the lowest
        recall among `classes` (every class when empty). A figure with nothing to count (no test examples) is 0."""
        if metric == "recall":
            names = {c.name for c in self.classes}
            wanted = set(classes) or names
            unknown = wanted - names
            if unknown:
                raise ValueError(f"task.classes names {sorted(unknown)}, which the data does not have")
            recalls = [c.recall for c in self.classes if c.name in wanted and c.recall is not None]
            return min(recalls) if recalls else 0.0
        value = {"accuracy": self.accuracy, "balanced_accuracy": self.balanced_accuracy,
                 "macro_f1": self.macro_f1}[metric]
        return value if value is not None else 0.0


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator / denominator) if denominator else None


def _f1(precision: float | None, recall: float | None) -> float | None:
    """F1 of a class with test examples; one never predicted (precision None) or never found scores 0."""
    if recall is None:
        return None
    if not precision or not recall:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def class_metrics(y_true: np.ndarray, y_pred: np.ndarray, names: Sequence[str]) -> ClassMetrics:
    """Per-class precision, recall, F1, the confusion matrix and the warnings of (a), (b), (c) below.

    Warnings: (a) collapse onto one class (see COLLAPSE_SHARE), (b) a class with test examples that is
    never predicted, (c) accuracy at or below the majority-class baseline.
    """
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    k = len(names)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"labels {y_true.shape} and predictions {y_pred.shape} must be two vectors of one length")
    if len(y_true) and (min(y_true.min(), y_pred.min()) < 0 or max(y_true.max(), y_pred.max()) >= k):
        raise ValueError(f"a label or prediction is outside the {k} classes")
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    support, predicted, correct = confusion.sum(axis=1), confusion.sum(axis=0), np.diag(confusion)
    classes = []
    for c, name in enumerate(names):
        precision, recall = _ratio(correct[c], predicted[c]), _ratio(correct[c], support[c])
        classes.append(ClassFigures(name=str(name), support=int(support[c]), predicted=int(predicted[c]),
                                    precision=precision, recall=recall, f1=_f1(precision, recall)))
    n = len(y_true)
    majority = int(np.argmax(support)) if n else None
    metrics = ClassMetrics(
        classes=tuple(classes), confusion=confusion,
        accuracy=_ratio(correct.sum(), n),
        balanced_accuracy=_mean([c.recall for c in classes if c.recall is not None]),
        macro_f1=_mean([c.f1 for c in classes if c.f1 is not None]),
        majority_baseline=_ratio(support.max(), n),
        majority_class=str(names[majority]) if majority is not None else None,
        warnings=(),
    )
    return replace(metrics, warnings=tuple(_warnings(metrics)))


def _warnings(m: ClassMetrics) -> list[str]:
    n = sum(c.support for c in m.classes)
    if not n:
        return []
    found = []
    for c, figures in enumerate(m.classes):
        others = n - figures.support
        absorbed = int(m.confusion[:, c].sum() - m.confusion[c, c])  # other classes' examples predicted as c
        if figures.predicted / n > COLLAPSE_SHARE and others and absorbed / others > COLLAPSE_SHARE:
            found.append(f"the model has collapsed onto class '{figures.name}': it predicts it for "
                         f"{figures.predicted / n:.0%} of test inputs (its true share is {figures.support / n:.0%}), "
                         f"including {absorbed / others:.0%} of the other classes' examples")
    never = [c for c in m.classes if c.support and not c.predicted]
    if never:
        found.append(f"{len(never)} class(es) with test examples never predicted (recall 0): "
                     + ", ".join(f"'{c.name}' ({c.support} examples)" for c in never))
    if m.accuracy is not None and m.majority_baseline is not None and len(m.classes) > 1 \
            and m.accuracy <= m.majority_baseline:
        found.append(f"accuracy {m.accuracy:.4f} is not above the majority-class baseline {m.majority_baseline:.4f} "
                     f"(always predicting '{m.majority_class}')")
    return found


def score(metric: str, classes: Sequence[str], y_true: np.ndarray, y_pred: np.ndarray,
          names: Sequence[str]) -> float:
    """ClassMetrics.score of these predictions."""
    return class_metrics(y_true, y_pred, names).score(metric, classes)


def student_warning(student: str, student_accuracy: float, teacher_accuracy: float,
                    margin_points: float = STUDENT_MARGIN_POINTS) -> str | None:
    """(d) A distilled student well above its float teacher: the teacher, and so the distillation, is weak."""
    gain = (student_accuracy - teacher_accuracy) * 100
    if gain <= margin_points:
        return None
    return (f"{student} ({student_accuracy:.4f}) beats its float teacher ({teacher_accuracy:.4f}) by {gain:.1f} "
            "points: the teacher may be undertrained (train it longer)")
