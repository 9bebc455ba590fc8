"""The default `edgecc build --target rpi4`, checked from its artifacts alone."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import edgecc, edgecc_command, killed_after, needs_train_extra
from edgecc.cost import op_costs
from edgecc.reader import read_graph
from edgecc.report import markdown

ROOT = Path(__file__).parents[1]


def test_accuracy_and_size(default_build) -> None:
    out, manifest, result = default_build
    metrics = manifest["metrics"]
    assert json.loads(result.stdout) == manifest
    assert metrics["int8_accuracy"] >= 0.95
    assert metrics["float_accuracy"] - metrics["int8_accuracy"] <= 0.01
    float_size, int8_size = (out / "float.tflite").stat().st_size, (out / "model.tflite").stat().st_size
    assert float_size / int8_size >= 3.5, (float_size, int8_size)
    assert all(b["status"] == "pass" for b in manifest["budgets"])


def test_every_activation_tensor_is_int8(default_build) -> None:
    """Read the flatbuffer directly: every tensor computed at run time must be int8."""
    from ai_edge_litert import schema_py_generated as schema

    out, _, _ = default_build
    model = schema.ModelT.InitFromPackedBuf((out / "model.tflite").read_bytes(), 0)
    graph = model.subgraphs[0]
    computed = set(graph.inputs) | set(graph.outputs) | {o for op in graph.operators for o in op.outputs}
    assert computed
    for index in computed:
        tensor = graph.tensors[index]
        assert tensor.type == schema.TensorType.INT8, tensor.name


def _accuracy(model: Path, indices: list[int], pre: dict) -> float:
    """A model file's accuracy on digits examples, fed as the manifest's preprocessing says, with LiteRT alone."""
    from ai_edge_litert.interpreter import Interpreter
    from sklearn.datasets import load_digits

    digits = load_digits()
    interpreter = Interpreter(model_path=str(model), num_threads=1)
    interpreter.allocate_tensors()
    inp, outp = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert list(inp["shape"]) == pre["model_input_shape"] and pre["layout"] == "NHWC"
    (in_scale, in_zero), (out_scale, out_zero) = inp["quantization"], outp["quantization"]
    correct = 0
    for i in indices:
        x = (digits.images[i].astype(np.float32) * pre["scale"] + pre["offset"]).reshape(pre["model_input_shape"])
        if inp["dtype"] == np.int8:
            x = np.clip(np.round(x / in_scale) + in_zero, -128, 127).astype(np.int8)
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        logits = interpreter.get_tensor(outp["index"])[0].astype(np.float32)
        if outp["dtype"] == np.int8:
            logits = (logits - out_zero) * out_scale
        correct += pre["label_names"][int(np.argmax(logits))] == str(digits.target[i])
    return correct / len(indices)


def test_third_party_reproduces_int8_accuracy(default_build) -> None:
    """Only model.tflite, manifest.json, the public dataset and the interpreter: no edgecc code."""
    out, manifest, _ = default_build
    pre = manifest["preprocessing"]
    assert manifest["data"]["dataset"] == "sklearn-digits"
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(out / "model.tflite"))  # _accuracy reads these from the file itself
    for details, key in ((interpreter.get_input_details(), "input_quantization"),
                         (interpreter.get_output_details(), "output_quantization")):
        assert list(details[0]["quantization"]) == pytest.approx([pre[key]["scale"], pre[key]["zero_point"]])
    assert _accuracy(out / "model.tflite", manifest["data"]["test_indices"], pre) == \
        pytest.approx(manifest["metrics"]["int8_accuracy"], abs=1e-12)


def test_the_choice_is_made_on_a_validation_split_held_out_of_training_not_on_the_test_split(default_build) -> None:
    """The validation examples are training examples (never test ones), about train.validation_fraction of them;
    every kept model's accuracy on them, recomputed from its file with LiteRT, is the figure the choice used."""
    out, manifest, _ = default_build
    data = manifest["data"]
    validation, test = data["validation_indices"], set(data["test_indices"])
    assert len(set(validation)) == len(validation) and not test & set(validation)
    assert set(validation) <= set(range(1797)) and len(validation) == pytest.approx(0.1 * data["train_size"], abs=10)
    for record in manifest["metrics"]["stages"]:
        assert _accuracy(out / record["file"], validation, manifest["preprocessing"]) == \
            pytest.approx(record["validation"]["accuracy"], abs=1e-12), record["name"]
        assert _accuracy(out / record["file"], data["test_indices"], manifest["preprocessing"]) == \
            pytest.approx(record["accuracy"], abs=1e-12), record["name"]


