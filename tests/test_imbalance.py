"""Training that holds on a new user's data: class weights lift a rare class's recall, a collapsed model is
flagged, the validation split never overlaps what the teacher trains on, early stopping stops, and an
interrupted teacher resumes from its last finished epoch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import needs_train_extra
from edgecc.classmetrics import class_metrics
from edgecc.data import (Dataset, Preprocessing, class_weights, epoch_length, epoch_order, load_dataset, mixed,
                         validation_split)
from edgecc.progress import Reporter
from edgecc.recipe import DataSection, ModelSection, TaskSection, TrainSection

TINY = ModelSection(stem_filters=(8,), stem_strides=(2,), dim=16, depth=1, heads=2, mlp_dim=32, dropout=0.0)


class Recording(Reporter):
    """A quiet reporter that counts finished epochs and heartbeats, keeps info lines, and can raise
    KeyboardInterrupt (what Ctrl-C raises) right after a chosen number of epochs."""

    def __init__(self, interrupt_after: int = 0) -> None:
        super().__init__(quiet=True)
        self.interrupt_after = interrupt_after
        self.epochs = self.heartbeats = 0
        self.lines: list[str] = []

    def info(self, message: str) -> None:
        self.lines.append(message)

    @contextmanager
    def task(self, description: str, total: int, **options: Any) -> Iterator[Callable[..., None]]:
        with super().task(description, total, **options) as advance:
            def counting(steps: int = 1, status: str = "", *, partial: float = 0.0) -> None:
                advance(steps, status, partial=partial)
                self.epochs += steps
                self.heartbeats += steps == 0
                if self.interrupt_after and self.epochs == self.interrupt_after:
                    raise KeyboardInterrupt

            yield counting


@pytest.fixture(scope="module")
def digits() -> Dataset:
    needs_train_extra()
    return load_dataset(DataSection(), seed=0)


def imbalanced(data: Dataset, rare: range, keep: float) -> Dataset:
    """`data` with only `keep` of the training examples of the `rare` classes (seeded); the test split as it is."""
    rng = np.random.default_rng(0)
    index = []
    for label in range(data.num_classes):
        members = data.train_index[data.y[data.train_index] == label]
        index.append(rng.choice(members, round(len(members) * keep), replace=False) if label in rare else members)
    return replace(data, train_index=np.sort(np.concatenate(index)))


def teacher(data: Dataset, reporter: Reporter | None = None, checkpoint: Path | None = None, **fields: Any) -> Any:
    from edgecc.train.teacher import starting_model, train

    section = TrainSection(**{"batch_size": 32, "augment_shift": 0, "validation_fraction": 0.0, **fields})
    return train(starting_model(TINY, None, data, 0), data, section, 0, reporter or Reporter(quiet=True),
                 task=TaskSection(), checkpoint=checkpoint)


def predictions(model: Any, data: Dataset) -> np.ndarray:
    return np.argmax(model.predict(data.x[data.test_index], verbose=0), axis=-1)


def test_balanced_weights_are_inverse_class_frequencies_with_mean_one() -> None:
    y = np.repeat([0, 1, 2], [60, 6, 24])
    expected = [90 / (3 * 60), 90 / (3 * 6), 90 / (3 * 24)]  # n / (k * count), by hand
    assert class_weights(y, 3) == pytest.approx(expected)
    assert class_weights(y, 3)[y].mean() == pytest.approx(1.0)
    assert class_weights(np.repeat([0, 1, 2], 5), 3) == pytest.approx([1, 1, 1])
    assert class_weights(y, 3, "none") == pytest.approx([1, 1, 1])
    assert class_weights(y, 3, "sampling") == pytest.approx([1, 1, 1])  # sampling balances through the order
    absent = class_weights(y, 4)  # a class with no training example takes no weight; the mean stays 1
    assert absent[3] == 0 and absent[y].mean() == pytest.approx(1.0) and absent[:3] == pytest.approx(expected)


def test_validation_is_stratified_and_never_overlaps_a_training_window(tmp_path: Path) -> None:
    y = np.repeat([0, 1], [100, 20])
    images = Dataset("images", np.zeros((120, 4, 4, 1), np.float32), y, ("a", "b"), np.arange(120), np.arange(0),
                     Preprocessing("pixels", "NHWC", (4, 4, 1), 1.0, 0.0))
    fit, held = validation_split(images, 0.1, seed=0)
    assert np.bincount(y[held]).tolist() == [10, 2] and sorted([*fit, *held]) == list(range(120))
    # a floor per class lifts the rare class's 2 to 5; a class of 9 gives a third of itself, 3, not 5
    y_rare = np.repeat([0, 1, 2], [100, 20, 9])
    rare = Dataset("images", np.zeros((129, 4, 4, 1), np.float32), y_rare, ("a", "b", "c"), np.arange(129),
                   np.arange(0), Preprocessing("pixels", "NHWC", (4, 4, 1), 1.0, 0.0))
    fit, held = validation_split(rare, 0.1, seed=0, min_per_class=5)
    assert np.bincount(y_rare[held]).tolist() == [10, 5, 3] and sorted([*fit, *held]) == list(range(129))

    for name, label in (("healthy_0.npy", 0), ("fault_0.npy", 1)):
        np.save(tmp_path / name, np.sin(np.arange(400) * (0.1 + label)))
    signals = load_dataset(DataSection(source="signals", path=str(tmp_path), files=r"([a-z]+)_\d+\.npy",
                                       window=40, hop=20, test_tail=0.2), seed=0)
    fit, held = validation_split(signals, 0.2, seed=0)
    assert len(held) and not set(fit) & set(held) and set(fit) | set(held) <= set(signals.train_index)
    spans = {}
    for part, index in (("fit", fit), ("held", held)):
        for i in index:
            recording, start = signals.example_ids[i].split("@")
            spans.setdefault((recording, part), []).append(int(start))
    for recording in ("healthy_0.npy", "fault_0.npy"):
        assert max(spans[recording, "fit"]) + 40 <= min(spans[recording, "held"])  # no shared sample
    assert validation_split(signals, 0.0, seed=0)[0].tolist() == signals.train_index.tolist()


def test_balanced_sampling_gives_every_class_the_largest_ones_share_of_each_epoch() -> None:
    y = np.repeat([0, 1, 2, 3], [50, 7, 20, 0])  # class 3 has no training example
    rng = np.random.default_rng(0)
    order = epoch_order(y, 4, "sampling", rng)
    assert len(order) == epoch_length(y, 4, "sampling") == 150
    assert np.bincount(y[order], minlength=4).tolist() == [50, 50, 50, 0]
    counts = np.bincount(order, minlength=len(y))
    assert set(counts[y == 0]) == {1} and set(counts[y == 1]) <= {7, 8} and set(counts[y == 2]) <= {2, 3}
    assert order.tolist() != epoch_order(y, 4, "sampling", rng).tolist()  # a fresh draw each epoch
    balanced = np.repeat([0, 1], 30)
    assert sorted(epoch_order(balanced, 2, "sampling", rng)) == list(range(60))  # each example once
    for rule in ("weights", "none"):
        assert sorted(epoch_order(y, 4, rule, rng)) == list(range(77)) and epoch_length(y, 4, rule) == 77


def test_mixup_blends_inputs_and_targets_by_the_same_share() -> None:
    """Example i's input is the number i and its target is class i, so a blend's input must be its target's
    mean class; the weights follow the same blend."""
    n = 64
    x, targets = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, 2, 2, 1), np.float32), np.eye(n)
    weights = np.arange(n, dtype=np.float32)
    blended_x, blended_targets, blended_weights = mixed(0.2, np.random.default_rng(0), x, targets, weights)
    mean_class = blended_targets @ np.arange(n)
    assert np.allclose(blended_x, mean_class[:, None, None, None], atol=1e-4)
    assert np.allclose(blended_weights, mean_class, atol=1e-4) and np.allclose(blended_targets.sum(axis=1), 1)
    assert (np.count_nonzero(blended_targets, axis=1) <= 2).all() and not np.array_equal(blended_targets, targets)
    assert all(a is b for a, b in zip(mixed(0.0, np.random.default_rng(0), x, targets), (x, targets)))


@pytest.fixture(scope="module")
def by_balance(digits: Dataset) -> dict[str, Any]:
    """'0' keeps its training examples, every other digit a tenth of them: each train.balance's per-class
    figures on the test split, from the same seed. A sampled epoch is 10 times the largest class, about five
    times the others' epoch, so sampling gets 2 epochs against their 8: about as many steps."""
    data = imbalanced(digits, rare=range(1, 10), keep=0.1)
    epochs = {"none": 8, "weights": 8, "sampling": 2}
    return {rule: class_metrics(data.y[data.test_index],
                                predictions(teacher(data, epochs=epochs[rule], balance=rule), data), data.label_names)
            for rule in epochs}


