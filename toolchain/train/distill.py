"""Knowledge distillation from the float teacher, the glue of every compression stage.

The student learns from three signals: the task labels, the teacher's logits
softened by a temperature (KL divergence, scaled by T² so its gradients keep
their size as T changes), and the teacher's hidden states after each block
(mean squared error), which guide a pruned or quantized student layer by layer.
The inputs are augmented and blended (mixup) as in the teacher's training, the teacher labelling the
same view the student sees: with few examples of a class, the student learns the
teacher's function around them rather than on them alone ("function matching").
Each class gets its share of training as in the teacher's (recipe.TrainSection.balance):
balanced sampling of each epoch, or class weights on the label and logit terms,
so a rare class is not learned away; the hidden-state term imitates the
teacher's features and stays unweighted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgecc.data import epoch_length, epoch_order, mixed
from edgecc.errors import EdgeccError
from edgecc.progress import Reporter
from edgecc.train import distribute
from edgecc.train.best_epoch import Best, Judge, first_judged
from edgecc.train.tf import keras as _keras, tensorflow

BLOCK_OUTPUT_SUFFIX = "_mlp_residual"  # the last layer of each edgecc encoder block
Augment = Callable[[np.ndarray, np.random.Generator], np.ndarray]  # one epoch's inputs -> their augmented views


@dataclass(frozen=True)
class DistillWeights:
    """The loss terms' weights, and each class's weight for the task and logit terms (empty: all 1)."""

    task: float = 1.0
    logits: float = 1.0
    hidden: float = 0.0
    temperature: float = 2.0
    classes: tuple[float, ...] = ()


def block_outputs(model: Any) -> list[str]:
    """Names of the layers that end each encoder block, in order."""
    return [layer.name for layer in model.layers if layer.name.endswith(BLOCK_OUTPUT_SUFFIX)]


def hidden_pairs(student: Any, teacher: Any) -> list[tuple[str, str]]:
    """Student block -> teacher block, spread evenly when the student has fewer blocks."""
    mine, theirs = block_outputs(student), block_outputs(teacher)
    if not mine or not theirs:
        return []
    step = len(theirs) / len(mine)
    pairs = [(name, theirs[min(len(theirs) - 1, int(round((i + 1) * step)) - 1)]) for i, name in enumerate(mine)]
    for s, t in pairs:
        if student.get_layer(s).output.shape[1:] != teacher.get_layer(t).output.shape[1:]:
            raise EdgeccError(f"hidden-state distillation needs equal widths: student {s} "
                              f"{student.get_layer(s).output.shape[1:]} vs teacher {t} {teacher.get_layer(t).output.shape[1:]}")
    return pairs


def _with_hidden(model: Any, names: list[str]) -> Any:
    keras = _keras()
    return keras.Model(model.inputs, [model.outputs[0], *(model.get_layer(n).output for n in names)])


def distill(student: Any, teacher: Any, x: np.ndarray, y: np.ndarray, epochs: int, batch_size: int,
            learning_rate: float, weights: DistillWeights, seed: int, reporter: Reporter,
            description: str = "distilling", hidden_blocks: int | None = None, balance: str = "none",
            augment: Augment | None = None, mixup: float = 0.0, judge: Judge | None = None) -> list[float]:
    """Train `student` in place against `teacher`; returns the mean loss of each epoch.

    With `judge` (the validation split), the student ends with the weights of its best epoch of the second half
    (best_epoch: the teacher's rule), not necessarily its last.

    `hidden_blocks` limits the hidden-state loss to the first blocks (progressive QAT); `balance` orders each
    epoch (data.epoch_order); `augment` gives each epoch's inputs (teacher.augmented), teacher and student
    seeing the same; `mixup` blends them (data.mixed), the label term's targets alike. Inside a tf.distribute
    scope (edgecc.train.distribute), where `student` and `teacher` were created, each batch of `batch_size` (the
    global batch) is split across the replicas and their gradients summed.
    """
    tf = tensorflow()
    keras = _keras()
    pairs = hidden_pairs(student, teacher)[:hidden_blocks] if weights.hidden else []
    student_view = _with_hidden(student, [s for s, _ in pairs])
    teacher_view = _with_hidden(teacher, [t for _, t in pairs])
    classes = int(student.output_shape[-1])
    batches = int(np.ceil(epoch_length(y, classes, balance) / batch_size))
    steps = max(1, epochs * batches)
    optimizer = keras.optimizers.AdamW(keras.optimizers.schedules.CosineDecay(learning_rate, steps), weight_decay=0.01)
    temperature = weights.temperature
    class_weights = tf.constant(weights.classes or (1.0,) * classes, dtype=tf.float32)
    strategy = distribute.active()  # the caller's tf.distribute scope, if any ([train] distribute)

    def train_step(batch_x: Any, batch_targets: Any, mean: Callable[[Any], Any]) -> Any:
        """One optimizer step; `mean` averages a per-example (or per-element) loss over the whole batch."""
        teacher_out = tf.nest.flatten(teacher_view(batch_x, training=False))  # a lone output comes unwrapped
        with tf.GradientTape() as tape:
            student_out = tf.nest.flatten(student_view(batch_x, training=True))
            logits, teacher_logits = student_out[0], teacher_out[0]
            example_weights = tf.linalg.matvec(batch_targets, class_weights)  # a blend's: its classes' blend
            task = mean(example_weights * keras.losses.categorical_crossentropy(
                batch_targets, logits, from_logits=True))
            soft_teacher = tf.nn.softmax(teacher_logits / temperature)
            log_student = tf.nn.log_softmax(logits / temperature)
            kl = mean(example_weights * tf.reduce_sum(
                soft_teacher * (tf.math.log(soft_teacher + 1e-9) - log_student), axis=-1)) * temperature**2
            hidden = tf.add_n([mean(tf.square(s - t)) for s, t in zip(student_out[1:], teacher_out[1:])]) \
                if pairs else 0.0
            loss = weights.task * task + weights.logits * kl + weights.hidden * hidden
        variables = student.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    @tf.function
    def step(batch_x: Any, batch_targets: Any) -> Any:
        return train_step(batch_x, batch_targets, tf.reduce_mean)

    @tf.function
    def replicated_step(batch_x: Any, batch_targets: Any, total: Any) -> Any:
        """Each replica's share of the global batch's mean loss (its sum over `total` examples), summed across
        replicas, as the optimizer sums their gradients: the same step as on one machine."""
        def mean(value: Any) -> Any:
            per_example = tf.cast(tf.reduce_prod(tf.shape(value)[1:]), tf.float32)
            return tf.reduce_sum(value) / (total * per_example)

        losses = strategy.run(train_step, args=(batch_x, batch_targets, mean))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

    rng = np.random.default_rng(seed)
    targets = np.eye(classes, dtype=np.float32)[y]
    history = []
    best = Best()
    with reporter.task(description, epochs, unit="epoch") as advance:
        for epoch in range(1, epochs + 1):
            order = epoch_order(y, classes, balance, rng)
            epoch_x = x[order] if augment is None else augment(x[order], rng)
            epoch_x, epoch_targets = mixed(mixup, rng, epoch_x, targets[order])
            losses = []
            for b in range(batches):
                part = slice(b * batch_size, (b + 1) * batch_size)
                if strategy is None:
                    losses.append(float(step(tf.constant(epoch_x[part]), tf.constant(epoch_targets[part]))))
                else:
                    shares = distribute.replica_batches(strategy, epoch_x[part], epoch_targets[part])
                    losses.append(float(replicated_step(*shares, tf.constant(len(epoch_x[part]), tf.float32))))
                if b + 1 < batches:  # the epoch's own advance follows the last batch
                    advance(0, f"batch {b + 1}/{batches} loss {np.mean(losses):.4f}", partial=(b + 1) / batches)
            history.append(float(np.mean(losses)))
            status = f"loss {history[-1]:.4f}"
            if judge is not None and epoch >= first_judged(epochs):
                figure, loss = judge(student)
                best.offer(epoch, figure, loss, student)
                status += f" validation {judge.task.metric} {figure:.3f} (best {best.figure:.3f} at epoch {best.epoch})"
            advance(status=status)
    if best.weights is not None and best.epoch < epochs:
        student.set_weights(best.weights)
        reporter.info(f"{description}: keeping epoch {best.epoch}'s weights (validation {judge.task.metric} "
                      f"{best.figure:.3f}; the last epoch's was lower, or equal with a higher loss)")
    return history
