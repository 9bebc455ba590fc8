"""Quantization-aware training (TF-MOT) for models built from edgecc's layers.

QAT only pays off when its fake-quant nodes round the same tensors, on the same
grids, as the int8 TFLite graph. What TF-MOT 0.8.1 does and what edgecc adds:

- Conv2D (per-channel kernel), Dense (per-tensor kernel), Add and
  GlobalAveragePooling1D use TF-MOT's default 8-bit registry (activation or
  output quantized); Reshape and Dropout are registered without quantizers,
  which matches TFLite, where they keep their input's scale.
- With `per_channel` (compress.per_channel), a Dense kernel gets one scale per
  output unit (PerChannelDenseQuantizeConfig), which the converter writes as a
  per-channel FULLY_CONNECTED, as post-training quantization does with the same
  field. A pretrained encoder's Dense kernels need it: converted to int8 with one
  scale per kernel, the fine-tuned all-MiniLM-L6-v2 TREC teacher scores 0.903 on
  its validation split, per output unit 0.951 (float 0.971;
  scripts/bench_quantization.py).
- Softmax is registered but left unquantized. TFLite's int8 SOFTMAX always
  writes scale 1/256 and zero point -128, so edgecc rounds it to that fixed
  grid, [0, 255/256].
- The TFLite graph has one int8 op per step of a LayerNorm (FULLY_CONNECTED
  for the mean, SUB, MUL, FULLY_CONNECTED with epsilon as its bias, RSQRT,
  MUL, MUL, ADD). It also has the MUL that
  scales the queries in AttentionScores. A QuantizeConfig can reach only a
  layer's weights, its output and the callables its `call` uses. So qat_model
  swaps these two layers for twins that compute the same thing but pass each of
  those tensors through a hook. Their QuantizeConfigs fake-quantize every hook.
  Without this the ranges of those tensors come only from converter
  calibration and QAT never sees the rounding they add.
- all-MiniLM-L6-v2's layers (edgecc.train.minilm): MaskedSoftmax is rounded like
  Softmax, to the fixed 1/256 grid, and its twin also rounds the ADD of the padding
  bias to the scores, which TFLite rounds before its SOFTMAX (the mask value widens
  that range, so its grid is coarser than the scores'). Without that hook a QAT
  graph's first attention probabilities were more than one step of 1/256 away from
  its int8 model's on 24% of their elements, 0.3% with it (tests/test_minilm.py).
  PaddingBias (0 or the mask value) and
  TokenMean (the mean-pooled embedding) get an output quantizer only. UnitNormalization
  has no config: a classifier's head reads `pool`, before it.
- AttentionContext gets an output quantizer only. Its TRANSPOSE and RESHAPE
  keep the scale of the BATCH_MATMUL output. So does KeySum (sigmoid
  attention's SUM over the keys) and Multiply (TFLite's MUL rounds its output). PositionEmbedding's positions are
  rounded per tensor, symmetric 8-bit.
- LayerNorm's gamma and beta are quantized too, asymmetric per tensor over
  [min(0, w), max(0, w)]. The converter turns them into int8 constants of MUL
  and ADD with exactly that scheme, so the same rounding happens in training.
- TF-MOT starts every activation range at [-6, 6] and moves it by an EMA with
  decay 0.999 per step, so a short QAT run barely leaves that range. On that
  grid a LayerNorm's variance rounds to zero. So qat_model requires
  calibration examples and starts every range at what the float model shows
  on them, as post-training quantization would.
- Sparsity-preserving QAT (Default8BitPrunePreserveQuantizeScheme) works
  with these configs. Its registry is asked only about layers without an
  explicit config, which are the Dense and Conv2D kernels it masks.
- Keras' LayerNormalization, MultiHeadAttention, EinsumDense, Lambda and
  activations TF-MOT cannot quantize (elu, for example) are refused with the
  layer's name. edgecc.train.rewrite turns the standard layers into edgecc's layers.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from edgecc.train.convert import compact_names
from edgecc.errors import EdgeccError
from edgecc.train.layers import (PACKAGE, AttentionContext, AttentionScores, KeySum, LayerNorm, PositionEmbedding,
                                 TokenEmbedding, int8_graph, keras, scores, tf)
from edgecc.train.minilm import MaskedSoftmax, PaddingBias, TokenMean
from edgecc.progress import native_output_silenced

import tensorflow_model_optimization as tfmot  # after edgecc.train.layers: TF must be imported with legacy Keras first
from tensorflow_model_optimization.python.core.quantization.keras.collab_opts.prune_preserve.prune_preserve_quantize_registry import (  # noqa: E501
    PrunePreserveDefaultWeightsQuantizer,
)
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit.default_8bit_quantize_registry import (
    Default8BitQuantizeConfig,
)
from tensorflow_model_optimization.python.core.quantization.keras.quantize_aware_activation import (
    QuantizeAwareActivation,
)

quantizers = tfmot.quantization.keras.quantizers


def _moving_average() -> Any:
    return quantizers.MovingAverageQuantizer(num_bits=8, per_axis=False, symmetric=False, narrow_range=False)


class NamedQuantizer(quantizers.MovingAverageQuantizer):
    """An 8-bit per-tensor moving-average quantizer with range variables named after the tensor it rounds.

    TF-MOT names every activation's range `post_activation`. A layer with several
    hooks needs distinct names, and calibration finds the variables by these names.
    """

    def __init__(self, name: str) -> None:
        super().__init__(num_bits=8, per_axis=False, symmetric=False, narrow_range=False)
        self.name = name

    def build(self, tensor_shape: Any, name: str, layer: Any) -> dict[str, Any]:
        return super().build(tensor_shape, self.name, layer)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name}


def _hook(layer: Any, name: str, x: Any) -> Any:
    return getattr(layer, f"{name}_hook")(x)


@keras.utils.register_keras_serializable(package=PACKAGE)
class QatLayerNorm(LayerNorm):
    """LayerNorm with a hook after each op that the int8 TFLite graph rounds. A hook is the identity unless QAT wraps it."""

    HOOKS = ("mean", "centred", "squares", "shifted", "inverse", "normalised", "scaled")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.variance_floor = 0.0
        for name in self.HOOKS:
            setattr(self, f"{name}_hook", keras.activations.linear)

    def call(self, x: Any, training: Any = None) -> Any:
        mean = _hook(self, "mean", self.average(x))
        centred = _hook(self, "centred", x - mean)
        if self.frozen_scale:
            normalised = _hook(self, "normalised", centred * self.frozen_scale)
        else:
            squares = _hook(self, "squares", centred * centred)
            # the converter folds epsilon into the bias of the second averaging FULLY_CONNECTED
            shifted = _hook(self, "shifted", self.average(squares) + self.epsilon)
            if training is True:
                # A row whose variance rounds to 0 would give rsqrt(0) = inf, and the moving-average range of
                # `inverse` would take it in for good. TFLite saturates such a row at the top of the calibrated
                # `inverse` range; the floor (set by calibration, else epsilon) gives training the same value.
                shifted = tf.maximum(shifted, self.variance_floor or self.epsilon)
            inverse = _hook(self, "inverse", tf.math.rsqrt(shifted))
            normalised = _hook(self, "normalised", centred * inverse)
        if not self.affine:
            return normalised
        return _hook(self, "scaled", normalised * self.gamma) + self.beta


@keras.utils.register_keras_serializable(package=PACKAGE)
class QatAttentionScores(AttentionScores):
    """AttentionScores with a hook on the scaled queries, which TFLite rounds after its MUL."""

    HOOKS = ("scaled_query",)

    def __init__(self, heads: int, **kwargs: Any) -> None:
        super().__init__(heads, **kwargs)
        self.scaled_query_hook = keras.activations.linear

    def call(self, inputs: list[Any]) -> Any:
        query, key = inputs
        head_dim = query.shape[-1] // self.heads
        return scores(_hook(self, "scaled_query", query * (head_dim**-0.5)), key, self.heads)


@keras.utils.register_keras_serializable(package=PACKAGE)
class QatMaskedSoftmax(MaskedSoftmax):
    """MaskedSoftmax with a hook on scores + bias, which TFLite rounds (an int8 ADD) before its SOFTMAX."""

    HOOKS = ("biased",)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.biased_hook = keras.activations.linear

    def call(self, inputs: list[Any]) -> Any:
        scores, bias = inputs
        return tf.nn.softmax(_hook(self, "biased", scores + bias), axis=self.axis)


class OutputQuantizeConfig(tfmot.quantization.keras.QuantizeConfig):
    """No weights, no inner tensors: only the layer's output is rounded, as TFLite rounds the op's output."""

    def get_weights_and_quantizers(self, layer: Any) -> list[tuple[Any, Any]]:
        return []

    def get_activations_and_quantizers(self, layer: Any) -> list[tuple[Any, Any]]:
        return []

    def set_quantize_weights(self, layer: Any, quantize_weights: list[Any]) -> None:
        pass

    def set_quantize_activations(self, layer: Any, quantize_activations: list[Any]) -> None:
        pass

    def get_output_quantizers(self, layer: Any) -> list[Any]:
        return [_moving_average()]

    def get_config(self) -> dict[str, Any]:
        return {}


class HookedQuantizeConfig(OutputQuantizeConfig):
    """Rounds every hook of a twin layer (QatLayerNorm, QatAttentionScores) and its output."""

    def get_activations_and_quantizers(self, layer: Any) -> list[tuple[Any, Any]]:
        return [(getattr(layer, f"{name}_hook"), NamedQuantizer(name)) for name in layer.HOOKS]

    def set_quantize_activations(self, layer: Any, quantize_activations: list[Any]) -> None:
        for name, activation in zip(layer.HOOKS, quantize_activations):
            setattr(layer, f"{name}_hook", activation)


class LayerNormQuantizeConfig(HookedQuantizeConfig):
    """The hooks and output of QatLayerNorm, plus gamma and beta rounded as the converter rounds MUL/ADD constants."""

    def get_weights_and_quantizers(self, layer: Any) -> list[tuple[Any, Any]]:
        if not layer.affine:
            return []
        return [
            (weight, quantizers.LastValueQuantizer(num_bits=8, per_axis=False, symmetric=False, narrow_range=False))
            for weight in (layer.gamma, layer.beta)
        ]

    def set_quantize_weights(self, layer: Any, quantize_weights: list[Any]) -> None:
        if layer.affine:
            layer.gamma, layer.beta = quantize_weights


class PositionEmbeddingQuantizeConfig(OutputQuantizeConfig):
    """The positions become a symmetric per-tensor int8 constant of TFLite's ADD. The sum is rounded too."""

    def get_weights_and_quantizers(self, layer: Any) -> list[tuple[Any, Any]]:
        return [(layer.positions, quantizers.LastValueQuantizer(num_bits=8, per_axis=False, symmetric=True, narrow_range=True))]

    def set_quantize_weights(self, layer: Any, quantize_weights: list[Any]) -> None:
        (layer.positions,) = quantize_weights