@pytest.mark.parametrize("rule", ["weights", "sampling"])
def test_class_balance_lifts_the_rare_classes_recall(by_balance: dict[str, Any], rule: str) -> None:
    rare = {name: np.mean([c.recall for c in figures.classes[1:]]) for name, figures in by_balance.items()}
    assert rare[rule] > rare["none"] + 0.2, rare
    handled, unhandled = by_balance[rule], by_balance["none"]
    assert handled.balanced_accuracy > unhandled.balanced_accuracy and handled.accuracy > unhandled.accuracy


def test_collapse_warning_fires_on_the_collapsed_model_only(by_balance: dict[str, Any]) -> None:
    collapsed = [[w for w in figures.warnings if w.startswith("the model has collapsed onto class")]
                 for figures in by_balance.values()]
    assert len(collapsed[0]) == 1 and "onto class '0'" in collapsed[0][0] and not any(collapsed[1:]), collapsed


def test_early_stopping_stops_when_the_validation_figure_stalls(digits: Dataset) -> None:
    """A learning rate too small to change a prediction: epoch 5 of 10, the first one judged, is the best,
    then two more without a better figure."""
    data = replace(digits, train_index=digits.train_index[:200])
    reporter = Recording()
    teacher(data, reporter, epochs=10, learning_rate=1e-9, validation_fraction=0.2, patience=2)
    assert reporter.epochs == 7 and "stopped after epoch 7" in reporter.lines[-1], reporter.lines
    assert "keeping epoch 5's weights" in reporter.lines[-1], reporter.lines


