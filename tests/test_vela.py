"""Arm's real Vela compiler on small int8 models built here with TensorFlow."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from conftest import needs_train_extra

from edgecc.train.convert import to_float_tflite, to_int8_tflite
from edgecc.errors import EdgeccError
from edgecc.reader import read_graph
from edgecc.targets import EthosU, Figure
from edgecc.vela import compile_for_ethos_u

# Arm's reference Cortex-M55 + Ethos-U55 system from Vela's own vela.ini (500 MHz NPU clock)
U55 = EthosU(accelerator_config="ethos-u55-128", system_config="Ethos_U55_High_End_Embedded",
             memory_mode="Shared_Sram", npu_clock_mhz=Figure(500, "test"), sram_bytes=Figure(256 * 1024, "test"))


def int8_tflite(model: Any) -> bytes:
    """Full-integer quantization with edgecc's own converter, calibrated on random data."""
    calibration = np.random.default_rng(0).standard_normal((8, *model.input_shape[1:]))
    return to_int8_tflite(model, calibration, per_channel=True)


@pytest.fixture(scope="module")
def conv_dense() -> Any:
    needs_train_extra()
    from edgecc.train.tf import keras

    k = keras()
    inputs = k.Input((16, 16, 3), batch_size=1)
    x = k.layers.Conv2D(8, 3, activation="relu")(inputs)
    outputs = k.layers.Dense(4)(k.layers.Flatten()(x))
    return k.Model(inputs, outputs)


@pytest.fixture(scope="module")
def conv_dense_int8(conv_dense: Any) -> bytes:
    return int8_tflite(conv_dense)


def test_conv_dense_runs_on_the_npu(conv_dense_int8: bytes) -> None:
    result = compile_for_ethos_u(conv_dense_int8, U55)
    assert result.vela_version.count(".") >= 1
    assert result.accelerator_config == "ethos-u55-128"
    assert result.npu_ops == 3 and result.cpu_ops == ()  # CONV_2D, RESHAPE, FULLY_CONNECTED
    assert 0 < result.sram_bytes <= 256 * 1024
    assert result.flash_bytes > 8 * 3 * 3 * 3  # at least the conv weights, encoded for the NPU
    assert result.cycles > 0 and result.latency_ms > 0
    # Vela's summary for this system config uses the same 500 MHz clock as the profile
    assert result.latency_ms == pytest.approx(result.cycles / 500e3)
    assert {op.kind for op in read_graph(result.model).operators} == {"CUSTOM"}  # the ethos-u op


def test_latency_follows_the_profiles_npu_clock(conv_dense_int8: bytes) -> None:
    fast = compile_for_ethos_u(conv_dense_int8, U55)
    slow = compile_for_ethos_u(conv_dense_int8, replace(U55, npu_clock_mhz=Figure(250, "test")))
    assert slow.cycles == fast.cycles
    assert slow.latency_ms == pytest.approx(2 * fast.latency_ms)


def test_op_the_npu_lacks_falls_back_to_the_cpu() -> None:
    needs_train_extra()
    from edgecc.train.tf import keras, tensorflow

    k, tf = keras(), tensorflow()
    inputs = k.Input((8, 16), batch_size=1)
    x = k.layers.Dense(16)(inputs)
    outputs = k.layers.Lambda(lambda t: tf.math.reduce_prod(t, axis=-1))(x)  # int8 REDUCE_PROD: no NPU kernel
    content = int8_tflite(k.Model(inputs, outputs))
    assert [op.kind for op in read_graph(content).operators] == ["FULLY_CONNECTED", "REDUCE_PROD"]

    result = compile_for_ethos_u(content, U55)
    assert result.cpu_ops == ("REDUCE_PROD",)
    assert result.npu_ops == 1
    assert [op.kind for op in read_graph(result.model).operators] == ["CUSTOM", "REDUCE_PROD"]


def test_float_model_is_refused(conv_dense: Any) -> None:
    with pytest.raises(EdgeccError, match="the Ethos-U needs a fully int8 model, but its CONV_2D operator works in float"):
        compile_for_ethos_u(to_float_tflite(conv_dense), U55)


def test_vela_error_becomes_one_line(conv_dense_int8: bytes) -> None:
    expected = r"Vela could not compile the model for ethos-u55-128: .*System_Config\.Nope"
    with pytest.raises(EdgeccError, match=expected) as err:
        compile_for_ethos_u(conv_dense_int8, replace(U55, system_config="Nope"))
    assert "\n" not in str(err.value)
