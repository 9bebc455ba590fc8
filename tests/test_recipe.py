from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import edgecc, needs_train_extra
from edgecc import schema
from edgecc.errors import EdgeccError
from edgecc.recipe import default_recipe_path, load_recipe
from edgecc.schema import spec
from test_cli import assert_clean_failure

ROOT = Path(__file__).parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def test_default_recipe_is_valid_and_hashed() -> None:
    loaded = load_recipe()
    assert loaded.path == default_recipe_path()
    assert loaded.recipe.model.dim % loaded.recipe.model.heads == 0
    assert len(loaded.sha256) == 64


@pytest.mark.parametrize("text", ["", "# nothing yet\n", 'name = "mine"\nseed = 3\n', "[train]\n"])
def test_empty_recipe_is_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(EdgeccError, match=r"recipe .*recipe\.toml is empty: .*to build the default recipe omit --recipe"):
        load_recipe(write(tmp_path, text))


@pytest.mark.parametrize("recipe", sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("models/**/*.toml")))
def test_every_shipped_recipe_loads(recipe: str) -> None:
    assert load_recipe(ROOT / recipe).recipe.train.epochs >= 1


def test_missing_recipe(tmp_path: Path) -> None:
    with pytest.raises(EdgeccError, match="does not exist"):
        load_recipe(tmp_path / "nope.toml")


def test_malformed_toml(tmp_path: Path) -> None:
    with pytest.raises(EdgeccError, match="not valid TOML"):
        load_recipe(write(tmp_path, "[train\nepochs = 3"))


def test_every_problem_is_reported_with_its_field(tmp_path: Path) -> None:
    text = """
seed = -1
[train]
epochs = "ten"
batch_sise = 4
[model]
stem_filters = [8, "x"]
[compress]
stages = ["magic"]
"""
    with pytest.raises(EdgeccError) as err:
        load_recipe(write(tmp_path, text))
    message = str(err.value)
    assert "\n" not in message
    for expected in ("seed: -1 is below the minimum 0", "train.epochs: expected an integer, got 'ten'",
                     "train.batch_sise: unknown field", "model.stem_filters[1]: expected an integer",
                     "compress.stages[0]: 'magic' is not one of 'prune', 'mix', 'qat', 'ptq'"):
        assert expected in message


def test_bool_is_not_an_integer_and_int_is_a_number(tmp_path: Path) -> None:
    with pytest.raises(EdgeccError, match="train.epochs: expected an integer, got True"):
        load_recipe(write(tmp_path, "[train]\nepochs = true"))
    assert load_recipe(write(tmp_path, "[train]\nlearning_rate = 1")).recipe.train.learning_rate == 1.0


def test_cross_field_checks(tmp_path: Path) -> None:
    text = "[model]\ndim = 30\nheads = 4\nstem_filters = [8]\nstem_strides = [1, 2]"
    with pytest.raises(EdgeccError) as err:
        load_recipe(write(tmp_path, text))
    message = str(err.value)
    assert "model.heads: 4 does not divide model.dim 30" in message
    assert "same length" in message
    with pytest.raises(EdgeccError, match=r"model\.path: .*missing\.keras does not exist"):
        load_recipe(write(tmp_path, "[model]\npath = 'missing.keras'"))


def test_stages_must_end_with_one_quantization(tmp_path: Path) -> None:
    for stages, problem in ((["prune"], "must end with exactly one of 'qat' or 'ptq'"),
                            (["qat", "ptq"], "must end with exactly one of 'qat' or 'ptq'"),
                            (["prune", "prune", "ptq"], "names a stage twice"),
                            (["mix", "prune", "ptq"], "'prune' must come before 'mix'"),
                            (["sparsify", "mix", "qat"], "'mix' must come before 'sparsify'")):
        with pytest.raises(EdgeccError, match=problem):
            load_recipe(write(tmp_path, f"[compress]\nstages = {stages}"))
    assert load_recipe(write(tmp_path, "[compress]\nstages = ['prune', 'qat']")).recipe.compress.stages == ("prune", "qat")
    mixed = load_recipe(write(tmp_path, "[compress]\nstages = ['prune', 'mix', 'sparsify', 'qat']")).recipe.compress
    assert mixed.stages == ("prune", "mix", "sparsify", "qat")


