"""The float teacher: a reference transformer trained from scratch, pretrained all-MiniLM-L6-v2 fine-tuned with
a classification head, or the user's own model.

The teacher is trained with a free batch size and then cloned into the static
batch-1 graph that conversion needs (a `None` batch turns into SHAPE/FILL ops
that TFLite Micro cannot allocate).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecc.data import Dataset, class_weights, epoch_length, epoch_order, mixed, validation_split
from edgecc.errors import EdgeccError
from edgecc.progress import Reporter
from edgecc.recipe import ModelSection, TaskSection, TrainSection
from edgecc.train.best_epoch import Best, Judge, first_judged, outputs_logits
from edgecc.train.tf import keras as _keras, tensorflow

SPECIAL_TOKENS = frozenset({"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"})  # never dropped to [UNK]


def reference_model(section: ModelSection, dataset: Dataset) -> Any:
    """The recipe's reference architecture, sized for the dataset."""
    from edgecc.train.transformer import VitConfig, text_transformer, vision_transformer

    if section.architecture == "minilm":
        return minilm_classifier(section, dataset)
    config = VitConfig(
        stem_filters=section.stem_filters,
        stem_strides=section.stem_strides,
        stem_kernel=(section.stem_kernel[0], section.stem_kernel[1]),
        dim=section.dim,
        depth=section.depth,
        heads=section.heads,
        mlp_dim=section.mlp_dim,
        dropout=section.dropout,
    )
    shape = dataset.preprocessing.input_shape
    if section.architecture == "text":
        if len(shape) != 1 or not dataset.preprocessing.vocabulary:
            raise EdgeccError("model.architecture 'text' needs token ids: set data.source = 'text'")
        return text_transformer(config, shape[0], len(dataset.preprocessing.vocabulary), dataset.num_classes)
    if len(shape) != 3:
        raise EdgeccError(f"model.architecture 'vit' needs images or signals (H, W, C), the data gives {shape}")
    return vision_transformer(config, shape, dataset.num_classes)


def minilm_classifier(section: ModelSection, dataset: Dataset) -> Any:
    """Pretrained all-MiniLM-L6-v2 with a Dense `logits` head on its mean-pooled embedding (`pool`).

    The head reads the embedding before L2 normalisation, so `normalize` is not part of the classifier.
    The data must be the package's WordPiece ids (data.tokenizer = 'minilm') at the model's sequence length.
    """
    from edgecc.train import minilm

    keras = _keras()
    pre = dataset.preprocessing
    length = pre.sequence_length
    if (len(pre.input_shape) != 1 or length is None or pre.vocabulary is None
            or len(pre.vocabulary) != minilm.VOCABULARY or pre.tokenizer != minilm.tokenizer_description(length)):
        raise EdgeccError("model.architecture 'minilm' needs all-MiniLM-L6-v2's own token ids: set "
                          "data.source = 'text' and data.tokenizer = 'minilm'")
    encoder = minilm.load_weights(minilm.minilm_model(length))
    x = encoder.get_layer("pool").output
    if section.dropout:
        x = keras.layers.Dropout(section.dropout, name="head_dropout")(x)
    logits = keras.layers.Dense(dataset.num_classes, name="logits")(x)
    return keras.Model(encoder.input, logits, name="minilm_classifier")


def load_safely(path: Path) -> Any:
    """A `.keras` file or SavedModel directory loaded in safe mode, edgecc's layers known; EdgeccError naming it if not.

    HDF5 files are refused: Keras restores their Lambda layers from Python
    bytecode. For SavedModel directories Keras ignores `safe_mode`, so the safe
    mode scope is set explicitly; either way no code from the file runs.
    """
    keras = _keras()
    import edgecc.train.layers  # noqa: F401  (registers edgecc's layers for deserialisation)
    from tf_keras.src.saving.serialization_lib import SafeModeScope

    if not path.exists():
        raise EdgeccError(f"model file {path} does not exist")
    if not (path.suffix == ".keras" or (path / "saved_model.pb").exists()):
        raise EdgeccError(f"{path}: edgecc loads tf_keras .keras files and SavedModel directories only "
                          "(HDF5 and other formats can carry code and are refused)")
    try:
        with SafeModeScope(True):
            return keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as err:  # Keras raises many types for a file it cannot read
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise EdgeccError(f"{path} is not a Keras model edgecc can load: {reason}") from None


