"""Datasets: examples, labels, a fixed held-out test split, and the exact preprocessing.

The preprocessing is recorded as data (`Preprocessing`) rather than hidden in
code, because the manifest must let a third party feed the int8 model
correctly without edgecc. Besides scikit-learn's digits, a recipe can point at
its own data with no code: a folder of images, a text file, or a folder of
recorded signals (see `DataSection`).
"""

from __future__ import annotations

import csv
import io
import os
import re
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass, replace
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from edgecc.board.preprocess import IMAGE_SUFFIXES, STANDARDIZE_EPSILON, TOKENIZER, pixels, token_ids, tokenize
from edgecc.errors import EdgeccError
from edgecc.recipe import AUTO_IMAGE_SIZE_LIMIT, AUTO_SEQUENCE_LIMIT, AUTO_SEQUENCE_SHARE, DataSection

# the tokenizer, the image conversion and the standardization are the board's (edgecc.board.preprocess), so a
# bundle's serve.py feeds its model exactly what the build's evaluation fed it
SIGNAL_SUFFIXES = (".npz", ".npy")
PAD, UNK = "[PAD]", "[UNK]"


STANDARDIZE_FORMULA = f"then per example: x = (x - mean(x)) / (std(x) + {STANDARDIZE_EPSILON})"


@dataclass(frozen=True)
class Preprocessing:
    """How raw examples become the float model input: `x = raw * scale + offset`.

    The optional fields are what a source needs beyond that formula (text: the
    tokenizer and vocabulary; signals: the sampling rate); None means it does not apply.
    """

    raw: str
    layout: str
    input_shape: tuple[int, ...]
    scale: float
    offset: float
    tokenizer: str | None = None
    vocabulary: tuple[str, ...] | None = None
    sequence_length: int | None = None
    padding_id: int | None = None
    unknown_id: int | None = None
    sample_rate: int | None = None
    standardize: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Dataset:
    """Float model inputs with labels, split once: the test split is never trained or calibrated on.

    `x` is float32 for images and signals, int32 token ids for text.
    `example_ids` names each example (file, file:line or file@sample) so the split can be checked from outside.
    `notes` say what reading left out (files that are not images, patterns' exclusions), so nothing is dropped unseen.
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    label_names: tuple[str, ...]
    train_index: np.ndarray
    test_index: np.ndarray
    preprocessing: Preprocessing
    split_rule: str = ""
    example_ids: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def class_counts(self) -> dict[str, dict[str, int]]:
        """Examples of each class (label order) per split: a rare class or a doubled data set shows before training."""
        return {split: dict(zip(self.label_names, np.bincount(self.y[index], minlength=self.num_classes).tolist()))
                for split, index in (("train", self.train_index), ("test", self.test_index))}

    def split_json(self) -> dict[str, Any]:
        """The test split as positions in the source dataset's own order, and by example name, with class counts."""
        split: dict[str, Any] = {"dataset": self.name, "test_indices": self.test_index.tolist(),
                                 "train_size": len(self.train_index), "examples_per_class": self.class_counts()}
        if self.split_rule:
            split["split_rule"] = self.split_rule
        if self.example_ids:
            split["test_examples"] = [self.example_ids[i] for i in self.test_index]
        if self.notes:
            split["notes"] = list(self.notes)
        return split

    def summary(self) -> list[str]:
        """Plain lines for people: examples per class and split, then what reading left out."""
        counts = self.class_counts()
        width = max(len(name) for name in self.label_names)
        lines = [f"examples per class ({self.split_rule or 'fixed split'}):"]
        lines += [f"  {name:<{width}}  {counts['train'][name]:>6} training  {counts['test'][name]:>6} test"
                  for name in self.label_names]
        return lines + [f"  {note}" for note in self.notes]


