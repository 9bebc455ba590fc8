"""Loading a user's model: safe mode always, formats that can carry code refused."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("tf_keras")
from edgecc.data import load_dataset  # noqa: E402
from edgecc.errors import EdgeccError  # noqa: E402
from edgecc.train.layers import keras  # noqa: E402
from edgecc.recipe import DataSection  # noqa: E402
from edgecc.train.teacher import load_user_model  # noqa: E402

DIGITS = load_dataset(DataSection(), seed=0)


def lambda_model(marker: Path) -> keras.Model:
    """A model whose Lambda leaves `marker` on disk whenever its Python code runs."""
    path = str(marker)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Lambda(lambda t: (__import__("pathlib").Path(path).touch(), t * 2.0)[1])(keras.layers.Flatten()(inputs))
    return keras.Model(inputs, keras.layers.Dense(10)(x))


def test_lambda_bytecode_is_never_loaded(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    lambda_model(marker).save(tmp_path / "m.keras")
    marker.unlink()
    with pytest.raises(EdgeccError, match="is not a Keras model edgecc can load: .*Lambda"):
        load_user_model(tmp_path / "m.keras", DIGITS)
    assert not marker.exists()


def test_saved_model_directory_runs_no_code_from_the_file(tmp_path: Path) -> None:
    """Keras ignores safe_mode for SavedModel; edgecc's scope makes it fall back to the traced graph."""
    marker = tmp_path / "code-ran"
    lambda_model(marker).save(tmp_path / "saved", save_format="tf")
    marker.unlink()
    with pytest.raises(EdgeccError, match="cannot rewrite layer 'lambda[_0-9]*' \\(Lambda\\)"):
        load_user_model(tmp_path / "saved", DIGITS)  # loads from the traced graph, then the rewrite refuses it
    assert not marker.exists()


def test_hdf5_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m.h5").write_bytes(b"\x89HDF\r\n")
    with pytest.raises(EdgeccError, match=".keras files and SavedModel directories only"):
        load_user_model(tmp_path / "m.h5", DIGITS)


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    inputs = keras.Input((4, 4, 1))
    keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs))).save(tmp_path / "m.keras")
    with pytest.raises(EdgeccError, match=r"model input shape \(4, 4, 1\) does not match the data's \(8, 8, 1\)"):
        load_user_model(tmp_path / "m.keras", DIGITS)
