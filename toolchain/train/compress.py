"""The recipe's compression stages, in order, each fine-tuned by distillation from the float teacher.

- `prune`: remove the least important encoder blocks, attention heads and feed-forward neurons
  (a physically smaller dense model), and for text the embedding rows of the
  rarest tokens; optionally freeze the norms (they then fold away); then distil.
- `mix`: replace each self-attention's softmax(q·kᵀ)·v by a constant token-mixing matrix times v (initialised
  from the model's mean attention, edgecc.train.mixing), or by sigmoid attention (compress.mixing 'sigmoid'),
  then distil: every matrix product then multiplies by constant weights, so the whole encoder maps to the Edge
  TPU (less the `keep_attention` attentions left as they are, those whose mixing changes the outputs most).
- `sparsify`: TF-MOT magnitude pruning of the Dense and Conv2D kernels to a
  target share of zeros, or to 2:4 sparsity, then distil. The matrices keep
  their size: the zeros shrink the compressed file and suit sparse kernels.
- `qat`: quantization-aware training of the current student, distilled (with
  `progressive`, block by block from the input side first); the int8 model
  comes from the QAT graph. After `sparsify` it keeps the zeros.
- `ptq`: post-training quantization of the current student (the fast baseline).

Every stage ends with an int8 TFLite model, so each can be measured the same way.

Each stage is a pass with one signature, `(student, context) -> (student, distillation losses)`, and
`run_stages` runs the recipe's passes in order (as Vela's graph optimiser runs its list of passes). A new
stage is a function of that signature, an entry in `PASSES` and its name in `edgecc.recipe.STAGES` (which
tests/test_compress.py keeps equal to `PASSES`). For example, a stage that distils the current student
for twice the usual epochs, under the name "polish":

    def _polish(student: Any, c: StageContext) -> tuple[Any, list[float]]:
        # more distillation of the current student, for twice compress.distill_epochs
        return student, c.distil(student, 2 * c.section.distill_epochs, "polishing the student", hidden=True)

    PASSES["polish"] = _polish  # and "polish" added to recipe.STAGES

Its int8 model then comes by post-training quantization (`_int8`), as every stage's but `qat`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from edgecc.train.convert import to_int8_tflite
from edgecc.data import Dataset, class_weights
from edgecc.train.best_epoch import Judge
from edgecc.train.distill import Augment, DistillWeights, distill
from edgecc.train.gelu import sigmoid_gelu
from edgecc.train.layers import keras
from edgecc.progress import Reporter
from edgecc.recipe import CompressSection, TrainSection
from edgecc.train.teacher import augmented, inference_graph


@dataclass(frozen=True)
class Stage:
    """One stage's result: the float (or QAT) student and its int8 TFLite model.

    `student_validation` is the student's task.metric on the validation split before its int8 conversion (None
    without a validation split): set beside its int8 model's figure, it tells what the stage's training lost from
    what the conversion lost.
    """

    name: str
    student: Any
    int8: bytes
    parameters: int
    distill_losses: tuple[float, ...]
    student_validation: float | None = None


def _weights(section: CompressSection, classes: tuple[float, ...], hidden: bool) -> DistillWeights:
    return DistillWeights(task=section.task_weight, logits=section.logits_weight,
                          hidden=section.hidden_weight if hidden else 0.0, temperature=section.temperature,
                          classes=classes)


@dataclass(frozen=True, kw_only=True)
class StageContext:
    """What every stage pass reads: the teacher, the examples the students train on, the recipe's sections."""

    teacher: Any
    x: np.ndarray  # the training examples (the training split less the validation split, in a build)
    y: np.ndarray
    dataset: Dataset
    section: CompressSection
    train: TrainSection
    seed: int
    calibration: np.ndarray
    reporter: Reporter
    earlier: tuple[str, ...]  # the stages already run, in order
    judge: Judge | None = None  # the validation split: each distillation keeps its best epoch there

    def distil(self, student: Any, epochs: int, description: str, *, hidden: bool,
               learning_rate: float | None = None) -> list[float]:
        """Distil `student` from the teacher, each epoch balanced by train.balance and augmented as the teacher's."""
        return distill(student, self.teacher, self.x, self.y, epochs, self.train.batch_size,
                       learning_rate or self.section.distill_learning_rate, self.weights(hidden=hidden), self.seed,
                       self.reporter, description, judge=self.judge, **self.feed())

    def weights(self, *, hidden: bool) -> DistillWeights:
        """The recipe's loss weights, each class weighted by train.balance; `hidden`: with the hidden-state loss."""
        classes = tuple(class_weights(self.y, self.dataset.num_classes, self.train.balance).tolist())
        return _weights(self.section, classes, hidden)

    def feed(self) -> dict[str, Any]:
        """distill's balance, augmentation and mixup arguments: each epoch as the teacher's."""
        return {"balance": self.train.balance, "augment": _augment(self.train, self.dataset),
                "mixup": self.train.mixup}