class TokenEmbeddingQuantizeConfig(OutputQuantizeConfig):
    """The table becomes the int8 constant of TFLite's GATHER, asymmetric per tensor; GATHER keeps its scale."""

    def get_weights_and_quantizers(self, layer: Any) -> list[tuple[Any, Any]]:
        return [(layer.table, quantizers.LastValueQuantizer(num_bits=8, per_axis=False, symmetric=False,
                                                            narrow_range=False))]

    def set_quantize_weights(self, layer: Any, quantize_weights: list[Any]) -> None:
        (layer.table,) = quantize_weights

    def get_output_quantizers(self, layer: Any) -> list[Any]:
        return []


class _LeftToTheConverter:
    """A Dense kernel rounded symmetrically per output unit, on the grid max|w|/127 that the converter uses.

    The converter refuses a per-channel fake-quant of a Dense kernel ("'tfl.transpose' op has mismatched quantized
    axes": FULLY_CONNECTED wants the kernel transposed). So the int8 graph is traced without it
    (`_converting`; a sparse kernel still masked) and the converter rounds the float kernel per channel itself,
    onto the same grid.
    """

    def __init__(self) -> None:
        super().__init__(num_bits=8, per_axis=True, symmetric=True, narrow_range=True)

    def __call__(self, inputs: Any, training: Any, weights: dict[str, Any], **kwargs: Any) -> Any:
        if not _converting:
            return super().__call__(inputs, training, weights, **kwargs)
        mask = weights.get("sparsity_mask")
        return inputs if mask is None else inputs * mask

    def get_config(self) -> dict[str, Any]:
        return {}


