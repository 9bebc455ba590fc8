from __future__ import annotations

from pathlib import Path

import pytest

from edgecc.errors import EdgeccError
from edgecc.recipe import Recipe, default_recipe_path, load_recipe


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def test_default_recipe_is_valid_and_hashed() -> None:
    loaded = load_recipe()
    assert loaded.path == default_recipe_path()
    assert loaded.recipe.model.dim % loaded.recipe.model.heads == 0
    assert len(loaded.sha256) == 64


def test_empty_recipe_takes_every_default(tmp_path: Path) -> None:
    assert load_recipe(write(tmp_path, "")).recipe == Recipe()


def test_missing_recipe(tmp_path: Path) -> None:
    with pytest.raises(EdgeccError, match="does not exist"):
        load_recipe(tmp_path / "nope.toml")


def test_malformed_toml(tmp_path: Path) -> None:
    with pytest.raises(EdgeccError, match="not valid TOML"):
        load_recipe(write(tmp_path, "[train\nepochs = 3"))


def test_every_problem_is_reported_with_its_field(tmp_path: Path) -> None:
    text = """
seed = -1
[train]
epochs = "ten"
batch_sise = 4
[model]
stem_filters = [8, "x"]
[compress]
stages = ["magic"]
"""
    with pytest.raises(EdgeccError) as err:
        load_recipe(write(tmp_path, text))
    message = str(err.value)
    assert "\n" not in message
    for expected in ("seed: -1 is below the minimum 0", "train.epochs: expected an integer, got 'ten'",
                     "train.batch_sise: unknown field", "model.stem_filters[1]: expected an integer",
                     "compress.stages: 'magic' is not one of 'prune', 'qat', 'ptq'"):
        assert expected in message


def test_bool_is_not_an_integer_and_int_is_a_number(tmp_path: Path) -> None:
    with pytest.raises(EdgeccError, match="train.epochs: expected an integer, got True"):
        load_recipe(write(tmp_path, "[train]\nepochs = true"))
    assert load_recipe(write(tmp_path, "[train]\nlearning_rate = 1")).recipe.train.learning_rate == 1.0


def test_cross_field_checks(tmp_path: Path) -> None:
    text = "[model]\ndim = 30\nheads = 4\nstem_filters = [8]\nstem_strides = [1, 2]\npath = 'missing.keras'"
    with pytest.raises(EdgeccError) as err:
        load_recipe(write(tmp_path, text))
    message = str(err.value)
    assert "model.heads: 4 does not divide model.dim 30" in message
    assert "same length" in message
    assert "model.path:" in message and "missing.keras does not exist" in message


def test_stages_must_end_with_one_quantization(tmp_path: Path) -> None:
    for stages, problem in ((["prune"], "must end with exactly one of 'qat' or 'ptq'"),
                            (["qat", "ptq"], "must end with exactly one of 'qat' or 'ptq'"),
                            (["prune", "prune", "ptq"], "names a stage twice")):
        with pytest.raises(EdgeccError, match=problem):
            load_recipe(write(tmp_path, f"[compress]\nstages = {stages}"))
    assert load_recipe(write(tmp_path, "[compress]\nstages = ['prune', 'qat']")).recipe.compress.stages == ("prune", "qat")
