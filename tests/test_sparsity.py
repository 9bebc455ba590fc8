"""TF-MOT sparsity fine-tuned by distillation: the zeros reach the target, keep their pattern and survive into int8."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tensorflow_model_optimization")
from edgecc.train.compress import run_stages  # noqa: E402
from edgecc.train.convert import to_int8_tflite  # noqa: E402
from edgecc.data import load_dataset  # noqa: E402
from edgecc.train.distill import DistillWeights  # noqa: E402
from edgecc.errors import EdgeccError  # noqa: E402
from edgecc.train.layers import keras  # noqa: E402
from edgecc.progress import Reporter  # noqa: E402
from edgecc.recipe import CompressSection, DataSection, TrainSection, load_recipe  # noqa: E402
from edgecc.reader import int8_weight_sparsity  # noqa: E402
from edgecc.train.sparsity import kernel_sparsity, prunable_layers, sparsify  # noqa: E402
from edgecc.train.teacher import inference_graph  # noqa: E402
from edgecc.train.transformer import VitConfig, vision_transformer  # noqa: E402

DIGITS = load_dataset(DataSection(), seed=0)
X, Y = DIGITS.x[DIGITS.train_index], DIGITS.y[DIGITS.train_index]
# stem1 reads 8 channels and is pruned; stem0 reads the 1-channel image and stays dense, like the classifier
TINY = VitConfig(stem_filters=(8, 8), stem_strides=(1, 2), dim=16, depth=1, heads=2, mlp_dim=32, dropout=0.0)
PRUNED = ["stem1", "token_projection", "block0_query", "block0_key", "block0_value", "block0_attn_output",
          "block0_mlp_up", "block0_mlp_down"]


@pytest.fixture(scope="module")
def teacher() -> Any:
    keras.utils.set_random_seed(0)
    model = vision_transformer(TINY, (8, 8, 1), 10)
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(X, Y, epochs=3, batch_size=32, verbose=0)
    return model


def _sparsify(teacher: Any, target: float, pattern: str) -> tuple[Any, list[float]]:
    return sparsify(teacher, teacher, X[:320], Y[:320], target, pattern, epochs=2, batch_size=32,
                    learning_rate=1e-3, weights=DistillWeights(), seed=0, reporter=Reporter(quiet=True))


def _sparse_int8(content: bytes, target: float) -> dict[str, float]:
    """The int8 weight tensors at the target sparsity or above: one per pruned kernel, whatever the converter named it."""
    return {name: f for name, f in int8_weight_sparsity(content).items() if f >= target - 0.01}


@pytest.fixture(scope="module")
def magnitude(teacher: Any) -> tuple[Any, list[float]]:
    return _sparsify(teacher, 0.7, "magnitude")


def test_classifier_and_image_convolution_stay_dense(teacher: Any) -> None:
    assert prunable_layers(teacher, "magnitude") == PRUNED
    assert prunable_layers(teacher, "2:4") == PRUNED


def test_magnitude_reaches_the_target_in_every_pruned_kernel(teacher: Any, magnitude: tuple[Any, list[float]]) -> None:
    before = teacher.get_weights()
    student, losses = magnitude
    sparsity = kernel_sparsity(student)
    print({name: round(f, 4) for name, f in sparsity.items()})
    assert not any("prune_low_magnitude" in layer.name for layer in student.layers)
    for name in PRUNED:
        assert sparsity[name] == pytest.approx(0.7, abs=0.01), name
    assert sparsity["stem0"] == sparsity["logits"] == 0.0
    assert len(losses) == 2 and np.isfinite(losses).all()
    assert all(np.array_equal(a, b) for a, b in zip(before, teacher.get_weights()))  # the teacher is not pruned


def test_two_of_every_four_input_weights_are_zero(teacher: Any) -> None:
    student, _ = _sparsify(teacher, 0.5, "2:4")
    for name in PRUNED:
        kernel = student.get_layer(name).kernel.numpy()
        groups = np.moveaxis(kernel, -2, -1).reshape(-1, 4)  # fours along the input axis, as TFLite lays them out
        assert np.all(np.sum(groups == 0, axis=1) == 2), name


def test_post_training_quantization_keeps_the_zeros(magnitude: tuple[Any, list[float]]) -> None:
    content = to_int8_tflite(inference_graph(magnitude[0]), X[:32], per_channel=False)
    sparse = _sparse_int8(content, 0.7)
    print({name[-40:]: round(f, 4) for name, f in sparse.items()})
    assert len(sparse) == len(PRUNED)
    assert not any("logits" in name for name in sparse)


def test_sparsify_then_sparsity_preserving_qat(teacher: Any) -> None:
    section = CompressSection(stages=("sparsify", "qat"), sparsity=0.6, distill_epochs=1, hidden_weight=0.5,
                              calibration_samples=32)
    sparse, qat = run_stages(teacher, DIGITS, section, TrainSection(batch_size=64), 0, X[:32], Reporter(quiet=True))
    assert [sparse.name, qat.name] == ["sparsify", "qat"]
    assert sparse.parameters == teacher.count_params()
    for stage in (sparse, qat):
        fractions = _sparse_int8(stage.int8, 0.6)
        print(stage.name, {name[-40:]: round(f, 4) for name, f in fractions.items()})
        assert len(fractions) == len(PRUNED), stage.name


def _recipe(tmp_path: Path, compress: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(f"[compress]\n{compress}\n")
    return path


def test_recipe_accepts_sparsify_before_the_quantizing_stage(tmp_path: Path) -> None:
    loaded = load_recipe(_recipe(tmp_path, 'stages = ["sparsify", "qat"]\nsparsity = 0.8'))
    assert loaded.recipe.compress.stages == ("sparsify", "qat")
    assert loaded.recipe.compress.sparsity_pattern == "magnitude"
    load_recipe(_recipe(tmp_path, 'stages = ["prune", "sparsify", "ptq"]\nsparsity_pattern = "2:4"'))


@pytest.mark.parametrize(("compress", "problem"), [
    ('stages = ["sparsify", "ptq"]\nsparsity = 1.5', "compress.sparsity: 1.5 is above the maximum 0.95"),
    ('stages = ["sparsify", "ptq"]\nsparsity_pattern = "4:8"',
     "compress.sparsity_pattern: '4:8' is not one of 'magnitude', '2:4'"),
    ('stages = ["sparsify", "ptq"]\nsparsity_pattern = "2:4"\nsparsity = 0.7', "does not apply to the 2:4 pattern"),
    ('stages = ["sparsify", "prune", "ptq"]', "'prune' must come before 'sparsify'"),
    ('stages = ["ptq", "sparsify"]', "must end with exactly one of 'qat' or 'ptq'"),
    ('stages = ["sparsify", "qat"]\ndistill_epochs = 0', "'sparsify' needs at least 1"),
])
def test_recipe_refuses_bad_sparsity_settings(tmp_path: Path, compress: str, problem: str) -> None:
    with pytest.raises(EdgeccError, match=re.escape(problem)):
        load_recipe(_recipe(tmp_path, compress))


@pytest.mark.parametrize(("target", "pattern", "problem"), [
    (1.5, "magnitude", "sparsity must be in"),
    (0.5, "4:8", "unknown sparsity pattern '4:8'"),
    (0.7, "2:4", "does not apply to the 2:4 pattern"),
])
def test_sparsify_refuses_bad_arguments(teacher: Any, target: float, pattern: str, problem: str) -> None:
    with pytest.raises(EdgeccError, match=problem):
        _sparsify(teacher, target, pattern)
