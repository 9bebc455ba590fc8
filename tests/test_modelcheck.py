"""The model verifier: each kind of corruption is refused with exit code 2 and one line naming it (no TensorFlow)."""

from __future__ import annotations

import math
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import flatbuffers
import pytest
from ai_edge_litert import schema_py_generated as schema

from conftest import edgecc
from edgecc.errors import EdgeccError
from edgecc.modelcheck import check_model_file

FIXTURES = Path(__file__).parent / "fixtures"
VIT = (FIXTURES / "vit_int8.tflite").read_bytes()


def repacked(change: Callable[[schema.ModelT], None], content: bytes = VIT) -> bytes:
    model = schema.ModelT.InitFromPackedBuf(content, 0)
    change(model)
    builder = flatbuffers.Builder(len(content) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _set(obj: object, name: str, value: object) -> None:
    setattr(obj, name, value)


def _constant(model: schema.ModelT) -> schema.TensorT:
    return next(t for t in model.subgraphs[0].tensors if model.buffers[t.buffer].data is not None)


def _move_buffer_past_end(model: schema.ModelT) -> None:
    buffer = model.buffers[_constant(model).buffer]
    buffer.offset, buffer.size, buffer.data = 10**9, len(buffer.data), None


@pytest.mark.parametrize("name", ["vit_int8", "vit_float", "gelu_int8"])
def test_valid_fixtures_pass(name: str) -> None:
    check_model_file((FIXTURES / f"{name}.tflite").read_bytes())
    check_model_file(repacked(lambda model: None, (FIXTURES / f"{name}.tflite").read_bytes()))


CORRUPTIONS = {
    "tensor buffer index": (lambda m: _set(m.subgraphs[0].tensors[3], "buffer", 4000), r"tensor 3 of subgraph 0 reads buffer 4000, but the model has \d+ buffers"),
    "operator input": (lambda m: _set(m.subgraphs[0].operators[1], "inputs", [999]), r"operator 1 of subgraph 0's inputs names tensor 999"),
    "operator output": (lambda m: _set(m.subgraphs[0].operators[0], "outputs", [-5]), r"operator 0 of subgraph 0's outputs names tensor -5"),
    "opcode index": (lambda m: _set(m.subgraphs[0].operators[2], "opcodeIndex", 77), r"operator 2 of subgraph 0 uses operator code 77"),
    "subgraph input": (lambda m: _set(m.subgraphs[0], "inputs", [-1]), r"subgraph 0's inputs names tensor -1"),
    "unknown builtin": (lambda m: _set(m.operatorCodes[0], "builtinCode", 9999), r"operator code 0 has unknown builtin code 9999"),
    "opcode version": (lambda m: _set(m.operatorCodes[0], "version", 0), r"operator code 0 \(\w+\) has version 0"),
    "negative dimension": (lambda m: _set(m.subgraphs[0].tensors[0], "shape", [1, -8, 8, 1]), r"tensor 0 of subgraph 0 has a negative dimension"),
    "huge dimension": (lambda m: _set(m.subgraphs[0].tensors[0], "shape", [2**30, 2**30, 8, 1]), r"tensor 0 of subgraph 0 has an impossible shape"),
    "shape signature": (lambda m: _set(m.subgraphs[0].tensors[0], "shapeSignature", [1, 7, 8, 1]), r"tensor 0 of subgraph 0's shape_signature \[1, 7, 8, 1\] does not match"),
    "constant size": (lambda m: _set(_constant(m), "shape", [3, 5, 7]), r"needs \d+ bytes of constant data, but buffer \d+ holds"),
    "buffer past the end": (_move_buffer_past_end, r"buffer \d+ lies past the end of the file"),
    "tensor type": (lambda m: _set(m.subgraphs[0].tensors[0], "type", 99), r"tensor 0 of subgraph 0 has unknown type 99"),
    "no subgraphs": (lambda m: _set(m, "subgraphs", []), r"the model has no subgraphs"),
}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_each_corruption_is_named(kind: str) -> None:
    change, message = CORRUPTIONS[kind]
    with pytest.raises(EdgeccError, match=r"^model: .*" + message) as error:
        check_model_file(repacked(change))
    assert error.value.exit_code == 2 and "\n" not in str(error.value)


@pytest.mark.parametrize("where, value, message", [
    (0, 0xFFFF0000, r"the root offset points outside the file"),  # the root table
    (None, None, r"points outside the file|lies outside|vtable is corrupt|misaligned|more than the file holds"),
])
def test_raw_corruption_is_refused(where: int | None, value: int | None, message: str) -> None:
    data = bytearray(VIT)
    if where is None:
        data = data[: len(data) // 3]  # truncated
    else:
        data[where:where + 4] = value.to_bytes(4, "little")
    with pytest.raises(EdgeccError, match=message):
        check_model_file(bytes(data))


def test_check_exits_2_with_one_line(tmp_path: Path) -> None:
    """Through the command a user runs: the buffer-past-the-end model that once 'fit' stm32h7."""
    model = tmp_path / "bad.tflite"
    model.write_bytes(repacked(_move_buffer_past_end))
    for target in ("rpi4", "stm32h7"):
        result = edgecc("check", str(model), "--target", target)
        assert result.returncode == 2, result.stdout
        assert result.stderr.count("\n") == 1 and "lies past the end of the file" in result.stderr


def campaign_mutant(seed: int, index: int) -> bytes:
    """Mutant `index` of scripts/fuzz_models.py's campaign `seed`: the same bytes every time."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from fuzz_models import FIXTURES, SEEDS, mutant

    return mutant([(FIXTURES / s).read_bytes() for s in SEEDS], seed, index)[2]


# Mutants the campaigns (BENCHMARKS.md) found slipping through: each now exits 2 with one line.
FOUND_BY_FUZZING = {389: "turns a BOOL tensor into a INT8 one", 1739: "turns a INT32 tensor into a INT8 one",
                    3688: "name is not UTF-8 text", 4372: "name is not UTF-8 text",
                    7360: "input 0 is -1, no tensor"}  # the 10,000-mutant run: SIGSEGV in LiteRT


@pytest.mark.parametrize("index", sorted(FOUND_BY_FUZZING))
def test_mutants_found_by_the_campaign_are_refused(index: int) -> None:
    content = campaign_mutant(0, index)
    with pytest.raises(EdgeccError, match=FOUND_BY_FUZZING[index]):
        check_model_file(content)


def test_shadow_on_a_model_whose_batch_is_not_one_is_bad_input(tmp_path: Path) -> None:
    import numpy as np

    content = campaign_mutant(0, 239)  # input batch 1048576
    (tmp_path / "m.tflite").write_bytes(content)
    np.save(tmp_path / "x.npy", np.zeros((2, 8, 8, 1), np.float32))
    result = edgecc("shadow", "--baseline", str(tmp_path / "m.tflite"), "--candidate", str(tmp_path / "m.tflite"),
                    "--data", str(tmp_path / "x.npy"), "--log", str(tmp_path / "a.jsonl"), "--quiet")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "cannot take an example of shape (8, 8, 1)" in result.stderr


def test_bench_on_a_model_without_inputs_is_bad_input(tmp_path: Path) -> None:
    content = campaign_mutant(1, 412)  # found by the seed-1 campaign: its first operator reads the dropped input
    (tmp_path / "m.tflite").write_bytes(content)
    result = edgecc("bench", str(tmp_path / "m.tflite"), "--runs", "2", "--warmup", "0", "--quiet")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "operator 0 of subgraph 0 reads tensor 0, which no earlier operator writes" in result.stderr


def test_bench_on_a_well_formed_model_without_outputs_is_bad_input(tmp_path: Path) -> None:
    from edgecc.tflite_edit import pack, unpack

    model = unpack((FIXTURES / "gelu_int8.tflite").read_bytes())
    model.subgraphs[0].outputs = []  # every operator still reads what an earlier one wrote: well formed
    (tmp_path / "m.tflite").write_bytes(pack(model))
    result = edgecc("bench", str(tmp_path / "m.tflite"), "--runs", "2", "--warmup", "0", "--quiet")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "the model has 1 inputs and 0 outputs" in result.stderr


def test_a_fully_connected_without_its_weights_is_refused() -> None:
    """Found by the seed-1 campaign (mutant 6838: FULLY_CONNECTED's weights index overwritten with -1): check, profile
    and bench died with SIGSEGV in LiteRT on some runs, before LiteRT's own "was optional but was expected"."""
    with pytest.raises(EdgeccError, match=r"operator 52 of subgraph 0 \(FULLY_CONNECTED\)'s input 1 is -1, no tensor"):
        check_model_file(campaign_mutant(1, 6838))


def test_weights_whose_buffer_index_was_lost_are_refused() -> None:
    """Found by the seed-1 campaign (mutant 862: a 32x32 weight tensor's buffer index overwritten with 0, the empty
    buffer): LiteRT and TFLite Micro ran it on weights nothing wrote, and check said it fits."""
    with pytest.raises(EdgeccError, match="operator 25 of subgraph 0 reads tensor 13, which no earlier operator"):
        check_model_file(campaign_mutant(1, 862))


@pytest.mark.parametrize("command", [("check", "--target", "rpi4"), ("check", "--target", "stm32h7"),
                                     ("profile", "--target", "rpi4"), ("bench", "--runs", "2", "--warmup", "0")])
def test_a_model_whose_output_no_operator_writes_is_refused(tmp_path: Path, command: tuple[str, ...]) -> None:
    """Found by the seed-1 campaign (mutant 3814: the operator list cut from 4 to 1). LiteRT and TFLite Micro both
    allocate it; check said it fits and shadow failed with an internal error (LiteRT: "Tensor data is null")."""
    (tmp_path / "m.tflite").write_bytes(campaign_mutant(1, 3814))
    result = edgecc(command[0], str(tmp_path / "m.tflite"), *command[1:])
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "subgraph 0's output tensor 7 is written by no operator" in result.stderr


@pytest.mark.parametrize("size", [13, 8, 16])
def test_a_malformed_offline_memory_plan_is_refused(tmp_path: Path, size: int) -> None:
    """Found by the seed-2 campaign (mutant 2692 of a TREC build for stm32h7: its OfflineMemoryAllocation buffer
    resized to bytes that are not whole 32-bit words): TFLite Micro loaded it and check stopped with an internal
    error (exit 3). A plan shorter than its header or than the offsets the header counts is refused too, as TFLite
    Micro would read past it; a well-formed plan passes."""
    from edgecc.memplan import read_offline_plan, write_offline_plan
    from edgecc.reader import read_graph

    planned = write_offline_plan(VIT, [-1] * len(read_graph(VIT).tensors))
    check_model_file(planned)

    def resize(model: schema.ModelT) -> None:
        entry = next(e for e in model.metadata if e.name == b"OfflineMemoryAllocation")
        model.buffers[entry.buffer].data = bytes(model.buffers[entry.buffer].data)[:size]

    (tmp_path / "m.tflite").write_bytes(repacked(resize, planned))
    for target in ("stm32h7", "rpi4"):
        result = edgecc("check", str(tmp_path / "m.tflite"), "--target", target)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert f"OfflineMemoryAllocation metadata (TFLite Micro's offline memory plan) is malformed: {size} bytes" \
            in result.stderr
    with pytest.raises(EdgeccError, match="malformed"):
        read_offline_plan((tmp_path / "m.tflite").read_bytes())


LITERT_RUNS = """
import sys
from ai_edge_litert.interpreter import Interpreter
interpreter = Interpreter(model_path=sys.argv[1])
interpreter.allocate_tensors()
interpreter.invoke()
"""


@pytest.mark.parametrize("scale, refused", [
    (1.2264053e37, "twice the larger input scale over 2\\*\\*20 times the output scale is 0"),
    (1e-9, "twice the larger input scale over 2\\*\\*20 times the output scale is 9.3"),
    (0.0, "scale\\(s\\) \\[0.0\\]; a tensor's scale must be positive and finite"),
    (-1.0, "must be positive and finite"),
    (math.inf, "must be positive and finite"), (math.nan, "must be positive and finite"),
    (1e-6, None), (1e30, None)])
def test_a_quantization_scale_litert_would_abort_on_is_refused(tmp_path: Path, scale: float,
                                                               refused: str | None) -> None:
    """Found by the seed-2 campaign (mutant 8152: the int8 ADD's output scale overwritten with 1.2e37): check, profile,
    bench and shadow all died by SIGABRT, as LiteRT's ADD aborts the process when twice its larger input scale over
    2**20 times its output scale is not between 0 and 1. Checked against LiteRT itself: every scale refused here
    kills it (or, NaN, is refused by it), every scale passed runs."""
    def set_scale(model: schema.ModelT) -> None:
        model.subgraphs[0].tensors[26].quantization.scale = [scale]  # vit_int8's positional ADD's output

    path = tmp_path / "m.tflite"
    path.write_bytes(repacked(set_scale))
    runtime = subprocess.run([sys.executable, "-c", LITERT_RUNS, str(path)], capture_output=True, timeout=120)
    result = edgecc("check", str(path), "--target", "rpi4")
    if refused is None:
        assert runtime.returncode == 0 and result.returncode == 0, (runtime.stderr, result.stderr)
        return
    assert runtime.returncode == (1 if math.isnan(scale) else -signal.SIGABRT), runtime.stderr
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert re.search(refused, result.stderr), result.stderr


@pytest.mark.parametrize("scale, refused", [(0.0, None), (-1.0, "a constant's scale must be finite and at least 0")])
def test_a_constant_channel_of_scale_zero_runs(tmp_path: Path, scale: float, refused: str | None) -> None:
    """A per-channel weight scale of 0 (a channel whose weights are all zero) is a model LiteRT runs, so it passes;
    a negative one does not."""
    def set_channel(model: schema.ModelT) -> None:
        weights = next(t for t in model.subgraphs[0].tensors
                       if t.type == schema.TensorType.INT8 and model.buffers[t.buffer].data is not None
                       and t.quantization is not None and len(t.quantization.scale) > 1)
        weights.quantization.scale = [scale, *weights.quantization.scale[1:]]

    path = tmp_path / "m.tflite"
    path.write_bytes(repacked(set_channel))
    result = edgecc("check", str(path), "--target", "rpi4")
    if refused is None:
        runtime = subprocess.run([sys.executable, "-c", LITERT_RUNS, str(path)], capture_output=True, timeout=120)
        assert runtime.returncode == 0 and result.returncode == 0, (runtime.stderr, result.stderr)
    else:
        assert result.returncode == 2 and refused in result.stderr, result.stderr
