"""The compression stages run in the recipe's order and change what they should (the default build, in
test_build.py, runs prune and QAT end to end on digits)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("tf_keras")
from edgecc.train.compress import PASSES, run_stages  # noqa: E402
from edgecc.data import load_dataset  # noqa: E402
from edgecc.train.layers import keras  # noqa: E402
from edgecc.progress import Reporter  # noqa: E402
from edgecc.reader import read_graph  # noqa: E402
from edgecc.recipe import STAGES, CompressSection, DataSection, TrainSection  # noqa: E402
from edgecc.train.transformer import VitConfig, vision_transformer  # noqa: E402

DIGITS = load_dataset(DataSection(), seed=0)


@pytest.fixture(scope="module")
def teacher() -> keras.Model:
    keras.utils.set_random_seed(0)
    config = VitConfig(stem_filters=(8,), stem_strides=(2,), dim=32, depth=2, heads=4, mlp_dim=64, dropout=0.0)
    model = vision_transformer(config, (8, 8, 1), 10)
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(DIGITS.x[DIGITS.train_index], DIGITS.y[DIGITS.train_index], epochs=3, batch_size=32, verbose=0)
    return model


def test_every_stage_a_recipe_may_name_has_a_pass_and_every_pass_a_name() -> None:
    assert set(PASSES) == set(STAGES)


def test_progressive_qat_quantizes_block_by_block_then_the_whole_model(teacher: keras.Model) -> None:
    """With two blocks: a hidden-state phase per block (1 epoch each), then the whole model (1 epoch)."""
    section = CompressSection(stages=("qat",), distill_epochs=2, progressive=True, calibration_samples=64)
    calibration = DIGITS.x[DIGITS.train_index[:64]]
    few = replace(DIGITS, train_index=DIGITS.train_index[:256])  # the phases' order is tested, not what they learn
    (stage,) = run_stages(teacher, few, section, TrainSection(batch_size=64), 0, calibration, Reporter(quiet=True))
    assert len(stage.distill_losses) == 1 + 1 + 2 and np.isfinite(stage.distill_losses).all()
    assert {t.dtype for t in read_graph(stage.int8).activation_tensors()} == {"INT8"}
    from edgecc.runtime import Model

    int8 = Model(stage.int8)
    x = DIGITS.x[DIGITS.test_index[:100]]
    agree = np.mean([np.argmax(int8.invoke(e)) for e in x] == np.argmax(stage.student.predict(x, verbose=0), axis=1))
    assert agree >= 0.9, agree


def test_partial_qat_leaves_the_other_layers_float(teacher: keras.Model) -> None:
    from edgecc.train.qat import float_weights_from, qat_model

    calibration = DIGITS.x[DIGITS.train_index[:32]]
    names = [layer.name for layer in teacher.layers]
    partial = qat_model(teacher, calibration, only=set(names[: names.index("block0_mlp_residual") + 1]))
    wrapped = {layer.layer.name for layer in partial.layers if hasattr(layer, "layer")}
    assert "block0_query" in wrapped and "block1_query" not in wrapped and "logits" not in wrapped
    copy = keras.models.clone_model(teacher)
    float_weights_from(partial, copy)
    for a, b in zip(copy.get_weights(), teacher.get_weights()):
        np.testing.assert_array_equal(a, b)