StagePass = Callable[[Any, StageContext], tuple[Any, list[float]]]


def _prune(student: Any, c: StageContext) -> tuple[Any, list[float]]:
    from edgecc.train.prune import prune_to, trim_vocabulary

    s = c.section
    reference = c.teacher.predict(c.calibration, verbose=0)
    student = prune_to(student, s.head_fraction, s.neuron_fraction, c.calibration, reference, s.block_fraction,
                       s.first_blocks, reporter=c.reporter)
    if s.vocabulary_fraction < 1.0:
        student = trim_vocabulary(student, c.x, s.vocabulary_fraction, c.dataset.preprocessing.unknown_id)
    if s.freeze_norms:
        from edgecc.train.fold import freeze_norms

        student = freeze_norms(student, c.x)
    return student, c.distil(student, s.distill_epochs, "distilling the pruned student", hidden=True)


def _mix(student: Any, c: StageContext) -> tuple[Any, list[float]]:
    from edgecc.train.mixing import constant_mixing

    student = constant_mixing(student, c.calibration, c.section.mixing, keep=c.section.keep_attention,
                              reporter=c.reporter)
    what = "sigmoid-attention" if c.section.mixing == "sigmoid" else "constant-mixing"
    return student, c.distil(student, c.section.distill_epochs, f"distilling the {what} student", hidden=True)


def _sparsify(student: Any, c: StageContext) -> tuple[Any, list[float]]:
    from edgecc.train.sparsity import sparsify

    s = c.section
    student, losses = sparsify(student, c.teacher, c.x, c.y, s.sparsity, s.sparsity_pattern, s.distill_epochs,
                               c.train.batch_size, s.distill_learning_rate, c.weights(hidden=True), c.seed,
                               c.reporter, **c.feed())
    return student, list(losses)


def _qat(student: Any, c: StageContext) -> tuple[Any, list[float]]:
    from edgecc.train.fold import fold_norms
    from edgecc.train.qat import qat_model

    s = c.section
    sparse = "sparsify" in c.earlier  # QAT keeps the zeros of an earlier sparsify
    student = fold_norms(student)
    losses = _progressive(student, c, sparse) if s.progressive else []
    student = qat_model(student, c.calibration, preserve_sparsity=sparse, per_channel=s.per_channel)
    losses += c.distil(student, s.qat_epochs or s.distill_epochs, "quantization-aware distillation", hidden=False,
                       learning_rate=s.qat_learning_rate or s.distill_learning_rate)
    return student, losses


def _ptq(student: Any, c: StageContext) -> tuple[Any, list[float]]:
    """No training: the student is quantized as it is (_int8)."""
    return student, []


PASSES: dict[str, StagePass] = {"prune": _prune, "mix": _mix, "sparsify": _sparsify, "qat": _qat, "ptq": _ptq}


@dataclass(frozen=True)
class Resume:
    """What an interrupted run of the stages finished: its stages (a Stage or cache.CachedStage each) and the float
    student after the last of them, from which the next stage continues."""

    stages: tuple[Any, ...]
    student: Any


