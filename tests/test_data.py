"""Dataset loaders: a recipe points at images, text or signals with no code, and gets a stated split."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import edgecc, needs_train_extra
from edgecc.data import decimate, load_dataset, tokenize
from edgecc.errors import EdgeccError
from edgecc.recipe import DataSection, load_recipe
from test_cli import assert_clean_failure

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_image(path: Path, value: int | tuple[int, int, int], size: int = 12) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB" if isinstance(value, tuple) else "L", (size, size), value).save(path)


def flat_images(folder: Path) -> Path:
    """Three classes named like NEU's files (a class with an underscore and a hyphen included)."""
    for label, value in (("rolled-in_scale", 10), ("crazing", 120), ("pits", 250)):
        for n in range(1, 13):
            write_image(folder / f"{label}_{n}.png", value)
    return folder


def test_images_class_from_the_name_before_the_last_underscore(tmp_path: Path) -> None:
    needs_train_extra()
    section = DataSection(source="images", path="imgs", image_size=8, test_pattern=r"_(1[01])\.png$")
    flat_images(tmp_path / "imgs")
    data = load_dataset(section, 0, tmp_path)
    assert data.label_names == ("crazing", "pits", "rolled-in_scale")
    assert data.x.shape == (36, 8, 8, 1) and data.x.dtype == np.float32
    assert data.preprocessing.input_shape == (8, 8, 1) and data.preprocessing.layout == "NHWC"
    ids = data.example_ids
    assert ids[:3] == ("crazing_1.png", "crazing_2.png", "crazing_3.png") and ids[9] == "crazing_10.png"
    assert data.x[0].max() == pytest.approx(120 / 255) and data.x[12].min() == pytest.approx(250 / 255)
    split = data.split_json()
    assert split["test_examples"] == [f"{c}_{n}.png" for c in ("crazing", "pits", "rolled-in_scale") for n in (10, 11)]
    assert split["train_size"] == 30 and list(data.y[data.test_index]) == [0, 0, 1, 1, 2, 2]


def test_images_one_folder_per_class_in_rgb(tmp_path: Path) -> None:
    needs_train_extra()
    for label, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        for n in range(1, 7):
            write_image(tmp_path / "data" / label / (f"img{n}.jpg" if n % 2 else f"{n}.bmp"), colour)
    data = load_dataset(DataSection(source="images", path=str(tmp_path / "data"), image_size=4, channels=3,
                                    test_every=3), 0)
    assert data.label_names == ("blue", "red") and data.x.shape == (12, 4, 4, 3)
    assert np.allclose(data.x[6, 0, 0], [1, 0, 0], atol=0.02)
    assert list(data.test_index) == [2, 5, 8, 11]
    assert data.split_json()["test_examples"][0] == "blue/6.bmp"    # natural order: 2, 4, 6, img1, ...


def test_images_test_path_and_seeded_fraction(tmp_path: Path) -> None:
    needs_train_extra()
    flat_images(tmp_path / "train")
    for label in ("crazing", "pits", "rolled-in_scale"):
        write_image(tmp_path / "test" / f"{label}_1.png", 0)
    data = load_dataset(DataSection(source="images", path="train", test_path="test", image_size=4), 0, tmp_path)
    assert len(data.train_index) == 36 and list(data.test_index) == [36, 37, 38]
    section = DataSection(source="images", path="train", test_fraction=0.25, image_size=4)
    first, again = load_dataset(section, 3, tmp_path), load_dataset(section, 3, tmp_path)
    assert np.array_equal(first.test_index, again.test_index) and len(first.test_index) == 9
    assert np.bincount(first.y[first.test_index]).tolist() == [3, 3, 3]


