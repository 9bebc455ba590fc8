"""Running TFLite models with the real interpreter, without importing TensorFlow.

ai-edge-litert is the interpreter; older boards may only have tflite-runtime,
and a training machine always has tensorflow.lite, tried in that order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgecc.errors import EdgeccError, one_line
from edgecc.modelcheck import check_model_file
from edgecc.progress import native_output_silenced


def interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            try:
                from edgecc.train.tf import tensorflow

                Interpreter = tensorflow().lite.Interpreter
            except EdgeccError:
                raise EdgeccError("no TFLite interpreter found: pip install ai-edge-litert") from None
    return Interpreter


def load_interpreter(content: bytes, threads: int = 1) -> Any:
    """The real interpreter with the model's tensors allocated; EdgeccError (one line) when it refuses the model."""
    check_model_file(content)  # LiteRT's native loader must never see a corrupt file
    try:
        with native_output_silenced():
            interpreter = interpreter_class()(model_content=content, num_threads=threads)
            interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as err:
        raise EdgeccError(f"the TFLite interpreter cannot load this model: {one_line(err)}") from None
    return interpreter


@dataclass(frozen=True)
class Quantization:
    """Affine int8 mapping: real = scale * (q - zero_point); scale 0 means a float tensor."""

    scale: float
    zero_point: int

    def quantize(self, x: np.ndarray, dtype: np.dtype) -> np.ndarray:
        if not self.scale:
            return x.astype(dtype)
        info = np.iinfo(dtype)
        return np.clip(np.round(x / self.scale) + self.zero_point, info.min, info.max).astype(dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        if not self.scale:
            return q.astype(np.float32)
        return (q.astype(np.float32) - self.zero_point) * self.scale


class Model:
    """One loaded TFLite model with a single input and output, run an example at a time."""

    def __init__(self, content: bytes, threads: int = 1) -> None:
        self.threads = threads
        self.interpreter = load_interpreter(content, threads)
        inputs, outputs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        if not inputs or not outputs:
            raise EdgeccError(f"the model has {len(inputs)} inputs and {len(outputs)} outputs; edgecc runs models "
                              "with one input and one output")
        self.input, self.output = inputs[0], outputs[0]
        self.input_quantization = Quantization(*self.input["quantization"])
        self.output_quantization = Quantization(*self.output["quantization"])

    def run(self) -> None:
        """One inference on the input already set; a kernel that refuses its tensors is the model's fault (exit 2)."""
        try:
            self.interpreter.invoke()
        except RuntimeError as err:
            raise EdgeccError(f"the TFLite interpreter cannot run this model: {one_line(err)}") from None

    def set_input(self, x: np.ndarray) -> None:
        """Quantize one float example (no batch axis) into the input tensor, for the next `run`."""
        try:  # LiteRT checks the input's shape and type only here (a batch other than 1, a bool input, ...)
            q = self.input_quantization.quantize(x[np.newaxis], self.input["dtype"])
            self.interpreter.set_tensor(self.input["index"], q)
        except ValueError as err:
            raise EdgeccError(f"the model's input {[int(d) for d in self.input['shape']]} {np.dtype(self.input['dtype']).name} "
                              f"cannot take an example of shape {x.shape}: {one_line(err)}") from None

    def invoke(self, x: np.ndarray) -> np.ndarray:
        """Run one float example (no batch axis); returns the float output of the model."""
        self.set_input(x)
        self.run()
        return self.output_quantization.dequantize(self.interpreter.get_tensor(self.output["index"]))[0]
