"""Per-class figures and warnings, against answers computed by hand and by scikit-learn."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgecc.classmetrics import class_metrics, student_warning

NAMES = ("ok", "crack", "scratch", "dent")


def _collapsed() -> tuple[np.ndarray, np.ndarray]:
    """70 'ok', 10 of each defect; the model says 'ok' for everything but 5 cracks."""
    y_true = np.array([0] * 70 + [1] * 10 + [2] * 10 + [3] * 10)
    y_pred = np.zeros(100, dtype=int)
    y_pred[70:75] = 1
    return y_true, y_pred


def test_figures_by_hand() -> None:
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    y_pred = np.array([0, 0, 1, 1, 1, 2, 2, 0, 0])
    m = class_metrics(y_true, y_pred, NAMES)
    ok, crack, scratch, dent = m.classes
    assert (ok.support, ok.predicted, ok.precision, ok.recall) == (3, 4, 2 / 4, 2 / 3)
    assert (crack.precision, crack.recall) == (2 / 3, 1.0)
    assert (scratch.precision, scratch.recall) == (1.0, 2 / 4)
    assert ok.f1 == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    # 'dent' has no examples and no predictions: its figures are undefined, and it is not "never predicted"
    assert (dent.support, dent.precision, dent.recall, dent.f1) == (0, None, None, None)
    assert m.confusion.tolist() == [[2, 1, 0, 0], [0, 2, 0, 0], [2, 0, 2, 0], [0, 0, 0, 0]]
    assert m.accuracy == pytest.approx(6 / 9)
    assert m.balanced_accuracy == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)
    assert (m.majority_baseline, m.majority_class) == (4 / 9, "scratch")
    assert m.warnings == ()
    text = json.dumps(m.to_json(), allow_nan=False)  # strict JSON: None, never NaN
    assert json.loads(text)["per_class"][3]["recall"] is None


def test_agrees_with_scikit_learn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 300)
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 3, 300))
    y_pred[y_pred == 3] = 0  # class 3 is never predicted
    m = class_metrics(y_true, y_pred, NAMES)
    labels = list(range(4))
    assert m.confusion.tolist() == metrics.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    assert m.balanced_accuracy == pytest.approx(metrics.balanced_accuracy_score(y_true, y_pred))
    assert m.macro_f1 == pytest.approx(metrics.f1_score(y_true, y_pred, average="macro", zero_division=0))
    recall = metrics.recall_score(y_true, y_pred, average=None, labels=labels)
    assert [c.recall for c in m.classes] == pytest.approx(list(recall))
    precision = metrics.precision_score(y_true, y_pred, average=None, labels=labels[:3])
    assert [c.precision for c in m.classes[:3]] == pytest.approx(list(precision))
    assert m.classes[3].precision is None and m.classes[3].f1 == 0.0


def test_a_collapsed_model_is_flagged() -> None:
    m = class_metrics(*_collapsed(), NAMES)
    assert m.accuracy == pytest.approx(0.75) and m.majority_baseline == pytest.approx(0.70)  # above the baseline
    collapse, never = m.warnings
    assert "collapsed onto class 'ok'" in collapse and "95% of test inputs" in collapse
    assert "true share is 70%" in collapse and "83% of the other classes' examples" in collapse
    assert never.startswith("2 class(es)") and "'scratch' (10 examples)" in never and "'dent'" in never


def test_a_balanced_good_model_and_a_decent_imbalanced_one_raise_nothing() -> None:
    rng = np.random.default_rng(1)
    y_true = np.repeat(np.arange(4), 50)
    wrong = rng.random(200) < 0.1
    balanced = np.where(wrong, (y_true + 1) % 4, y_true)
    assert class_metrics(y_true, balanced, NAMES).warnings == ()
    y_true, _ = _collapsed()  # 70% 'ok': a model that misses 30% of each defect into 'ok' is poor but not collapsed
    y_pred = y_true.copy()
    y_pred[[70, 71, 72, 80, 81, 82, 90, 91, 92]] = 0
    assert class_metrics(y_true, y_pred, NAMES).warnings == ()


def test_accuracy_at_the_majority_baseline() -> None:
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 1, 2, 1, 0, 2])  # 3 of 6 right, as always saying 'ok' would be
    (warning,) = class_metrics(y_true, y_pred, NAMES).warnings
    assert warning == "accuracy 0.5000 is not above the majority-class baseline 0.5000 (always predicting 'ok')"


def test_empty_split_has_no_figures_and_no_warnings() -> None:
    m = class_metrics(np.array([], dtype=int), np.array([], dtype=int), NAMES)
    assert (m.accuracy, m.balanced_accuracy, m.macro_f1, m.majority_baseline, m.warnings) == (None, None, None, None, ())


def test_labels_outside_the_classes_are_refused() -> None:
    with pytest.raises(ValueError, match="outside the 4 classes"):
        class_metrics(np.array([0, 4]), np.array([0, 1]), NAMES)


def test_a_student_far_above_its_teacher() -> None:
    warning = student_warning("int8 after qat", 0.912, 0.752)
    assert warning == ("int8 after qat (0.9120) beats its float teacher (0.7520) by 16.0 points: "
                       "the teacher may be undertrained (train it longer)")
    assert student_warning("int8 after qat", 0.78, 0.752) is None  # 2.8 points: within the margin
    assert student_warning("int8 after ptq", 0.70, 0.752) is None
