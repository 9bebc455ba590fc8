"""Datasets: examples, labels, a fixed held-out test split, and the exact preprocessing.

The preprocessing is recorded as data (`Preprocessing`) rather than hidden in
code, because the manifest must let a third party feed the int8 model
correctly without edgecc.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgecc.errors import EdgeccError
from edgecc.recipe import DataSection


@dataclass(frozen=True)
class Preprocessing:
    """How raw examples become the float model input: `x = raw * scale + offset`."""

    raw: str
    layout: str
    input_shape: tuple[int, ...]
    scale: float
    offset: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Dataset:
    """Float model inputs with labels, split once: the test split is never trained or calibrated on."""

    name: str
    x: np.ndarray
    y: np.ndarray
    label_names: tuple[str, ...]
    train_index: np.ndarray
    test_index: np.ndarray
    preprocessing: Preprocessing

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def split_json(self) -> dict[str, Any]:
        """The test split as positions in the source dataset's own order."""
        return {"dataset": self.name, "test_indices": self.test_index.tolist(), "train_size": len(self.train_index)}


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split that keeps each class's share in both parts (indices sorted)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        cut = int(round(len(members) * test_fraction))
        test.append(members[:cut])
        train.append(members[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _sklearn_digits(section: DataSection, seed: int) -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise EdgeccError("data.source 'sklearn-digits' needs scikit-learn: pip install 'edgecc[train]'") from err
    digits = load_digits()
    pre = Preprocessing(
        raw="sklearn.datasets.load_digits().images: 8x8 grey levels 0..16",
        layout="NHWC",
        input_shape=(8, 8, 1),
        scale=1.0 / 16.0,
        offset=0.0,
    )
    x = (digits.images.astype(np.float32) * pre.scale + pre.offset)[..., np.newaxis]
    y = digits.target.astype(np.int64)
    train, test = stratified_split(y, section.test_fraction, seed)
    names = tuple(str(n) for n in digits.target_names)
    return Dataset("sklearn-digits", x, y, names, train, test, pre)


def load_dataset(section: DataSection, seed: int) -> Dataset:
    """The recipe's dataset, with its split and preprocessing."""
    loaders = {"sklearn-digits": _sklearn_digits}
    return loaders[section.source](section, seed)
