"""Write the small real TFLite models that TensorFlow-free tests read, into tests/fixtures/.

Made with edgecc's own converter (edgecc.train, so this script needs `edgecc[train]`), exactly as
tests/conftest.py's `tiny_models` makes them, seeded so that a rerun gives the same models:

- `vit_int8.tflite`: edgecc's vision transformer (one conv stem layer, 1 block, dim 32, 2 heads,
  MLP 64) on 8x8x1 inputs, 10 classes, full int8 (per-tensor), calibrated on 16 seeded random inputs.
- `vit_float.tflite`: the same network in float32.
- `gelu_int8.tflite`: Flatten -> Dense(16, GELU) -> Dense(10), full int8 (GELU is a builtin that
  TFLite Micro lacks).
- `ssd_postprocess.tflite`: a tiny SSD-style detector, int8 convolutions with float I/O ending in the
  TFLite_Detection_PostProcess custom operator (64 anchors, 3 classes, 10 detections), made the way
  the TensorFlow Object Detection API exports one for TFLite (a tf.function that implements it).

    python scripts/make_fixtures.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"


def models() -> dict[str, bytes]:
    """The fixture models by name, built from seed 0."""
    from edgecc.train.convert import to_float_tflite, to_int8_tflite
    from edgecc.train.layers import keras
    from edgecc.train.teacher import inference_graph
    from edgecc.train.transformer import VitConfig, text_transformer, vision_transformer

    keras.utils.set_random_seed(0)
    calibration = np.random.default_rng(0).random((16, 8, 8, 1), dtype=np.float32)
    config = VitConfig(stem_filters=(8,), stem_strides=(2,), dim=32, depth=1, heads=2, mlp_dim=64, dropout=0.0)
    vit = inference_graph(vision_transformer(config, (8, 8, 1), 10))
    inputs = keras.Input(batch_shape=(1, 8, 8, 1))
    x = keras.layers.Dense(16, activation="gelu")(keras.layers.Flatten()(inputs))
    gelu = keras.Model(inputs, keras.layers.Dense(10)(x))
    text = text_transformer(VitConfig(stem_filters=(), stem_strides=(), dim=8, depth=1, heads=2, mlp_dim=16,
                                      dropout=0.0), sequence_length=8, vocabulary_size=50, num_classes=3, batch_size=1)
    ids = np.random.default_rng(0).integers(0, 50, (8, 8)).astype(np.int32)
    return {
        "vit_int8": to_int8_tflite(vit, calibration, per_channel=False),
        "vit_float": to_float_tflite(vit),
        "gelu_int8": to_int8_tflite(gelu, calibration, per_channel=False),
        "text_int8": to_int8_tflite(text, ids, per_channel=False),  # a text transformer: GATHER first
        "ssd_postprocess": _detector(keras),
    }


def _detector(keras: Any) -> bytes:
    """Two conv heads (boxes, class scores) over 64 anchors and the detection post-processing custom operator."""
    from edgecc.train.tf import tensorflow

    tf = tensorflow()
    attributes = {"max_detections": "i: 10", "max_classes_per_detection": "i: 1", "use_regular_nms": "b: false",
                  "nms_score_threshold": "f: 0.3", "nms_iou_threshold": "f: 0.6", "y_scale": "f: 10.0",
                  "x_scale": "f: 10.0", "h_scale": "f: 5.0", "w_scale": "f: 5.0", "num_classes": "i: 3"}
    implements = " ".join(['name: "TFLite_Detection_PostProcess"']
                          + [f'attr {{ key: "{k}" value {{ {v} }} }}' for k, v in attributes.items()])

    @tf.function(experimental_implements=implements)
    def post_process(boxes: Any, scores: Any, anchors: Any) -> tuple[Any, ...]:
        # the converter replaces this body by the custom operator; the constants only give it four outputs
        return tuple(tf.constant(0.0, name=name) for name in ("boxes", "classes", "scores", "num_detections"))

    rng = np.random.default_rng(0)
    anchors = tf.constant(rng.uniform(0.1, 0.9, (64, 4)).astype(np.float32))
    inputs = keras.Input(batch_shape=(1, 16, 16, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inputs)
    boxes = keras.layers.Reshape((64, 4))(keras.layers.Conv2D(4, 1)(x))
    scores = keras.layers.Reshape((64, 4))(keras.layers.Conv2D(4, 1, activation="sigmoid")(x))
    heads = keras.Model(inputs, [boxes, scores])

    @tf.function(input_signature=[tf.TensorSpec((1, 16, 16, 3), tf.float32)])
    def detect(images: Any) -> tuple[Any, ...]:
        return post_process(*heads(images), anchors)

    converter = tf.lite.TFLiteConverter.from_concrete_functions([detect.get_concrete_function()], heads)
    converter.allow_custom_ops = True
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([rng.random((1, 16, 16, 3), dtype=np.float32)] for _ in range(8))
    return converter.convert()


def main() -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for name, content in models().items():
        path = FIXTURES / f"{name}.tflite"
        path.write_bytes(content)
        print(f"wrote {path} ({len(content):,} bytes)")


if __name__ == "__main__":
    main()
