"""Latency estimator against published measurements, out of sample only.

Rebuilds every architecture of benchmarks/latency_measurements.toml (random weights give
the same ops, shapes and MACs), converts it to TFLite, and for each row fits the
estimator's per-class coefficients (each within the physical range BOUNDS gives) and kernel
factors on the other models only (leave-one-model-out), then estimates the row on its
device's profile with the row's kernel library. Leave-one-device-out is reported too
for classes with several boards. Writes the fitted coefficients and the held-out error
band of each class to toolchain/latency_model.toml (what `edgecc check` reads) and the
table to BENCHMARKS.md.

    python scripts/bench_estimator.py            # models are cached in benchmarks/models/estimator
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import least_squares

from edgecc.calibrate import MAX_SPLIT, calibrated_ms, calibration_factors
from edgecc.check import assess, crossing_bytes
from edgecc.cost import op_costs
from edgecc.latency import (CPU_CLASS, MAC_TERMS, MODEL_FILE, Band, ClassModel, Measurement, estimate_latency,
                            fp32_macs_per_cycle, int8_macs_per_cycle, kernels_of, load_measurements)
from edgecc.targets import KERNELS, load_target

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / "models" / "estimator"
DATASET = ROOT / "benchmarks" / "latency_measurements.toml"
# runtimes whose kernels edgecc models: CMSIS-NN's (TFLite Micro, microTVM, ONNC), LiteRT's and the Edge TPU's
MODELLED = ("tflite-micro", "microtvm-cmsis-nn", "onnc-cmsis-nn", "tflite", "litert-xnnpack", "edgetpu")
CPU_FEATURES = ("op_cycles", "bytes", *(f"{k}_{p}" for p in ("int8", "fp32") for k in ("gemm", "depthwise", "elementwise")))
TPU_FEATURES = ("tpu_op_us", "tpu_macs", "invoke_ms", "link")
UNIT = ClassModel({}, {}, Band(1.0, 1.0, 0))
# Physically sensible range of each coefficient, so that the fit cannot trade one term for another: CPU work
# terms are cycles per operator, per MAC on one thread at the core's peak rate for the MAC's precision
# (cpu.fp32_macs_per_cycle, cpu.int8_macs_per_cycle: each coefficient at least 1), per element; bytes and the host
# link are multiples of the profile's bandwidth; tpu_macs a multiple of the time at peak rate (>= 1), tpu_op_us
# microseconds. Cortex-M4/M7/M33 with the DSP extension: SMLAD is 2 int8 MACs a cycle, and SXTB16 unpacking and
# loads make ~1 cycle a MAC the floor of an int8 GEMM, scalar C 4-10. NEON: 4 fp32 or 16 int8 MACs per
# instruction; thread dispatch is tens of microseconds.
BOUNDS: dict[str, dict[str, tuple[float, float]]] = {
    "cortex-m": {"op_cycles": (100, 20_000), "bytes": (0, 2),
                 "gemm_int8": (2, 16), "depthwise_int8": (2, 32), "elementwise_int8": (4, 100),
                 "gemm_fp32": (2, 20), "depthwise_fp32": (2, 40), "elementwise_fp32": (2, 50)},
    "cortex-a": {"op_cycles": (1_000, 200_000), "bytes": (0.3, 5),
                 "gemm_int8": (1, 32), "depthwise_int8": (1, 128), "elementwise_int8": (2, 320),
                 "gemm_fp32": (1, 12), "depthwise_fp32": (1, 40), "elementwise_fp32": (1, 80)},
    "edgetpu": {"tpu_op_us": (0, 100), "tpu_macs": (1, 10), "invoke_ms": (0.1, 5), "link": (0.7, 2)},
}
KERNEL_BOUNDS = (0.2, 5.0)  # a kernel library's factor against the class's reference one
# The fit's loss, one rule for every class: Cauchy's (scipy's least_squares) of r = log(estimate / published) with
# f_scale 0.25, a row's pull r / (1 + (r / 0.25)^2) largest 25% off and falling beyond, so that a single doubtful
# published figure cannot drag a class's coefficients and so every other row's estimate (soft L1 or Huber, whose pull
# stays constant, let tests/test_estimator.py's row 2.2 times off move the others' coefficients 3-4 times as far).
ROBUST: dict[str, Any] = {"loss": "cauchy", "f_scale": 0.25}
REFERENCE_KERNELS = {"cortex-m": "tflite-micro", "cortex-a": "litert-xnnpack"}
# The least time any kernels can take for a row's rebuilt model on its board: its multiply-accumulates at the cores'
# peak for their precision (edgecc.latency's MAC terms with coefficient 1) and the Edge TPU's, plus the bytes that
# cross the host link every inference at the link's signalling rate (USB 3.0 and PCIe Gen 2 x1, the Coral boards'
# links, both signal at 5 Gbit/s; 8b/10b coding leaves 4). A published figure below its row's floor cannot be of the
# rebuilt architecture: the row is shown with its floor and neither fitted nor counted.
LINK_SIGNALLING_BYTES_PER_S = 5e9 / 8


def _mobilenet_v1(keras: Any) -> Any:
    return keras.applications.MobileNet(weights=None, input_shape=(224, 224, 3))


def _mobilenet_v2(keras: Any) -> Any:
    return keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3))


def _mobilenet_v3_large(keras: Any) -> Any:
    return keras.applications.MobileNetV3Large(weights=None, input_shape=(224, 224, 3), include_preprocessing=False)


def _mobilenet_v3_small(keras: Any) -> Any:
    return keras.applications.MobileNetV3Small(weights=None, input_shape=(224, 224, 3), include_preprocessing=False)


def _mobilenet_v2_030_80(keras: Any) -> Any:
    """The model of Plumerai's Cortex-M comparison: MobileNet v2 at width 0.30 on 80x80x3, 1000 classes."""
    return keras.applications.MobileNetV2(weights=None, alpha=0.3, input_shape=(80, 80, 3))


