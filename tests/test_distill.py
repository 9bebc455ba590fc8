"""Distillation: the combined loss falls, and hidden states are paired block to block."""

from __future__ import annotations

import io

import numpy as np
import pytest
from rich.console import Console

pytest.importorskip("tf_keras")
from edgecc.data import load_dataset  # noqa: E402
from edgecc.train.distill import DistillWeights, distill, hidden_pairs  # noqa: E402
from edgecc.errors import EdgeccError  # noqa: E402
from edgecc.train.layers import keras  # noqa: E402
from edgecc.progress import Reporter  # noqa: E402
from edgecc.recipe import DataSection, TaskSection  # noqa: E402
from edgecc.train.transformer import VitConfig, vision_transformer  # noqa: E402

DIGITS = load_dataset(DataSection(), seed=0)


def vit(depth: int, dim: int = 32) -> keras.Model:
    config = VitConfig(stem_filters=(8,), stem_strides=(2,), dim=dim, depth=depth, heads=2, mlp_dim=32, dropout=0.0)
    return vision_transformer(config, (8, 8, 1), 10)


@pytest.fixture(scope="module")
def taught() -> tuple[keras.Model, np.ndarray, np.ndarray]:
    """A teacher trained briefly on 512 digits, with those digits."""
    keras.utils.set_random_seed(0)
    x, y = DIGITS.x[DIGITS.train_index][:512], DIGITS.y[DIGITS.train_index][:512]
    teacher = vit(depth=2)
    teacher.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    teacher.fit(x, y, epochs=4, batch_size=32, verbose=0)
    return teacher, x, y


@pytest.mark.parametrize("mixup", [0.0, 0.2])
def test_distillation_loss_decreases_and_the_student_learns(taught: tuple, mixup: float) -> None:
    """With mixup the student trains on blends only (the teacher labelling each), and still learns the digits."""
    teacher, x, y = taught
    keras.utils.set_random_seed(0)
    student = vit(depth=1)
    history = distill(student, teacher, x, y, epochs=6, batch_size=32, learning_rate=3e-3,
                      weights=DistillWeights(hidden=0.5), seed=0, reporter=Reporter(quiet=True), mixup=mixup)
    assert history[-1] < 0.6 * history[0], history
    accuracy = np.mean(np.argmax(student.predict(x, verbose=0), -1) == y)
    assert accuracy > 0.5


def test_hidden_states_pair_evenly_and_need_equal_widths() -> None:
    assert hidden_pairs(vit(depth=2), vit(depth=4)) == [("block0_mlp_residual", "block1_mlp_residual"),
                                                         ("block1_mlp_residual", "block3_mlp_residual")]
    with pytest.raises(EdgeccError, match="equal widths"):
        hidden_pairs(vit(depth=1, dim=16), vit(depth=1, dim=32))


def test_each_epoch_distils_on_one_augmented_view_of_a_balanced_draw() -> None:
    """The augmentation gets each epoch's inputs once, in the epoch's order: a balanced draw when asked
    (the rare class as often as the common one), so the teacher and the student see the same views."""
    keras.utils.set_random_seed(0)
    keep = np.concatenate([np.flatnonzero(DIGITS.y[DIGITS.train_index] == 0)[:40],
                           np.flatnonzero(DIGITS.y[DIGITS.train_index] == 1)[:8]])
    x, y = DIGITS.x[DIGITS.train_index][keep], DIGITS.y[DIGITS.train_index][keep]
    seen: list[np.ndarray] = []

    def augment(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        seen.append(batch)
        return batch + rng.normal(0, 0.01, batch.shape).astype(np.float32)

    distill(vit(depth=1), vit(depth=1), x, y, epochs=2, batch_size=16, learning_rate=1e-3,
            weights=DistillWeights(), seed=0, reporter=Reporter(quiet=True), balance="sampling", augment=augment)
    assert len(seen) == 2 and all(len(view) == 80 for view in seen)  # 2 classes x the larger one's 40
    originals = {x[i].tobytes(): y[i] for i in range(len(x))}
    for view in seen:
        labels = [originals[example.tobytes()] for example in view]  # every view example is a training one
        assert np.bincount(labels).tolist() == [40, 40]


class _ScriptedJudge:
    """Stands in for best_epoch.Judge: gives the listed validation figures in turn and keeps the weights it saw."""

    task = TaskSection()

    def __init__(self, figures: list[float]) -> None:
        self.figures, self.seen = figures, []

    def __call__(self, model: keras.Model) -> tuple[float, float]:
        self.seen.append(model.get_weights())
        return self.figures[len(self.seen) - 1], 1.0


def test_the_student_keeps_its_best_judged_epoch_of_the_second_half() -> None:
    """Judged after epochs 3..6 of 6 (the second half) with figures 0.5, 0.9, 0.9, 0.3: the student ends with the
    weights it had after epoch 4, the first of the two equal best (an equal figure needs a lower loss), not the
    last epoch's."""
    keras.utils.set_random_seed(0)
    x, y = DIGITS.x[DIGITS.train_index][:128], DIGITS.y[DIGITS.train_index][:128]
    teacher, student = vit(depth=1), vit(depth=1)
    judge = _ScriptedJudge([0.5, 0.9, 0.9, 0.3])
    log = io.StringIO()
    distill(student, teacher, x, y, epochs=6, batch_size=32, learning_rate=3e-3, weights=DistillWeights(), seed=0,
            reporter=Reporter(console=Console(file=log, width=300)), judge=judge)
    assert len(judge.seen) == 4
    final = student.get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(final, judge.seen[1]))
    assert not all(np.array_equal(a, b) for a, b in zip(final, judge.seen[-1]))
    assert "keeping epoch 4's weights (validation accuracy 0.900" in log.getvalue()