def test_nan_and_infinity_are_refused_by_field(tmp_path: Path) -> None:
    text = "[train]\nlearning_rate = nan\nweight_decay = -inf\n[budgets]\nmax_latency_ms = inf\n"
    with pytest.raises(EdgeccError) as err:
        load_recipe(write(tmp_path, text))
    message = str(err.value)
    for expected in ("train.learning_rate: nan is not a finite number", "train.weight_decay: -inf is not a finite number",
                     "budgets.max_latency_ms: inf is not a finite number"):
        assert expected in message


@dataclass(frozen=True)
class Gains:
    gains: tuple[float, ...] = spec((1.0,), positive=True)


def test_every_item_of_a_list_is_checked_and_named_by_its_index() -> None:
    with pytest.raises(EdgeccError) as err:
        schema.parse(Gains, {"gains": [1.0, float("nan"), 0, float("inf")]}, "gains.toml")
    assert str(err.value) == ("gains.toml: gains[1]: nan is not a finite number; gains[2]: 0.0 must be above 0; "
                              "gains[3]: inf is not a finite number")
    assert schema.parse(Gains, {"gains": [0.5, 2]}, "gains.toml").gains == (0.5, 2.0)


@dataclass(frozen=True)
class Floors:
    floors: dict[str, float] = spec(dict, minimum=0.0, maximum=1.0)
    drop: float | None = spec(None, minimum=0.0)


def test_every_value_of_a_table_is_checked_and_named_by_its_key() -> None:
    with pytest.raises(EdgeccError) as err:
        schema.parse(Floors, {"floors": {"crack": 1.5, "dent": "high", "scratch": float("nan"), "pit": 0.9}}, "f.toml")
    # limits are checked once every value has its type, as for a list
    assert str(err.value) == "f.toml: floors.dent: expected a number, got 'high'"
    with pytest.raises(EdgeccError) as err:
        schema.parse(Floors, {"floors": {"crack": 1.5, "scratch": float("nan"), "pit": 0.9}}, "f.toml")
    assert str(err.value) == ("f.toml: floors.crack: 1.5 is above the maximum 1.0; "
                              "floors.scratch: nan is not a finite number")
    with pytest.raises(EdgeccError, match=r"f\.toml: floors: expected a table of numbers, got 0\.9$"):
        schema.parse(Floors, {"floors": 0.9}, "f.toml")
    parsed = schema.parse(Floors, {"floors": {"crack": 1, "pit": 0.5}}, "f.toml")
    assert parsed.floors == {"crack": 1.0, "pit": 0.5} and isinstance(parsed.floors["crack"], float)
    assert parsed.drop is None and Floors().floors == {} and Floors().floors is not Floors().floors


def test_a_table_and_an_absent_optional_field_round_trip_through_toml() -> None:
    import tomllib

    written = Floors(floors={"crack": 0.95, "rolled-in scale": 0.9})
    text = schema.dump(written, ())
    assert text == 'floors = { crack = 0.95, "rolled-in scale" = 0.9 }\n'  # drop is absent: TOML has no null
    assert schema.parse(Floors, tomllib.loads(text), "f.toml") == written


