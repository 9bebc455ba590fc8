"""The choice of the final model among the build's int8 stages, the budgets each is judged by, and how they
are shown (issue 12: the best stage that meets the budgets, each distinct model listed once)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from conftest import needs_train_extra
from edgecc.selection import Candidate, budget_verdicts, select
from edgecc.check import assess
from edgecc.classmetrics import class_metrics
from edgecc.recipe import BudgetsSection, Recipe, TaskSection
from edgecc.report import EMPTY_ERROR_PLOT, budget_line, markdown


def candidate(name: str, meets: bool, latency_ms: float, metric: float, size: int) -> Candidate:
    return Candidate(name=name, failed=0 if meets else 1, latency_ms=latency_ms, metric=metric, bytes=size)


# In stage order. "sparsify" is the fastest, smallest and best, but misses a budget, so it is never chosen.
STAGES = [
    candidate("int8 after ptq of the teacher", True, 5.0, 0.95, 400),
    candidate("int8 after prune", True, 3.0, 0.93, 300),
    candidate("int8 after sparsify", False, 2.0, 0.97, 200),
    candidate("int8 after qat", True, 3.0, 0.94, 300),
]


@pytest.mark.parametrize(("rule", "chosen"), [
    ("fastest", "int8 after qat"),  # 3.0 ms like prune, with the higher metric
    ("best", "int8 after ptq of the teacher"),  # 0.95: the highest among those meeting every budget
    ("smallest", "int8 after qat"),  # 300 bytes like prune, with the higher metric
    ("last", "int8 after qat"),
])
def test_each_rule_chooses_among_the_models_that_meet_every_budget(rule: str, chosen: str) -> None:
    selection = select(STAGES, rule)
    assert STAGES[selection.index].name == chosen
    assert selection.met == ("int8 after ptq of the teacher", "int8 after prune", "int8 after qat")
    assert selection.to_json(chosen) == {"rule": rule, "chosen": chosen, "file": "model.tflite",
                                         "meeting_every_budget": list(selection.met), "reason": selection.reason}


def test_a_full_tie_goes_to_the_later_stage_and_reasons_are_rounded() -> None:
    tied = [candidate("int8 after prune", True, 1 / 3, 0.9, 300), candidate("int8 after qat", True, 1 / 3, 0.9, 300)]
    for rule in ("fastest", "best", "smallest", "last"):
        assert select(tied, rule).index == 1
    assert select(tied, "fastest").reason == ("the smallest estimated latency on the target (0.3333 ms) of the "
                                              "2 model(s) that meet every budget")
    assert select(STAGES, "best").reason.startswith("the highest task.metric (0.95) of the 3 model(s)")
    assert select(STAGES, "smallest").reason.startswith("the fewest bytes (300) of the 3 model(s)")


def test_when_no_model_meets_every_budget_the_closest_is_kept() -> None:
    failing = [replace(c, failed=n) for c, n in zip(STAGES, (1, 2, 3, 1))]  # ptq and qat fail one budget each
    for rule in ("fastest", "best", "smallest", "last"):
        selection = select(failing, rule)
        assert (selection.index, selection.met) == (0, ()), rule  # ptq: 0.95 against qat's 0.94
        assert selection.reason == ("no model meets every budget: the highest task.metric (0.95) of the 2 model(s) "
                                    "that fail the fewest (1)")
    tied = [replace(c, failed=1, metric=0.9) for c in STAGES]
    assert select(tied, "fastest").index == 2 and select(tied, "smallest").index == 2 and select(tied, "last").index == 3


def test_the_noise_of_a_metric_difference_is_its_paired_standard_error() -> None:
    """Against the textbook answer: for accuracy on n examples, the standard error of the difference between two
    models is the standard deviation of their per-example difference (1 right, 0 wrong) over sqrt(n)."""
    from edgecc.selection import metric_noise

    rng = np.random.default_rng(3)
    names = ("crack", "dent", "ok")
    y = rng.integers(0, 3, 300)
    a = np.where(rng.random(300) < 0.9, y, (y + 1) % 3)  # about 90% right
    b = np.where(rng.random(300) < 0.8, a, (a + 2) % 3)  # differs from a on about 20%
    noise = metric_noise(y, [a, b, a], names, "accuracy", resamples=2000)
    difference = (a == y).astype(float) - (b == y)
    assert noise[0, 1] == pytest.approx(difference.std(ddof=1) / np.sqrt(len(y)), rel=0.1)
    assert noise[0, 1] == noise[1, 0] and noise[0, 2] == 0.0  # symmetric; a model against itself has no noise
    # balanced accuracy weighs an example of a rare class more: its noise is larger than accuracy's
    rare = np.where(np.arange(300) < 30, 0, y)
    rare_a = np.where(rng.random(300) < 0.9, rare, (rare + 1) % 3)
    rare_b = np.where(rng.random(300) < 0.8, rare_a, (rare_a + 2) % 3)
    assert metric_noise(rare, [rare_a, rare_b], names, "balanced_accuracy")[0, 1] > \
        metric_noise(rare, [rare_a, rare_b], names, "accuracy")[0, 1]


def test_a_metric_difference_within_one_standard_error_is_a_tie_that_the_later_stage_wins() -> None:
    """prune 0.972 and qat 0.958 on a small validation split, one standard error of their difference 1.7 points
    (neu_det's case): the split does not tell them apart, so the later stage is kept and the reason says why;
    with 0.5 points of noise the higher figure decides, as it does without a noise estimate."""
    pair = [candidate("int8 after prune", False, 0.693, 0.9722, 300),
            candidate("int8 after qat", False, 0.6935, 0.9583, 301)]
    wide = np.array([[0.0, 0.017], [0.017, 0.0]])
    for rule in ("fastest", "best", "smallest", "last"):
        assert select(pair, rule, wide).index == (0 if rule == "smallest" else 1), rule
    selection = select(pair, "fastest", wide)
    assert selection.reason == ("no model meets every budget: the highest task.metric (0.9722) of the 2 model(s) that "
                                "fail the fewest (1) (its task.metric 0.9583 is within one standard error, 1.70 points, of "
                                "int8 after prune's 0.9722: the split does not tell them apart, and the later stage "
                                "is kept)")
    assert select(pair, "fastest", wide / 3.4).index == 0 and select(pair, "fastest").index == 0
    meeting = [replace(c, failed=0) for c in pair]
    assert select(meeting, "fastest", wide).index == 1 and select(meeting, "best", wide).index == 1
    assert "within one standard error" in select(meeting, "best", wide).reason
    assert select(meeting, "best", wide / 3.4).index == 0
    # a faster model outside the latency tie still wins "fastest", whatever the noise
    faster = [replace(meeting[0], latency_ms=0.5), meeting[1]]
    assert select(faster, "fastest", wide).index == 0


def test_stages_with_identical_bytes_are_one_model() -> None:
    needs_train_extra()
    from edgecc.selection import distinct_models, model_name, stage_files
    from edgecc.train.compress import Stage

    def stage(name: str, content: bytes) -> Stage:
        return Stage(name, None, content, 10, ())

    # ptq after prune quantizes the same student: the same bytes, one model named after both stages
    stages = [stage("ptq of the teacher", b"teacher"), stage("prune", b"pruned"), stage("ptq", b"pruned")]
    models = distinct_models(stages)
    assert [model_name(group) for group in models] == ["int8 after ptq of the teacher", "int8 after prune = ptq"]
    assert stage_files(models, 1) == ["stage0_ptq_of_the_teacher.tflite", "model.tflite"]
    assert stage_files(models, 0) == ["model.tflite", "stage1_prune_ptq.tflite"]
    # a group is placed at its last stage, so the last model always holds the recipe's last stage
    apart = distinct_models([stage("ptq of the teacher", b"a"), stage("sparsify", b"b"), stage("ptq", b"a")])
    assert [model_name(group) for group in apart] == ["int8 after sparsify", "int8 after ptq of the teacher = ptq"]


def test_every_budget_of_the_recipe_on_one_model(tiny_models) -> None:
    """Figures recomputed by hand from 10 test labels; the target's budgets follow the recipe's."""
    names = ("crack", "dent", "ok")
    y = np.array([0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    teacher = class_metrics(y, y, names)  # every example right
    student = class_metrics(y, np.array([0, 2, 1, 1, 1, 2, 2, 2, 2, 2]), names)
    # recalls: crack 1/2, dent 3/4, ok 4/4; accuracy 8/10; balanced (0.5 + 0.75 + 1) / 3 = 0.75
    recipe = Recipe(task=TaskSection(metric="recall", classes=("crack", "dent")),
                    budgets=BudgetsSection(min_accuracy=0.8, max_accuracy_drop=10.0, min_balanced_accuracy=0.8,
                                           min_recall={"dent": 0.75, "crack": 0.6}, max_metric_drop=50.0))
    fit = assess(tiny_models["vit_int8"].read_bytes(), "rpi4")
    budgets = budget_verdicts(recipe, teacher, student, fit)
    figures = [(b["name"], b["value"], b["limit"], b["status"]) for b in budgets[:6]]
    assert figures == [
        ("int8 accuracy", 0.8, ">= 0.8", "pass"),
        ("accuracy drop", 20.0, "<= 10.0", "fail"),
        ("int8 balanced accuracy", pytest.approx(0.75), ">= 0.8", "fail"),
        ("int8 recall of 'dent'", 0.75, ">= 0.75", "pass"),
        ("int8 recall of 'crack'", 0.5, ">= 0.6", "fail"),
        ("recall drop", 50.0, "<= 50.0", "pass"),  # the lowest recall of crack and dent: 1.0 -> 0.5
    ]
    assert [b["name"] for b in budgets[6:]] == [f"{b.name} on rpi4" for b in fit.budgets]
    # budgets the recipe leaves at their default are not listed, except the accuracy floor and drop
    assert [b["name"] for b in budget_verdicts(Recipe(), teacher, student, fit)[:3]] == \
        ["int8 accuracy", "accuracy drop", "operators on rpi4"]


def test_budget_lines_are_rounded_for_people() -> None:
    assert budget_line({"name": "int8 accuracy", "value": 0.9166666666666666, "unit": "", "limit": ">= 0.95"}) == \
        "int8 accuracy is 0.9167, limit >= 0.95"
    assert budget_line({"name": "accuracy drop", "value": 2.3809523, "unit": "points", "limit": "<= 1.0"}) == \
        "accuracy drop is 2.381 points, limit <= 1 points"
    assert budget_line({"name": "int8 recall of 'pit'", "value": None, "unit": "", "limit": ">= 0.5"}) == \
        "int8 recall of 'pit' is not measured, limit >= 0.5"
    assert budget_line({"name": "RAM on esp32-s3", "value": 393216, "unit": "bytes", "limit": "<= 327680"}) == \
        "RAM on esp32-s3 is 384.0 KiB, limit <= 320.0 KiB"


def test_the_default_build_says_which_model_it_chose_and_why(default_build) -> None:
    """The default recipe runs the whole method (prune, then QAT) and chooses on the validation split; the choice is
    recomputed here from each record's validation figures by the rule as the recipe documents it
    (tests/test_build.py recomputes those figures from the files)."""
    out, manifest, _ = default_build
    records = manifest["metrics"]["stages"]
    assert [r["name"] for r in records] == ["float teacher", "int8 after ptq of the teacher", "int8 after prune",
                                            "int8 after qat"]
    students = records[1:]
    met = [r for r in students if r["validation"]["meets_budgets"]]
    fastest = min(r["target_latency_ms"] for r in met)
    near = [i for i, r in enumerate(students) if r in met and r["target_latency_ms"] <= fastest * 1.02]
    selection = manifest["selection"]
    noise = selection["task_metric_standard_errors"]
    metric = [r["validation"]["accuracy"] for r in students]
    top = max(near, key=lambda i: (metric[i], i))
    # within one standard error of the highest, the validation split does not tell them apart: the later stage
    chosen = students[max(i for i in near if metric[top] - metric[i] <= noise[top][i] + 1e-9)]
    final = next(r for r in records if r["file"] == "model.tflite")
    assert final["name"] == chosen["name"]
    assert (selection["rule"], selection["chosen"], selection["meeting_every_budget"], selection["judged_on"]) == \
        ("fastest", final["name"], [r["name"] for r in met], "validation")
    assert selection["judged_on_size"] == len(manifest["data"]["validation_indices"]) > 0
    assert selection["reason"].endswith(f"of the {len(met)} model(s) that meet every budget")
    assert final["budgets"] == manifest["budgets"]
    assert final["meets_budgets"] == all(b["status"] == "pass" for b in final["budgets"])
    assert final["target_latency_ms"] == manifest["target_check"]["latency"]["estimate_ms"]
    assert manifest["metrics"]["task_metric"] == {"name": "accuracy", "classes": [],
                                                  "float": manifest["metrics"]["float_accuracy"],
                                                  "int8": manifest["metrics"]["int8_accuracy"]}
    report = (out / "report.md").read_text()
    assert (f"model.tflite is {final['name']} (compress.select = 'fastest'), judged on the "
            f"{selection['judged_on_note']}: {selection['reason']}") in report
    verdicts = f"{'yes' if final['validation']['meets_budgets'] else 'no'} / {'yes' if final['meets_budgets'] else 'no'}"
    assert (f"| {final['name']} | model.tflite | {final['validation']['task_metric']:.4f} | {final['accuracy']:.4f} | "
            f"{final['target_latency_ms']:.4g} ms | {verdicts} |") in report
    html = (out / "report.html").read_text()
    assert '<img alt="Confusion matrix of the final model' in html
    assert '<img alt="Relative RMS error of each int8 operator output' in html and EMPTY_ERROR_PLOT not in html


def test_an_error_plot_with_every_error_zero_is_replaced_by_a_warning(default_build) -> None:
    _, manifest, _ = default_build
    zeros = [{**e, "relative_rms_error": 0.0} for e in manifest["quantization_error"]]
    report = markdown({**manifest, "quantization_error": zeros})
    assert f"No plot: {EMPTY_ERROR_PLOT}." in report
    assert "(plot in report.html: Relative RMS error" not in report


def test_fastest_counts_estimates_within_two_percent_as_ties() -> None:
    """A student 0.3% faster by the estimate but a point less accurate is not the fastest: the estimate does not
    resolve such a difference (the default build's prune and qat students differ so). 3% apart, speed decides."""
    near = [candidate("int8 after prune", True, 0.8279, 0.9778, 300), candidate("int8 after qat", True, 0.8307, 0.9889, 301)]
    selection = select(near, "fastest")
    assert selection.index == 1
    assert selection.reason == ("the highest task.metric (0.9889) of the 2 whose estimated latency on the target "
                                "(0.8307 ms) is within 2% of the smallest (0.8279 ms), closer than the estimate "
                                "resolves, of the 2 model(s) that meet every budget")
    apart = [near[0], replace(near[1], latency_ms=0.8279 * 1.03)]
    assert select(apart, "fastest").index == 0


def test_without_a_validation_split_the_choice_is_made_on_the_test_split_and_says_so(tmp_path) -> None:
    """train.validation_fraction = 0 leaves nothing to choose on but the test split: the build still chooses,
    and the manifest and report say that the chosen model's test figures are then optimistic."""
    needs_train_extra()
    from edgecc.build import build

    recipe = tmp_path / "recipe.toml"
    recipe.write_text('name = "no-validation"\n[model]\nstem_filters = [8]\nstem_strides = [2]\ndim = 16\ndepth = 1\n'
                      'heads = 2\nmlp_dim = 32\n[data]\nsource = "sklearn-digits"\n[train]\nepochs = 1\n'
                      'validation_fraction = 0.0\n[compress]\nstages = ["prune", "ptq"]\ncalibration_samples = 16\n'
                      'distill_epochs = 0\n[budgets]\nmin_accuracy = 0.0\nmax_accuracy_drop = 100.0\n')
    manifest = build("rpi4", recipe, tmp_path / "out").manifest
    selection = manifest["selection"]
    assert (selection["judged_on"], selection["judged_on_size"]) == ("test", manifest["data"]["test_size"])
    assert "optimistic" in selection["judged_on_note"] and manifest["data"]["validation_indices"] == []
    assert not any("validation" in record for record in manifest["metrics"]["stages"])
    assert f"judged on the {selection['judged_on_note']}" in (tmp_path / "out" / "report.md").read_text()


def test_a_validation_split_too_small_for_a_drop_budget_is_warned_about() -> None:
    """One example of 50 is 2 points of accuracy, more than a 1-point drop budget; of 200, half a point. A metric
    that weighs 3 classes alike moves by 100 / (3 * 5) = 6.67 points per example of a 5-example class."""
    from edgecc.selection import resolution_warning

    names = ("crack", "dent", "ok")
    small = np.array([0] * 5 + [1] * 5 + [2] * 40)
    large = np.repeat(small, 4)
    accuracy = Recipe(budgets=BudgetsSection(max_accuracy_drop=1.0))
    warning = resolution_warning(accuracy, class_metrics(small, small, names))
    assert warning is not None and "budgets.max_accuracy_drop (1 points; one example of 50 is 2.00)" in warning
    assert resolution_warning(accuracy, class_metrics(large, large, names)) is None
    balanced = Recipe(task=TaskSection(metric="balanced_accuracy"),
                      budgets=BudgetsSection(max_accuracy_drop=5.0, max_metric_drop=5.0))
    warning = resolution_warning(balanced, class_metrics(large, large, names))  # 20 of the smallest: 1.67 points
    assert warning is None
    warning = resolution_warning(balanced, class_metrics(small, small, names))
    assert "max_accuracy_drop" not in warning and "5 there, moves it by about 6.67" in warning
    recall = Recipe(task=TaskSection(metric="recall", classes=("ok",)),
                    budgets=BudgetsSection(max_accuracy_drop=5.0, max_metric_drop=5.0))
    assert resolution_warning(recall, class_metrics(small, small, names)) is None  # 40 of 'ok': 2.5 points


def test_a_floor_the_teacher_itself_misses_on_the_validation_split_is_warned_about() -> None:
    """The teacher predicts 45 of 50 right (0.9), 'crack' 3 of 5 (0.6): a 0.92 accuracy floor and a 0.8 recall
    floor on 'crack' are above it and named with the teacher's figure; the floors it meets are not."""
    from edgecc.selection import floor_warning

    names = ("crack", "dent", "ok")
    truth = np.array([0] * 5 + [1] * 5 + [2] * 40)
    predicted = truth.copy()
    predicted[[0, 1]] = 2  # two cracks called ok
    predicted[[10, 11, 12]] = [0, 1, 1]  # three oks called crack or dent
    teacher = class_metrics(truth, predicted, names)
    assert teacher.score("accuracy") == 0.9 and {c.name: c.recall for c in teacher.classes}["crack"] == 0.6
    missed = Recipe(budgets=BudgetsSection(min_accuracy=0.92, min_recall={"crack": 0.8, "ok": 0.9}))
    warning = floor_warning(missed, teacher)
    assert "budgets.min_accuracy 0.92 (the teacher: 0.9000), budgets.min_recall.crack 0.8 (the teacher: 0.6000)" in warning
    assert "min_recall.ok" not in warning
    assert floor_warning(Recipe(budgets=BudgetsSection(min_accuracy=0.9)), teacher) is None