def test_image_errors_name_the_field(tmp_path: Path) -> None:
    needs_train_extra()
    flat_images(tmp_path / "ok")
    (tmp_path / "empty").mkdir()
    write_image(tmp_path / "noname" / "picture.png", 0)
    for name in ("a_1.png", "b_1.png", "b_2.png"):
        write_image(tmp_path / "broken" / name, 0)
    (tmp_path / "broken" / "a_2.png").write_bytes(b"not a png")
    write_image(tmp_path / "mixed" / "a" / "x.png", 0)
    write_image(tmp_path / "mixed" / "a_1.png", 0)
    cases = [
        (dict(path="missing"), r"data\.path: .*missing is not a folder"),
        (dict(path=""), r"data\.path: needed for data.source 'images'"),
        (dict(path="empty"), r"data\.path: no \.jpg/\.jpeg/\.png/\.bmp images"),
        (dict(path="noname"), r"data\.path: picture\.png is not named <class>_<n>\.png"),
        (dict(path="broken", test_every=2), r"data\.path: cannot read image .*a_2\.png"),
        (dict(path="mixed"), r"data\.path: .* holds both images and sub-folders"),
        (dict(path="ok", test_pattern=r"crazing"), r"data\.test_pattern: class 'crazing' has no training examples"),
        (dict(path="ok", test_pattern=r"_1\.png$", test_every=4),
         r"data\.test_pattern and data\.test_every each define the test split; set only one"),
        (dict(path="ok", test_pattern="("), r"data\.test_pattern: '\(' is not a valid regular expression"),
        (dict(path="ok", test_every=1), r"data\.test_every: must be at least 2"),
        (dict(path="ok", test_path="missing"), r"data\.test_path: .*missing is not a folder"),
    ]
    for fields, message in cases:
        with pytest.raises(EdgeccError, match=message):
            load_dataset(DataSection(source="images", image_size=4, **fields), 0, tmp_path)


def test_one_class_or_a_class_missing_from_a_split_is_refused_with_the_counts(tmp_path: Path) -> None:
    needs_train_extra()
    for n in range(1, 7):
        write_image(tmp_path / "one" / f"cat_{n}.png", 0)
    with pytest.raises(EdgeccError, match=r"data\.path: \S*one has 1 class \('cat' 5 training / 1 test\); "
                                          r"a classifier needs at least two"):
        load_dataset(DataSection(source="images", path="one", image_size=4, test_every=6), 0, tmp_path)
    (tmp_path / "one.tsv").write_text("spam\tbuy now\n" * 8)
    with pytest.raises(EdgeccError, match=r"data\.path: \S*one\.tsv has 1 class \('spam' 6 training / 2 test\)"):
        load_dataset(DataSection(source="text", format="tsv", path="one.tsv"), 0, tmp_path)
    flat_images(tmp_path / "three")
    with pytest.raises(EdgeccError, match=r"data\.test_pattern: class 'crazing' has no training examples in \S*three "
                                          r"\('crazing' 0 training / 12 test, 'pits' 12 training / 0 test, "
                                          r"'rolled-in_scale' 12 training / 0 test\)"):
        load_dataset(DataSection(source="images", path="three", image_size=4, test_pattern="crazing"), 0, tmp_path)


def test_the_build_refuses_one_class_before_training_and_keeps_the_previous_output(tmp_path: Path) -> None:
    needs_train_extra()
    for n in range(1, 9):
        write_image(tmp_path / "one" / f"cat_{n}.png", 0)
    (tmp_path / "recipe.toml").write_text('[data]\nsource = "images"\npath = "one"\nimage_size = 8\n')
    previous = tmp_path / "out" / "model.tflite"
    previous.parent.mkdir()
    previous.write_bytes(b"the previous build")
    before = set(tmp_path.rglob("*"))
    result = edgecc("build", "--target", "rpi4", "--recipe", "recipe.toml", "--out", "out", cwd=tmp_path, timeout=120)
    assert_clean_failure(result, "one has 1 class ('cat' 6 training / 2 test); a classifier needs at least two",
                         tmp_path, before)
    assert previous.read_bytes() == b"the previous build"


def defect_set(root: Path) -> Path:
    """A factory defect set: class folders each holding Imgs/ with a same-named .png mask beside every .jpg."""
    for label, value, count in (("crack", 40, 4), ("ok", 200, 8)):
        for n in range(1, count + 1):
            write_image(root / label / "Imgs" / f"{n}.jpg", value)
            write_image(root / label / "Imgs" / f"{n}.png", 255 - value)      # the mask
    (root / "README.txt").write_text("masks are the .png files")
    return root


