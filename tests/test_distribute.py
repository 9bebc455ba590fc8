"""[train] distribute: TF_CONFIG checked field by field, and distillation across two real local workers
(tf.distribute.MultiWorkerMirroredStrategy over gRPC on localhost) reaching the single-process accuracy."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_train_extra
from edgecc.errors import EdgeccError
from edgecc.recipe import load_recipe
from edgecc.train.distribute import cluster_task, writes_files

TWO_WORKERS = {"cluster": {"worker": ["localhost:2222", "localhost:2223"]}, "task": {"type": "worker", "index": 1}}

# A worker of the two: a small teacher trained by edgecc's teacher.train (the same seed gives the same teacher on
# each worker), then a linear student distilled from it by edgecc's distill across both workers; the chief first
# distils the same student alone, in this process only, and writes both accuracies to <out>/result.json. The strategy comes first, as
# MultiWorkerMirroredStrategy must.
WORKER = """
import json, os, sys
from pathlib import Path
import numpy as np
from edgecc.data import load_dataset
from edgecc.progress import Reporter
from edgecc.recipe import DataSection, TaskSection, TrainSection
from edgecc.train import distribute
from edgecc.train.distill import DistillWeights, distill
from edgecc.train.teacher import make_reproducible, train
from edgecc.train.tf import keras

def mlp(*widths):
    layers = keras().layers
    return keras().Sequential([layers.Flatten(input_shape=(8, 8, 1)),
                               *(layers.Dense(w, activation="relu") for w in widths), layers.Dense(10)])

distribute.strategy("multi-worker")
chief = distribute.writes_files("multi-worker")
digits = load_dataset(DataSection(), seed=0)
x, y, x_test = digits.x[digits.train_index], digits.y[digits.train_index], digits.x[digits.test_index]
section = TrainSection(epochs=3, batch_size=128, learning_rate=2e-2, validation_fraction=0.0, augment_shift=0)
make_reproducible(0)
teacher = train(mlp(64), digits, section, 0, Reporter(quiet=True), task=TaskSection())  # the same on each worker
results = {}
for mode in ["none", "multi-worker"] if chief else ["multi-worker"]:
    keras().utils.set_random_seed(1)
    with distribute.scope(mode):
        student = mlp()
        losses = distill(student, teacher, x, y, epochs=2, batch_size=128, learning_rate=2e-2,
                         weights=DistillWeights(), seed=0, reporter=Reporter(quiet=True))
        outputs = student.predict(x_test, batch_size=128, verbose=0)
    results[mode] = {"accuracy": float(np.mean(np.argmax(outputs, -1) == digits.y[digits.test_index])),
                     "losses": losses}
if chief:
    (Path(sys.argv[1]) / "result.json").write_text(json.dumps(results))
os._exit(0)  # at once: TensorFlow takes seconds to shut its gRPC server down
"""


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.parametrize("config, message", [
    (None, "TF_CONFIG is not set"),
    ("{cluster", "TF_CONFIG is not JSON"),
    ({"cluster": {"ps": ["h:1"]}, "task": {"type": "ps", "index": 0}}, r"TF_CONFIG.cluster.ps: .*only chief and worker"),
    ({"cluster": {"worker": ["nohost"]}, "task": {"type": "worker", "index": 0}},
     r"TF_CONFIG.cluster.worker: \['nohost'\] must be a list of 'host:port'"),
    ({**TWO_WORKERS, "task": {"type": "worker", "index": 2}}, "TF_CONFIG.task.index: 2 is not an index of cluster.worker"),
    ({**TWO_WORKERS, "task": {"type": "chief", "index": 0}}, "TF_CONFIG.task.type: 'chief' is not a task list"),
    ({"cluster": {}}, r"TF_CONFIG.cluster must be .*; TF_CONFIG.task must be"),
])
def test_a_missing_or_malformed_tf_config_is_named(config: object, message: str) -> None:
    environ = {} if config is None else {"TF_CONFIG": config if isinstance(config, str) else json.dumps(config)}
    with pytest.raises(EdgeccError, match=message):
        cluster_task(environ)


def test_only_the_chief_writes_files(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cluster_task({"TF_CONFIG": json.dumps({**TWO_WORKERS, "task": {"type": "worker", "index": 0}})}).chief
    assert not cluster_task({"TF_CONFIG": json.dumps(TWO_WORKERS)}).chief
    with_chief = {"cluster": {"chief": ["h:1"], "worker": ["h:2"]}, "task": {"type": "worker", "index": 0}}
    assert not cluster_task({"TF_CONFIG": json.dumps(with_chief)}).chief
    monkeypatch.setenv("TF_CONFIG", json.dumps(TWO_WORKERS))
    assert not writes_files("multi-worker") and writes_files("mirrored") and writes_files("none")


def test_the_recipe_names_a_strategy(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[train]\ndistribute = "mirrored"\n')
    assert load_recipe(recipe).recipe.train.distribute == "mirrored"
    recipe.write_text('[train]\ndistribute = "ring"\n')
    with pytest.raises(EdgeccError, match="train.distribute"):
        load_recipe(recipe)


def test_a_multi_worker_build_without_tf_config_stops_before_any_work(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from edgecc.build import build

    monkeypatch.delenv("TF_CONFIG", raising=False)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[train]\ndistribute = "multi-worker"\n')
    with pytest.raises(EdgeccError, match="TF_CONFIG is not set"):
        build("rpi4", recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_two_workers_distil_to_the_single_process_accuracy(tmp_path: Path) -> None:
    """Two local CPU workers split every global batch of 128 and sum their gradients: the student they distil
    reaches the accuracy of the same distillation in one process within half a point; only worker 0 (the chief)
    writes files."""
    needs_train_extra()
    ports = free_ports(2)
    cluster = {"worker": [f"localhost:{port}" for port in ports]}
    processes = []
    for index in range(2):
        out = tmp_path / f"worker{index}"
        out.mkdir()
        config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "CUDA_VISIBLE_DEVICES": "", "TF_CONFIG": config}
        processes.append(subprocess.Popen([sys.executable, "-c", WORKER, str(out)], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for index, process in enumerate(processes):
        output = process.communicate(timeout=240)[0]
        assert process.returncode == 0, f"worker {index}: {output[-3000:]}"
    results = json.loads((tmp_path / "worker0" / "result.json").read_text())
    single, multi = results["none"], results["multi-worker"]
    assert not any((tmp_path / "worker1").iterdir())
    assert single["accuracy"] > 0.7, single
    assert abs(multi["accuracy"] - single["accuracy"]) <= 0.005, (single, multi)
