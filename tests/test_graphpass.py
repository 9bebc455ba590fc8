"""The graph passes keep every output bit-exact on real models and remove operators and tensors; text models with
a trimmed vocabulary run on TFLite Micro after them; the TFLite Micro evaluation agrees with LiteRT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgecc import graphpass
from edgecc.arena import measure_arena
from edgecc.check import assess
from edgecc.errors import EdgeccError
from edgecc.graphpass import (MICRO_PASSES, PASSES, EditGraph, heads_as_batch_matmul, optimize, optimize_verified,
                              random_inputs, same_outputs)
from edgecc.liveness import plan_memory
from edgecc.lower import lower_for_edgetpu
from edgecc.memplan import micro_outputs, offline_offsets, write_offline_plan
from edgecc.micro_eval import MicroModel, evaluate_micro
from edgecc.reader import read_graph
from edgecc.runtime import Model
from edgecc.tflite_edit import add_tensor, opcode, pack, tflite_schema, unpack

# what each pass removes on the committed models (operators), where its pattern exists there
ATTENTION = {"unpack_through_transpose": 2, "reshape_through_transpose": 1, "softmax_per_part": 3,
             "transpose_into_products": 1}
REMOVED = {"vit_int8": ATTENTION, "text_int8": ATTENTION}
ID_MAP_ROWS = 80  # input vocabulary of the trimmed text model below


def with_id_map(content: bytes) -> bytes:
    """The text fixture as a trimmed vocabulary converts: a constant int32 id map GATHERed before the embedding
    table (TokenEmbedding's `input_vocabulary`), input ids 0..ID_MAP_ROWS-1 sent to the table's rows."""
    schema = tflite_schema()
    model = unpack(content)
    subgraph = model.subgraphs[0]
    embedding = subgraph.operators[0]
    ids, rows = int(embedding.inputs[1]), int(subgraph.tensors[int(embedding.inputs[0])].shape[0])
    id_map = np.random.default_rng(1).integers(0, rows, ID_MAP_ROWS).astype("<i4")
    table = add_tensor(model, subgraph.tensors[ids], "id_map", (ID_MAP_ROWS,), id_map.tobytes())
    mapped = add_tensor(model, subgraph.tensors[ids], "mapped_ids", tuple(subgraph.tensors[ids].shape))
    gather = schema.OperatorT()
    gather.opcodeIndex = opcode(model, schema.BuiltinOperator.GATHER, 1)
    gather.inputs, gather.outputs = np.array([table, ids], np.int32), np.array([mapped], np.int32)
    gather.builtinOptionsType, gather.builtinOptions = schema.BuiltinOptions.GatherOptions, schema.GatherOptionsT()
    embedding.inputs = np.array([int(embedding.inputs[0]), mapped], np.int32)
    subgraph.operators.insert(0, gather)
    return pack(model)


@pytest.fixture(scope="module")
def models(tiny_models: dict[str, Path]) -> dict[str, bytes]:
    found = {name: tiny_models[name].read_bytes() for name in ("vit_int8", "gelu_int8")}
    found["text_int8"] = (Path(__file__).parent / "fixtures" / "text_int8.tflite").read_bytes()
    found["vit_lowered"] = lower_for_edgetpu(found["vit_int8"])  # the Edge TPU form: RESHAPE around each CONV_2D
    found["text_id_map"] = with_id_map(found["text_int8"])
    return found


@pytest.mark.parametrize("name", ["vit_int8", "text_int8", "gelu_int8", "vit_lowered", "text_id_map"])
@pytest.mark.parametrize("one_pass", PASSES, ids=[p.__name__ for p in PASSES])
def test_each_pass_is_bit_exact_on_real_models(models: dict[str, bytes], name: str, one_pass: graphpass.Pass) -> None:
    content = models[name]
    rewritten, report = optimize(content, (one_pass,))
    assert same_outputs(content, rewritten, random_inputs(content, 24))
    removed = REMOVED.get(name, {}).get(one_pass.__name__)
    if removed is not None:
        assert report.rewrites[one_pass.__name__] >= 1
        assert report.operators_after == report.operators_before - removed
        assert len(read_graph(rewritten).activation_tensors()) < len(read_graph(content).activation_tensors())
    if not report.rewrites:
        assert rewritten is content  # nothing to do: the very same bytes


def test_all_passes_together_shrink_the_attention(models: dict[str, bytes]) -> None:
    content = models["vit_int8"]
    rewritten, report = optimize(content)
    before, after = read_graph(content).op_counts(), read_graph(rewritten).op_counts()
    assert (report.operators_before, report.operators_after) == (53, 46)
    assert (before["TRANSPOSE"], after["TRANSPOSE"]) == (4, 1)  # only the values' per-head transpose is left
    assert (before["CONCATENATION"], after["CONCATENATION"]) == (2, 1)  # scores no longer joined for one softmax
    assert same_outputs(content, rewritten, random_inputs(content, 48, seed=3))


def test_reshape_chains_and_identities_go_in_the_lowered_graph(models: dict[str, bytes]) -> None:
    content = models["vit_lowered"]
    rewritten, report = optimize(content)
    assert report.rewrites.get("merge_reshapes", 0) + report.rewrites.get("drop_identities", 0) >= 1
    assert read_graph(rewritten).op_counts()["RESHAPE"] < read_graph(content).op_counts()["RESHAPE"]
    assert same_outputs(content, rewritten, random_inputs(content, 24))


def test_a_trimmed_vocabulary_runs_on_tflite_micro_after_the_passes(models: dict[str, bytes]) -> None:
    content = models["text_id_map"]
    with pytest.raises(EdgeccError, match="TFLite Micro cannot allocate"):
        MicroModel(content)  # its GATHER refuses the int32 id map ("Type 'INT32' is not supported by gather")
    rewritten, report = optimize_verified(content)
    assert report.rewrites["gather_ids_for_micro"] == 1
    ops = read_graph(rewritten).op_counts()
    assert ops["CAST"] == 1 and ops["GATHER"] == 2
    graph = read_graph(rewritten)
    assert {graph.tensors[op.inputs[0]].dtype for op in graph.operators if op.kind == "GATHER"} == {"FLOAT32", "INT8"}
    fit = assess(rewritten, "stm32h7")  # the float32 ids go straight to a CAST: still an int8 model for the check
    assert fit.ok and not fit.float_tensors and fit.arena is not None
    ids = np.random.default_rng(2).integers(0, ID_MAP_ROWS, (40, 8)).astype(np.int32)
    labels = np.random.default_rng(3).integers(0, 3, 40)
    result = evaluate_micro(rewritten, ids, labels)
    assert result.examples == 40 and result.same_predictions >= 38
    assert abs(result.accuracy - result.litert_accuracy) <= 2 / 40


def test_tflite_micro_allocates_less_after_the_passes(models: dict[str, bytes], tmp_path: Path) -> None:
    (tmp_path / "before.tflite").write_bytes(models["vit_int8"])
    (tmp_path / "after.tflite").write_bytes(optimize(models["vit_int8"])[0])
    before, after = measure_arena(tmp_path / "before.tflite"), measure_arena(tmp_path / "after.tflite")
    assert after.bytes < before.bytes


def test_the_passes_are_bit_exact_on_tflite_micro_too(models: dict[str, bytes]) -> None:
    content = models["vit_int8"]
    before, after = MicroModel(content), MicroModel(optimize(content)[0])
    for seed in range(12):
        x = np.random.default_rng(seed).standard_normal((8, 8, 1)).astype(np.float32)
        assert np.array_equal(before.raw(x), after.raw(x))


def test_tflite_micro_accuracy_beside_litert(models: dict[str, bytes]) -> None:
    x = np.random.default_rng(4).standard_normal((30, 8, 8, 1)).astype(np.float32)
    y = np.random.default_rng(5).integers(0, 10, 30)
    result = evaluate_micro(optimize(models["vit_int8"])[0], x, y)
    # TFLite Micro's reference kernels round a few int8 outputs differently from LiteRT's (never bit-identical on
    # this model), so a near tie may go the other way; the classes agree on nearly every example
    assert result.examples == 30 and result.same_predictions >= 27
    assert abs(result.accuracy - result.litert_accuracy) <= (30 - result.same_predictions) / 30


def test_a_pass_that_changes_an_output_is_not_kept(models: dict[str, bytes]) -> None:
    def sharper_softmax(graph: EditGraph) -> int:  # not bit-exact on purpose
        for index, kind in enumerate(graph.kinds):
            if kind == "SOFTMAX" and graph.op(index).builtinOptions.beta == 1.0:
                graph.op(index).builtinOptions.beta = 4.0
                return 1
        return 0

    content = models["vit_int8"]
    kept, report = optimize_verified(content, passes=(sharper_softmax,))
    assert kept is content and report.skipped and "differed" in report.skipped


def test_a_model_carrying_an_offline_plan_is_left_as_it_is(models: dict[str, bytes]) -> None:
    content = models["vit_int8"]
    graph = read_graph(content)
    planned = write_offline_plan(content, offline_offsets(graph, plan_memory(graph)))
    assert optimize(content)[0] is not content  # the passes would renumber the tensors the plan's offsets index
    kept, report = optimize(planned)
    assert kept is planned and report.skipped and "offline memory plan" in report.skipped
    assert report.operators_after == report.operators_before


def test_the_build_records_the_passes(default_build) -> None:
    out, manifest, _ = default_build
    passes = manifest["model"]["graph_passes"]
    assert passes["operators"][1] < passes["operators"][0] and passes["tensors"][1] < passes["tensors"][0]
    assert len(read_graph((out / "model.tflite").read_bytes()).operators) == passes["operators"][1]
    assert "Graph passes (bit-exact)" in (out / "report.md").read_text()
    assert manifest["metrics"]["tflite_micro"] is None  # rpi4 runs LiteRT


def test_the_first_operator_where_the_runtimes_part_is_named(models: dict[str, bytes]) -> None:
    """evaluate_micro names the first example whose outputs differ and the first operator whose output differs on
    it; checked here prefix by prefix with both interpreters."""
    from edgecc.micro_eval import prefix_model

    content = optimize(models["vit_int8"])[0]
    x = np.random.default_rng(4).standard_normal((6, 8, 8, 1)).astype(np.float32)
    result = evaluate_micro(content, x, np.zeros(6, np.int64))
    first = result.first_difference
    assert result.identical_outputs < 6 and first is not None
    micro, litert = MicroModel(content), Model(content)
    identical = []
    for e in x:
        litert.invoke(e)
        identical.append(np.array_equal(micro.raw(e), litert.interpreter.get_tensor(litert.output["index"])))
    assert first["example"] == identical.index(False)
    example, k = x[first["example"]], first["operator"]

    def parts(prefix: bytes) -> np.ndarray:
        lite = Model(prefix)
        lite.invoke(example)
        return MicroModel(prefix).raw(example).astype(int) - lite.interpreter.get_tensor(lite.output["index"]).astype(int)

    assert not any(parts(prefix_model(content, i)).any() for i in range(k))
    differences = parts(prefix_model(content, k))
    assert read_graph(content).operators[k].kind == first["kind"]
    assert (np.count_nonzero(differences), differences.size, np.abs(differences).max()) == (
        first["elements_differing"], first["elements"], first["max_steps"])
    # its cause, recomputed from the operator's inputs (edgecc.requantize, checked in tests/test_requantize.py)
    assert "TFLite Micro rescales its integer results with two roundings" in first["cause"]


@pytest.mark.parametrize("name", ["vit_int8", "text_int8"])
def test_heads_as_one_batch_matmul_are_bit_exact_on_tflite_micro_and_allocate_less(models: dict[str, bytes],
                                                                                   name: str, tmp_path: Path) -> None:
    """After the general passes, one block's per-head products, softmaxes and splits become two BATCH_MATMULs and one
    SOFTMAX over all heads: TFLite Micro gives the same bits (checked here apart from optimize_verified's own
    check, on other inputs) and allocates a smaller arena, with no transposed operand kept in its persistent part."""
    content = optimize(models[name])[0]
    rewritten, report = optimize(content, (heads_as_batch_matmul,))
    assert report.rewrites == {"heads_as_batch_matmul": 1}
    before, after = read_graph(content), read_graph(rewritten)
    assert after.op_counts()["BATCH_MATMUL"] == 2 and after.op_counts()["SOFTMAX"] == 1
    assert "UNPACK" not in after.op_counts() and "CONCATENATION" not in after.op_counts()
    assert all(op.options["adj_y"] and not op.options["adj_x"] for op in after.operators if op.kind == "BATCH_MATMUL")
    assert len(after.operators) < len(before.operators) and len(after.tensors) < len(before.tensors)
    inputs = random_inputs(content, 24, seed=7)
    assert same_outputs(content, rewritten, inputs, run=micro_outputs)
    (tmp_path / "before.tflite").write_bytes(content)
    (tmp_path / "after.tflite").write_bytes(rewritten)
    arena_before, arena_after = measure_arena(tmp_path / "before.tflite"), measure_arena(tmp_path / "after.tflite")
    assert arena_after.bytes < arena_before.bytes
    buffers = "Persistent buffer data"  # the kernels' own persistent allocations
    assert arena_after.persistent[buffers] <= arena_before.persistent[buffers]


def test_a_pass_exact_on_tflite_micro_only_is_verified_with_tflite_micro(models: dict[str, bytes]) -> None:
    """LiteRT's BATCH_MATMUL rounds its sums unlike its FULLY_CONNECTED, so LiteRT would refuse the rewrite; a
    TFLite Micro target's build checks it with the interpreter the board runs, and keeps it."""
    content = optimize(models["vit_int8"])[0]
    kept_by_litert, litert_report = optimize_verified(content, MICRO_PASSES)
    assert kept_by_litert is content and "differed" in litert_report.skipped
    kept, report = optimize_verified(content, MICRO_PASSES, run=micro_outputs)
    assert kept is not content and report.skipped is None and report.rewrites["heads_as_batch_matmul"] == 1