def test_budgets_on_class_figures(tmp_path: Path) -> None:
    text = ("[task]\nmetric = 'balanced_accuracy'\n[compress]\nselect = 'smallest'\n[budgets]\n"
            "min_recall = { 3 = 0.95, 8 = 0.9 }\nmin_balanced_accuracy = 0.9\nmin_macro_f1 = 0.85\nmax_metric_drop = 1.5\n")
    recipe = load_recipe(write(tmp_path, text)).recipe
    assert recipe.budgets.min_recall == {"3": 0.95, "8": 0.9}
    assert (recipe.budgets.min_balanced_accuracy, recipe.budgets.min_macro_f1, recipe.budgets.max_metric_drop) == \
        (0.9, 0.85, 1.5)
    assert recipe.compress.select == "smallest" and load_recipe().recipe.compress.select == "fastest"
    assert load_recipe().recipe.budgets.max_metric_drop is None
    bad = "[compress]\nselect = 'cheapest'\n[budgets]\nmin_recall = { 3 = 1.2 }\nmax_metric_drop = -1\n"
    with pytest.raises(EdgeccError) as err:
        load_recipe(write(tmp_path, bad))
    message = str(err.value)
    for expected in ("compress.select: 'cheapest' is not one of 'fastest', 'best', 'smallest', 'last'",
                     "budgets.min_recall.3: 1.2 is above the maximum 1.0",
                     "budgets.max_metric_drop: -1.0 is below the minimum 0.0"):
        assert expected in message


def test_class_names_are_checked_against_the_data() -> None:
    from dataclasses import replace

    from edgecc.recipe import BudgetsSection, Recipe, TaskSection, check_class_names

    names = ("crack", "dent", "ok")
    check_class_names(Recipe(task=TaskSection(metric="recall", classes=("crack",)),
                             budgets=BudgetsSection(min_recall={"dent": 0.9})), names)
    recipe = Recipe(budgets=BudgetsSection(min_recall={"crack": 0.9, "Crack": 0.9, "pit": 0.5}))
    with pytest.raises(EdgeccError) as err:
        check_class_names(recipe, names)
    assert str(err.value) == ("budgets.min_recall: no class 'Crack', 'pit' in the data "
                              "(the data's classes: crack, dent, ok)")
    with pytest.raises(EdgeccError, match=r"^task\.classes: no class 'pit' in the data \(the data's classes"):
        check_class_names(replace(Recipe(), task=TaskSection(metric="recall", classes=("pit",))), names)


def test_positive_figures_refuse_zero(tmp_path: Path) -> None:
    text = "[train]\nlearning_rate = 0\n[compress]\nstages = ['qat']\ndistill_learning_rate = 0.0\nqat_learning_rate = 0\n"
    with pytest.raises(EdgeccError) as err:
        load_recipe(write(tmp_path, text))
    message = str(err.value)
    assert "train.learning_rate: 0.0 must be above 0" in message
    assert "compress.distill_learning_rate: 0.0 must be above 0" in message
    assert "qat_learning_rate" not in message          # 0 means: the distillation's rate


def test_zero_epochs_only_for_a_users_model(tmp_path: Path) -> None:
    with pytest.raises(EdgeccError, match=r"train\.epochs: 0 would leave the reference architecture untrained"):
        load_recipe(write(tmp_path, "[train]\nepochs = 0"))
    (tmp_path / "mine.keras").write_bytes(b"")
    assert load_recipe(write(tmp_path, "[model]\npath = 'mine.keras'\n[train]\nepochs = 0")).recipe.train.epochs == 0


def test_fields_that_do_not_apply_are_refused_all_at_once(tmp_path: Path) -> None:
    text = """
[model]
architecture = "minilm"
stem_filters = [8]
dim = 32
[data]
source = "text"
path = "d.txt"
tokenizer = "minilm"
format = "label-text"
label_column = "1"
min_count = 3
window = 64
[train]
augment_flip = true
[compress]
stages = ["prune", "ptq"]
sparsity = 0.8
progressive = true
vocabulary_fraction = 0.5
"""
    with pytest.raises(EdgeccError) as err:
        load_recipe(write(tmp_path, text))
    message = str(err.value)
    for expected in ("model.stem_filters: [8] applies to model.architecture 'vit', not 'minilm'",
                     "model.dim: 32 applies to model.architecture 'vit' or 'text', not 'minilm'",
                     "data.label_column: '1' applies to data.format 'csv' or 'tsv', not 'label-text'",
                     "data.min_count: 3 applies to data.tokenizer 'words', not 'minilm'",
                     "data.window: 64 applies to data.source 'signals', not 'text'",
                     "train.augment_flip: True applies to data.source 'sklearn-digits' or 'images', not 'text'",
                     "compress.sparsity: 0.8 applies to compress.stages with 'sparsify', not ['prune', 'ptq']",
                     "compress.progressive: True applies to compress.stages with 'qat', not ['prune', 'ptq']"):
        assert expected in message
    assert "vocabulary_fraction" not in message and message.count("applies to") == 8