def test_images_with_masks_read_through_include(tmp_path: Path) -> None:
    needs_train_extra()
    defect_set(tmp_path / "defects")
    for patterns in (dict(include="*/Imgs/*.jpg"), dict(exclude=["*.png", "nothing*"])):
        data = load_dataset(DataSection(source="images", path="defects", image_size=4, test_every=4, **patterns),
                            0, tmp_path)
        assert data.label_names == ("crack", "ok") and data.x.shape == (12, 4, 4, 1)
        assert data.example_ids[:2] == ("crack/Imgs/1.jpg", "crack/Imgs/2.jpg")
        assert data.x[data.y == 0].max() == pytest.approx(40 / 255, abs=0.02)      # images, not masks
        split = json.loads(json.dumps(data.split_json()))
        assert split["examples_per_class"] == {"train": {"crack": 3, "ok": 6}, "test": {"crack": 1, "ok": 2}}
        name = "include" if "include" in patterns else "exclude"
        assert split["notes"] == ["data.path: ignored 1 files that are not images (e.g. README.txt)",
                                  f"data.path: data.{name} left out 12 images (e.g. crack/Imgs/1.png)"]
    with pytest.raises(EdgeccError, match=r"data\.include: '\*/imgs/\*\.jpg' leaves none of the 24 images in "
                                          r"\S*defects \(e\.g\. crack/Imgs/1\.jpg\); patterns match the whole path "
                                          r"relative to data\.path, case-sensitive"):
        load_dataset(DataSection(source="images", path="defects", include="*/imgs/*.jpg"), 0, tmp_path)


def test_an_image_and_its_mask_are_refused_with_the_field_that_picks_one(tmp_path: Path) -> None:
    needs_train_extra()
    defect_set(tmp_path / "defects")
    pair = (r"12 examples have files that differ only by extension \(an image and its mask\?\), e\.g\. "
            r"crack/Imgs/1\.jpg and crack/Imgs/1\.png in \S*defects; read one per example with "
            r'data\.include = "\*\.jpg" or data\.exclude = "\*\.png"')
    with pytest.raises(EdgeccError, match=r"data\.path: " + pair):
        load_dataset(DataSection(source="images", path="defects", test_every=4), 0, tmp_path)
    with pytest.raises(EdgeccError, match=r"data\.include: 4 examples have .* e\.g\. crack/Imgs/1\.jpg and "):
        load_dataset(DataSection(source="images", path="defects", test_every=4, include="crack/*"), 0, tmp_path)
    (tmp_path / "recipe.toml").write_text('[data]\nsource = "images"\npath = "defects"\nimage_size = 8\n')
    before = set(tmp_path.rglob("*"))
    result = edgecc("build", "--target", "rpi4", "--recipe", "recipe.toml", "--out", "out", cwd=tmp_path, timeout=120)
    assert_clean_failure(result, "data.path: 12 examples have files that differ only by extension", tmp_path, before)


def test_a_stray_root_file_is_named_with_the_field_that_leaves_it_out(tmp_path: Path) -> None:
    needs_train_extra()
    for label in ("blue", "red"):
        for n in range(1, 5):
            write_image(tmp_path / "data" / label / "2024" / f"{n}.png", 0)    # deeper than the class folder
    write_image(tmp_path / "data" / "preview.jpg", 0)
    (tmp_path / "data" / "labels.csv").write_text("not an image")
    write_image(tmp_path / "data" / ".thumbs" / "x.png", 0)                     # hidden: never read
    section = DataSection(source="images", path="data", image_size=4, test_every=2)
    stray = (r'data\.path: \S*data holds both images and sub-folders: 1 image\(s\) at its root \(e\.g\. '
             r'preview\.jpg\) beside class folders \(e\.g\. blue/\); use one class layout: leave the root images '
             r'out with data\.exclude = "preview\.jpg" or read only the class folders with data\.include = "\*/\*"')
    with pytest.raises(EdgeccError, match=stray):
        load_dataset(section, 0, tmp_path)
    for fix in (dict(exclude="preview.jpg"), dict(include="*/*")):
        data = load_dataset(replace(section, **fix), 0, tmp_path)
        assert data.label_names == ("blue", "red") and data.example_ids[0] == "blue/2024/1.png"
        counts = data.split_json()["examples_per_class"]
        assert counts == {"train": {"blue": 2, "red": 2}, "test": {"blue": 2, "red": 2}}
        assert data.notes[0] == "data.path: ignored 1 files that are not images (e.g. labels.csv)"
    write_image(tmp_path / "flat" / "a_1.png", 0)
    write_image(tmp_path / "flat" / "scan.png", 0)
    with pytest.raises(EdgeccError, match=r'data\.path: scan\.png is not named <class>_<n>\.png; rename it, put '
                                          r'each class in a folder of its own, or leave it out with '
                                          r'data\.exclude = "scan\.png"'):
        load_dataset(DataSection(source="images", path="flat", image_size=4), 0, tmp_path)


