"""Training across devices and machines with TensorFlow's own tf.distribute strategies (`[train] distribute`).

- "none": the plain single-process training, unchanged (same seed, same bytes).
- "mirrored": tf.distribute.MirroredStrategy, one replica per device of this machine.
- "multi-worker": tf.distribute.MultiWorkerMirroredStrategy; every worker runs the same build with the
  cluster in the TF_CONFIG environment variable, as TensorFlow defines it:
  `{"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", "index": 0}}`.

Under a strategy the models, their compile and their optimizers are created inside `scope()`, and the
recipe's `batch_size` is the global batch, split across the replicas, so a step learns from as many
examples as on one machine. Only the chief (worker 0, or the "chief" task) writes files; the other
workers compute their share and exit 0. A multi-worker build does not use the build cache: a worker that found
a cached teacher would skip steps the others wait for.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgecc.errors import EdgeccError
from edgecc.recipe import DISTRIBUTE

TASK_TYPES = ("chief", "worker")  # what MultiWorkerMirroredStrategy trains with ("ps" is another strategy's)
EXAMPLE = '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}'


@dataclass(frozen=True)
class ClusterTask:
    """This process's place in the TF_CONFIG cluster."""

    type: str
    index: int
    has_chief: bool

    @property
    def chief(self) -> bool:
        """The chief writes the build: the "chief" task, or worker 0 when the cluster names no chief."""
        return self.type == "chief" or (not self.has_chief and self.index == 0)


def cluster_task(environ: dict[str, str] | None = None) -> ClusterTask:
    """The task TF_CONFIG gives this process; EdgeccError naming TF_CONFIG when it is missing or malformed.

    Checked here rather than by TensorFlow, whose own errors come late (at the first collective) or as a
    traceback that does not say which part of the variable is wrong.
    """
    raw = (os.environ if environ is None else environ).get("TF_CONFIG", "")
    if not raw.strip():
        raise EdgeccError("TF_CONFIG is not set: train.distribute = 'multi-worker' needs the cluster, "
                          f"e.g. {EXAMPLE}")
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise EdgeccError(f"TF_CONFIG is not JSON ({err.msg} at character {err.pos}); "
                          f"expected e.g. {EXAMPLE}") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    problems = []
    if not isinstance(cluster, dict) or not cluster:
        problems.append("TF_CONFIG.cluster must be a table of task lists, e.g. {\"worker\": [\"host:port\", ...]}")
        cluster = {}
    for name, addresses in cluster.items():
        if name not in TASK_TYPES:
            problems.append(f"TF_CONFIG.cluster.{name}: multi-worker training has only "
                            f"{' and '.join(TASK_TYPES)} tasks")
        elif (not isinstance(addresses, list) or not addresses
              or not all(isinstance(a, str) and a.rpartition(":")[2].isdigit() for a in addresses)):
            problems.append(f"TF_CONFIG.cluster.{name}: {addresses!r} must be a list of 'host:port' strings")
    if len(cluster.get("chief", [])) > 1:
        problems.append("TF_CONFIG.cluster.chief: at most one chief")
    if not isinstance(task, dict):
        problems.append("TF_CONFIG.task must be a table {\"type\": \"worker\", \"index\": N}")
        task = {}
    kind, index = task.get("type"), task.get("index")
    if task and kind not in cluster:
        problems.append(f"TF_CONFIG.task.type: {kind!r} is not a task list of the cluster ({', '.join(cluster)})")
    elif task and (not isinstance(index, int) or isinstance(index, bool)
                   or not 0 <= index < len(cluster[kind] if isinstance(cluster[kind], list) else ())):
        problems.append(f"TF_CONFIG.task.index: {index!r} is not an index of cluster.{kind}")
    if problems:
        raise EdgeccError("; ".join(problems))
    return ClusterTask(kind, index, "chief" in cluster)


def writes_files(mode: str) -> bool:
    """Whether this process writes the build's files and cache: always, except a multi-worker build's non-chiefs."""
    return mode != "multi-worker" or cluster_task().chief


@functools.cache
def strategy(mode: str) -> Any:
    """The process's one strategy of `mode` (None for "none").

    Created once: MultiWorkerMirroredStrategy connects to the other workers and configures TensorFlow's
    collective operations for the whole process, which can be done only once.
    """
    if mode == "none":
        return None
    from edgecc.train.tf import tensorflow

    if mode == "mirrored":
        return tensorflow().distribute.MirroredStrategy()
    if mode == "multi-worker":
        cluster_task()  # a clear error before TensorFlow reads TF_CONFIG
        tf = tensorflow()
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as err:  # "Collective ops must be configured at program startup"
            raise EdgeccError("train.distribute = 'multi-worker' must start before TensorFlow runs anything in "
                              f"the process: run one multi-worker build per process ({err})") from None
    raise EdgeccError(f"train.distribute: {mode!r} is not one of {', '.join(DISTRIBUTE)}")


@contextlib.contextmanager
def scope(mode: str) -> Iterator[None]:
    """Inside: models, compiles and optimizers belong to `mode`'s strategy (nothing changes for "none")."""
    chosen = strategy(mode)
    with chosen.scope() if chosen is not None else contextlib.nullcontext():
        yield


def active() -> Any:
    """The strategy of the scope the caller runs in, or None outside any (the plain single-process path)."""
    from edgecc.train.tf import tensorflow

    tf = tensorflow()
    return tf.distribute.get_strategy() if tf.distribute.has_strategy() else None


def replica_batches(chosen: Any, *arrays: np.ndarray) -> tuple[Any, ...]:
    """One global batch split into consecutive, nearly equal parts, one per replica of every worker.

    Every worker holds the same global batch (same data, same seed), so each takes its replicas' parts and
    together they see each example once.
    """
    from edgecc.train.tf import tensorflow

    tf = tensorflow()

    def part(array: np.ndarray) -> Callable[[Any], Any]:
        def value(context: Any) -> Any:
            pieces = np.array_split(array, context.num_replicas_in_sync)
            return tf.constant(pieces[context.replica_id_in_sync_group])
        return value

    return tuple(chosen.experimental_distribute_values_from_function(part(a)) for a in arrays)