@pytest.mark.parametrize("metric, written, resolved", [
    ("accuracy", None, "none"),  # accuracy weighs the classes by their frequency: balancing would cost it
    ("balanced_accuracy", None, "sampling"),
    ("macro_f1", None, "sampling"),
    ("recall", None, "sampling"),
    ("accuracy", "sampling", "sampling"),  # a balance the recipe names is kept
    ("balanced_accuracy", "weights", "weights"),
])
def test_balance_auto_follows_the_metric(tmp_path: Path, metric: str, written: str | None, resolved: str) -> None:
    text = f"[task]\nmetric = '{metric}'\n" + (f"[train]\nbalance = '{written}'\n" if written else "")
    assert load_recipe(write(tmp_path, text)).recipe.train.balance == resolved


def test_applicability_follows_the_recipe_and_ignores_defaults(tmp_path: Path) -> None:
    with pytest.raises(EdgeccError, match=r"compress\.head_fraction: 0\.5 applies to compress\.stages with 'prune'"):
        load_recipe(write(tmp_path, "[compress]\nhead_fraction = 0.5"))
    with pytest.raises(EdgeccError, match=r"model\.depth: 3 applies to an empty model\.path, not 'mine\.keras'"):
        load_recipe(write(tmp_path, "[model]\npath = 'mine.keras'\ndepth = 3"))
    with pytest.raises(EdgeccError, match=r"data\.path: 'x' applies to data\.source 'images' or 'text' or 'signals'"):
        load_recipe(write(tmp_path, "[data]\npath = 'x'"))
    signals = "[data]\nsource = 'signals'\npath = 'x'\nwindow = 64\n[compress]\nstages = ['sparsify', 'qat']\nsparsity = 0.7"
    recipe = load_recipe(write(tmp_path, signals)).recipe
    assert recipe.data.window == 64 and recipe.data.image_size == 0 and recipe.compress.sparsity == 0.7


@pytest.mark.parametrize(("text", "fragment"), [
    ("", "is empty: no table sets a field"),
    ("[train]\nepochs = 0", "train.epochs: 0 would leave the reference architecture untrained"),
    ("[train]\nlearning_rate = nan", "train.learning_rate: nan is not a finite number"),
    ("[data]\nsource = 'images'\npath = 'imgs'\nwindow = 512", "data.window: 512 applies to data.source 'signals', not 'images'"),
    ("[compress]\nsparsity = 0.7", "compress.sparsity: 0.7 applies to compress.stages with 'sparsify', not ['ptq']"),
    ("[task]\nmetric = 'recall'\nclasses = ['ten']\n[budgets]\nmin_recall = { nine = 0.9, 3 = 0.95 }",
     "task.classes: no class 'ten' in the data; budgets.min_recall: no class 'nine' in the data (the data's classes: "
     "0, 1, 2, 3, 4, 5, 6, 7, 8, 9)"),
], ids=["empty", "zero-epochs", "nan-rate", "window-on-images", "sparsity-without-sparsify", "unknown-classes"])
def test_the_build_refuses_a_bad_recipe_and_keeps_the_previous_output(tmp_path: Path, text: str,
                                                                      fragment: str) -> None:
    previous = tmp_path / "out" / "model.tflite"
    previous.parent.mkdir()
    previous.write_bytes(b"the previous build")
    before = set(tmp_path.rglob("*"))
    if "task.classes" in fragment:
        needs_train_extra()  # the class names come from the data: the digits need scikit-learn
    result = edgecc("build", "--target", "rpi4", "--recipe", str(write(tmp_path, text)), "--out", str(previous.parent),
                    cwd=tmp_path)
    assert_clean_failure(result, fragment, tmp_path, before | {tmp_path / "recipe.toml"})
    assert previous.read_bytes() == b"the previous build"
