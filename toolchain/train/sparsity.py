"""Unstructured magnitude sparsity and 2:4 sparsity (TF-MOT pruning), fine-tuned by distillation.

Which kernels are pruned: every Dense and Conv2D kernel (query/key/value,
attention output, both feed-forward matrices, stem convolutions, the token
projection) except the two kinds that published sparsity work commonly keeps
dense, the first and the last layer:

- layers whose output is a model output, the classifier: each of its few
  weights moves a logit directly, so pruning it costs accuracy and saves almost
  nothing;
- kernels with fewer than 4 input channels, a convolution reading a grey or
  RGB image: a few hundred weights at most, and each filter has only a few
  taps per channel to lose. The 2:4 pattern groups weights in fours along the
  input axis, so it also skips kernels whose input channels are not a
  multiple of 4: TF-MOT pads those, and no complete group would exist.

edgecc's own layers (LayerNorm, PositionEmbedding, the attention matmuls) are
left unwrapped: TF-MOT would refuse their weights, and they hold few of them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgecc.data import epoch_length
from edgecc.train.distill import Augment, DistillWeights, distill
from edgecc.errors import EdgeccError
from edgecc.train.layers import keras
from edgecc.progress import Reporter
from edgecc.recipe import SPARSITY_PATTERNS

import tensorflow_model_optimization as tfmot  # after edgecc.train.layers: TF must be imported with legacy Keras first

MASK_UPDATES = 20  # about this many magnitude-mask updates on the way to the target


def prunable(layer: Any, pattern: str) -> bool:
    """Whether `layer`'s kernel is sparsified (see the module docstring for which are kept dense)."""
    if type(layer) not in (keras.layers.Dense, keras.layers.Conv2D):
        return False
    channels = int(layer.kernel.shape[-2])  # input axis: (in, out) for Dense, (h, w, in, out) for Conv2D
    return channels >= 4 and (pattern != "2:4" or channels % 4 == 0)


def prunable_layers(model: Any, pattern: str) -> list[str]:
    """Names of the layers whose kernels `sparsify` prunes: neither the classifier nor tiny input convolutions."""
    classifiers = {id(tensor._keras_history.layer) for tensor in model.outputs}
    return [layer.name for layer in model.layers if prunable(layer, pattern) and id(layer) not in classifiers]


def schedule(target: float, epochs: int, steps_per_epoch: int) -> Any:
    """Polynomial decay (cubic, TF-MOT's default) from 0 to `target`, ending before the last epoch.

    The last epoch then fine-tunes at the final mask. With a single epoch the
    target is reached halfway through it. TF-MOT updates the mask only on steps
    that are multiples of `frequency`, so the end step is one of them: otherwise
    the last update would fall short of the target.
    """
    end = (epochs - 1) * steps_per_epoch if epochs > 1 else steps_per_epoch // 2
    frequency = max(1, end // MASK_UPDATES)
    end = max(frequency, end - end % frequency)
    return tfmot.sparsity.keras.PolynomialDecay(0.0, target, begin_step=0, end_step=end, frequency=frequency)


def wrap(model: Any, target: float, pattern: str, epochs: int, steps_per_epoch: int) -> Any:
    """A copy of `model` with the prunable layers in `prune_low_magnitude` wrappers; `model` is left unchanged.

    TF-MOT wraps the very layer it is given, so every layer is copied first: a
    teacher passed in as the first student keeps its weights, and each layer
    belongs to one model only (distill() reads the outputs of named layers).
    """
    if pattern not in SPARSITY_PATTERNS:
        raise EdgeccError(f"unknown sparsity pattern {pattern!r}; patterns are {', '.join(SPARSITY_PATTERNS)}")
    if not 0.0 <= target <= 0.95:
        raise EdgeccError(f"sparsity must be in [0, 0.95], not {target}")
    if pattern == "2:4" and target != 0.5:
        raise EdgeccError(f"sparsity {target} does not apply to the 2:4 pattern, which is always 0.5")
    if not getattr(model, "_is_graph_network", False):
        raise EdgeccError(f"cannot sparsify model '{model.name}': pruning needs a functional or Sequential model")
    names = set(prunable_layers(model, pattern))
    if not names:
        raise EdgeccError(f"model '{model.name}' has no Dense or Conv2D kernel to sparsify with pattern {pattern}")
    options = ({"sparsity_m_by_n": (2, 4)} if pattern == "2:4"
               else {"pruning_schedule": schedule(target, epochs, steps_per_epoch)})
    copies = []

    def clone(layer: Any) -> Any:
        copy = type(layer).from_config(layer.get_config())
        copies.append((copy, layer))
        return tfmot.sparsity.keras.prune_low_magnitude(copy, **options) if layer.name in names else copy

    wrapped = keras.models.clone_model(model, clone_function=clone)
    for copy, layer in copies:
        copy.set_weights(layer.get_weights())
    return wrapped


def sparsify(model: Any, teacher: Any, x: np.ndarray, y: np.ndarray, target: float, pattern: str, epochs: int,
             batch_size: int, learning_rate: float, weights: DistillWeights, seed: int, reporter: Reporter,
             description: str = "distilling the sparse student", balance: str = "none",
             augment: Augment | None = None, mixup: float = 0.0) -> tuple[Any, list[float]]:
    """A sparse copy of `model`, distilled from `teacher`, and the mean loss of each epoch.

    `magnitude` zeroes the smallest `target` share of each pruned kernel, raised
    from 0 along `schedule`; `2:4` zeroes the 2 smallest of every 4 consecutive
    weights along the input axis (TFLite's layout), chosen at the first step.
    The result is a plain Keras model, its wrappers stripped, with the zeros in
    its kernels.

    distill() runs its own GradientTape loop, not `fit`, so this does the work of
    TF-MOT's UpdatePruningStep callback around it. Each wrapper's call in
    training mode adds 1 to its `pruning_step`, then updates its mask when the
    schedule says so, then multiplies the kernel by the mask. distill's
    tf.function runs these stateful ops in that order on every training step. The step starts at -1, and the wrapper asserts that it is at
    least 1 after the increment. So on_train_begin sets it to 0 before the first
    step, which makes the step count the distillation steps. After the last
    optimizer update, on_epoch_end masks the kernels once more: the update moved
    the masked weights too.
    """
    if epochs < 1:
        raise EdgeccError("sparsify needs at least one distillation epoch: TF-MOT sets its masks while training")
    steps_per_epoch = int(np.ceil(epoch_length(y, int(model.output_shape[-1]), balance) / batch_size))
    wrapped = wrap(model, target, pattern, epochs, steps_per_epoch)
    callback = tfmot.sparsity.keras.UpdatePruningStep()
    callback.set_model(wrapped)
    callback.on_train_begin()
    losses = distill(wrapped, teacher, x, y, epochs, batch_size, learning_rate, weights, seed, reporter, description,
                     balance=balance, augment=augment, mixup=mixup)
    callback.on_epoch_end(epochs - 1)
    return tfmot.sparsity.keras.strip_pruning(wrapped), losses


def kernel_sparsity(model: Any) -> dict[str, float]:
    """Share of exactly-zero weights in each Dense and Conv2D kernel of a Keras model, by layer name."""
    return {layer.name: float(np.mean(layer.kernel.numpy() == 0)) for layer in model.layers
            if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D))}