class PerChannelKernelQuantizer(_LeftToTheConverter, quantizers.LastValueQuantizer):
    """One scale per output unit of a Dense kernel (_LeftToTheConverter)."""


class SparsePerChannelKernelQuantizer(_LeftToTheConverter, PrunePreserveDefaultWeightsQuantizer):
    """PerChannelKernelQuantizer that keeps the kernel's zeros, as the prune-preserving scheme does."""


_converting = False  # True while to_int8_tflite_from_qat traces the int8 graph


class PerChannelDenseQuantizeConfig(Default8BitQuantizeConfig):
    """TF-MOT's Dense config (kernel and activation rounded) with one kernel scale per output unit.

    `preserve_sparsity` keeps the kernel's zeros. The prune-preserving scheme leaves an explicitly configured
    layer alone, so this config does it itself.
    """

    def __init__(self, preserve_sparsity: bool = False) -> None:
        super().__init__(["kernel"], ["activation"], False)
        self.preserve_sparsity = preserve_sparsity
        self.weight_quantizer = SparsePerChannelKernelQuantizer() if preserve_sparsity else PerChannelKernelQuantizer()

    def get_config(self) -> dict[str, Any]:
        return {"preserve_sparsity": self.preserve_sparsity}


class SoftmaxQuantizeConfig(OutputQuantizeConfig):
    """TFLite's int8 SOFTMAX output is fixed at scale 1/256, zero point -128, so QAT rounds to that grid."""

    def get_output_quantizers(self, layer: Any) -> list[Any]:
        return [quantizers.FixedQuantizer(num_bits=8, init_min=0.0, init_max=255 / 256, narrow_range=False)]