def test_each_model_records_its_student_before_the_int8_conversion(default_build) -> None:
    """The teacher is the student of the post-training baseline: its Keras figure on the validation split is the
    float teacher's, recomputed here from float.tflite with LiteRT. Every model names its student's figure, and the
    report sets each beside its int8 figure."""
    out, manifest, _ = default_build
    records, validation = manifest["metrics"]["stages"], manifest["data"]["validation_indices"]
    baseline = next(r for r in records if r["name"] == "int8 after ptq of the teacher")
    teacher = _accuracy(out / "float.tflite", validation, manifest["preprocessing"])
    assert baseline["validation"]["student_task_metric"] == pytest.approx(teacher, abs=1.5 / len(validation))
    report = (out / "report.md").read_text()
    assert "Where the accuracy goes, on the validation split: float teacher" in report
    for record in records[1:]:
        student = record["validation"]["student_task_metric"]
        assert 0 < student <= 1
        assert (f"{record['name']}: its student {student:.4f} before the conversion, "
                f"{record['validation']['task_metric']:.4f} as int8") in report


def test_manifest_records_provenance(default_build) -> None:
    out, manifest, _ = default_build
    for name, entry in manifest["artifacts"].items():
        data = (out / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
    assert set(manifest["artifacts"]) == {p.name for p in out.iterdir()} - {"manifest.json"}
    default_recipe = ROOT / "models" / "digits.toml"
    assert manifest["recipe"]["sha256"] == hashlib.sha256(default_recipe.read_bytes()).hexdigest()
    assert manifest["seed"] == 0 and manifest["target"]["name"] == "rpi4"
    for library in ("tensorflow", "tf-keras", "ai-edge-litert", "numpy", "python"):
        assert manifest["versions"][library][0].isdigit()
    reproducibility = manifest["reproducibility"]
    assert reproducibility["seed"] == 0 and reproducibility["deterministic"] is True  # built on this CPU
    assert reproducibility["versions"]["edgecc"] == manifest["edgecc_version"]
    assert reproducibility["versions"]["tensorflow"] == manifest["versions"]["tensorflow"]
    latency = manifest["metrics"]["host_latency"]
    assert latency["float"]["threads"] == latency["int8"]["threads"] == 1
    assert latency["int8"]["median_ms"] > 0 and latency["float"]["median_ms"] > 0
    test, train_size = manifest["data"]["test_indices"], manifest["data"]["train_size"]
    assert len(set(test)) == len(test) == manifest["data"]["test_size"] and len(test) + train_size == 1797


def test_the_default_build_prunes_heads_and_neurons_and_trains_quantization_aware(default_build) -> None:
    """Read from each stage's kept int8 file: the teacher's PTQ has every head, the pruned and QAT students half
    (recipe defaults: head_fraction = neuron_fraction = 0.5); every activation is int8 and attention is one
    FULLY_CONNECTED per head and product (never BATCH_MATMUL); each distillation's loss fell."""
    import tomllib

    out, manifest, _ = default_build
    model = tomllib.loads((ROOT / "models" / "digits.toml").read_text())["model"]
    heads, depth, mlp = model["heads"], model["depth"], model["mlp_dim"]
    records = {r["name"]: r for r in manifest["metrics"]["stages"]}
    kept = {"int8 after ptq of the teacher": heads, "int8 after prune": heads // 2, "int8 after qat": heads // 2}
    macs = {}
    for name, kept_heads in kept.items():
        graph = read_graph((out / records[name]["file"]).read_bytes())
        macs[name] = sum(cost.macs for cost in op_costs(graph))
        ops = graph.op_counts()
        assert {t.dtype for t in graph.activation_tensors()} == {"INT8"}, name
        assert "BATCH_MATMUL" not in ops and ops["SOFTMAX"] == kept_heads * depth, (name, ops)
        products = [op for op in graph.operators
                    if op.kind == "FULLY_CONNECTED" and not graph.tensors[op.inputs[1]].constant]
        assert len(products) == 2 * kept_heads * depth, name
        widths = {graph.tensors[op.outputs[0]].shape[-1] for op in graph.operators
                  if op.kind == "FULLY_CONNECTED" and graph.tensors[op.inputs[1]].constant}
        assert (mlp in widths) == (kept_heads == heads), (name, widths)  # the feed-forward layer's neurons
    teacher = records["int8 after ptq of the teacher"]
    for name in ("int8 after prune", "int8 after qat"):
        assert records[name]["parameters"] < teacher["parameters"] and records[name]["bytes"] < teacher["bytes"]
        assert macs[name] < 0.8 * macs["int8 after ptq of the teacher"], macs
    for name in ("int8 after prune", "int8 after qat"):
        losses = records[name]["distill_losses"]
        assert len(losses) == 10 and np.isfinite(losses).all() and losses[-1] < losses[0], (name, losses)


def test_build_checks_the_target_budgets(default_build) -> None:
    out, manifest, _ = default_build
    check = manifest["target_check"]
    assert check["target"] == "rpi4" and check["ok"] is True
    names = {b["name"] for b in check["budgets"]}
    assert names == {"operators", "RAM", "flash", "latency"}
    assert {f"{name} on rpi4" for name in names} <= {b["name"].rsplit(" (", 1)[0] for b in manifest["budgets"]}
    result = edgecc("check", str(out), "--target", "rpi4", "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["budgets"] == check["budgets"]


def test_report_shows_the_measured_figures(default_build) -> None:
    out, manifest, _ = default_build
    report = (out / "report.md").read_text()
    assert f"{manifest['metrics']['int8_accuracy']:.4f}" in report
    assert f"{manifest['metrics']['size_ratio']:.2f}x smaller" in report
    assert "rpi4" in report


def test_per_class_figures_agree_with_the_predictions(default_build) -> None:
    """The final model's per-class figures, recomputed from the manifest's predictions and the public labels."""
    from sklearn.datasets import load_digits

    out, manifest, result = default_build
    names = manifest["preprocessing"]["label_names"]
    target = load_digits().target
    labels = [names.index(str(target[i])) for i in manifest["data"]["test_indices"]]
    predicted = manifest["data"]["int8_test_predictions"]
    records = manifest["metrics"]["stages"]
    chosen = next(r for r in records if r["file"] == "model.tflite")
    final = chosen["classes"]
    for c, figures in enumerate(final["per_class"]):
        pairs = list(zip(labels, predicted))
        hits = sum(t == p == c for t, p in pairs)
        assert figures["name"] == names[c] and figures["support"] == labels.count(c)
        assert figures["predicted"] == predicted.count(c)
        assert figures["recall"] == pytest.approx(hits / labels.count(c))
        assert figures["precision"] == pytest.approx(hits / predicted.count(c))
        assert final["confusion"][c] == [sum(t == c and p == q for t, p in pairs) for q in range(len(names))]
    recalls = [sum(t == p == c for t, p in zip(labels, predicted)) / labels.count(c) for c in range(len(names))]
    assert final["balanced_accuracy"] == pytest.approx(sum(recalls) / len(recalls))
    assert final["accuracy"] == pytest.approx(manifest["metrics"]["int8_accuracy"])
    assert final["majority_baseline"] == max(labels.count(c) for c in range(len(names))) / len(labels)
    assert [r["classes"]["accuracy"] for r in records] == pytest.approx([r["accuracy"] for r in records])
    # a good model on balanced data: no warning in the manifest, the report or on stderr
    assert manifest["warnings"] == [] and all(r["classes"]["warnings"] == [] for r in records)
    assert "edgecc: warning" not in result.stderr
    report = (out / "report.md").read_text()
    assert "## Warnings" not in report
    assert f"## Per class ({chosen['name']}, model.tflite)" in report
    assert f"balanced accuracy (mean recall over classes) {final['balanced_accuracy']:.4f}" in report
    first = final["per_class"][0]
    assert (f"| {first['name']} | {first['support']} | {first['predicted']} | {first['precision']:.3f} | "
            f"{first['recall']:.3f} |") in report
    assert "| true class | " + " | ".join(names) + " |" in report
    assert "<th>true class</th>" in (out / "report.html").read_text()
    warned = markdown({**manifest, "warnings": ["float teacher (float.tflite): a class is never predicted"]})
    assert warned.index("## Warnings\n\n- float teacher (float.tflite): a class is never predicted") < \
        warned.index("## Result")


def test_interrupted_build_keeps_the_previous_result(default_build, tmp_path: Path) -> None:
    out, _, _ = default_build
    target = tmp_path / "rpi4"
    shutil.copytree(out, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    process = subprocess.Popen([edgecc_command(), "build", "--target", "rpi4", "--out", str(target), "--no-cache"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    with killed_after(process, 600):
        for line in process.stderr:  # SIGTERM once the teacher is training: the build is under way, nothing written
            if "training float teacher" in line:
                break
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["rpi4"]


def test_build_from_a_users_keras_file_with_a_budget_it_misses(tmp_path: Path) -> None:
    """A user's model of standard Keras layers is rewritten and built; a budget it misses exits 1, artifacts kept."""
    needs_train_extra()
    from edgecc.train.tf import keras as load_keras

    keras = load_keras()
    layers = keras.layers
    inputs = keras.Input((8, 8, 1))
    x = layers.Reshape((16, 16))(layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(inputs))
    h = layers.LayerNormalization(epsilon=1e-6)(x)
    x = x + layers.MultiHeadAttention(num_heads=2, key_dim=8)(h, h)
    x = x + layers.Dense(16)(layers.Dense(32, activation="relu")(layers.LayerNormalization()(x)))
    outputs = layers.Dense(10)(layers.GlobalAveragePooling1D()(x))
    keras.Model(inputs, outputs).save(tmp_path / "mine.keras")
    (tmp_path / "recipe.toml").write_text(
        'name = "mine"\n[model]\npath = "mine.keras"\n[train]\nepochs = 2\n[compress]\ncalibration_samples = 32\n'
        'stages = ["prune", "ptq"]\nhead_fraction = 1.0\ndistill_epochs = 1\nhidden_weight = 0.5\n'
        '[budgets]\nmin_accuracy = 1.0\n'
    )
    result = edgecc("build", "--target", "rpi4", "--recipe", str(tmp_path / "recipe.toml"),
                    "--out", str(tmp_path / "out"), "--quiet")
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith("edgecc: budget not met: int8 accuracy is ")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    # the warnings follow the verdict, one line each, without changing the exit code
    warned = [line for line in result.stderr.splitlines() if line.startswith("edgecc: warning: ")]
    assert warned == [f"edgecc: warning: {w}" for w in manifest["warnings"]]
    assert manifest["model"]["source"].endswith("mine.keras")
    assert manifest["model"]["activation_dtypes"] == ["INT8"]
    # the rewritten attention in the int8 graph: Q·Kᵀ and the context as one FULLY_CONNECTED per head,
    # its weights an activation (no BATCH_MATMUL, TFLite's slow int8 form)
    assert "BATCH_MATMUL" not in manifest["model"]["ops"]
    graph = read_graph((tmp_path / "out" / "model.tflite").read_bytes())
    assert graph.op_counts() == manifest["model"]["ops"]
    products = [op for op in graph.operators if op.kind == "FULLY_CONNECTED" and not graph.tensors[op.inputs[1]].constant]
    assert len(products) == 2 * 2  # 2 products x 2 heads, 1 block
    # every distinct int8 model is kept and listed once (ptq after prune quantizes the same student: one row);
    # no model meets every budget, so model.tflite is the closest: the best task.metric of those failing the fewest
    records = manifest["metrics"]["stages"]
    assert [r["name"] for r in records] == ["float teacher", "int8 after ptq of the teacher", "int8 after prune = ptq"]
    assert records[0]["file"] == "float.tflite" and {r["file"] for r in records} <= set(manifest["artifacts"])
    assert all((tmp_path / "out" / r["file"]).is_file() for r in records)
    students = records[1:]
    assert not any(r["meets_budgets"] or r["validation"]["meets_budgets"] for r in students)
    assert manifest["selection"]["judged_on"] == "validation"
    # the choice by the validation figures: the highest task.metric of those failing the fewest budgets there, where
    # a figure within one standard error of the highest is a tie that the later (and here faster) model wins
    fewest = min(r["validation"]["failed_budgets"] for r in students)
    closest = [i for i, r in enumerate(students) if r["validation"]["failed_budgets"] == fewest]
    metric = [r["validation"]["task_metric"] for r in students]
    noise = manifest["selection"]["task_metric_standard_errors"]
    top = max(closest, key=lambda i: (metric[i], i))
    chosen = next(r for r in students if r["file"] == "model.tflite")
    assert chosen is students[max(i for i in closest if metric[top] - metric[i] <= noise[top][i] + 1e-9)]
    assert chosen["budgets"] == manifest["budgets"] and manifest["selection"]["chosen"] == chosen["name"]
    assert manifest["selection"]["meeting_every_budget"] == []
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Where the bytes go" in report and "| conv2d | 208 |" in report  # 3x3x1x16 int8 + 16 int32 bias
    partition = manifest["edgetpu_partition"]  # an rpi4 build still says what would leave a Coral's Edge TPU
    assert partition["target"] == "coral-usb" and len(partition["on_tpu"]) == len(graph.operators)
    assert "## Operators that leave the Edge TPU (coral-usb)" in report
    first = manifest["budgets"][0]
    assert (first["name"], first["value"], first["limit"], first["status"]) == \
        ("int8 accuracy", manifest["metrics"]["int8_accuracy"], ">= 1.0", "fail")


def test_the_same_seed_gives_the_same_bytes_twice_in_one_process() -> None:
    """Training and QAT of a tiny recipe run twice in this process, as scripts/bench_compression.py runs
    its builds one after another; other models built in between must not change the second run's bytes."""
    needs_train_extra()
    from dataclasses import replace

    from edgecc.data import load_dataset
    from edgecc.progress import Reporter
    from edgecc.recipe import CompressSection, DataSection, ModelSection, TaskSection, TrainSection
    from edgecc.train.compress import run_stages
    from edgecc.train.teacher import starting_model, train

    full = load_dataset(DataSection(), seed=0)
    data = replace(full, train_index=full.train_index[:64], test_index=full.test_index[:64])
    model = ModelSection(stem_filters=(8,), stem_strides=(2,), dim=16, depth=1, heads=2, mlp_dim=32, dropout=0.1)
    training = TrainSection(epochs=1, batch_size=32)
    stages = CompressSection(stages=("qat",), distill_epochs=1, calibration_samples=16)
    calibration = data.x[data.train_index[:16]]

    def built(seed: int) -> list[bytes]:
        teacher = train(starting_model(model, None, data, seed), data, training, seed, Reporter(quiet=True),
                        task=TaskSection())
        return [stage.int8 for stage in run_stages(teacher, data, stages, training, seed, calibration,
                                                   Reporter(quiet=True))]

    first = built(seed=3)
    assert len(first) == 1 and built(seed=3) == first