def run_stages(teacher: Any, dataset: Dataset, section: CompressSection, train: TrainSection, seed: int,
               calibration: np.ndarray, reporter: Reporter,
               after_stage: Callable[[str, Any], None] | None = None, *, resume: Resume | None = None,
               finished: Callable[[list[Any], Any], None] | None = None, judge: Judge | None = None) -> list[Any]:
    """Apply `section.stages` (PASSES, in order) to a copy of `teacher`; the last stage's int8 model is the build's.

    `after_stage(name, student)` sees each stage's student before its int8 conversion and may raise to stop
    there (edgecc tune stops a hopeless trial after its first stage). `finished(stages, student)` gets the stages
    so far and the student after each stage that another follows (the build keeps them as a checkpoint), and
    `resume` continues from such a checkpoint. Each stage starts from its own seed (`seed` + its position), so a
    resumed run trains what an uninterrupted one does. `judge` (the validation split) makes every distillation keep
    its best epoch of the second half (edgecc.train.best_epoch).
    """
    context = StageContext(teacher=teacher, x=dataset.x[dataset.train_index], y=dataset.y[dataset.train_index],
                           dataset=dataset, section=section, train=train, seed=seed, calibration=calibration,
                           reporter=reporter, earlier=(), judge=judge)
    if resume is None:
        stages: list[Any] = []
        student = sigmoid_gelu(teacher) if section.gelu == "sigmoid" else teacher
    else:
        stages, student = list(resume.stages), resume.student
    for name in section.stages[len(stages):]:
        keras.utils.set_random_seed(seed + len(stages))
        context = replace(context, earlier=tuple(stage.name for stage in stages))  # the examples are taken once
        student, losses = PASSES[name](student, context)
        if after_stage is not None:
            after_stage(name, student)
        # a `ptq` stage after prune or sparsify quantizes the student that stage already quantized the same way
        int8 = stages[-1].int8 if name == "ptq" and stages else _int8(student, name, calibration, section.per_channel)
        figure = judged(student, judge, f"{name}: the student before its int8 conversion", reporter)
        stages.append(Stage(name, student, int8, int(student.count_params()), tuple(losses), figure))
        if finished is not None and len(stages) < len(section.stages):
            finished(stages, student)
    return stages


def judged(student: Any, judge: Judge | None, what: str, reporter: Reporter) -> float | None:
    """`student`'s task.metric on the validation split (None without one), said as `what` has it."""
    if judge is None:
        return None
    figure = judge(student)[0]
    reporter.info(f"{what}: validation {judge.task.metric} {figure:.4f}")
    return figure


def _augment(train: TrainSection, dataset: Dataset) -> Augment:
    return lambda x, rng: augmented(x, train, dataset, rng)


def _progressive(student: Any, c: StageContext, sparse: bool) -> list[float]:
    """Quantize the blocks one after another from the input side, each retrained against the teacher's hidden states.

    Phase k quantizes everything up to the end of block k and distils only the
    hidden states of blocks 0..k (no label or logit loss), for half the
    distillation epochs; its float weights then carry into the next phase. The
    caller ends with QAT of the whole model.
    """
    from edgecc.train.distill import block_outputs
    from edgecc.train.qat import float_weights_from, qat_model

    s = c.section
    names = [layer.name for layer in student.layers]
    losses: list[float] = []
    hidden_only = DistillWeights(task=0.0, logits=0.0, hidden=1.0, temperature=s.temperature)
    for k, end in enumerate(block_outputs(student)):
        partial = qat_model(student, c.calibration, preserve_sparsity=sparse, only=set(names[: names.index(end) + 1]),
                            per_channel=s.per_channel)
        losses += distill(partial, c.teacher, c.x, c.y, max(1, (s.qat_epochs or s.distill_epochs) // 2),
                          c.train.batch_size, s.qat_learning_rate or s.distill_learning_rate, hidden_only,
                          c.seed, c.reporter, f"progressive QAT: blocks 0..{k}", hidden_blocks=k + 1, **c.feed())
        float_weights_from(partial, student)
    return losses


def _int8(student: Any, stage: str, calibration: np.ndarray, per_channel: bool) -> bytes:
    """The int8 TFLite model of a stage: from the QAT graph after `qat`, by post-training quantization otherwise."""
    if stage == "qat":
        from edgecc.train.qat import to_int8_tflite_from_qat

        return to_int8_tflite_from_qat(student, calibration)
    return to_int8_tflite(inference_graph(student), calibration, per_channel)
