"""Distillation: the combined loss falls, and hidden states are paired block to block."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tf_keras")
from edgecc.data import load_dataset  # noqa: E402
from edgecc.train.distill import DistillWeights, distill, hidden_pairs  # noqa: E402
from edgecc.errors import EdgeccError  # noqa: E402
from edgecc.train.layers import keras  # noqa: E402
from edgecc.progress import Reporter  # noqa: E402
from edgecc.recipe import DataSection  # noqa: E402
from edgecc.train.transformer import VitConfig, vision_transformer  # noqa: E402

DIGITS = load_dataset(DataSection(), seed=0)


def vit(depth: int, dim: int = 32) -> keras.Model:
    config = VitConfig(stem_filters=(8,), stem_strides=(2,), dim=dim, depth=depth, heads=2, mlp_dim=32, dropout=0.0)
    return vision_transformer(config, (8, 8, 1), 10)


def test_distillation_loss_decreases_and_the_student_learns() -> None:
    keras.utils.set_random_seed(0)
    x, y = DIGITS.x[DIGITS.train_index][:512], DIGITS.y[DIGITS.train_index][:512]
    teacher = vit(depth=2)
    teacher.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    teacher.fit(x, y, epochs=4, batch_size=32, verbose=0)
    student = vit(depth=1)
    history = distill(student, teacher, x, y, epochs=6, batch_size=32, learning_rate=3e-3,
                      weights=DistillWeights(hidden=0.5), seed=0, reporter=Reporter(quiet=True))
    assert history[-1] < 0.6 * history[0], history
    accuracy = np.mean(np.argmax(student.predict(x, verbose=0), -1) == y)
    assert accuracy > 0.5


def test_hidden_states_pair_evenly_and_need_equal_widths() -> None:
    assert hidden_pairs(vit(depth=2), vit(depth=4)) == [("block0_mlp_residual", "block1_mlp_residual"),
                                                         ("block1_mlp_residual", "block3_mlp_residual")]
    with pytest.raises(EdgeccError, match="equal widths"):
        hidden_pairs(vit(depth=1, dim=16), vit(depth=1, dim=32))
