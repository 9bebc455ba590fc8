"""A model's test split run with the TFLite Micro interpreter, beside LiteRT's figure on the same examples.

The board runs TFLite Micro's kernels, not LiteRT's, so a microcontroller build's
accuracy is measured with them (the `tflite_micro` package's host interpreter,
reference kernels), example by example, and compared with LiteRT's outputs: the
accuracy of each and how many outputs are bit-for-bit the same.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgecc.arena import PROBE_ARENA, abort_cause
from edgecc.errors import EdgeccError, one_line
from edgecc.modelcheck import check_model_file
from edgecc.progress import Reporter, native_output_silenced
from edgecc.reader import read_graph
from edgecc.runtime import Model, Quantization


@dataclass(frozen=True)
class MicroEvaluation:
    """Test accuracy with TFLite Micro and with LiteRT, and how far their outputs agree."""

    examples: int
    accuracy: float
    litert_accuracy: float
    same_predictions: int  # examples where both predict the same class
    identical_outputs: int  # examples whose quantized outputs are bit-for-bit equal
    method: str = "tflite-micro Python interpreter (host reference kernels), one example at a time"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class MicroModel:
    """The TFLite Micro interpreter with `content` allocated; one input and one output."""

    def __init__(self, content: bytes) -> None:
        check_model_file(content)  # TFLite Micro trusts the file: a corrupt one can crash it
        cause = abort_cause(read_graph(content))
        if cause:
            raise EdgeccError(f"TFLite Micro cannot run this model: {cause}")
        from tflite_micro import runtime

        try:
            with native_output_silenced():
                self.interpreter = runtime.Interpreter.from_bytes(content, arena_size=PROBE_ARENA)
        except (RuntimeError, ValueError) as err:
            raise EdgeccError(f"TFLite Micro cannot allocate this model: {one_line(err)}") from None
        detail = self.interpreter.get_input_details(0)
        self.dtype = np.dtype(detail["dtype"])
        params = detail["quantization_parameters"]
        scales, zero_points = params.get("scales", []), params.get("zero_points", [])
        self.quantization = Quantization(float(scales[0]), int(zero_points[0])) if len(scales) else Quantization(0.0, 0)

    def raw(self, x: np.ndarray) -> np.ndarray:
        """The quantized output for one float example (no batch axis)."""
        self.interpreter.set_input(self.quantization.quantize(x[np.newaxis], self.dtype), 0)
        self.interpreter.invoke()
        return np.asarray(self.interpreter.get_output(0)).copy()


def evaluate_micro(content: bytes, x: np.ndarray, y: np.ndarray, reporter: Reporter | None = None) -> MicroEvaluation:
    """Run every example of (`x`, `y`) with TFLite Micro and with LiteRT and compare."""
    micro, litert = MicroModel(content), Model(content)
    same_predictions = identical = micro_right = litert_right = 0
    reporter = reporter or Reporter(quiet=True)
    with reporter.task("evaluating with TFLite Micro", len(x)) as advance:
        for example, label in zip(x, y):
            ours = micro.raw(example)
            litert.invoke(example)
            theirs = litert.interpreter.get_tensor(litert.output["index"])
            ours_class, theirs_class = int(np.argmax(ours)), int(np.argmax(theirs))
            identical += int(ours.dtype == theirs.dtype and np.array_equal(ours, theirs))
            same_predictions += int(ours_class == theirs_class)
            micro_right += int(ours_class == int(label))
            litert_right += int(theirs_class == int(label))
            advance()
    count = max(len(x), 1)
    return MicroEvaluation(examples=len(x), accuracy=micro_right / count, litert_accuracy=litert_right / count,
                           same_predictions=same_predictions, identical_outputs=identical)