def load_user_model(path: Path, dataset: Dataset) -> Any:
    """A user's `.keras` file or SavedModel directory, loaded in safe mode, validated against the data and
    rewritten into edgecc's layers."""
    from edgecc.train.rewrite import rewrite_model

    model = load_safely(path)
    expected = dataset.preprocessing.input_shape
    if tuple(model.input_shape[1:]) != tuple(expected):
        raise EdgeccError(f"{path}: model input shape {model.input_shape[1:]} does not match the data's {expected}")
    if model.output_shape[-1] != dataset.num_classes:
        raise EdgeccError(f"{path}: model has {model.output_shape[-1]} outputs, the data has {dataset.num_classes} classes")
    return rewrite_model(model)


def _shifted(images: np.ndarray, shift: int, rng: np.random.Generator) -> np.ndarray:
    """Each image translated by up to `shift` pixels, the uncovered border filled with zeros."""
    if shift == 0:
        return images
    n, height, width = images.shape[:3]
    padded = np.pad(images, ((0, 0), (shift, shift), (shift, shift), (0, 0)))
    dy, dx = rng.integers(0, 2 * shift + 1, size=(2, n))
    return np.stack([padded[i, dy[i] : dy[i] + height, dx[i] : dx[i] + width] for i in range(n)])


def augmented(x: np.ndarray, section: TrainSection, dataset: Dataset, rng: np.random.Generator) -> np.ndarray:
    """One epoch's training inputs: images shifted, flipped, brightened and contrasted, or words dropped to [UNK].

    Token dropout leaves the special tokens ([PAD], [CLS], [SEP], ...) in place: only words and word pieces
    become [UNK].

    Brightness and contrast jitter make the model rely on texture rather than
    on the lighting of the session that recorded the training images.
    """
    pre = dataset.preprocessing
    if pre.unknown_id is not None:
        if not section.token_dropout:
            return x
        special = [i for i, token in enumerate(pre.vocabulary or ()) if token in SPECIAL_TOKENS]
        dropped = (rng.random(x.shape) < section.token_dropout) & ~np.isin(x, [pre.padding_id, *special])
        return np.where(dropped, pre.unknown_id, x).astype(x.dtype)
    if x.ndim != 4 or x.shape[1] == 1:  # signals: their windows already overlap
        return x
    x = _shifted(x, section.augment_shift, rng)
    n = len(x)
    if section.augment_flip:
        flips = rng.integers(0, 2, size=(2, n)).astype(bool)
        x = np.where(flips[0, :, None, None, None], x[:, ::-1], x)
        x = np.where(flips[1, :, None, None, None], x[:, :, ::-1], x)
    if section.augment_contrast:
        factor = rng.uniform(1 - section.augment_contrast, 1 + section.augment_contrast, size=(n, 1, 1, 1))
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        x = mean + (x - mean) * factor
    if section.augment_brightness:
        x = x + rng.uniform(-section.augment_brightness, section.augment_brightness, size=(n, 1, 1, 1))
    return x.astype(np.float32)


@dataclass
class _Run:
    """Where the teacher's training stands after `epoch` finished epochs: what a checkpoint holds."""

    rng: np.random.Generator
    epoch: int = 0
    best: Best = field(default_factory=Best)

    def stopped(self, patience: int) -> bool:
        return bool(patience) and self.best.weights is not None and self.epoch - self.best.epoch >= patience


CHECKPOINT_FILE = "teacher.npz"