def test_summary_gives_examples_per_class_and_split(tmp_path: Path) -> None:
    needs_train_extra()
    flat_images(tmp_path / "imgs")
    (tmp_path / "imgs" / "notes.txt").write_text("x")
    data = load_dataset(DataSection(source="images", path="imgs", image_size=4, test_pattern=r"_1[0-2]\.png$"),
                        0, tmp_path)
    assert data.class_counts() == {"train": {"crazing": 9, "pits": 9, "rolled-in_scale": 9},
                                   "test": {"crazing": 3, "pits": 3, "rolled-in_scale": 3}}
    assert data.summary() == [
        "examples per class (test_pattern '_1[0-2]\\\\.png$'):",
        "  crazing               9 training       3 test",
        "  pits                  9 training       3 test",
        "  rolled-in_scale       9 training       3 test",
        "  data.path: ignored 1 files that are not images (e.g. notes.txt)"]
    digits = load_dataset(DataSection(), 0).split_json()       # every source gets the counts
    assert sum(digits["examples_per_class"]["test"].values()) == len(digits["test_indices"]) and "notes" not in digits


def test_include_and_exclude_apply_only_to_images(tmp_path: Path) -> None:
    (tmp_path / "r.toml").write_text('[data]\nsource = "images"\npath = "x"\ninclude = "*/Imgs/*.jpg"\n'
                                     'exclude = ["*_mask.png", "*.bmp"]\n')
    data = load_recipe(tmp_path / "r.toml").recipe.data
    assert data.include == "*/Imgs/*.jpg" and data.exclude == ("*_mask.png", "*.bmp")
    (tmp_path / "t.toml").write_text('[data]\nsource = "text"\npath = "x"\nexclude = ["*.png"]\ninclude = 3\n')
    with pytest.raises(EdgeccError, match=r"data\.include: expected a string or a list of .*, got 3"):
        load_recipe(tmp_path / "t.toml")
    (tmp_path / "t.toml").write_text('[data]\nsource = "text"\npath = "x"\nexclude = ["*.png"]\n')
    with pytest.raises(EdgeccError, match=r"data\.exclude: \['\*\.png'\] applies to data\.source 'images', not 'text'"):
        load_recipe(tmp_path / "t.toml")


def test_tokenizer_rule() -> None:
    assert tokenize("How did SERFDOM develop, in 1861? Don't") == [
        "how", "did", "serfdom", "develop", ",", "in", "1861", "?", "don't"]
    assert tokenize("Weld seam, ok? " * 100_000, limit=4) == ["weld", "seam", ",", "ok"]


def test_text_tsv_vocabulary_from_training_only(tmp_path: Path) -> None:
    lines = ["kind\tmessage\tlabel"]
    lines += [f"x\tthe cat sat on mat {i}\tcat:a" for i in range(6)]
    lines += [f"x\tthe dog ran far far {i}\tdog:b" for i in range(6)]
    lines[6] = "x\tthe cat sat zebra zebra zebra\tcat:a"     # the 6th example: test, so 'zebra' stays unknown
    (tmp_path / "d.tsv").write_text("\n".join(lines) + "\n\n")
    section = DataSection(source="text", path="d.tsv", format="tsv", header=True, label_column="label",
                          text_column="1", label_pattern="^([^:]+)", test_every=3, sequence_length=5)
    data = load_dataset(section, 0, tmp_path)
    pre = data.preprocessing
    assert data.label_names == ("cat", "dog") and data.x.dtype == np.int32 and data.x.shape == (12, 5)
    assert list(data.test_index) == [2, 5, 8, 11] and data.example_ids[5] == "d.tsv:7"
    assert pre.vocabulary[:2] == ("[PAD]", "[UNK]") and "zebra" not in pre.vocabulary
    assert pre.vocabulary[2:4] == ("far", "the") and "mat" in pre.vocabulary    # most frequent first, then a-z
    assert "2" not in pre.vocabulary and "5" not in pre.vocabulary               # twice each, but only in test
    words = dict(zip(pre.vocabulary, range(len(pre.vocabulary))))
    assert data.x[5].tolist() == [words["the"], words["cat"], words["sat"], 1, 1]
    assert pre.input_shape == (5,) and pre.layout == "NL token ids" and pre.sequence_length == 5
    assert pre.padding_id == 0 and pre.unknown_id == 1 and "re.findall" in pre.tokenizer
    manifest = json.loads(json.dumps(pre.to_json()))
    assert manifest["vocabulary"][:2] == ["[PAD]", "[UNK]"] and manifest["input_shape"] == [5]
    capped = load_dataset(replace(section, max_vocabulary=4, min_count=1), 0, tmp_path)
    assert capped.preprocessing.vocabulary == ("[PAD]", "[UNK]", "far", "the")