def _mobilenet_v1_025_128(keras: Any) -> Any:
    """MobileNet v1 at width 0.25 on 128x128x3, 1000 classes (Coral's smallest image classifier)."""
    return keras.applications.MobileNet(weights=None, alpha=0.25, input_shape=(128, 128, 3))


def _mobilenet_v1_025_96_vww(keras: Any) -> Any:
    """MLPerf Tiny visual wake words: MobileNet v1 at width 0.25 on 96x96x3, two classes."""
    return keras.applications.MobileNet(weights=None, alpha=0.25, input_shape=(96, 96, 3), classes=2)


def _ds_cnn_kws(keras: Any) -> Any:
    """MLPerf Tiny keyword spotting DS-CNN: 49x10 MFCC input, 64 filters, 4 depthwise-separable blocks."""
    layers = keras.layers
    inputs = keras.Input((49, 10, 1))
    x = layers.Conv2D(64, (10, 4), strides=(2, 2), padding="same", use_bias=False)(inputs)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    for _ in range(4):
        x = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
        x = layers.ReLU()(layers.BatchNormalization()(x))
        x = layers.Conv2D(64, 1, use_bias=False)(x)
        x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.AveragePooling2D(pool_size=(x.shape[1], x.shape[2]))(x)
    return keras.Model(inputs, layers.Dense(12, activation="softmax")(layers.Flatten()(x)))


def _resnet8_ic(keras: Any) -> Any:
    """MLPerf Tiny image classification ResNet-8: 32x32x3 input, three residual stacks of 16/32/64 filters."""
    layers = keras.layers
    inputs = keras.Input((32, 32, 3))
    x = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(16, 3, padding="same")(inputs)))
    for filters, stride in ((16, 1), (32, 2), (64, 2)):
        y = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(filters, 3, stride, padding="same")(x)))
        y = layers.BatchNormalization()(layers.Conv2D(filters, 3, padding="same")(y))
        shortcut = x if stride == 1 else layers.Conv2D(filters, 1, stride)(x)
        x = layers.ReLU()(layers.Add()([shortcut, y]))
    x = layers.AveragePooling2D(pool_size=x.shape[1])(x)
    return keras.Model(inputs, layers.Dense(10, activation="softmax")(layers.Flatten()(x)))


def _fc_autoencoder_ad(keras: Any) -> Any:
    """MLPerf Tiny anomaly detection: a 640-input dense autoencoder, 4x128, a bottleneck of 8, 4x128, 640."""
    layers = keras.layers
    inputs = keras.Input((640,))
    x = inputs
    for units in (128, 128, 128, 128, 8, 128, 128, 128, 128):
        x = layers.ReLU()(layers.BatchNormalization()(layers.Dense(units)(x)))
    return keras.Model(inputs, layers.Dense(640)(x))


def _conv(keras: Any, x: Any, filters: int, size: Any, stride: int = 1, padding: str = "same",
          relu: bool = True) -> Any:
    """A convolution without bias, then batch norm and (unless `relu` is False) ReLU: the unit of the slim and
    EfficientNet builds below, whose batch norms the converter folds into the convolution."""
    layers = keras.layers
    x = layers.BatchNormalization()(layers.Conv2D(filters, size, stride, padding=padding, use_bias=False)(x))
    return layers.ReLU()(x) if relu else x


def _inception_v1_224(keras: Any) -> Any:
    """GoogLeNet as TF-slim's inception_v1 builds it (Coral's Inception v1): batch-normalised convolutions, the
    "5x5" branch of each inception block a 3x3 convolution, MaxPool_5a 2x2, 1001 classes, 224x224x3."""
    layers, conv = keras.layers, partial(_conv, keras)
    inputs = keras.Input((224, 224, 3))
    x = layers.MaxPooling2D(3, 2, padding="same")(conv(inputs, 64, 7, 2))
    x = layers.MaxPooling2D(3, 2, padding="same")(conv(conv(x, 64, 1), 192, 3))
    blocks = {"3b": (64, 96, 128, 16, 32, 32), "3c": (128, 128, 192, 32, 96, 64), "4b": (192, 96, 208, 16, 48, 64),
              "4c": (160, 112, 224, 24, 64, 64), "4d": (128, 128, 256, 24, 64, 64), "4e": (112, 144, 288, 32, 64, 64),
              "4f": (256, 160, 320, 32, 128, 128), "5b": (256, 160, 320, 32, 128, 128),
              "5c": (384, 192, 384, 48, 128, 128)}
    for name, (b0, b1a, b1b, b2a, b2b, b3) in blocks.items():
        x = layers.Concatenate()([conv(x, b0, 1), conv(conv(x, b1a, 1), b1b, 3), conv(conv(x, b2a, 1), b2b, 3),
                                  conv(layers.MaxPooling2D(3, 1, padding="same")(x), b3, 1)])
        if name == "3c":
            x = layers.MaxPooling2D(3, 2, padding="same")(x)
        elif name == "4f":
            x = layers.MaxPooling2D(2, 2, padding="same")(x)
    x = layers.Conv2D(1001, 1)(layers.AveragePooling2D(7)(x))
    return keras.Model(inputs, layers.Softmax()(layers.Flatten()(x)))


