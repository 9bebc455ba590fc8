"""Which epoch's weights a training keeps: the best on the validation split, judged by task.metric after each
epoch of the second half of the schedule. The teacher's training and every distillation (prune, mix, sparsify,
qat) share this rule, so a student whose training drifts off at the end (a quantization-aware distillation whose
loss climbs in its last epochs) keeps its best epoch rather than its last.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgecc.classmetrics import score
from edgecc.data import Dataset
from edgecc.recipe import TaskSection
from edgecc.train.tf import keras as _keras

TIE_BREAK_MARGIN = 1e-3  # a validation loss lower by less than this share is rounding, not learning


def first_judged(epochs: int) -> int:
    """The first epoch whose validation figure can stop training or be kept: half way through the schedule.

    The first half of a cosine schedule runs at a high learning rate, where the validation figure of a
    small or imbalanced split swings from epoch to epoch; judged there, patience stopped NEU-DET's teacher
    after 22 of 80 epochs, with the learning rate still near its peak and the model half trained.
    """
    return (epochs + 1) // 2


def outputs_logits(model: Any) -> bool:
    keras = _keras()
    return getattr(model.layers[-1], "activation", None) is not keras.activations.softmax


def class_mean_loss(outputs: np.ndarray, truth: np.ndarray, logits: bool) -> float:
    """The validation cross-entropy averaged per class, then over classes.

    It breaks ties between epochs of equal task.metric: a validation split with two examples of a rare class
    reaches a perfect figure early, and without a tie-break patience would stop the teacher there while
    it is still learning. Averaged per class, so the majority does not decide it alone.
    """
    if logits:
        shifted = outputs - outputs.max(axis=-1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    else:
        log_p = np.log(np.clip(outputs, 1e-12, 1.0))
    losses = -log_p[np.arange(len(truth)), truth]
    return float(np.mean([losses[truth == c].mean() for c in np.unique(truth)]))


@dataclass(frozen=True)
class Judge:
    """The validation split and the task that judge a model on it: (task.metric, class-mean loss)."""

    x: np.ndarray
    y: np.ndarray
    task: TaskSection
    label_names: tuple[str, ...]
    batch_size: int = 256

    @classmethod
    def on(cls, dataset: Dataset, index: np.ndarray, task: TaskSection, batch_size: int) -> Judge | None:
        """The judge on `dataset`'s examples at `index` (a validation split); None when it is empty."""
        return cls(dataset.x[index], dataset.y[index], task, dataset.label_names, batch_size) if len(index) else None

    def __call__(self, model: Any) -> tuple[float, float]:
        outputs = model.predict(self.x, batch_size=self.batch_size, verbose=0)
        figure = score(self.task.metric, self.task.classes, self.y, np.argmax(outputs, axis=-1), self.label_names)
        return figure, class_mean_loss(outputs, self.y, outputs_logits(model))


@dataclass
class Best:
    """The best validation figure so far, its loss, after how many epochs, and that epoch's weights."""

    figure: float = -np.inf
    loss: float = np.inf  # what breaks a tie between equal figures
    epoch: int = 0
    weights: list[np.ndarray] | None = None

    def offer(self, epoch: int, figure: float, loss: float, model: Any) -> None:
        """Keep `model`'s weights after `epoch` epochs if its figure is higher, or equal with a lower loss."""
        if figure > self.figure or (figure == self.figure and loss < self.loss * (1 - TIE_BREAK_MARGIN)):
            self.figure, self.loss, self.epoch, self.weights = figure, loss, epoch, model.get_weights()