class HookedSoftmaxQuantizeConfig(HookedQuantizeConfig, SoftmaxQuantizeConfig):
    """QatMaskedSoftmax: its biased scores rounded like any hook, its output on the softmax's fixed grid."""


TWINS: dict[type, type] = {LayerNorm: QatLayerNorm, AttentionScores: QatAttentionScores,
                           MaskedSoftmax: QatMaskedSoftmax}
CONFIGS: dict[type, type] = {
    QatLayerNorm: LayerNormQuantizeConfig,
    QatAttentionScores: HookedQuantizeConfig,
    AttentionContext: OutputQuantizeConfig,
    PositionEmbedding: PositionEmbeddingQuantizeConfig,
    TokenEmbedding: TokenEmbeddingQuantizeConfig,
    keras.layers.Softmax: SoftmaxQuantizeConfig,
    QatMaskedSoftmax: HookedSoftmaxQuantizeConfig,
    PaddingBias: OutputQuantizeConfig,
    TokenMean: OutputQuantizeConfig,
    keras.layers.Rescaling: OutputQuantizeConfig,  # mix's token weight from a padding bias: 0 or 1, exact in int8
    keras.layers.Multiply: OutputQuantizeConfig,  # mix's masked values: TFLite's MUL rounds its output
    KeySum: OutputQuantizeConfig,  # sigmoid attention's context: TFLite's SUM rounds its output
}


def quantize_scope() -> contextlib.AbstractContextManager:
    """TF-MOT's quantize_scope that also knows edgecc's layers, their twins and configs: clone QAT models inside it.

    A QAT model saved as `.keras` does not load again with TF-MOT 0.8.1 and tf_keras 2.21.
    This holds even for plain Dense models: QuantizeLayer expects 5 variables and the file
    holds 3. Keep QAT weights with `save_weights` or HDF5 instead.
    """
    objects = [*TWINS, *CONFIGS, *TWINS.values(), *CONFIGS.values(), PerChannelDenseQuantizeConfig,
               PerChannelKernelQuantizer, SparsePerChannelKernelQuantizer]
    return tfmot.quantization.keras.quantize_scope({c.__name__: c for c in objects})