def _inception_v4_299(keras: Any) -> Any:
    """Inception v4 as TF-slim builds it (Coral's Inception v4, Szegedy et al. 2016): the stem, 4 Inception-A,
    Reduction-A, 7 Inception-B, Reduction-B and 3 Inception-C blocks, batch-normalised convolutions, 1001 classes,
    299x299x3."""
    layers, conv = keras.layers, partial(_conv, keras)

    def chain(x: Any, *steps: tuple[int, Any]) -> Any:
        for filters, size in steps:
            x = conv(x, filters, size)
        return x

    def pool(x: Any) -> Any:
        return layers.MaxPooling2D(3, 2, padding="valid")(x)

    def avg(x: Any, filters: int) -> Any:
        return conv(layers.AveragePooling2D(3, 1, padding="same")(x), filters, 1)

    inputs = keras.Input((299, 299, 3))
    x = conv(conv(conv(inputs, 32, 3, 2, "valid"), 32, 3, padding="valid"), 64, 3)
    x = layers.Concatenate()([pool(x), conv(x, 96, 3, 2, "valid")])
    x = layers.Concatenate()([conv(conv(x, 64, 1), 96, 3, padding="valid"),
                              conv(chain(x, (64, 1), (64, (1, 7)), (64, (7, 1))), 96, 3, padding="valid")])
    x = layers.Concatenate()([conv(x, 192, 3, 2, "valid"), pool(x)])
    for _ in range(4):
        x = layers.Concatenate()([conv(x, 96, 1), chain(x, (64, 1), (96, 3)), chain(x, (64, 1), (96, 3), (96, 3)),
                                  avg(x, 96)])
    x = layers.Concatenate()([conv(x, 384, 3, 2, "valid"), conv(chain(x, (192, 1), (224, 3)), 256, 3, 2, "valid"),
                              pool(x)])
    for _ in range(7):
        x = layers.Concatenate()([conv(x, 384, 1), chain(x, (192, 1), (224, (1, 7)), (256, (7, 1))),
                                  chain(x, (192, 1), (192, (7, 1)), (224, (1, 7)), (224, (7, 1)), (256, (1, 7))),
                                  avg(x, 128)])
    x = layers.Concatenate()([conv(conv(x, 192, 1), 192, 3, 2, "valid"),
                              conv(chain(x, (256, 1), (256, (1, 7)), (320, (7, 1))), 320, 3, 2, "valid"), pool(x)])
    for _ in range(3):
        b1, b2 = conv(x, 384, 1), chain(x, (384, 1), (448, (3, 1)), (512, (1, 3)))
        x = layers.Concatenate()([conv(x, 256, 1), conv(b1, 256, (1, 3)), conv(b1, 256, (3, 1)),
                                  conv(b2, 256, (1, 3)), conv(b2, 256, (3, 1)), avg(x, 256)])
    x = layers.Dense(1001)(layers.Flatten()(layers.AveragePooling2D(8)(x)))
    return keras.Model(inputs, layers.Softmax()(x))


def _efficientnet_edgetpu(depth: float, size: int, width: float = 1.0) -> Callable[[Any], Any]:
    """EfficientNet-EdgeTPU as tensorflow/tpu's efficientnet_edgetpu_builder defines it: a 32-filter 3x3 stride-2
    stem; blocks (repeats, kernel, stride, expansion, output filters, fused) where a fused block is a k x k
    convolution to the expanded width and a 1x1 projection, the others MobileNet v2 inverted bottlenecks; ReLU, no
    squeeze-and-excitation; a 1280-filter head and 1001 classes. `depth` scales the repeats (rounded up), `width`
    every filter count (efficientnet's round_filters: to the nearest multiple of 8, not below 90% of the scaled
    count)."""
    blocks = ((1, 3, 1, 4, 24, True), (2, 3, 2, 8, 32, True), (4, 3, 2, 8, 48, True), (5, 5, 2, 8, 96, False),
              (4, 5, 1, 8, 144, False), (2, 5, 2, 8, 192, False))

    def scaled(filters: int) -> int:
        rounded = max(8, int(filters * width + 4) // 8 * 8)
        return rounded + 8 if rounded < 0.9 * filters * width else rounded

    def build(keras: Any) -> Any:
        layers, conv = keras.layers, partial(_conv, keras)
        inputs = keras.Input((size, size, 3))
        x, current, first = conv(inputs, scaled(32), 3, 2), scaled(32), True
        for repeats, kernel, stride, expand, stated, fused in blocks:
            filters = scaled(stated)
            for i in range(int(np.ceil(depth * repeats))):
                step = stride if i == 0 else 1
                wide = (scaled(24) if first else current) * expand  # the first block's expansion counts from its 24
                if fused:
                    y = conv(x, wide, kernel, step)
                else:
                    y = layers.DepthwiseConv2D(kernel, step, padding="same", use_bias=False)(conv(x, wide, 1))
                    y = layers.ReLU()(layers.BatchNormalization()(y))
                y = conv(y, filters, 1, relu=False)
                x = layers.Add()([x, y]) if step == 1 and current == filters and not first else y
                current, first = filters, False
        x = layers.GlobalAveragePooling2D()(conv(x, scaled(1280), 1))
        return keras.Model(inputs, layers.Softmax()(layers.Dense(1001)(x)))
    return build


def _unet_mv2_128(keras: Any) -> Any:
    """The U-Net of TensorFlow's image segmentation tutorial (Coral's "Unet Mv2"): a MobileNet v2 encoder on
    128x128x3, four pix2pix upsampling blocks (3x3 transposed convolution, stride 2, batch norm, ReLU) of 512, 256,
    128 and 64 filters, each joined to the encoder's skip of its size, and a transposed convolution to 3 classes."""
    layers = keras.layers
    base = keras.applications.MobileNetV2(weights=None, input_shape=(128, 128, 3), include_top=False)
    skips = [base.get_layer(name).output for name in ("block_1_expand_relu", "block_3_expand_relu",
                                                        "block_6_expand_relu", "block_13_expand_relu")]
    x = base.get_layer("block_16_project").output
    for filters, skip in zip((512, 256, 128, 64), reversed(skips)):
        x = layers.Conv2DTranspose(filters, 3, strides=2, padding="same", use_bias=False)(x)
        x = layers.Concatenate()([layers.ReLU()(layers.BatchNormalization()(x)), skip])
    return keras.Model(base.input, layers.Conv2DTranspose(3, 3, strides=2, padding="same")(x))


def _applications(name: str, size: int) -> Callable[[Any], Any]:
    def build(keras: Any) -> Any:
        return getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3))
    build.__doc__ = f"keras.applications.{name} at {size}x{size}x3, 1000 classes (the ImageNet models Coral benchmarks)"
    return build