def _save(checkpoint: Path, model: Any, run: _Run) -> None:
    """Weights, optimizer state, best weights and where the run stands, in one file replaced atomically."""
    arrays = {f"w{i}": w for i, w in enumerate(model.get_weights())}
    arrays |= {f"o{i}": v.numpy() for i, v in enumerate(model.optimizer.variables)}
    arrays |= {f"b{i}": w for i, w in enumerate(run.best.weights or [])}
    meta = {"epoch": run.epoch, "best": run.best.figure, "best_loss": run.best.loss, "best_epoch": run.best.epoch,
            "rng": run.rng.bit_generator.state}
    checkpoint.mkdir(parents=True, exist_ok=True)
    temporary = checkpoint / (CHECKPOINT_FILE + ".tmp")
    with temporary.open("wb") as file:
        np.savez(file, meta=np.array(json.dumps(meta)), **arrays)
    os.replace(temporary, checkpoint / CHECKPOINT_FILE)


def _resume(checkpoint: Path, model: Any, run: _Run) -> None:
    """Load what _save wrote into `model`, its optimizer and `run`."""
    path = checkpoint / CHECKPOINT_FILE
    with np.load(path, allow_pickle=False) as saved:
        meta = json.loads(str(saved["meta"]))
        group = {prefix: [saved[f"{prefix}{i}"] for i in range(sum(k.startswith(prefix) for k in saved.files))]
                 for prefix in "wob"}
    model.optimizer.build(model.trainable_variables)
    variables = model.optimizer.variables
    try:
        if len(variables) != len(group["o"]):
            raise ValueError(f"{len(group['o'])} optimizer variables where the model has {len(variables)}")
        model.set_weights(group["w"])
        for variable, value in zip(variables, group["o"]):
            variable.assign(value)
    except ValueError as err:
        raise EdgeccError(f"{path} is the checkpoint of another model ({str(err).splitlines()[0]}); "
                          "delete it to train the teacher from the start") from None
    run.rng.bit_generator.state = meta["rng"]
    run.epoch = meta["epoch"]
    run.best = Best(meta["best"], meta["best_loss"], meta["best_epoch"], group["b"] or None)


def _heartbeat(advance: Callable[..., None], batches: int) -> Any:
    """A Keras callback that reports each finished batch of an epoch, so a log shows a long epoch advancing."""
    keras = _keras()

    def batch_end(batch: int, logs: dict[str, float]) -> None:
        if batch + 1 < batches:  # the epoch's own advance follows the last batch
            advance(0, f"batch {batch + 1}/{batches} loss {logs['loss']:.3f}", partial=(batch + 1) / batches)

    return keras.callbacks.LambdaCallback(on_train_batch_end=batch_end)