def _refuse_unsupported(model: Any) -> None:
    """Name the first layer that TF-MOT would reject, before any cloning. TF-MOT's own errors do not name it."""
    registry = tfmot.quantization.keras.default_8bit.Default8BitQuantizeRegistry()
    activations = QuantizeAwareActivation._PRE_QUANT_ACTIVATIONS | QuantizeAwareActivation._POST_QUANT_ACTIVATIONS
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer) or type(layer) in TWINS or type(layer) in CONFIGS:
            continue
        activation = getattr(layer, "activation", keras.activations.linear)
        if not registry.supports(layer) or getattr(activation, "__name__", type(activation).__name__) not in activations:
            raise EdgeccError(
                f"layer {layer.name!r} ({type(layer).__name__}) cannot be quantization-aware trained: edgecc "
                "quantizes its own transformer layers and the Keras layers and activations that TF-MOT supports "
                "(rewrite the model into edgecc's layers first)"
            )


def qat_model(model: Any, calibration: np.ndarray, preserve_sparsity: bool = False,
              only: set[str] | None = None, per_channel: bool = False) -> Any:
    """A QAT copy of `model` with fake-quant nodes where the int8 TFLite graph rounds. `model` itself is left unchanged.

    `calibration` holds a few hundred training examples, never the test split. It starts every
    activation range at the float model's range. `preserve_sparsity` keeps the zeros of
    Dense/Conv2D kernels exactly zero through training (TF-MOT's prune-preserving scheme).
    `only` names the layers to quantize (progressive QAT); the others stay float.
    `per_channel` gives every Dense kernel one scale per output unit (PerChannelDenseQuantizeConfig).
    Raises EdgeccError naming the first layer that cannot be quantized.
    """
    _refuse_unsupported(model)
    twinned = keras.models.clone_model(
        model, clone_function=lambda layer: TWINS.get(type(layer), type(layer)).from_config(layer.get_config())
    )
    twinned.set_weights(model.get_weights())

    def annotate(layer: Any) -> Any:
        if only is not None and layer.name not in only:
            return layer
        if per_channel and type(layer) is keras.layers.Dense:
            quantize_config = PerChannelDenseQuantizeConfig(preserve_sparsity)
        else:
            config = CONFIGS.get(type(layer))
            quantize_config = config() if config else None
        return tfmot.quantization.keras.quantize_annotate_layer(layer, quantize_config)

    annotated = keras.models.clone_model(twinned, clone_function=annotate)
    scheme = (tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme() if preserve_sparsity
              else tfmot.quantization.keras.default_8bit.Default8BitQuantizeScheme())
    integer_input = not model.inputs[0].dtype.is_floating
    with quantize_scope(), _input_left_unquantized(integer_input):
        qat = tfmot.quantization.keras.quantize_apply(annotated, scheme)
    _calibrate(qat, twinned, calibration)
    return qat


@contextlib.contextmanager
def _input_left_unquantized(active: bool) -> Iterator[None]:
    """Keep TF-MOT from fake-quantizing integer model inputs (token ids).

    TF-MOT's layout always puts a float fake-quant layer after every input,
    which fails on int32 token ids; TFLite keeps them int32 too. Its transform
    has no option for this, so its pattern is made unmatchable meanwhile.
    """
    if not active:
        yield
        return
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import default_8bit_transforms
    from tensorflow_model_optimization.python.core.quantization.keras.graph_transformations.transforms import (
        LayerPattern,
    )

    transform = default_8bit_transforms.InputLayerQuantize
    original = transform.pattern
    transform.pattern = lambda self: LayerPattern("edgecc-no-such-layer")
    try:
        yield
    finally:
        transform.pattern = original