BUILDERS: dict[str, Callable[[Any], Any]] = {
    "mobilenet_v1": _mobilenet_v1, "mobilenet_v2": _mobilenet_v2,
    "mobilenet_v3_large": _mobilenet_v3_large, "mobilenet_v3_small": _mobilenet_v3_small,
    "mobilenet_v1_025_96_vww": _mobilenet_v1_025_96_vww, "mobilenet_v2_030_80": _mobilenet_v2_030_80,
    "ds_cnn_kws": _ds_cnn_kws,
    "resnet8_ic": _resnet8_ic, "fc_autoencoder_ad": _fc_autoencoder_ad,
    "resnet50_v1_299": _applications("ResNet50", 299), "resnet50_v2_299": _applications("ResNet50V2", 299),
    "resnet152_v2_299": _applications("ResNet152V2", 299),
    "inception_resnet_v2_299": _applications("InceptionResNetV2", 299),
    "vgg16": _applications("VGG16", 224), "vgg19": _applications("VGG19", 224),
    "densenet121": _applications("DenseNet121", 224),
    "inception_v1_224": _inception_v1_224, "inception_v4_299": _inception_v4_299,
    "efficientnet_edgetpu_s": _efficientnet_edgetpu(1.0, 224),
    "efficientnet_edgetpu_m": _efficientnet_edgetpu(1.1, 240),
    "efficientnet_edgetpu_l": _efficientnet_edgetpu(1.4, 300, width=1.2),
    "inception_v3_299": _applications("InceptionV3", 299),
    "mobilenet_v1_025_128": _mobilenet_v1_025_128,
    "unet_mv2_128": _unet_mv2_128,
}


def model_file(name: str, precision: str) -> Path:
    """The converted model, built on first use (batch 1, random weights, random calibration data)."""
    path = CACHE / f"{name}_{precision}.tflite"
    if path.exists():
        return path
    from edgecc.train.convert import to_float_tflite, to_int8_tflite
    from edgecc.train.teacher import inference_graph
    from edgecc.train.tf import keras as load_keras

    keras = load_keras()
    keras.utils.set_random_seed(0)
    model = BUILDERS[name](keras)
    batch_one = inference_graph(model)
    calibration = np.random.default_rng(0).uniform(-1, 1, (4, *model.input_shape[1:])).astype(np.float32)
    content = to_int8_tflite(batch_one, calibration, per_channel=True) if precision == "int8" else to_float_tflite(batch_one)
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    keras.backend.clear_session()
    return path


@dataclass(frozen=True)
class Row:
    """A published measurement with the work the estimator sees in it."""

    index: int
    device: str
    model: str
    precision: str
    runtime: str
    setup: str  # the runtime's version and build as the source states it: one software stack on the board
    published_ms: float
    cls: str  # the device class whose coefficients it fits and is estimated with
    cpu_class: str  # the class of the CPU (an Edge TPU's host)
    kernels: str  # the CPU kernel library
    cpu: dict[str, float]  # feature totals of the operators on the CPU
    tpu: dict[str, float]  # and of the Edge TPU part (empty on a CPU)
    floor_ms: float = 0.0  # the least time the rebuilt model can take on the board (see LINK_SIGNALLING_BYTES_PER_S)


def _totals(latency_of: Callable[[dict[str, ClassModel]], float], names: tuple[str, ...], cls: str) -> dict[str, float]:
    """Each feature's total over the model: the estimate with that one coefficient at 1, every other at 0."""
    zero = {"cortex-a": UNIT, "cortex-m": UNIT, "edgetpu": UNIT}
    return {name: latency_of(zero | {cls: replace(UNIT, coefficients={name: 1.0})}) for name in names}


def featurize(index: int, m: Measurement) -> Row:
    target = load_target(m.device)
    if m.runtime in KERNELS:  # the row's own kernel library, which may differ from the profile's usual one
        target = replace(target, cpu=replace(target.cpu, kernels=m.runtime))
    content = model_file(m.model, m.precision).read_bytes()
    on_tpu, streamed, graph = None, 0, None
    if m.runtime == "edgetpu":
        result = assess(content, target, measure_arena=False)
        graph, on_tpu = result.graph, result.edgetpu.on_tpu
        streamed = result.edgetpu.streamed_parameter_bytes + crossing_bytes(graph, on_tpu)
    else:
        from edgecc.reader import read_graph
        graph = read_graph(content)
    costs = op_costs(graph)
    cpu_class = CPU_CLASS[target.runtime]

    def latency_of(models: dict[str, ClassModel]) -> float:
        return estimate_latency(graph, costs, target, on_tpu, streamed, threads=m.threads, models=models).total_ms

    cls = "edgetpu" if m.runtime == "edgetpu" else cpu_class
    cpu = _totals(latency_of, CPU_FEATURES, cpu_class)
    tpu = _totals(latency_of, TPU_FEATURES, "edgetpu") if on_tpu else {}
    floor = (sum(ms for name, ms in cpu.items() if name.startswith(MAC_TERMS))
             + tpu.get("tpu_macs", 0.0) + streamed / LINK_SIGNALLING_BYTES_PER_S * 1e3)
    return Row(index, m.device, m.model, m.precision, m.runtime, m.runtime_version, m.latency_ms, cls, cpu_class,
               kernels_of(target), cpu, tpu, floor)