def test_text_csv_quotes_and_padding(tmp_path: Path) -> None:
    rows = ['label,text'] + [f'{"ham" if i % 2 else "spam"},"hello, world {i}"' for i in range(8)]
    (tmp_path / "d.csv").write_text("\n".join(rows))
    data = load_dataset(DataSection(source="text", path="d.csv", header=True, label_column="label",
                                    text_column="text", min_count=1, test_fraction=0.25, sequence_length=32), 0, tmp_path)
    assert data.x.shape == (8, 32) and (data.x[:, 4:] == 0).all() and len(data.test_index) == 2
    assert data.label_names == ("ham", "spam") and data.split_json()["split_rule"].startswith("test_fraction 0.25")


def test_sequence_length_from_the_data_keeps_every_token_of_99_percent_of_the_training_texts(tmp_path: Path) -> None:
    """200 training texts of 1..200 words (and test texts longer still, which do not count): 99% have at most 198
    words, so 198 would be the length, but it is capped at 128; with at most 40 words, 40 * 0.99 rounds up to 40."""
    def texts(lengths: range, name: str) -> str:
        (tmp_path / name).write_text("".join(f"{'ab'[n % 2]}\t{' '.join(['w'] * n)}\n" for n in lengths))
        return name

    section = DataSection(source="text", path=texts(range(1, 201), "long.tsv"), format="tsv", min_count=1,
                          test_path=texts(range(300, 304), "test.tsv"))
    data = load_dataset(section, 0, tmp_path)
    assert data.x.shape[1] == data.preprocessing.sequence_length == 128
    assert data.notes == ("data.sequence_length: 128 from the data (99% of the training texts have at most 198 "
                          "tokens, the longest 200; at most 128); set data.sequence_length to choose another",)
    short = load_dataset(replace(section, path=texts(range(1, 41), "short.tsv")), 0, tmp_path)
    assert short.x.shape[1] == 40 and (short.x[np.argmax((short.x > 0).sum(axis=1))] > 0).all()
    chosen = load_dataset(replace(section, sequence_length=7), 0, tmp_path)
    assert chosen.x.shape[1] == 7 and chosen.notes == ()


def test_text_label_text_with_a_test_file(tmp_path: Path) -> None:
    (tmp_path / "train.label").write_text("DESC:manner How did it go ?\nNUM:date When was it ?\n" * 3)
    (tmp_path / "test.label").write_bytes("DESC:def What is caf\xe9 ?\nNUM:count How many ?\n".encode("latin-1"))
    data = load_dataset(DataSection(source="text", path="train.label", test_path="test.label", format="label-text",
                                    label_pattern="^([^:]+)", encoding="latin-1"), 0, tmp_path)
    assert data.label_names == ("DESC", "NUM") and list(data.test_index) == [6, 7]
    assert data.split_json()["test_examples"] == ["test.label:1", "test.label:2"]
    fine = DataSection(source="text", path="train.label", test_path="test.label", format="label-text",
                       encoding="latin-1")
    with pytest.raises(EdgeccError, match=r"data\.test_path: class 'DESC:def' has no training examples"):
        load_dataset(fine, 0, tmp_path)