# With BERT's epsilon (1e-12), rsqrt(epsilon) = 1e6 would drag the moving-average range of a norm's 1/sigma up by
# about 1000 in one training step; such norms are floored at the calibrated top of that range instead. The usual
# 1e-5 gives 316, which moves the range little, and the QAT results of the reference recipes were measured with it
# (flooring them too cost cwru_bearing 1.8 points in one run of scripts/bench_compression.py).
TINY_EPSILON = 1e-6


def _calibrate(qat: Any, twinned: Any, calibration: np.ndarray) -> None:
    """Set every activation range to min(0, min) .. max(0, max) of the float tensor it rounds on `calibration`.

    `twinned` is the float model with the twin layers. It runs eagerly so that recording hooks
    see the twins' inner tensors. A training-mode call first sets the weight ranges, which
    TF-MOT otherwise sets only in the first training step.
    """
    ranges: dict[str, tuple[float, float]] = {}

    def observe(key: str, x: Any) -> Any:
        ranges[key] = (min(0.0, float(tf.reduce_min(x))), max(0.0, float(tf.reduce_max(x))))
        return x

    layers = [layer for layer in twinned.layers if not isinstance(layer, keras.layers.InputLayer)]
    for layer in layers:
        for name in getattr(layer, "HOOKS", ()):
            setattr(layer, f"{name}_hook", lambda x, key=f"quant_{layer.name}/{name}": observe(key, x))
    observe("quantize_layer/quantize_layer", calibration)
    outputs = keras.Model(twinned.inputs, [layer.output for layer in layers])(calibration)
    for layer, output in zip(layers, outputs):
        # registry layers name their output range `post_activation`, edgecc's configs `output`
        observe(f"quant_{layer.name}/output", output)
        ranges[f"quant_{layer.name}/post_activation"] = ranges[f"quant_{layer.name}/output"]
    qat(calibration[:1], training=True)
    for weight in qat.non_trainable_weights:
        key, _, end = weight.name.split(":")[0].rpartition("_")
        if key in ranges and end in ("min", "max"):
            weight.assign(ranges[key][end == "max"])
    for wrapper in qat.layers:
        norm = getattr(wrapper, "layer", None)
        inverse = ranges.get(f"quant_{getattr(norm, 'name', '')}/inverse")
        if isinstance(norm, QatLayerNorm) and norm.epsilon < TINY_EPSILON and inverse and inverse[1] > 0:
            norm.variance_floor = inverse[1] ** -2


def to_int8_tflite_from_qat(qat: Any, calibration: np.ndarray) -> bytes:
    """The QAT model as a full-int8 TFLite model, traced at batch 1 so that every shape is static.

    Tensors with a fake-quant node take its range, and `calibration` covers any others.
    Tracing a concrete function keeps the prune-preserving masks. A clone would rebuild them
    from freshly initialised weights. Converting the frozen function, not a SavedModel made
    from it, avoids re-tracing every Keras layer: about 1.5 s here instead of 7 to 15 s.
    """
    global _converting
    dtype = qat.inputs[0].dtype
    batch_one = tf.TensorSpec((1, *qat.input_shape[1:]), dtype)
    _converting = True
    try:
        with int8_graph():
            function = tf.function(lambda x: qat(x, training=False)).get_concrete_function(batch_one)
    finally:
        _converting = False

    def representative() -> Iterator[list[np.ndarray]]:
        for example in calibration:
            yield [example[np.newaxis].astype(dtype.as_numpy_dtype)]

    converter = tf.lite.TFLiteConverter.from_concrete_functions([function], qat)
    converter.experimental_lower_to_saved_model = False
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    with native_output_silenced(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
        return compact_names(converter.convert())


def float_weights_from(qat: Any, model: Any) -> None:
    """Copy the trained float weights of a QAT model back into the float `model` it was made from, layer by name."""
    trained = {w.name: w for w in qat.weights}  # a wrapped layer's own variables keep their names ("stem0/kernel:0")
    for layer in model.layers:
        if layer.weights and all(w.name in trained for w in layer.weights):
            layer.set_weights([trained[w.name].numpy() for w in layer.weights])