@dataclass
class Fit:
    """One class's coefficients and kernel factors."""

    coefficients: dict[str, float]
    kernels: dict[str, float] = field(default_factory=dict)


def _price(features: dict[str, float], coefficients: dict[str, float]) -> float:
    return sum(coefficients.get(n, 0.0) * v for n, v in features.items())


def _cpu_ms(row: Row, fits: dict[str, Fit], macs_only: bool = False) -> float:
    """The row's CPU estimate, or (`macs_only`) of it the multiply-accumulate terms (MAC_TERMS)."""
    cpu = fits[row.cpu_class]
    features = {n: v for n, v in row.cpu.items() if n.startswith(MAC_TERMS)} if macs_only else row.cpu
    return cpu.kernels.get(row.kernels, 1.0) * _price(features, cpu.coefficients)


def _bounded(a: np.ndarray, offset: np.ndarray, names: tuple[str, ...], bounds: dict[str, tuple[float, float]],
             groups: np.ndarray | None = None) -> tuple[dict[str, float], np.ndarray]:
    """The coefficients within `bounds` that minimise the ROBUST loss of log(estimate / published), a row's estimate
    / published being `a` @ coefficients + `offset`, times the factor of its row group (`groups[i]`: 0 .. k-1, or -1 for
    none; each factor within KERNEL_BOUNDS), all fitted at once. The search starts at the middle of each range, where
    a term no row exercises stays (a prior, not a fit). Returns the coefficients and the k factors."""
    groups = np.full(len(a), -1) if groups is None else groups
    k = int(groups.max()) + 1
    low = np.array([bounds[n][0] for n in names], dtype=float)
    high = np.array([bounds[n][1] for n in names], dtype=float)
    result = np.where(low > 0, np.sqrt(low * high), (low + high) / 2)
    factors = np.full(k, np.sqrt(KERNEL_BOUNDS[0] * KERNEL_BOUNDS[1]))
    used = a.any(axis=0)
    if used.any():
        scale = a[:, used].max(axis=0)  # coefficients in units that give each term's largest row a share of ~1
        n = int(used.sum())

        def residual(x: np.ndarray) -> np.ndarray:
            factor = np.append(x[n:], 1.0)[groups]  # group -1 reads the appended 1
            return np.log(factor * (a[:, used] / scale @ x[:n]) + offset)

        solved = least_squares(residual, np.concatenate([result[used] * scale, factors]),
                               bounds=(np.concatenate([low[used] * scale, np.full(k, KERNEL_BOUNDS[0])]),
                                       np.concatenate([high[used] * scale, np.full(k, KERNEL_BOUNDS[1])])),
                               **ROBUST).x
        result[used], factors = solved[:n] / scale, solved[n:]
    return {n: float(c) for n, c in zip(names, result) if c > 0}, factors


def fit(rows: list[Row], cls: str, cpu_fits: dict[str, Fit] | None = None) -> Fit | None:
    """Coefficients within BOUNDS (and kernel factors) that fit the published latency of `rows` of `cls` (see ROBUST).

    A CPU class fits its coefficients and each kernel library's factor against the class's reference library at
    once: fitted in turn, a library with many rows set the coefficients first and the reference library's rows,
    then far off, lost their pull under the robust loss. An Edge TPU row's CPU part is priced with `cpu_fits` (the
    host's class, fitted on the same rows left in).
    """
    mine = [r for r in rows if r.cls == cls]
    if not mine:
        return None
    if cls == "edgetpu":
        assert cpu_fits is not None
        a = np.array([[r.tpu[n] / r.published_ms for n in TPU_FEATURES] for r in mine])
        cpu = np.array([_cpu_ms(r, cpu_fits) / r.published_ms for r in mine])
        return Fit(_bounded(a, cpu, TPU_FEATURES, BOUNDS[cls])[0])
    others = sorted({r.kernels for r in mine} - {REFERENCE_KERNELS[cls]})
    groups = np.array([others.index(r.kernels) if r.kernels in others else -1 for r in mine])
    a = np.array([[r.cpu[n] / r.published_ms for n in CPU_FEATURES] for r in mine])
    coefficients, factors = _bounded(a, np.zeros(len(mine)), CPU_FEATURES, BOUNDS[cls], groups)
    return Fit(coefficients, {kernels: float(f) for kernels, f in zip(others, factors)})


def fit_all(rows: list[Row]) -> dict[str, Fit]:
    fits = {cls: f for cls in ("cortex-m", "cortex-a") if (f := fit(rows, cls))}
    if "cortex-a" in fits and (tpu := fit(rows, "edgetpu", fits)):
        fits["edgetpu"] = tpu
    return fits


def estimate(row: Row, fits: dict[str, Fit]) -> float:
    cpu = _cpu_ms(row, fits)
    return cpu + _price(row.tpu, fits["edgetpu"].coefficients) if row.cls == "edgetpu" else cpu


def fits_without(rows: list[Row], key: Callable[[Row], str]) -> dict[str, dict[str, Fit]]:
    """For each value of `key`, the classes fitted on the rows that do not share it."""
    return {value: fit_all([r for r in rows if key(r) != value]) for value in {key(r) for r in rows}}


def fits_without_pair(rows: list[Row]) -> dict[tuple[str, str], dict[str, Fit]]:
    """For each (model, board) of the rows, the classes fitted on the rows of neither: a new model on a new board."""
    return {(m, d): fit_all([r for r in rows if r.model != m and r.device != d])
            for m, d in {(r.model, r.device) for r in rows}}