def test_an_interrupted_teacher_resumes_from_its_last_epoch(digits: Dataset, tmp_path: Path) -> None:
    """Interrupted (KeyboardInterrupt from the progress call) after epoch 2 of 4, then run again on the same
    checkpoint: only epochs 3 and 4 run, and the weights equal an uninterrupted run's (the model has no dropout; the
    mixup draws come from the checkpointed generator)."""
    data = replace(digits, train_index=digits.train_index[:300])
    fields = {"epochs": 4, "validation_fraction": 0.1, "validation_min_per_class": 0, "patience": 0, "mixup": 0.2}
    whole = teacher(data, **fields)
    checkpoint = tmp_path / "teacher-checkpoint"
    interrupted = Recording(interrupt_after=2)
    with pytest.raises(KeyboardInterrupt):
        teacher(data, interrupted, checkpoint, **fields)
    assert interrupted.heartbeats > 0 and [p.name for p in checkpoint.iterdir()] == ["teacher.npz"]
    resumed = Recording()
    model = teacher(data, resumed, checkpoint, **fields)
    assert resumed.lines == ["mixup alpha 0.2: every training example is blended with another of its epoch",
                             "resuming the teacher from epoch 2"] and resumed.epochs == 2
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), whole.get_weights()))
    assert np.mean(predictions(model, data) == data.y[data.test_index]) > 0.2  # chance is 0.1
