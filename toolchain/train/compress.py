"""The recipe's compression stages, in order, each fine-tuned by distillation from the float teacher.

- `prune`: remove the least important encoder blocks, attention heads and feed-forward neurons
  (a physically smaller dense model), and for text the embedding rows of the
  rarest tokens; optionally freeze the norms (they then fold away); then distil.
- `sparsify`: TF-MOT magnitude pruning of the Dense and Conv2D kernels to a
  target share of zeros, or to 2:4 sparsity, then distil. The matrices keep
  their size: the zeros shrink the compressed file and suit sparse kernels.
- `qat`: quantization-aware training of the current student, distilled (with
  `progressive`, block by block from the input side first); the int8 model
  comes from the QAT graph. After `sparsify` it keeps the zeros.
- `ptq`: post-training quantization of the current student (the fast baseline).

Every stage ends with an int8 TFLite model, so each can be measured the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgecc.train.convert import to_int8_tflite
from edgecc.data import Dataset, class_weights
from edgecc.train.distill import Augment, DistillWeights, distill
from edgecc.progress import Reporter
from edgecc.recipe import CompressSection, TrainSection
from edgecc.train.teacher import augmented, inference_graph


@dataclass(frozen=True)
class Stage:
    """One stage's result: the float (or QAT) student and its int8 TFLite model."""

    name: str
    student: Any
    int8: bytes
    parameters: int
    distill_losses: tuple[float, ...]


def _weights(section: CompressSection, classes: tuple[float, ...], hidden: bool) -> DistillWeights:
    return DistillWeights(task=section.task_weight, logits=section.logits_weight,
                          hidden=section.hidden_weight if hidden else 0.0, temperature=section.temperature,
                          classes=classes)


def run_stages(teacher: Any, dataset: Dataset, section: CompressSection, train: TrainSection, seed: int,
               calibration: np.ndarray, reporter: Reporter,
               after_stage: Callable[[str, Any], None] | None = None) -> list[Stage]:
    """Apply `section.stages` to a copy of `teacher`; the last stage's int8 model is the build's result.

    Every distillation balances the classes by `train.balance` and augments its inputs by the train section,
    as the teacher's training does. `after_stage(name, student)` sees each stage's student before its int8
    conversion and may raise to stop there (edgecc tune stops a hopeless trial after its first stage).
    """
    x, y = dataset.x[dataset.train_index], dataset.y[dataset.train_index]
    classes = tuple(class_weights(y, dataset.num_classes, train.balance).tolist())
    feed = {"balance": train.balance, "augment": _augment(train, dataset)}  # each epoch as the teacher's
    student = teacher
    stages = []
    for name in section.stages:
        losses: list[float] = []
        if name == "prune":
            from edgecc.train.prune import prune_to, trim_vocabulary

            reference = teacher.predict(calibration, verbose=0)
            student = prune_to(student, section.head_fraction, section.neuron_fraction, calibration, reference,
                               section.block_fraction, section.first_blocks)
            if section.vocabulary_fraction < 1.0:
                student = trim_vocabulary(student, x, section.vocabulary_fraction, dataset.preprocessing.unknown_id)
            if section.freeze_norms:
                from edgecc.train.fold import freeze_norms

                student = freeze_norms(student, x)
            losses = distill(student, teacher, x, y, section.distill_epochs, train.batch_size,
                             section.distill_learning_rate, _weights(section, classes, hidden=True), seed, reporter,
                             "distilling the pruned student", **feed)
        elif name == "sparsify":
            from edgecc.train.sparsity import sparsify

            student, losses = sparsify(student, teacher, x, y, section.sparsity, section.sparsity_pattern,
                                       section.distill_epochs, train.batch_size, section.distill_learning_rate,
                                       _weights(section, classes, hidden=True), seed, reporter, **feed)
        elif name == "qat":
            from edgecc.train.fold import fold_norms
            from edgecc.train.qat import qat_model

            sparse = any(stage.name == "sparsify" for stage in stages)
            student = fold_norms(student)
            if section.progressive:
                losses = _progressive(student, teacher, x, y, section, train, seed, calibration, sparse, reporter, feed)
            student = qat_model(student, calibration, preserve_sparsity=sparse)
            losses += distill(student, teacher, x, y, section.qat_epochs or section.distill_epochs, train.batch_size,
                              section.qat_learning_rate or section.distill_learning_rate,
                              _weights(section, classes, hidden=False), seed, reporter,
                              "quantization-aware distillation", **feed)
        if after_stage is not None:
            after_stage(name, student)
        # a `ptq` stage after prune or sparsify quantizes the student that stage already quantized the same way
        int8 = stages[-1].int8 if name == "ptq" and stages else _int8(student, name, calibration, section.per_channel)
        stages.append(Stage(name, student, int8, int(student.count_params()), tuple(losses)))
    return stages


def _augment(train: TrainSection, dataset: Dataset) -> Augment:
    return lambda x, rng: augmented(x, train, dataset, rng)


def _progressive(student: Any, teacher: Any, x: np.ndarray, y: np.ndarray, section: CompressSection,
                 train: TrainSection, seed: int, calibration: np.ndarray, sparse: bool, reporter: Reporter,
                 feed: dict[str, Any]) -> list[float]:
    """Quantize the blocks one after another from the input side, each retrained against the teacher's hidden states.

    Phase k quantizes everything up to the end of block k and distils only the
    hidden states of blocks 0..k (no label or logit loss), for half the
    distillation epochs; its float weights then carry into the next phase. The
    caller ends with QAT of the whole model.
    """
    from edgecc.train.distill import block_outputs
    from edgecc.train.qat import float_weights_from, qat_model

    names = [layer.name for layer in student.layers]
    losses: list[float] = []
    hidden_only = DistillWeights(task=0.0, logits=0.0, hidden=1.0, temperature=section.temperature)
    for k, end in enumerate(block_outputs(student)):
        partial = qat_model(student, calibration, preserve_sparsity=sparse, only=set(names[: names.index(end) + 1]))
        losses += distill(partial, teacher, x, y, max(1, (section.qat_epochs or section.distill_epochs) // 2),
                          train.batch_size, section.qat_learning_rate or section.distill_learning_rate, hidden_only,
                          seed, reporter,
                          f"progressive QAT: blocks 0..{k}", hidden_blocks=k + 1, **feed)
        float_weights_from(partial, student)
    return losses


def _int8(student: Any, stage: str, calibration: np.ndarray, per_channel: bool) -> bytes:
    """The int8 TFLite model of a stage: from the QAT graph after `qat`, by post-training quantization otherwise."""
    if stage == "qat":
        from edgecc.train.qat import to_int8_tflite_from_qat

        return to_int8_tflite_from_qat(student, calibration)
    return to_int8_tflite(inference_graph(student), calibration, per_channel)