def pair(row: Row) -> tuple[str, str]:
    return row.model, row.device


def held_out(rows: list[Row], fits: dict[Any, dict[str, Fit]], key: Callable[[Row], Any]) -> dict[int, float]:
    """Each row's estimate by the fit in `fits` (fits_without or fits_without_pair) that left out its key."""
    return {r.index: estimate(r, fits[key(r)]) for r in rows if r.cls in fits[key(r)] and r.cpu_class in fits[key(r)]}


def percentile_band(ratios: list[float]) -> tuple[float, float]:
    """The nearest of `ratios` at or outside their 10th and 90th percentiles, so that the band covers >= 80% of them."""
    return float(np.percentile(ratios, 10, method="lower")), float(np.percentile(ratios, 90, method="higher"))


def summary(rows: list[Row], estimates: dict[int, float]) -> dict[str, dict[str, float]]:
    out = {}
    for cls in sorted({r.cls for r in rows}):
        ratios = [r.published_ms / estimates[r.index] for r in rows if r.cls == cls and estimates.get(r.index)]
        if not ratios:
            continue
        errors = [abs(1 / q - 1) for q in ratios]
        low, high = percentile_band(ratios)
        out[cls] = {"rows": len(ratios), "median": statistics.median(errors), "worst": max(errors),
                    "band_low": low, "band_high": high}
    return out


def write_model(fits: dict[str, Fit], bands: dict[str, dict[str, float]], unseen: dict[str, dict[str, float]],
                calibrated: dict[str, dict[str, float]], rows: list[Row]) -> None:
    lines = [f"# Written by scripts/bench_estimator.py on {date.today().isoformat()}: per device class, the latency",
             "# estimator's coefficients fitted on every modelled row of benchmarks/latency_measurements.toml,",
             "# and its bands: 10th-90th percentile of published / estimated over the rows held out one model at a",
             "# time (band_low, band_high: for the boards with rows, `devices`), with their board and model at once",
             "# (unseen), and those after calibrating on 1 or 2 of the board's other models (calibrated). Read by",
             "# edgecc.latency; do not edit by hand.", ""]
    for cls, band in bands.items():
        lines += [f'[class.{cls}]', f"rows = {band['rows']}", f"band_low = {band['band_low']:.4f}",
                  f"band_high = {band['band_high']:.4f}",
                  f"precisions = {sorted({r.precision for r in rows if r.cls == cls})}".replace("'", '"'),
                  f"devices = {sorted({r.device for r in rows if r.cls == cls})}".replace("'", '"'),
                  f"coefficients = {_inline(fits[cls].coefficients)}"]
        lines += [f"kernels = {_inline(fits[cls].kernels)}"] if fits[cls].kernels else []
        for name, band in (("unseen", unseen.get(cls)), ("calibrated", calibrated.get(cls))):
            if band:
                lines.append(f"{name} = {{ low = {band['band_low']:.4f}, high = {band['band_high']:.4f}, "
                             f"count = {band['rows']} }}")
        lines.append("")
    MODEL_FILE.write_text("\n".join(lines))


def _inline(values: dict[str, float]) -> str:
    return "{ " + ", ".join(f'"{k}" = {v:.6g}' for k, v in sorted(values.items())) + " }"


