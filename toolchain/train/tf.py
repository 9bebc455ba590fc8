"""The one place that imports TensorFlow, so the rest of edgecc can stay TensorFlow-free.

TF-MOT only works with Keras 2 (tf_keras), which TensorFlow uses only when
TF_USE_LEGACY_KERAS=1 is set before the first TensorFlow import.
"""

from __future__ import annotations

import os
from types import ModuleType

from edgecc.progress import native_output_silenced


def tensorflow() -> ModuleType:
    """Import TensorFlow with legacy Keras selected and its C++ logging quietened."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        with native_output_silenced():  # absl logs CUDA probing to fd 2 before any setting applies
            import tensorflow as tf

            tf.config.list_physical_devices()
    except ImportError as err:
        from edgecc.errors import EdgeccError

        raise EdgeccError(
            "building needs TensorFlow: install edgecc with its training extra, "
            "pip install 'edgecc[train]'"
        ) from err
    tf.get_logger().setLevel("ERROR")
    return tf


def keras() -> ModuleType:
    """tf_keras (Keras 2), the Keras that TF-MOT and the TFLite converter expect."""
    tensorflow()
    import tf_keras

    return tf_keras