def test_text_errors_name_the_field(tmp_path: Path) -> None:
    (tmp_path / "d.tsv").write_text("a\tone two\nb\tthree\nc\n")
    (tmp_path / "h.tsv").write_text("y\tx\na\tone\n")
    base = dict(source="text", format="tsv")
    cases = [
        (dict(path="nope.tsv"), r"data\.path: .*nope\.tsv does not exist"),
        (dict(path="d.tsv"), r"data\.path: d\.tsv:3 has 1 field\(s\), not both the label"),
        (dict(path="h.tsv", header=True, text_column="body"), r"data\.text_column: no column 'body' \(columns: y, x\)"),
        (dict(path="h.tsv", label_column="y"), r"data\.label_column: 'y' is not a column index; .*data\.header = true"),
        (dict(path="h.tsv", label_pattern="z"), r"data\.label_pattern: 'z' does not match the label 'y' at h\.tsv:1"),
        (dict(path="h.tsv", encoding="klingon"), r"data\.encoding: 'klingon' is not a known encoding"),
        (dict(path="h.tsv", test_pattern="x"), r"data\.test_pattern: does not apply to data\.source 'text'"),
    ]
    for fields, message in cases:
        with pytest.raises(EdgeccError, match=message):
            load_dataset(DataSection(**base, **fields), 0, tmp_path)
    (tmp_path / "bad.txt").write_bytes(b"a\t\xff\xfe\n")
    with pytest.raises(EdgeccError, match=r"data\.path: cannot read .*bad\.txt as utf-8 \(see data\.encoding\)"):
        load_dataset(DataSection(**base, path="bad.txt"), 0, tmp_path)


def test_decimation_keeps_the_passband_and_removes_what_would_alias() -> None:
    t = np.arange(48000) / 48000
    low, high = np.sin(2 * np.pi * 1000 * t), np.sin(2 * np.pi * 9000 * t)   # the new Nyquist is 6 kHz
    kept, removed = decimate(low, 4), decimate(high, 4)
    middle = slice(100, -100)
    assert len(kept) == 12000
    assert np.allclose(kept[middle], low[::4][middle], atol=0.01)          # same amplitude, no delay
    assert np.abs(removed[middle]).max() < 0.01
    assert decimate(low, 1) is low