def table(rows: list[Row], by_model: dict[int, float], by_device: dict[int, float], bands: dict[str, Any]) -> str:
    lines = ["| device | class | runtime | model | precision | published (ms) | held-out estimate (ms) | band (ms) | error |"
             " leave-device-out error |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r.cls, r.device, r.model)):
        est = by_model[r.index]
        band = bands[r.cls]
        other = f"{by_device[r.index] / r.published_ms - 1:+.0%}" if r.index in by_device else "-"
        inside = "" if band["band_low"] * est <= r.published_ms <= band["band_high"] * est else " (outside)"
        lines.append(f"| {r.device} | {r.cls} | {r.runtime} | {r.model} | {r.precision} | {r.published_ms:.4g} | "
                     f"{est:.4g} | {band['band_low'] * est:.3g}-{band['band_high'] * est:.3g}{inside} | "
                     f"{est / r.published_ms - 1:+.0%} | {other} |")
    return "\n".join(lines)


def summary_table(rows: list[Row], by_model: dict[int, float], model_stats: dict[str, dict[str, float]],
                  device_stats: dict[str, dict[str, float]], pair_stats: dict[str, dict[str, float]],
                  calibrated: dict[str, dict[str, float]]) -> str:
    """Per class, the summary of each held-out estimate (summary: by model, by device, by model and device at once)
    and the band after calibration (calibrated_bands)."""
    lines = ["| class | rows | boards | median abs error | worst | band (published / estimate) | band covers | "
             "leave-device-out median / worst | band on a board without rows (board and model held out) | band "
             "after calibrating on 1 or 2 models |", "|---|---|---|---|---|---|---|---|---|---|"]
    for cls, s in model_stats.items():
        mine = [r for r in rows if r.cls == cls]
        covered = sum(s["band_low"] <= r.published_ms / by_model[r.index] <= s["band_high"] for r in mine)
        d = device_stats.get(cls)
        several = d and len({r.device for r in mine}) > 1
        lodo = f"{d['median']:.0%} / {d['worst']:.0%}" if several else "one board"
        p = pair_stats.get(cls)
        unseen = f"{p['band_low']:.2f}-{p['band_high']:.2f}" if several and p else "one board"
        c = calibrated.get(cls)
        after = f"{c['band_low']:.2f}-{c['band_high']:.2f}" if c else "-"
        lines.append(f"| {cls} | {s['rows']} | {len({r.device for r in mine})} | {s['median']:.0%} | {s['worst']:.0%} | "
                     f"{s['band_low']:.2f}-{s['band_high']:.2f} | {covered}/{len(mine)} | {lodo} | {unseen} | "
                     f"{after} |")
    return "\n".join(lines)


def calibrations(rows: list[Row], pair_fits: dict[tuple[str, str], dict[str, Fit]]) -> dict[
        tuple[str, str, str], list[list[tuple[Row, float]]]]:
    """`edgecc targets calibrate` on a board and a model the estimator has not seen: per setup (board, runtime build,
    precision) with at least 3 models, each model's published / estimated ratio by the fit without its board and its
    model (fits_without_pair), uncalibrated, then calibrated on 1 and on 2 of the board's other models (every choice,
    estimated by the same fit; edgecc.calibrate.calibration_factors: one factor, or from 2 models a factor on the MAC
    terms and one on the rest).

    A calibration's records and the models it is judged on share one setup, as `edgecc bench` records made on the
    user's board do: the same runtime build (the rows' runtime_version) and precision. Rows of one board from sources
    years apart ran other builds (XNNPACK's README gives rpi2's fp32 MobileNet v1 341 ms in 2020, 302 ms in 2022)."""
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for r in rows:
        if r.cls != "edgetpu" and r.cls in pair_fits[pair(r)]:
            groups.setdefault((r.device, r.setup, r.precision), []).append(r)
    out = {}
    for key, mine in sorted(groups.items()):
        if len(mine) < 3:
            continue
        runs: list[list[tuple[Row, float]]] = [[], [], []]
        for judged in mine:
            fits = pair_fits[pair(judged)]
            est = {r.index: (_cpu_ms(r, fits), _cpu_ms(r, fits, macs_only=True)) for r in mine}
            others = [r for r in mine if r is not judged]
            for k in (0, 1, 2):
                for chosen in itertools.combinations(others, k):
                    factors = (calibration_factors([r.published_ms for r in chosen],
                                                   *zip(*(est[r.index] for r in chosen))) if chosen else (1.0, None))
                    runs[k].append((judged, judged.published_ms / calibrated_ms(*est[judged.index], factors)))
        out[key] = runs
    return out


def calibration_table(runs: dict[tuple[str, str, str], list[list[tuple[Row, float]]]]) -> str:
    """Per setup, the median and worst error of its models uncalibrated and calibrated on 1 and on 2 (calibrations)."""
    lines = ["| board | class | runtime build | precision | models | uncalibrated median / worst | "
             "calibrated on 1: median / worst | calibrated on 2: median / worst |", "|---|---|---|---|---|---|---|---|"]
    for (device, setup, precision), cells in runs.items():
        mine = cells[0]  # one ratio per model
        errors = [[abs(1 / q - 1) for _, q in cell] for cell in cells]
        build = f"{mine[0][0].runtime}: {setup.split(' (')[0]}"
        lines.append(f"| {device} | {mine[0][0].cls} | {build} | {precision} | {len(mine)} | "
                     + " | ".join(f"{statistics.median(e):.0%} / {max(e):.0%}" for e in errors) + " |")
    return "\n".join(lines)


def calibrated_ratios(runs: dict[tuple[str, str, str], list[list[tuple[Row, float]]]]) -> dict[str, list[float]]:
    """Per class, the published / estimated ratios of every board's models after calibrating on 1 or 2 others."""
    out: dict[str, list[float]] = {}
    for cells in runs.values():
        for row, q in cells[1] + cells[2]:
            out.setdefault(row.cls, []).append(q)
    return out


def calibrated_bands(runs: dict[tuple[str, str, str], list[list[tuple[Row, float]]]]) -> dict[str, dict[str, float]]:
    """Per class, the band after calibration (percentile_band of calibrated_ratios) and how many ratios it is of, in
    summary's keys."""
    out = {}
    for cls, ratios in calibrated_ratios(runs).items():
        low, high = percentile_band(ratios)
        out[cls] = {"band_low": low, "band_high": high, "rows": len(ratios)}
    return out


def peak_rates(rows: list[Row]) -> str:
    """Each CPU board's peak fp32 and int8 rates per core, and whether its profile gives them or the class default
    stands in."""
    rates = []
    for device in sorted({r.device for r in rows if r.cls != "edgetpu"}):
        target = load_target(device)
        given = ["profile" if figure else "class default"
                 for figure in (target.cpu.fp32_macs_per_cycle, target.cpu.int8_macs_per_cycle)]
        rates.append(f"{device} {fp32_macs_per_cycle(target):g} / {int8_macs_per_cycle(target):g} "
                     f"({target.cpu.core.split(' (')[0]}, {' / '.join(given)})")
    return ", ".join(rates)


def beyond_goal(rows: list[Row], estimates: dict[int, float], worst: float = 0.5) -> str:
    """The rows whose held-out error is beyond the issue's worst-error goal, in dataset order."""
    errors = {r.index: estimates[r.index] / r.published_ms - 1 for r in rows}
    far = [r for r in sorted(rows, key=lambda r: r.index) if abs(errors[r.index]) > worst]
    return ", ".join(f"{r.device} {r.runtime} {r.model} {errors[r.index]:+.0%}" for r in far) or "none"


def below_floor(rows: list[Row], impossible: list[Row]) -> str:
    """The published figures faster than their rebuilt model can run, each with its floor and the estimate of a fit
    without its model."""
    fits = {model: fit_all([k for k in rows if k.model != model]) for model in {r.model for r in impossible}}
    described = []
    for r in impossible:
        held_out_ms = estimate(r, fits[r.model])
        described.append(f"{r.device} {r.runtime} {r.model} {r.precision}: published {r.published_ms:g} ms, floor "
                         f"{r.floor_ms:.3g} ms (held-out estimate {held_out_ms:.4g} ms, "
                         f"{held_out_ms / r.published_ms - 1:+.0%})")
    return "; ".join(described) or "none"


def write_section(path: Path, name: str, body: str) -> None:
    """Replace this script's section of BENCHMARKS.md, keeping the other scripts' sections."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEach section is regenerated by the script it names.\n"
    section = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--built-only", action="store_true",
                        help="estimate only the rows whose model is already converted (the section says which are not)")
    args = parser.parse_args()
    measurements = load_measurements(DATASET)
    unbuilt = {m.model for m in measurements
               if args.built_only and not (CACHE / f"{m.model}_{m.precision}.tflite").exists()}
    featurized = [featurize(i, m) for i, m in enumerate(measurements)
                  if m.runtime in MODELLED and m.model not in unbuilt]
    rows = [r for r in featurized if r.published_ms >= r.floor_ms]
    impossible = [r for r in featurized if r.published_ms < r.floor_ms]
    skipped = sorted({(m.runtime, m.device) for m in measurements if m.runtime not in MODELLED})
    by_model = held_out(rows, fits_without(rows, lambda r: r.model), lambda r: r.model)
    by_device = held_out(rows, fits_without(rows, lambda r: r.device), lambda r: r.device)
    pair_fits = fits_without_pair(rows)
    by_pair = held_out(rows, pair_fits, pair)
    bands, pair_stats = summary(rows, by_model), summary(rows, by_pair)
    runs = calibrations(rows, pair_fits)
    calibrated = calibrated_bands(runs)
    write_model(fit_all(rows), bands, pair_stats, calibrated, rows)
    body = "\n".join([
        "## Latency estimator against published measurements",
        "",
        f"`python scripts/bench_estimator.py`, {date.today().isoformat()}, on {platform.machine()} "
        f"({platform.processor() or platform.system()}). {len(measurements)} published rows over "
        f"{len({m.device for m in measurements})} devices in `benchmarks/latency_measurements.toml` (each with its "
        f"source); {len(featurized)} run on a runtime edgecc models and {len(rows)} of them are estimated here (the "
        f"other {len(impossible)} are faster than their rebuilt model can run: see below). Every estimate is held "
        "out: the class's coefficients are fitted without any row of the same model (leave-one-model-out); the "
        "last column fits them without any row of the same device instead. The band is the 10th-90th percentile of the "
        "leave-one-model-out ratio published / estimated per class, stored in `toolchain/latency_model.toml` "
        "(fitted on all rows) and used by `edgecc check` on the boards with rows; on a board without (a user's own "
        "profile, or a built-in one no row is of) check uses the band of the rows held out with their board and their "
        "model at once (a new model on a new board), and on a profile `edgecc targets calibrate` wrote, the band after "
        "calibration (below). The fit, one rule for every class: the coefficients (each "
        f"within its physical range) minimise the {ROBUST['loss']} loss of log(estimate / published) with f_scale "
        f"{ROBUST['f_scale']} (scipy's least_squares), under which a row's pull is largest at about "
        f"{ROBUST['f_scale']:.0%} off and falls beyond, so that one doubtful published figure cannot drag the class's "
        "other rows. Goals (issue 14): median |error| <= 20%, worst <= 50%, band covers >= 80%, per class with >= 5 "
        "rows. The fp32 and int8 work is counted in cycles at each core's peak rate for its precision "
        "(`cpu.fp32_macs_per_cycle` and `cpu.int8_macs_per_cycle`, multiply-accumulates per cycle): "
        f"{peak_rates(rows)}.",
        "",
        summary_table(rows, by_model, bands, summary(rows, by_device), pair_stats, calibrated),
        "",
        f"Held-out rows beyond the worst-error goal (50%): {beyond_goal(rows, by_model)}.",
        "",
        "Published figures below their rebuilt model's floor, shown here and neither fitted nor counted above: the "
        "least time any kernels can take for the rebuild on the board, its multiply-accumulates at the cores' peak "
        "for their precision and the Edge TPU's 4 TOPS, plus the bytes that must cross the host link "
        f"every inference (parameters beyond the on-chip memory, activations to and from the CPU) at "
        f"{LINK_SIGNALLING_BYTES_PER_S * 8 / 1e9:g} Gbit/s, the signalling rate of USB 3.0 and of PCIe Gen 2 x1: "
        f"{below_floor(rows, impossible)}.",
        "",
        "Not estimated (runtimes with their own kernels that no edgecc profile describes): "
        + ", ".join(f"{rt} on {dev}" for rt, dev in skipped) + "."
        + (f" Not converted in this run (--built-only), so not estimated: {', '.join(sorted(unbuilt))}." if unbuilt else ""),
        "",
        "Calibration (`edgecc targets calibrate REC MODEL [REC MODEL ...]`: from one model one factor, measured over "
        "estimated; from two whose share of multiply-accumulate work differs, a factor on the MAC terms and one on the "
        f"rest, unless they come out more than {MAX_SPLIT:g}x apart or not positive, when the geometric mean of the "
        "two ratios stands) on a board and a model the estimator has not seen: each model's estimate comes from the "
        "fit without its board and without its model, and the factors from 1 or 2 of the board's other models of the "
        "same setup (every choice, estimated by the same fit), as `edgecc bench` records made on a user's board would "
        "be: the same runtime build and precision (setups with at least 3 models). The 10th-90th percentile of the "
        "calibrated ratios, on 1 and 2 models pooled per class, is the band check gives a calibrated profile. Goal "
        "(issue 14): median <= 10% from 2 records.",
        "",
        calibration_table(runs),
        "",
        table(rows, by_model, by_device, bands),
    ])
    print(body)
    write_section(args.out, "bench_estimator", body)


if __name__ == "__main__":
    main()