def stratified_split(y: np.ndarray, test_fraction: float, seed: int, *,
                     min_per_class: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split that keeps each class's share in both parts (indices sorted).

    With `min_per_class`, a class whose share would be smaller puts that many examples in the second part, but
    never more than a third of its examples (see TrainSection.validation_min_per_class for why).
    """
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        cut = max(int(round(len(members) * test_fraction)), min(min_per_class, len(members) // 3))
        test.append(members[:cut])
        train.append(members[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def class_weights(labels: np.ndarray, num_classes: int, balance: str = "weights") -> np.ndarray:
    """Each class's loss weight for recipe.TrainSection.balance, from the training labels' counts.

    'weights': class c weighs n / (k * count_c), scaled so that the mean weight over the examples is 1
    (the loss keeps its size; on a balanced set every weight is 1; an absent class gets 0). The weights
    are not capped: a cap is a number tuned to some data set, and it would hand the rarest classes, the
    ones weighting is for, back to the majority. 'sampling' and 'none': every weight is 1 (sampling
    balances the classes through epoch_order instead).
    """
    if balance != "weights":
        return np.ones(num_classes, dtype=np.float32)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return (weights / weights[labels].mean()).astype(np.float32)


def epoch_order(labels: np.ndarray, num_classes: int, balance: str, rng: np.random.Generator) -> np.ndarray:
    """One epoch's example positions (into `labels`), shuffled, for recipe.TrainSection.balance.

    'sampling': every class as many times as the largest one (whole shuffled passes over a rare class, then
    a random share of it), so each class gets as many steps; on a balanced set each example once. Otherwise
    every example once.
    """
    if balance != "sampling":
        return rng.permutation(len(labels))
    largest = np.bincount(labels, minlength=num_classes).max()
    parts = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members):
            repeats = [rng.permutation(members) for _ in range(-(-largest // len(members)))]
            parts.append(np.concatenate(repeats)[:largest])
    return rng.permutation(np.concatenate(parts))


def epoch_length(labels: np.ndarray, num_classes: int, balance: str) -> int:
    """How many examples epoch_order gives: what a learning-rate or sparsity schedule counts its steps by."""
    if balance != "sampling":
        return len(labels)
    counts = np.bincount(labels, minlength=num_classes)
    return int(np.count_nonzero(counts) * counts.max())


def mixed(alpha: float, rng: np.random.Generator, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Mixup (Zhang et al. 2018): each example of one epoch's `arrays` (inputs, one-hot targets, weights)
    blended with another example of the epoch, by a share drawn from Beta(alpha, alpha), the same for every
    array; 0 returns them as they are."""
    if not alpha:
        return arrays
    n = len(arrays[0])
    share = rng.beta(alpha, alpha, size=n).astype(np.float32)
    partner = rng.permutation(n)

    def blend(a: np.ndarray) -> np.ndarray:
        s = share.reshape(-1, *[1] * (a.ndim - 1))
        return (s * a + (1 - s) * a[partner]).astype(np.float32)

    return tuple(blend(a) for a in arrays)


WINDOW_ID = re.compile(r"(.+\.np[yz])@(\d+)")  # a signals example: `<recording>@<first sample>` (see _signals)


def validation_split(dataset: Dataset, fraction: float, seed: int, *,
                     min_per_class: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The training split less a validation share, and that share (positions in dataset.x, sorted).

    Stratified and seeded, with at least `min_per_class` examples of each class (at most a third of the class;
    TrainSection.validation_min_per_class). Signals' windows overlap, so a random share would judge the model on
    samples it trained on: there the share is the last windows of each recording's training part (a fraction of
    each recording, whose windows are many), and the training windows that overlap them are left out of both. A
    recording too short to give both keeps all for training.
    """
    train = dataset.train_index
    if not fraction:
        return train, train[:0]
    windows = [WINDOW_ID.fullmatch(dataset.example_ids[i]) for i in train] if dataset.example_ids else []
    if not windows or not all(windows):
        fit, held = stratified_split(dataset.y[train], fraction, seed, min_per_class=min_per_class)
        return train[fit], train[held]
    length = dataset.x.shape[2]  # signals are (N, 1, window, 1)
    recordings: dict[str, list[tuple[int, int]]] = {}
    for position, match in zip(train, windows):
        recordings.setdefault(match.group(1), []).append((int(match.group(2)), int(position)))
    fit, held = [], []
    for starts in recordings.values():
        starts.sort()
        count = int(round(len(starts) * fraction))
        first = starts[-count][0] if count else 0
        kept = [position for start, position in starts if start + length <= first]
        if not count or not kept:
            fit += [position for _, position in starts]
            continue
        fit += kept
        held += [position for _, position in starts[-count:]]
    return np.array(sorted(fit), dtype=np.int64), np.array(sorted(held), dtype=np.int64)


def decimate(signal: np.ndarray, factor: int) -> np.ndarray:
    """Every `factor`-th sample after a low-pass at the new Nyquist frequency, so faster content cannot alias.

    The filter is scipy.signal.decimate's FIR: a Hamming-windowed sinc of 20 * factor + 1 taps,
    applied with its delay removed so samples stay aligned in time.
    """
    if factor == 1:
        return signal
    taps = 20 * factor + 1
    kernel = np.sinc((np.arange(taps) - taps // 2) / factor) * np.hamming(taps)
    kernel /= kernel.sum()
    filtered = np.convolve(signal, kernel)[taps // 2: taps // 2 + len(signal)]
    return filtered[::factor]


def _sklearn_digits(section: DataSection, seed: int, base: Path | None) -> Dataset:
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
    rule = f"test_fraction {section.test_fraction}, stratified, seed {seed}"
    return Dataset("sklearn-digits", x, y, names, train, test, pre, rule)


def _natural(text: str) -> list[Any]:
    """Sort key that orders 'a_2' before 'a_10'."""
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", text))]


def _resolve(section: DataSection, name: str, base: Path | None) -> Path:
    value = getattr(section, name)
    if not value:
        raise EdgeccError(f"data.{name}: needed for data.source '{section.source}'")
    path = Path(value).expanduser()
    return path if base is None else base / path


def _regex(section: DataSection, name: str) -> re.Pattern[str]:
    pattern = getattr(section, name)
    try:
        return re.compile(pattern)
    except re.error as err:
        raise EdgeccError(f"data.{name}: {pattern!r} is not a valid regular expression: {err}") from None


def _split_option(section: DataSection, allowed: tuple[str, ...]) -> str:
    """The one split option the recipe sets ('test_fraction' when none is)."""
    chosen = [name for name in ("test_pattern", "test_path", "test_every") if getattr(section, name)]
    if len(chosen) > 1:
        raise EdgeccError(f"data: {' and '.join('data.' + c for c in chosen)} each define the test split; set only one")
    if chosen and chosen[0] not in allowed:
        raise EdgeccError(f"data.{chosen[0]}: does not apply to data.source '{section.source}'")
    if section.test_every == 1:
        raise EdgeccError("data.test_every: must be at least 2 (1 would leave nothing to train on)")
    return chosen[0] if chosen else "test_fraction"


def _every(count: int, n: int) -> np.ndarray:
    """True for the n-th, 2n-th, ... of `count` examples in file order."""
    return (np.arange(count) + 1) % n == 0


def _classes(section: DataSection, option: str, labels: list[str], is_test: np.ndarray | None,
             seed: int, path: Path) -> tuple[np.ndarray, tuple[str, ...], np.ndarray, np.ndarray]:
    """Class ids (names in natural order) and the split; a seeded stratified one when `is_test` is None.

    There must be two classes or more, each with training and test examples, or the accuracy would mean
    nothing; this is checked here, before any training. `path` is the data the labels were read from.
    """
    names = tuple(sorted(set(labels), key=_natural))
    ids = {name: i for i, name in enumerate(names)}
    y = np.array([ids[label] for label in labels], dtype=np.int64)
    if is_test is None:
        is_test = np.zeros(len(y), dtype=bool)
        is_test[stratified_split(y, section.test_fraction, seed)[1]] = True
    train_counts = np.bincount(y[~is_test], minlength=len(names))
    test_counts = np.bincount(y[is_test], minlength=len(names))
    counts = ", ".join(f"{name!r} {train} training / {test} test"
                       for name, train, test in zip(names, train_counts, test_counts))
    if len(names) < 2:
        raise EdgeccError(f"data.path: {path} has {len(names)} class ({counts}); a classifier needs at least two")
    for name, train, test in zip(names, train_counts, test_counts):
        for part, count in (("training", train), ("test", test)):
            if not count:
                raise EdgeccError(f"data.{option}: class {name!r} has no {part} examples in {path} ({counts})")
    return y, names, np.flatnonzero(~is_test), np.flatnonzero(is_test)


def _split_rule(section: DataSection, option: str, seed: int) -> str:
    if option == "test_fraction":
        return f"test_fraction {section.test_fraction}, stratified, seed {seed}"
    return f"{option} {getattr(section, option)!r}"


def _patterns(section: DataSection, name: str) -> tuple[str, ...]:
    """data.include or data.exclude as a tuple (the recipe may give one pattern as a string)."""
    value = getattr(section, name)
    return (value,) if isinstance(value, str) else value


def _shown(patterns: tuple[str, ...]) -> str:
    return repr(patterns[0]) if len(patterns) == 1 else repr(list(patterns))


def _walk(root: Path) -> list[str]:
    """Every file under `root` as a relative posix path; hidden names are skipped and linked folders read once."""
    found, seen = [], set()
    for here, folders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(here)
        if real in seen:
            folders[:] = []
            continue
        seen.add(real)
        folders[:] = [name for name in folders if not name.startswith(".")]
        inside = Path(here).relative_to(root)
        found += [(inside / name).as_posix() for name in names if not name.startswith(".")]
    return found


def _selected(folder: Path, field: str, section: DataSection) -> tuple[list[str], list[str]]:
    """The image files data.include and data.exclude select under `folder` (relative paths), and notes on the rest.

    Patterns are matched with fnmatch against the whole relative path, so '*' also matches '/'.
    """
    if not folder.is_dir():
        raise EdgeccError(f"data.{field}: {folder} is not a folder; set data.{field} to the folder that holds "
                          "one folder per class or the <class>_<n> images")
    files = sorted(_walk(folder), key=_natural)
    images = [name for name in files if PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES]
    others = [name for name in files if PurePosixPath(name).suffix.lower() not in IMAGE_SUFFIXES]
    if not images:
        seen = f" ({len(others)} other files, e.g. {others[0]})" if others else ""
        raise EdgeccError(f"data.{field}: no {'/'.join(IMAGE_SUFFIXES)} images in {folder} or below it{seen}; "
                          f"set data.{field} to the folder that holds one folder per class or the <class>_<n> images")
    notes = [f"data.{field}: ignored {len(others)} files that are not images (e.g. {others[0]})"] if others else []
    chosen = images
    for name, keep in (("include", True), ("exclude", False)):
        patterns = _patterns(section, name)
        if not patterns:
            continue
        matched = [any(fnmatchcase(image, p) for p in patterns) for image in chosen]
        kept = [image for image, hit in zip(chosen, matched) if hit == keep]
        if not kept:
            raise EdgeccError(f"data.{name}: {_shown(patterns)} leaves none of the {len(chosen)} images in {folder} "
                              f"(e.g. {chosen[0]}); patterns match the whole path relative to data.{field}, "
                              "case-sensitive, '*' also matching '/'")
        if len(kept) < len(chosen):
            left = [image for image, hit in zip(chosen, matched) if hit != keep]
            notes.append(f"data.{field}: data.{name} left out {len(left)} images (e.g. {left[0]})")
        chosen = kept
    return chosen, notes


def _one_file_per_example(chosen: list[str], folder: Path, field: str, section: DataSection) -> None:
    """Refuse files that differ only by extension (an image and its mask): they would be two examples of one."""
    stems: dict[str, list[str]] = {}
    for name in chosen:
        stems.setdefault(PurePosixPath(name).with_suffix("").as_posix(), []).append(name)
    doubled = [names for names in stems.values() if len(names) > 1]
    if doubled:
        first = sorted(doubled[0], key=lambda name: IMAGE_SUFFIXES.index(PurePosixPath(name).suffix.lower()))
        keep, drop = PurePosixPath(first[0]).suffix, PurePosixPath(first[1]).suffix
        where = "include" if section.include else field
        raise EdgeccError(f"data.{where}: {len(doubled)} examples have files that differ only by extension "
                          f"(an image and its mask?), e.g. {first[0]} and {first[1]} in {folder}; read one per "
                          f"example with data.include = \"*{keep}\" or data.exclude = \"*{drop}\"")


def _image_files(folder: Path, field: str, section: DataSection) -> tuple[list[tuple[str, str]], list[str]]:
    """(class, relative path) of each selected image, in natural order, and notes on what was left out.

    The class is the top-level folder under `folder` or, for images directly in it, the '<class>' of '<class>_<n>'.
    """
    chosen, notes = _selected(folder, field, section)
    _one_file_per_example(chosen, folder, field, section)
    loose = [name for name in chosen if "/" not in name]
    nested = [name for name in chosen if "/" in name]
    if loose and nested:
        raise EdgeccError(f"data.{field}: {folder} holds both images and sub-folders: {len(loose)} image(s) at its "
                          f"root (e.g. {loose[0]}) beside class folders (e.g. {nested[0].split('/')[0]}/); use one "
                          f"class layout: leave the root images out with data.exclude = \"{loose[0]}\" or read "
                          "only the class folders with data.include = \"*/*\"")
    if nested:
        found = [(name.split("/")[0], name) for name in nested]
    else:
        found = []
        for name in loose:
            stem, suffix = os.path.splitext(name)
            if "_" not in stem:
                raise EdgeccError(f"data.{field}: {name} is not named <class>_<n>{suffix}; rename it, put each "
                                  f"class in a folder of its own, or leave it out with data.exclude = \"{name}\"")
            found.append((stem.rsplit("_", 1)[0], name))
    return sorted(found, key=lambda pair: (_natural(pair[0]), _natural(pair[1]))), notes


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError as err:
        raise EdgeccError("data.source 'images' needs Pillow: pip install 'edgecc[train]'") from err
    return Image


def _unreadable(field: str, path: Path, name: str, err: Exception) -> EdgeccError:
    return EdgeccError(f"data.{field}: cannot read image {path}: {err}; replace it or leave it out with "
                       f"data.exclude = \"{name}\"")


def _image_size(files: list[tuple[str, Path, str]], section: DataSection) -> tuple[int, str | None]:
    """data.image_size, or when it is 0 the median shorter side of `files` (read from their headers) capped at
    recipe.AUTO_IMAGE_SIZE_LIMIT, with a note that says so: a recipe copied to images of another size keeps
    their detail without being told the size."""
    if section.image_size:
        return section.image_size, None
    image = _pillow()
    sides = []
    for field, path, name in files:
        try:
            with image.open(path) as opened:
                sides.append(min(opened.size))
        except (OSError, ValueError) as err:
            raise _unreadable(field, path, name, err) from None
    median = int(np.median(sides))
    size = max(4, min(median, AUTO_IMAGE_SIZE_LIMIT))
    return size, (f"data.image_size: {size} from the data (median shorter side of the training images {median} px, "
                  f"at most {AUTO_IMAGE_SIZE_LIMIT}); set data.image_size to choose another")


def _read_images(files: list[tuple[str, Path, str]], size: int, channels: int) -> np.ndarray:
    """0..255 float32 pixels, (N, size, size, channels), from (field, file, path relative to the field) triples."""
    image = _pillow()
    x = np.empty((len(files), size, size, channels), dtype=np.float32)
    for i, (field, path, name) in enumerate(files):
        try:
            with image.open(path) as opened:
                x[i] = pixels(opened, size, size, channels)
        except (OSError, ValueError) as err:
            raise _unreadable(field, path, name, err) from None
    return x


def _images(section: DataSection, seed: int, base: Path | None) -> Dataset:
    option = _split_option(section, ("test_pattern", "test_path", "test_every"))
    folder = _resolve(section, "path", base)
    roots = [("path", folder)]
    if option == "test_path":
        roots.append(("test_path", _resolve(section, "test_path", base)))
    files, notes = [], []
    for field, root in roots:
        found, noted = _image_files(root, field, section)
        files += [(field, label, root / name, name) for label, name in found]
        notes += noted
    is_test = None
    if option == "test_path":
        is_test = np.array([field == "test_path" for field, _, _, _ in files])
    elif option == "test_pattern":
        pattern = _regex(section, "test_pattern")
        is_test = np.array([bool(pattern.search(path.name)) for _, _, path, _ in files])
    elif option == "test_every":
        is_test = _every(len(files), section.test_every)
    y, names, train, test = _classes(section, option, [label for _, label, _, _ in files], is_test, seed, folder)
    triples = [(field, path, name) for field, _, path, name in files]
    size, note = _image_size([triples[i] for i in train], section)
    notes += [note] if note else []
    channels = section.channels
    pre = Preprocessing(
        raw=(f"image files read with Pillow, converted to {'L (grayscale)' if channels == 1 else 'RGB'}, "
             f"resized to {size}x{size} with Image.Resampling.BILINEAR: pixel values 0..255"),
        layout="NHWC",
        input_shape=(size, size, channels),
        scale=1.0 / 255.0,
        offset=0.0,
    )
    x = _read_images(triples, size, channels) * np.float32(pre.scale)
    return Dataset(section.path, x, y, names, train, test, pre, _split_rule(section, option, seed),
                   tuple(name for _, _, _, name in files), tuple(notes))


def _column(value: str, header: list[str] | None, field: str) -> int:
    """A column index from digits or, with a header, a column name."""
    if value.isdecimal():
        return int(value)
    if header is None:
        raise EdgeccError(f"data.{field}: {value!r} is not a column index; a column name needs data.header = true")
    if value not in header:
        raise EdgeccError(f"data.{field}: no column {value!r} (columns: {', '.join(header)})")
    return header.index(value)


def _rows(path: Path, section: DataSection, field: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank line, or csv record, of a text file."""
    try:
        text = path.read_text(encoding=section.encoding)
    except LookupError:
        raise EdgeccError(f"data.encoding: {section.encoding!r} is not a known encoding") from None
    except FileNotFoundError:
        raise EdgeccError(f"data.{field}: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        problem = f"cannot read {path} as {section.encoding} (see data.encoding): {err}"
        raise EdgeccError(f"data.{field}: {problem}") from None
    if section.format == "csv":
        reader = csv.reader(io.StringIO(text))
        rows = [(reader.line_num, row) for row in reader]
    elif section.format == "tsv":
        rows = [(n, line.split("\t")) for n, line in enumerate(text.split("\n"), 1)]
    else:
        rows = [(n, line.split(None, 1)) for n, line in enumerate(text.split("\n"), 1)]
    return [(n, row) for n, row in rows if any(cell.strip() for cell in row)]


def _read_text(path: Path, section: DataSection, field: str) -> list[tuple[str, str, str]]:
    """(label, text, 'file:line') for each example."""
    rows = _rows(path, section, field)
    header = rows.pop(0)[1] if section.header and rows else None
    columns = (0, 1)
    if section.format != "label-text":
        columns = (_column(section.label_column, header, "label_column"),
                   _column(section.text_column, header, "text_column"))
    pattern = _regex(section, "label_pattern")
    examples = []
    for n, row in rows:
        where = f"{path.name}:{n}"
        if len(row) <= max(columns):
            raise EdgeccError(f"data.{field}: {where} has {len(row)} field(s), not both the label (column "
                              f"{columns[0]}) and the text (column {columns[1]}) of data.format '{section.format}'")
        label, text = row[columns[0]].strip(), row[columns[1]]
        if section.label_pattern:
            match = pattern.match(label)
            if match is None:
                raise EdgeccError(f"data.label_pattern: {section.label_pattern!r} does not match the label "
                                  f"{label!r} at {where}")
            label = match.group(1) if pattern.groups else match.group(0)
        examples.append((label, text, where))
    if not examples:
        raise EdgeccError(f"data.{field}: {path} holds no examples")
    return examples


def _sequence_length(section: DataSection, counts: list[int], shortest: int) -> tuple[int, str | None]:
    """data.sequence_length, or when it is 0 the fewest tokens that keep every token of AUTO_SEQUENCE_SHARE of
    the training texts (`counts`: tokens per training text), at most AUTO_SEQUENCE_LIMIT, with a note that says
    so: a recipe copied to texts of another length neither pads every example with idle positions nor cuts
    most of them."""
    if section.sequence_length:
        return section.sequence_length, None
    ordered = sorted(counts)
    covering = ordered[max(0, int(np.ceil(AUTO_SEQUENCE_SHARE * len(ordered))) - 1)]
    length = max(shortest, min(covering, AUTO_SEQUENCE_LIMIT))
    return length, (f"data.sequence_length: {length} from the data ({AUTO_SEQUENCE_SHARE:.0%} of the training texts "
                    f"have at most {covering} tokens, the longest {ordered[-1]}; at most {AUTO_SEQUENCE_LIMIT}); set "
                    "data.sequence_length to choose another")


def _word_ids(texts: list[str], train: np.ndarray, section: DataSection) -> tuple[np.ndarray, Preprocessing, str | None]:
    """Ids of `tokenize`'s words in a vocabulary of the training split's words (min_count, max_vocabulary)."""
    tokens = [tokenize(text) for text in texts]
    counts = Counter(word for i in train for word in tokens[i])
    words = sorted((w for w, c in counts.items() if c >= section.min_count), key=lambda w: (-counts[w], w))
    vocabulary = (PAD, UNK, *words[: section.max_vocabulary - 2])
    ids = {word: i for i, word in enumerate(vocabulary)}
    length, note = _sequence_length(section, [len(tokens[i]) for i in train], shortest=1)
    x = np.stack([token_ids(words_of, ids, length, padding_id=0, unknown_id=1) for words_of in tokens])
    return x, _token_preprocessing(TOKENIZER, vocabulary, length, padding_id=0, unknown_id=1), note


def _token_preprocessing(tokenizer: str, vocabulary: tuple[str, ...], length: int, padding_id: int,
                         unknown_id: int) -> Preprocessing:
    return Preprocessing(
        raw="token ids of each text, from the tokenizer and vocabulary below",
        layout="NL token ids",
        input_shape=(length,),
        scale=1.0,
        offset=0.0,
        tokenizer=tokenizer,
        vocabulary=vocabulary,
        sequence_length=length,
        padding_id=padding_id,
        unknown_id=unknown_id,
    )


def _minilm_ids(texts: list[str], train: np.ndarray, section: DataSection
                ) -> tuple[np.ndarray, Preprocessing, str | None]:
    """Ids of all-MiniLM-L6-v2's own WordPiece tokenizer, [CLS] ... [SEP] then [PAD] (0), in its vocabulary."""
    from edgecc.train import minilm

    counts = [] if section.sequence_length else \
        minilm.tokenizer(minilm.MAX_POSITIONS)([texts[i] for i in train])[1].sum(axis=1).tolist()
    length, note = _sequence_length(section, counts, shortest=2)
    x = minilm.tokenizer(length)(texts)[0]
    vocabulary = minilm.vocabulary()
    return x, _token_preprocessing(minilm.tokenizer_description(length), vocabulary, length,
                                   padding_id=minilm.PAD_ID, unknown_id=vocabulary.index(UNK)), note


def _text(section: DataSection, seed: int, base: Path | None) -> Dataset:
    option = _split_option(section, ("test_path", "test_every"))
    path = _resolve(section, "path", base)
    examples = _read_text(path, section, "path")
    is_test = None
    if option == "test_path":
        test = _read_text(_resolve(section, "test_path", base), section, "test_path")
        is_test = np.arange(len(examples) + len(test)) >= len(examples)
        examples += test
    elif option == "test_every":
        is_test = _every(len(examples), section.test_every)
    y, names, train, test_index = _classes(section, option, [label for label, _, _ in examples], is_test, seed,
                                           path)
    texts = [text for _, text, _ in examples]
    ids = _minilm_ids if section.tokenizer == "minilm" else _word_ids
    x, pre, note = ids(texts, train, section)
    return Dataset(section.path, x, y, names, train, test_index, pre, _split_rule(section, option, seed),
                   tuple(where for _, _, where in examples), (note,) if note else ())


def _decimation(section: DataSection, name: str) -> int:
    """The integer factor that brings file `name` from its rate (data.file_rates) to data.sample_rate."""
    if section.file_rates and not section.sample_rate:
        raise EdgeccError("data.file_rates: needs data.sample_rate, the rate to resample to")
    for i, rule in enumerate(section.file_rates):
        pattern, _, hz = rule.rpartition("=")
        if not pattern or not hz.isdecimal() or int(hz) == 0:
            raise EdgeccError(f"data.file_rates[{i}]: expected '<regex>=<Hz>', got {rule!r}")
        try:
            found = re.search(pattern, name)
        except re.error as err:
            raise EdgeccError(f"data.file_rates[{i}]: {pattern!r} is not a valid regular expression: {err}") from None
        if found:
            if int(hz) % section.sample_rate:
                raise EdgeccError(f"data.file_rates[{i}]: {name} at {hz} Hz is not an integer multiple of "
                                  f"data.sample_rate {section.sample_rate} Hz; resample it beforehand")
            return int(hz) // section.sample_rate
    return 1


def _npz_array(path: Path, key: str) -> np.ndarray:
    """The array named `key` in an .npz file, or its only array when `key` is empty."""
    with np.load(path, allow_pickle=False) as loaded:
        if key and key not in loaded:
            raise EdgeccError(f"data.key: {path.name} has no array {key!r} (arrays: {', '.join(loaded)})")
        if not key and len(loaded.files) != 1:
            raise EdgeccError(f"data.key: {path.name} holds several arrays ({', '.join(loaded)}); name one")
        return loaded[key or loaded.files[0]]


def _read_signal(path: Path, key: str) -> np.ndarray:
    """One recording as 1-D float64."""
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            array = _npz_array(path, key)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise EdgeccError(f"data.path: cannot read {path}: {err}") from None
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.number):
        raise EdgeccError(f"data.path: {path.name} holds a {array.dtype} array of shape {array.shape}, "
                          "not one channel of numbers, (N,) or (N, 1)")
    return array.astype(np.float64)


def _signals(section: DataSection, seed: int, base: Path | None) -> Dataset:
    _split_option(section, ())
    folder = _resolve(section, "path", base)
    if not folder.is_dir():
        raise EdgeccError(f"data.path: {folder} is not a folder")
    if not section.files:
        raise EdgeccError("data.files: needed for data.source 'signals' (a regex whose group 1 is the class)")
    pattern = _regex(section, "files")
    if pattern.groups < 1:
        raise EdgeccError(f"data.files: {section.files!r} has no group to take the class from")
    chosen = sorted((p for p in folder.iterdir() if p.suffix in SIGNAL_SUFFIXES and pattern.fullmatch(p.name)),
                    key=lambda p: _natural(p.name))
    if not chosen:
        raise EdgeccError(f"data.files: {section.files!r} matches no .npz or .npy file name in {folder}")
    window, hop = section.window, section.hop or section.window // 2
    windows, labels, names, is_test = [], [], [], []
    for path in chosen:
        signal = decimate(_read_signal(path, section.key), _decimation(section, path.name))
        label = pattern.fullmatch(path.name).group(1)
        cut = int(len(signal) * (1.0 - section.test_tail))
        starts = [(s, False) for s in range(0, cut - window + 1, hop)]
        starts += [(s, True) for s in range(cut, len(signal) - window + 1, hop)]
        for start, test in starts:
            windows.append(signal[start: start + window])
            labels.append(label)
            names.append(f"{path.name}@{start}")
            is_test.append(test)
    if not windows:
        raise EdgeccError(f"data.window: {window} samples do not fit in the training part of any recording")
    y, classes, train, test_index = _classes(section, "test_tail", labels, np.array(is_test, dtype=bool), seed,
                                             folder)
    raw = np.stack(windows)
    std = float(raw[train].std())
    if std == 0.0:
        raise EdgeccError("data.path: the training windows are constant; there is nothing to learn from")
    rate = f" at {section.sample_rate} Hz" if section.sample_rate else ""
    array = f" of array {section.key!r}" if section.key else ""
    pre = Preprocessing(
        raw=(f"{window} consecutive samples{rate} of a recording{array}; recordings sampled faster are first "
             "decimated by an integer factor after a low-pass at the new Nyquist frequency (scipy.signal.decimate's "
             "FIR: Hamming-windowed sinc, 20 * factor + 1 taps)"),
        layout="NHWC",
        input_shape=(1, window, 1),
        scale=1.0 / std,
        offset=0.0,
        sample_rate=section.sample_rate or None,
    )
    x = (raw * pre.scale).astype(np.float32).reshape(len(raw), 1, window, 1)
    rule = f"test_tail {section.test_tail}: windows lying in the last {section.test_tail:.0%} of each recording"
    return Dataset(section.path, x, y, classes, train, test_index, pre, rule, tuple(names))


def load_dataset(section: DataSection, seed: int, base: Path | None = None) -> Dataset:
    """The recipe's dataset, with its split and preprocessing; relative paths are relative to `base`."""
    loaders = {"sklearn-digits": _sklearn_digits, "images": _images, "text": _text, "signals": _signals}
    dataset = loaders[section.source](section, seed, base)
    if not section.standardize:
        return dataset
    if section.source == "text":
        raise EdgeccError("data.standardize applies to images and signals, not to token ids")
    flat = dataset.x.reshape(len(dataset.x), -1)
    mean, std = flat.mean(axis=1, keepdims=True), flat.std(axis=1, keepdims=True)
    x = ((flat - mean) / (std + STANDARDIZE_EPSILON)).reshape(dataset.x.shape).astype(np.float32)
    return replace(dataset, x=x, preprocessing=replace(dataset.preprocessing, standardize=STANDARDIZE_FORMULA))
