"""Requantization as each runtime rounds it, recomputed from an operator's own inputs.

An int8 convolution, FULLY_CONNECTED, MUL or ADD sums (or multiplies) integers exactly, then rescales the int32
result to its output's scale (ADD rescales each input first): that step is where runtimes differ, by one
quantization step on values near a half. TFLite Micro, and CMSIS-NN on the board, round twice by default:
gemmlowp's rounding doubling high multiply by a fixed-point multiplier, then a rounding right shift (neither
TFLITE_SINGLE_ROUNDING nor CMSIS-NN's CMSIS_NN_USE_SINGLE_ROUNDING is set unless a board's build sets it; CMSIS-NN
asks for the two to be set alike).
LiteRT's kernels, and XNNPACK's, may round once, half up, or rescale in float32. `explain` recomputes an operator's
output each way in numpy and names the way that gives each runtime's output on every element, so a report states
why two runtimes part instead of guessing. Nothing here needs TensorFlow.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

FUSED = {0: (None, None), 1: (0.0, None), 3: (0.0, 6.0)}  # fused activation code -> the real range it clamps to
Rescale = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (int32 results, real scales broadcast to them) -> integers


@dataclass(frozen=True)
class Operand:
    """A quantized tensor's integer values with its scales (one, or one per output channel) and zero points."""

    values: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray


def quantized_multiplier(real: float) -> tuple[int, int]:
    """TFLite's QuantizeMultiplier: `real` = multiplier x 2^(shift - 31), multiplier in [2^30, 2^31)."""
    if real == 0:
        return 0, 0
    fraction, shift = math.frexp(real)
    multiplier = _round(fraction * (1 << 31))
    if multiplier == 1 << 31:
        multiplier, shift = multiplier // 2, shift + 1
    return (0, 0) if shift < -31 else (multiplier, shift)


