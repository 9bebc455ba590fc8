"""Conversion of the batch-1 Keras graph to TFLite: float32, and full-integer int8.

Full integer means int8 weights, int8 activations and an int8 input and output,
with ranges calibrated on training examples only (never the test split).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from edgecc.progress import native_output_silenced
from edgecc.train.tf import tensorflow


def compact_names(content: bytes) -> bytes:
    """The same model with each tensor named by its first name only.

    The converter names a fused tensor after every op folded into it, joined by
    ';' (with TF-MOT's fake-quant paths, hundreds of bytes each): about 8% of a
    small int8 file. The first name is the one the float graph shares.
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(content, 0)
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            tensor.name = tensor.name.split(b";")[0]
    builder = flatbuffers.Builder(len(content))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def to_float_tflite(model: Any) -> bytes:
    tf = tensorflow()
    with native_output_silenced():
        return compact_names(tf.lite.TFLiteConverter.from_keras_model(model).convert())


def to_int8_tflite(model: Any, calibration: np.ndarray, per_channel: bool) -> bytes:
    """Post-training full-integer quantization calibrated on `calibration` examples.

    `per_channel=False` quantizes fully connected weights per tensor: on small
    transformers the per-channel scales and 64-bit zero points cost about 12
    bytes per output channel, a large share of the int8 file.
    """
    from edgecc.train.layers import int8_graph

    tf = tensorflow()

    dtype = model.inputs[0].dtype.as_numpy_dtype  # float32, or int32 token ids for text models

    def representative() -> Iterator[list[np.ndarray]]:
        for example in calibration:
            yield [example[np.newaxis].astype(dtype)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    converter._experimental_disable_per_channel_quantization_for_dense_layers = not per_channel
    with native_output_silenced(), warnings.catch_warnings(), int8_graph():
        # the converter warns that the int8 input has no range statistics: it takes them from calibration
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
        return compact_names(converter.convert())