def train(model: Any, dataset: Dataset, section: TrainSection, seed: int, reporter: Reporter, *,
          task: TaskSection, checkpoint: Path | None = None) -> Any:
    """Fit the teacher on the training split: AdamW, cosine decay, label smoothing, augmentation, mixup, class balance.

    With `section.validation_fraction`, that share of the training split (data.validation_split) is held
    out and judged by `task.metric` after each epoch of the second half of the schedule (best_epoch.first_judged);
    training stops after `section.patience` epochs without a better figure (an equal figure is better only
    with a lower validation loss, best_epoch.class_mean_loss),
    and the first best epoch's weights are returned. The cosine decay spans `section.epochs` whether or
    not it stops early. Progress: a line per epoch with
    the validation figure, and a heartbeat after every batch.

    With `checkpoint` (a folder), every finished epoch is saved there, and a later call with the same
    folder resumes after the last saved epoch. A resumed run restores the weights, the optimizer (and so
    the learning-rate schedule), the augmentation and shuffling generator and the best epoch: without
    dropout it ends with the same weights as an uninterrupted run (tests/test_imbalance.py). TensorFlow's
    dropout generator is not restored, so with dropout the bytes differ, trained as long.

    Inside a tf.distribute scope (edgecc.train.distribute, `[train] distribute`), where `model` was created, the
    optimizer and compile belong to that strategy and `fit` splits each global batch of `section.batch_size`
    across the replicas.
    """
    keras = _keras()
    if section.epochs == 0:
        return model
    fit_index, validation_index = validation_split(dataset, section.validation_fraction, seed,
                                                    min_per_class=section.validation_min_per_class)
    judge = Judge.on(dataset, validation_index, task, section.batch_size)
    x, y = dataset.x[fit_index], dataset.y[fit_index]
    targets = np.eye(dataset.num_classes, dtype=np.float32)[y]
    weights = class_weights(y, dataset.num_classes, section.balance)[y]
    batches = int(np.ceil(epoch_length(y, dataset.num_classes, section.balance) / section.batch_size))
    if section.mixup:
        reporter.info(f"mixup alpha {section.mixup:g}: every training example is blended with another of its epoch")
    schedule = keras.optimizers.schedules.CosineDecay(section.learning_rate, section.epochs * batches)
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=section.weight_decay),
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=outputs_logits(model), label_smoothing=section.label_smoothing
        ),
        metrics=["accuracy"],
    )
    run = _Run(np.random.default_rng(seed))
    description = "training float teacher"
    if checkpoint is not None and (checkpoint / CHECKPOINT_FILE).exists():
        _resume(checkpoint, model, run)
        reporter.info(f"resuming the teacher from epoch {run.epoch}")
        description += f" from epoch {run.epoch}"
    with reporter.task(description, section.epochs - run.epoch, unit="epoch") as advance:
        while run.epoch < section.epochs and not run.stopped(section.patience):
            order = epoch_order(y, dataset.num_classes, section.balance, run.rng)
            inputs, epoch_targets, epoch_weights = mixed(
                section.mixup, run.rng, augmented(x[order], section, dataset, run.rng), targets[order], weights[order])
            history = model.fit(
                inputs, epoch_targets, sample_weight=epoch_weights, batch_size=section.batch_size, epochs=1,
                shuffle=False, verbose=0, callbacks=[_heartbeat(advance, batches)],
            ).history
            run.epoch += 1
            status = f"loss {history['loss'][-1]:.3f} acc {history['accuracy'][-1]:.3f}"
            if judge is not None:
                figure, loss = judge(model)
                if run.epoch >= first_judged(section.epochs):
                    run.best.offer(run.epoch, figure, loss, model)
                status += f" validation {task.metric} {figure:.3f}"
                if run.best.weights is not None:
                    status += f" (best {run.best.figure:.3f} at epoch {run.best.epoch})"
            if checkpoint is not None:
                _save(checkpoint, model, run)
            advance(1, status)
    if run.stopped(section.patience):
        reporter.info(f"the teacher stopped after epoch {run.epoch}: no better validation {task.metric} in "
                      f"{section.patience} epochs; keeping epoch {run.best.epoch}'s weights ({run.best.figure:.3f})")
    if run.best.weights is not None:
        model.set_weights(run.best.weights)
    return model


def inference_graph(model: Any) -> Any:
    """The same function with a static batch of 1 and the trained weights, norms folded into their readers."""
    from edgecc.train.fold import fold_norms

    keras = _keras()
    batch_one = keras.Input(batch_shape=(1, *model.input_shape[1:]), dtype=model.inputs[0].dtype,
                            name=model.inputs[0].name.split(":")[0])
    clone = keras.models.clone_model(model, input_tensors=batch_one)
    clone.set_weights(model.get_weights())
    return fold_norms(clone)


def make_reproducible(seed: int) -> None:
    """Start a build from the same state every time, so the same recipe, seed and versions give the same bytes.

    Clearing the Keras session restarts Keras' global counters (automatic layer names such as `dense_3`,
    which would reach the TFLite tensor names), so an earlier build in the same process
    (scripts/bench_compression.py builds three recipes in one) cannot leak into this one. Python, NumPy
    and TensorFlow are seeded. TensorFlow's CPU kernels are deterministic already; enable_op_determinism is left off,
    since it only matters on GPUs and makes every tf.data pipeline of `fit` log errors to stderr.
    """
    keras = _keras()
    if not tensorflow().distribute.has_strategy():  # clearing would drop the scope ([train] distribute) it is in
        keras.backend.clear_session()
    keras.utils.set_random_seed(seed)


def starting_model(section: ModelSection, user_model: Path | None, dataset: Dataset, seed: int) -> Any:
    """The untrained reference model, or the user's model (validated against the data), from a reproducible start."""
    make_reproducible(seed)
    return load_user_model(user_model, dataset) if user_model else reference_model(section, dataset)