def _fixed_point(real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """quantized_multiplier of each real scale (a scalar, or one per output channel), in `real`'s shape."""
    pairs = [quantized_multiplier(float(r)) for r in np.ravel(real)]
    multipliers, shifts = (np.array(column, np.int64).reshape(np.shape(real)) for column in zip(*pairs))
    return multipliers, shifts


def two_roundings(value: np.ndarray, real: np.ndarray) -> np.ndarray:
    """gemmlowp's SaturatingRoundingDoublingHighMul, then RoundingDivideByPOT: each rounds half away from zero."""
    multiplier, shift = _fixed_point(real)
    product = np.asarray(value, np.int64) * (np.int64(1) << np.maximum(shift, 0)) * multiplier
    nudge = np.where(product >= 0, np.int64(1) << 30, 1 - (np.int64(1) << 30))
    high = _truncating_divide(product + nudge, np.int64(1) << 31)
    right = np.maximum(-shift, 0)
    mask = (np.int64(1) << right) - 1
    return (high >> right) + ((high & mask) > (mask >> 1) + (high < 0))


def one_rounding(value: np.ndarray, real: np.ndarray) -> np.ndarray:
    """MultiplyByQuantizedMultiplier built with TFLITE_SINGLE_ROUNDING: one rounding, half up."""
    multiplier, shift = _fixed_point(real)
    total = 31 - shift
    return (np.asarray(value, np.int64) * multiplier + (np.int64(1) << (total - 1))) >> total


def float32_nearest_even(value: np.ndarray, real: np.ndarray) -> np.ndarray:
    """XNNPACK's fp32 requantization: the result times the scale in float32, rounded to the nearest even."""
    return np.rint(np.asarray(value, np.int64).astype(np.float32) * np.asarray(real, np.float32)).astype(np.int64)


WAYS: dict[str, Rescale] = {
    "two roundings (gemmlowp's doubling high multiply, then a rounding shift)": two_roundings,
    "one rounding, half up (TFLITE_SINGLE_ROUNDING's)": one_rounding,
    "a float32 scale, rounded to the nearest even": float32_nearest_even,
}


def _round(x: float) -> int:
    """std::round: half away from zero (Python's round() takes the even neighbour)."""
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


def _truncating_divide(a: np.ndarray, b: np.int64) -> np.ndarray:
    """C's integer division (toward zero), which gemmlowp's high multiply uses."""
    quotient = np.abs(a) // b
    return np.where(a < 0, -quotient, quotient)


def _clamped(value: np.ndarray, output: Operand, fused: int) -> np.ndarray:
    """`value` plus the output's zero point, clamped to int8 and to the fused activation's range."""
    low, high = FUSED[fused]
    zero, scale = int(output.zero_points[0]), float(output.scales[0])
    lowest = -128 if low is None else max(-128, zero + _round(low / scale))
    highest = 127 if high is None else min(127, zero + _round(high / scale))
    return np.clip(value + zero, lowest, highest)


# int32 results; their real scales (per output channel, the last axis, or one) as TFLite and as XNNPACK compute them
Results = tuple[np.ndarray, np.ndarray, np.ndarray]


def _scales(x: Operand, weights: Operand, output: Operand, float_product: bool) -> tuple[np.ndarray, np.ndarray]:
    """Each output channel's real scale, input x weight scale / output scale: as TFLite computes it (the product in
    float32 for FULLY_CONNECTED, `float_product`, in double for convolutions; the quotient in double) and as
    XNNPACK does (all in float32)."""
    weight_scales = np.asarray(weights.scales, np.float64)
    product = (np.float32(x.scales[0]) * weight_scales.astype(np.float32)).astype(np.float64) if float_product \
        else float(x.scales[0]) * weight_scales
    in_float32 = np.float32(x.scales[0]) * weight_scales.astype(np.float32) / np.float32(output.scales[0])
    return product / float(output.scales[0]), in_float32.astype(np.float32)


def _with_bias(sums: np.ndarray, operands: list[Operand | None], output: Operand, float_product: bool) -> Results:
    """The sums plus the operator's bias, when it has one, with each output channel's real scales."""
    x, weights, bias = (*operands, None)[:3]
    assert x is not None and weights is not None
    if bias is not None:
        sums = sums + bias.values.astype(np.int64)
    return (sums, *_scales(x, weights, output, float_product))


def _fully_connected(operands: list[Operand | None], output: Operand, options: Any) -> Results:
    x, weights = operands[0], operands[1]
    assert x is not None and weights is not None
    depth = weights.values.shape[-1]
    weight_values = weights.values.astype(np.int64) - int(weights.zero_points[0])  # nonzero for an activation
    sums = (x.values.astype(np.int64).reshape(-1, depth) - int(x.zero_points[0])) @ weight_values.T
    return _with_bias(sums, operands, output, float_product=True)


def same_padding(size: int, out: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TFLite's 'same' padding along one axis, (before, after): what `out` positions need beyond `size`, the odd one
    after; (0, 0) for a 'valid' output size."""
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _convolution(operands: list[Operand | None], output: Operand, options: Any) -> Results:
    """CONV_2D or DEPTHWISE_CONV_2D (weights (1, kh, kw, out) with a depth multiplier), NHWC, zero-point padding."""
    x, weights = operands[0], operands[1]
    assert x is not None and weights is not None
    depthwise = hasattr(options, "depthMultiplier")
    kernel_h, kernel_w = weights.values.shape[1:3]
    strides = (options.strideH, options.strideW)
    dilations = (options.dilationHFactor, options.dilationWFactor)
    values = x.values.astype(np.int64) - int(x.zero_points[0])
    sizes = []
    for axis, (kernel, stride, dilation) in enumerate(zip((kernel_h, kernel_w), strides, dilations)):
        size = values.shape[1 + axis]
        out = -(-size // stride) if options.padding == 0 else (size - (kernel - 1) * dilation - 1) // stride + 1
        sizes.append((out, *same_padding(size, out, kernel, stride, dilation)))
    padded = np.pad(values, ((0, 0), (sizes[0][1], sizes[0][2]), (sizes[1][1], sizes[1][2]), (0, 0)))
    if depthwise:
        padded = np.repeat(padded, weights.values.shape[3] // values.shape[3], axis=3)
    (out_h, _, _), (out_w, _, _) = sizes
    sums = np.zeros((values.shape[0], out_h, out_w, weights.values.shape[3 if depthwise else 0]), np.int64)
    kernel = weights.values.astype(np.int64)
    for ky in range(kernel_h):
        for kx in range(kernel_w):
            top, left = ky * dilations[0], kx * dilations[1]
            patch = padded[:, top: top + (out_h - 1) * strides[0] + 1: strides[0],
                           left: left + (out_w - 1) * strides[1] + 1: strides[1], :]
            sums += patch * kernel[0, ky, kx] if depthwise else patch @ kernel[:, ky, kx, :].T
    return _with_bias(sums, operands, output, float_product=False)


def _mul(operands: list[Operand | None], output: Operand, options: Any) -> Results:
    a, b = operands[0], operands[1]
    assert a is not None and b is not None
    products = (a.values.astype(np.int64) - int(a.zero_points[0])) * (b.values.astype(np.int64) - int(b.zero_points[0]))
    as_tflite = float(a.scales[0]) * float(b.scales[0]) / float(output.scales[0])
    in_float32 = np.float32(a.scales[0]) * np.float32(b.scales[0]) / np.float32(output.scales[0])
    return products, np.asarray(as_tflite), np.asarray(in_float32, np.float32)


ADD_LEFT_SHIFT = 20  # TFLite's int8 ADD lifts both inputs by 2^20 before rescaling each


def _add(operands: list[Operand | None], output: Operand, options: Any) -> dict[str, np.ndarray]:
    """TFLite's int8 ADD: each input, lifted by 2^20, rescaled to twice the larger input scale, summed, and the sum
    rescaled to the output; three rescalings, each rounded the same way. (In float32, the exact sum scaled once.)"""
    a, b = operands[0], operands[1]
    assert a is not None and b is not None
    x, y = ((o.values.astype(np.int64) - int(o.zero_points[0])) for o in (a, b))
    twice = 2 * max(float(a.scales[0]), float(b.scales[0]))
    ways = {}
    for name, rescale in WAYS.items():
        if rescale is float32_nearest_even:
            total = x.astype(np.float32) * np.float32(a.scales[0]) + y.astype(np.float32) * np.float32(b.scales[0])
            ways[name] = np.rint(total / np.float32(output.scales[0])).astype(np.int64)
            continue
        summed = sum(rescale(v * (1 << ADD_LEFT_SHIFT), np.asarray(float(o.scales[0]) / twice))
                     for v, o in ((x, a), (y, b)))
        ways[name] = rescale(summed, np.asarray(twice / ((1 << ADD_LEFT_SHIFT) * float(output.scales[0]))))
    return ways


def _rescaled_once(results: Callable[[list[Operand | None], Operand, Any], Results]) -> Recompute:
    """An operator whose exact integer results, computed once, are rescaled once each way (convolutions,
    FULLY_CONNECTED, MUL)."""
    def recompute(operands: list[Operand | None], output: Operand, options: Any) -> dict[str, np.ndarray]:
        values, as_tflite, in_float32 = results(operands, output, options)
        return {name: rescale(values, in_float32 if rescale is float32_nearest_even else as_tflite)
                for name, rescale in WAYS.items()}
    return recompute


Recompute = Callable[[list[Operand | None], Operand, Any], dict[str, np.ndarray]]  # each way's, before zero point
RECOMPUTED: dict[str, Recompute] = {
    "FULLY_CONNECTED": _rescaled_once(_fully_connected), "CONV_2D": _rescaled_once(_convolution),
    "DEPTHWISE_CONV_2D": _rescaled_once(_convolution), "MUL": _rescaled_once(_mul), "ADD": _add}


def recomputed(kind: str, options: Any, operands: list[Operand | None], output: Operand) -> dict[str, np.ndarray]:
    """`kind`'s output recomputed from `operands` each way (keys of WAYS), zero point added and clamped; empty when
    `kind`, its fused activation or its operands are not ones recomputed here."""
    recompute = RECOMPUTED.get(kind)
    fused = getattr(options, "fusedActivationFunction", 0)
    int8 = all(o is not None and o.values.dtype == np.int8 for o in operands[:2])
    if recompute is None or fused not in FUSED or not int8:
        return {}
    return {name: _clamped(values, output, fused) for name, values in recompute(operands, output, options).items()}


def way_of(ways: dict[str, np.ndarray], computed: np.ndarray) -> str | None:
    """The way (of `recomputed`'s) that gives `computed` on every element; None when none does."""
    return next((name for name, ours in ways.items()
                 if ours.size == computed.size and np.array_equal(ours.reshape(computed.shape), computed)), None)


def explain(kind: str, options: Any, operands: list[Operand | None], output: Operand, micro: np.ndarray,
            litert: np.ndarray) -> str | None:
    """Why TFLite Micro's output (`micro`) and LiteRT's (`litert`) of one operator differ, when recomputing it from
    its inputs (and the operator's `options`) finds each one's rescaling way; None otherwise."""
    ways = recomputed(kind, options, operands, output)
    ours, theirs = way_of(ways, micro), way_of(ways, litert)
    if ours is None or theirs is None or ours == theirs:
        return None
    return (f"recomputed here from its inputs: TFLite Micro rescales its integer results with {ours}, LiteRT with "
            f"{theirs}, on every element")