def write_signals(folder: Path) -> None:
    """Two classes at 1 kHz, and one file of class b recorded at 4 kHz (another array in each .npz too)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    t = np.arange(1000) / 1000
    np.savez(folder / "a_1.npz", X=(np.sin(2 * np.pi * 50 * t) + 0.1 * rng.standard_normal(1000))[:, None],
             Y=np.zeros(1000))
    np.savez(folder / "b_1.npz", X=2 * np.sin(2 * np.pi * 120 * t), Y=np.zeros(1000))
    fast = np.arange(4000) / 4000
    np.savez(folder / "b_2_fast.npz", X=2 * np.sin(2 * np.pi * 120 * fast) + np.sin(2 * np.pi * 1500 * fast),
             Y=np.zeros(4000))
    np.save(folder / "a_2.npy", np.sin(2 * np.pi * 50 * t))
    np.save(folder / "c_1.npy", np.ones(10))     # not selected by the regex


def test_signals_windows_rates_and_tail_split(tmp_path: Path) -> None:
    write_signals(tmp_path / "sig")
    section = DataSection(source="signals", path="sig", files=r"([ab])_\d+(?:_fast)?\.np[yz]", key="X",
                          sample_rate=1000, file_rates=("_fast=4000",), window=64, test_tail=0.25)
    data = load_dataset(section, 0, tmp_path)
    assert data.label_names == ("a", "b") and data.x.shape == (112, 1, 64, 1) and data.x.dtype == np.float32
    assert data.preprocessing.input_shape == (1, 64, 1) and data.preprocessing.sample_rate == 1000
    starts = np.array([int(name.split("@")[1]) for name in data.example_ids])
    assert (starts[data.train_index] + 64 <= 750).all() and (starts[data.test_index] >= 750).all()
    assert len(data.train_index) == 4 * 22 and len(data.test_index) == 4 * 6          # hop = window // 2
    assert float(data.x[data.train_index].std()) == pytest.approx(1.0, rel=1e-4)
    assert data.preprocessing.offset == 0.0
    slow = data.x[[data.example_ids.index("b_1.npz@320")]].ravel()
    fast = data.x[[data.example_ids.index("b_2_fast.npz@320")]].ravel()
    assert np.allclose(slow, fast, atol=0.02 * np.abs(slow).max())      # the 1500 Hz tone is gone
    assert data.split_json()["test_examples"][0] == "a_1.npz@750"


def test_signal_errors_name_the_field(tmp_path: Path) -> None:
    write_signals(tmp_path / "sig")
    base = dict(source="signals", path="sig", files=r"([ab])_\d+(?:_fast)?\.npz", key="X", sample_rate=1000,
                file_rates=("_fast=4000",), window=64)
    cases = [
        (dict(file_rates=("_fast=2500",)), r"data\.file_rates\[0\]: b_2_fast\.npz at 2500 Hz is not an integer"),
        (dict(file_rates=("4000",)), r"data\.file_rates\[0\]: expected '<regex>=<Hz>', got '4000'"),
        (dict(sample_rate=0), r"data\.file_rates: needs data\.sample_rate"),
        (dict(files=r"(z)_\d+\.npz"), r"data\.files: .* matches no \.npz or \.npy file name"),
        (dict(files=r"[ab]_1\.npz"), r"data\.files: .* has no group"),
        (dict(key="Z"), r"data\.key: a_1\.npz has no array 'Z' \(arrays: X, Y\)"),
        (dict(key=""), r"data\.key: a_1\.npz holds several arrays"),
        (dict(window=800), r"data\.test_tail: class 'a' has no test examples"),
        (dict(window=2000), r"data\.window: 2000 samples do not fit"),
        (dict(test_every=4), r"data\.test_every: does not apply to data\.source 'signals'"),
        (dict(path="nope"), r"data\.path: .*nope is not a folder"),
        (dict(path="broken"), r"data\.path: cannot read .*b_1\.npz"),
    ]
    write_signals(tmp_path / "broken")
    (tmp_path / "broken" / "b_1.npz").write_bytes(b"")
    for fields, message in cases:
        with pytest.raises(EdgeccError, match=message):
            load_dataset(DataSection(**{**base, **fields}), 0, tmp_path)


def test_recipe_paths_are_relative_to_the_recipe_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "d.tsv").write_text("".join(f"{'ab'[i % 2]}\tword {i % 2}\n" for i in range(10)))
    (folder / "recipe.toml").write_text('[data]\nsource = "text"\npath = "d.tsv"\nformat = "tsv"\ntest_every = 5\n')
    monkeypatch.chdir(tmp_path)
    loaded = load_recipe(folder / "recipe.toml")
    data = load_dataset(loaded.recipe.data, loaded.recipe.seed, loaded.path.parent)
    assert data.name == "d.tsv" and list(data.test_index) == [4, 9]


def test_digits_manifest_keeps_only_the_fields_that_apply() -> None:
    pytest.importorskip("sklearn")
    pre = load_dataset(DataSection(), 0).preprocessing.to_json()
    assert set(pre) == {"raw", "layout", "input_shape", "scale", "offset"}


def shared(name: str) -> Path:
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"the reference data {path} is absent (see DESIGN.md, 'Data for tests and benchmarks')")
    return SHARED


def test_real_neu_det() -> None:
    needs_train_extra()
    section = DataSection(source="images", path="neu_det/images", image_size=16,
                          test_pattern=r"_(24[1-9]|2[5-9][0-9]|300)\.[a-z]+$")
    data = load_dataset(section, 0, shared("neu_det"))
    assert data.x.shape == (1800, 16, 16, 1) and len(data.test_index) == 360 and data.num_classes == 6
    assert "rolled-in_scale" in data.label_names and np.bincount(data.y[data.test_index]).tolist() == [60] * 6


def test_real_trec() -> None:
    section = DataSection(source="text", path="trec/train_5500.label", test_path="trec/TREC_10.label",
                          format="label-text", label_pattern="^([^:]+)", encoding="latin-1")
    data = load_dataset(section, 0, shared("trec"))
    assert (len(data.train_index), len(data.test_index)) == (5452, 500)
    assert data.label_names == ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
    assert np.bincount(data.y[data.test_index]).tolist() == [9, 138, 94, 65, 81, 113]
    words = np.sort((data.x[data.train_index] > 0).sum(axis=1))  # no word is [PAD]; 1% of questions are cut
    assert data.x.shape[1] == words[int(np.ceil(0.99 * len(words))) - 1] == 24


def test_real_cwru_bearing() -> None:
    section = DataSection(source="signals", path="cwru_bearing/1797rpm", key="DE", sample_rate=12000,
                          files=r"1797_(Normal|(?:B|IR|OR@6)_(?:7|14|21))(?:_DE12)?\.npz",
                          file_rates=(r"1797_Normal\.npz=48000",))
    data = load_dataset(section, 0, shared("cwru_bearing"))
    assert data.num_classes == 10 and data.x.shape[1:] == (1, 1024, 1)
    counts = np.bincount(data.y, minlength=10)
    normal = data.label_names.index("Normal")     # 243,938 samples at 48 kHz: about half a 12 kHz fault file
    assert counts[normal] == pytest.approx(counts.max() / 2, rel=0.05)


def test_real_sms_spam() -> None:
    section = DataSection(source="text", path="sms_spam/SMSSpamCollection", format="tsv", header=True, test_every=5)
    data = load_dataset(section, 0, shared("sms_spam"))
    assert len(data.y) == 5574 and len(data.test_index) == 1114 and data.label_names == ("ham", "spam")
    assert np.bincount(data.y).tolist() == [4827, 747]


def test_standardize_makes_each_example_zero_mean_unit_variance(tmp_path: Path) -> None:
    needs_train_extra()
    folder = flat_images(tmp_path / "images")
    for n in range(1, 13):  # give the images some texture, differently lit per class
        from PIL import Image

        pixels = (np.random.default_rng(n).random((12, 12)) * 60 + 20 * n).astype(np.uint8)
        Image.fromarray(pixels, "L").save(folder / f"crazing_{n}.png")
    section = DataSection(source="images", path=str(folder), image_size=12, test_every=4, standardize=True)
    data = load_dataset(section, 0)
    textured = data.x[data.y == data.label_names.index("crazing")]
    np.testing.assert_allclose(textured.mean(axis=(1, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(textured.std(axis=(1, 2, 3)), 1, atol=0.03)  # std / (std + 1e-3)
    assert "std(x)" in data.preprocessing.to_json()["standardize"]
    with pytest.raises(EdgeccError, match="standardize"):
        load_dataset(DataSection(source="text", path=str(tmp_path / "t.tsv"), format="tsv", standardize=True), 0)


@pytest.mark.parametrize(("task", "train", "test"), [("neu_det", 1440, 360), ("trec", 5452, 500)])
def test_reference_recipes_read_their_data_with_the_fixed_split(task: str, train: int, test: int) -> None:
    shared(task)
    if task == "neu_det":  # images need Pillow
        needs_train_extra()
    loaded = load_recipe(Path(__file__).resolve().parents[1] / "models" / f"{task}.toml")
    data = load_dataset(loaded.recipe.data, loaded.recipe.seed, loaded.path.parent)
    assert (len(data.train_index), len(data.test_index)) == (train, test)


def test_cwru_recipe_tests_on_the_last_fifth_of_each_recording() -> None:
    shared("cwru_bearing")
    loaded = load_recipe(Path(__file__).resolve().parents[1] / "models" / "cwru_bearing.toml")
    data = load_dataset(loaded.recipe.data, loaded.recipe.seed, loaded.path.parent)
    assert data.num_classes == 10 and data.preprocessing.sample_rate == 12000
    share = len(data.test_index) / len(data.y)
    assert 0.15 < share < 0.2  # windows straddling the 80% cut belong to neither split


def test_image_size_comes_from_the_training_images_when_the_recipe_leaves_it_unset(tmp_path: Path) -> None:
    needs_train_extra()
    from PIL import Image

    sizes = {"ok": [(30, 20), (22, 40), (300, 300)], "scratch": [(24, 24), (50, 16), (300, 300)]}
    for label, shapes in sizes.items():
        for n, shape in enumerate(shapes, start=1):
            (tmp_path / "crops" / label).mkdir(parents=True, exist_ok=True)
            Image.new("L", shape, 9).save(tmp_path / "crops" / label / f"{n}.png")
    data = load_dataset(DataSection(source="images", path="crops", test_pattern=r"3\.png$"), 0, tmp_path)
    # training shorter sides 20, 22, 24, 16 (the 300 px images are the test split): median 21
    assert data.x.shape[1:] == (21, 21, 1) and data.preprocessing.input_shape == (21, 21, 1)
    assert data.notes[0].startswith("data.image_size: 21 from the data (median shorter side of the training images 21 px")
    capped = load_dataset(DataSection(source="images", path="crops", test_pattern=r"1\.png$"), 0, tmp_path)
    assert capped.x.shape[1] == 128 and "median shorter side of the training images 161 px, at most 128" in capped.notes[0]
    fixed = load_dataset(DataSection(source="images", path="crops", test_pattern=r"3\.png$", image_size=8), 0, tmp_path)
    assert fixed.x.shape[1] == 8 and fixed.notes == ()
