"""C++ sources for TFLite Micro firmware, checked with the system C++ compiler and the real TFLite Micro interpreter."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgecc.arena import measure_arena
from edgecc.errors import EdgeccError
from edgecc.micro import BUILTIN_METHODS, CUSTOM_METHODS, arena_size, used_ops, write_micro_sources
from edgecc.reader import read_graph
from edgecc.targets import load_target
from edgecc.vela import compile_for_ethos_u

CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
needs_cxx = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++, c++ or clang++) on PATH")
FILES = ["model_data.h", "model_data.cc", "op_resolver.h", "model_settings.h", "main.cc"]

# links against model_data.o and includes model_settings.h: both must stand alone, without TFLM
PROBE = r"""
#include <cstdint>
#include <cstdio>

#include "model_data.h"
#include "model_settings.h"

int main(int, char** argv) {
  std::FILE* f = std::fopen(argv[1], "wb");
  std::fwrite(g_model_data, 1, g_model_data_len, f);
  std::fclose(f);
  std::printf("%d %d %d %d\n", static_cast<int>(reinterpret_cast<uintptr_t>(g_model_data) % 16),
              kTensorArenaSize, kInput0Elements, kOutput0Elements);
  return 0;
}
"""


@pytest.fixture(scope="module")
def stm32(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, int, list[str]]:
    """Sources for the tiny int8 transformer on the STM32H7, with the arena measured by TFLite Micro."""
    model = tiny_models["vit_int8"].read_bytes()
    target = load_target("stm32h7")
    measured = measure_arena(tiny_models["vit_int8"]).bytes
    out = tmp_path_factory.mktemp("micro-stm32h7")
    names = write_micro_sources(out, model, read_graph(model), arena_size(measured, target), target)
    return out, model, measured, names


def registered(op_resolver_h: str) -> tuple[int, list[str]]:
    """The resolver's capacity N and the op names its Add* calls register."""
    by_method = {method: name for name, method in {**BUILTIN_METHODS, **CUSTOM_METHODS}.items()}
    capacity = int(re.search(r"using EdgeccOpResolver = tflite::MicroMutableOpResolver<(\d+)>;", op_resolver_h)[1])
    return capacity, [by_method[m] for m in re.findall(r"resolver\.(Add\w+)\(\)", op_resolver_h)]


def constant(header: str, name: str) -> int:
    return int(re.search(rf"constexpr int {name} = (-?\d+);", header)[1])


def test_every_file_says_what_made_it(stm32: tuple[Path, bytes, int, list[str]]) -> None:
    out, model, _, names = stm32
    assert names == FILES
    digest = hashlib.sha256(model).hexdigest()
    for name in names:
        head = (out / name).read_text().splitlines()[:4]
        assert any("edgecc" in line and "stm32h7" in line for line in head), name
        assert any(digest in line for line in head), name


def test_model_array_holds_the_model_bytes(stm32: tuple[Path, bytes, int, list[str]]) -> None:
    out, model, _, _ = stm32
    source = (out / "model_data.cc").read_text()
    body = re.search(r"alignas\(16\) const unsigned char g_model_data\[\] = \{(.*?)\};", source, re.S)[1]
    assert bytes(int(h, 16) for h in re.findall(r"0x([0-9a-f]{2})", body)) == model
    assert f"const unsigned int g_model_data_len = {len(model)};" in source


@needs_cxx
def test_sources_compile_and_link_to_the_model_aligned(stm32: tuple[Path, bytes, int, list[str]], tmp_path: Path) -> None:
    out, model, _, _ = stm32
    graph = read_graph(model)
    (tmp_path / "probe.cc").write_text(PROBE)
    compile_ = [CXX, "-std=c++17", "-Wall", "-Wextra", "-Werror", f"-I{out}"]
    subprocess.run([*compile_, "-c", str(out / "model_data.cc"), "-o", str(tmp_path / "model_data.o")], check=True)
    subprocess.run([*compile_, str(tmp_path / "probe.cc"), str(tmp_path / "model_data.o"), "-o", str(tmp_path / "probe")],
                   check=True)
    result = subprocess.run([tmp_path / "probe", tmp_path / "dumped.bin"], capture_output=True, text=True, check=True)
    misalignment, arena, input_elements, output_elements = map(int, result.stdout.split())
    assert (tmp_path / "dumped.bin").read_bytes() == model
    assert misalignment == 0
    assert arena == constant((out / "model_settings.h").read_text(), "kTensorArenaSize")
    assert input_elements == graph.tensors[graph.inputs[0]].elements == 64  # 8x8x1
    assert output_elements == graph.tensors[graph.outputs[0]].elements == 10


@needs_cxx
@pytest.mark.parametrize("defines, sdkconfig, builds", [
    ([], "", True), (["-DTFLITE_SINGLE_ROUNDING=0"], "", True), (["-DTFLITE_SINGLE_ROUNDING=1"], "", False),
    (["-DCMSIS_NN_USE_SINGLE_ROUNDING"], "", False), ([], "#define CONFIG_NN_SKIP_NUDGE 1\n", False),
    ([], "#define CONFIG_NN_OPTIMIZED 1\n", True),
    (["-DTFLITE_SINGLE_ROUNDING=1", "-DCMSIS_NN_USE_SINGLE_ROUNDING", "-DEDGECC_ACCEPT_OTHER_ROUNDING"], "", True)])
def test_a_firmware_that_rounds_otherwise_than_the_measured_accuracy_does_not_build(
        stm32: tuple[Path, bytes, int, list[str]], tmp_path: Path, defines: list[str], sdkconfig: str,
        builds: bool) -> None:
    """The accuracy edgecc reports was computed with TFLite Micro's two roundings (edgecc.requantize): a firmware
    built to round otherwise (a compile flag, or ESP-IDF's sdkconfig.h) stops at model_settings.h unless its
    author accepts that on purpose."""
    out = stm32[0]
    if sdkconfig:
        (tmp_path / "sdkconfig.h").write_text(sdkconfig)
    (tmp_path / "uses.cc").write_text(
        '#include "model_settings.h"\nint main() { return kTensorArenaSize > 0 ? 0 : 1; }\n')
    result = subprocess.run([CXX, "-std=c++17", "-fsyntax-only", f"-I{out}", f"-I{tmp_path}", *defines,
                             str(tmp_path / "uses.cc")],
                            capture_output=True, text=True)
    assert (result.returncode == 0) == builds, result.stderr
    assert builds or "edgecc measured this model with TFLite Micro's double rounding, not another" in result.stderr


def test_resolver_registers_exactly_the_models_ops(stm32: tuple[Path, bytes, int, list[str]]) -> None:
    out, model, _, _ = stm32
    capacity, names = registered((out / "op_resolver.h").read_text())
    ops = read_graph(model).op_counts()
    assert sorted(names) == sorted(ops) and len(set(names)) == len(names)
    assert capacity == len(ops)
    # the int8 attention: per-head FULLY_CONNECTED products of heads split by UNPACK and joined by CONCATENATION
    assert {"FULLY_CONNECTED", "SOFTMAX", "UNPACK", "CONCATENATION"} <= set(names)
    assert "BATCH_MATMUL" not in names


def test_settings_describe_the_graphs_input_and_output(stm32: tuple[Path, bytes, int, list[str]]) -> None:
    out, model, _, _ = stm32
    graph = read_graph(model)
    settings = (out / "model_settings.h").read_text()
    for prefix, index in (("Input0", graph.inputs[0]), ("Output0", graph.outputs[0])):
        tensor = graph.tensors[index]
        assert f"using {prefix}Type = int8_t;" in settings
        assert f"constexpr int k{prefix}Dims[] = {{{', '.join(map(str, tensor.shape))}}};" in settings
        scale = float(re.search(rf"constexpr float k{prefix}Scale = (\S+)f;", settings)[1])
        assert scale == pytest.approx(tensor.scale[0], rel=1e-7)
        assert constant(settings, f"k{prefix}ZeroPoint") == tensor.zero_point[0]


def test_arena_size_allocates_in_tflite_micro(stm32: tuple[Path, bytes, int, list[str]]) -> None:
    out, model, measured, _ = stm32
    settings = (out / "model_settings.h").read_text()
    assert "real TFLite Micro interpreter" in settings
    arena = constant(settings, "kTensorArenaSize")
    assert arena % 16 == 0 and arena >= measured + 4096  # the STM32H7 profile's fixed margin
    allocate = ("import sys; from tflite_micro import runtime; "
                "runtime.Interpreter.from_bytes(open(sys.argv[1], 'rb').read(), arena_size=int(sys.argv[2]))")
    (out / "model.tflite").write_bytes(model)
    result = subprocess.run([sys.executable, "-c", allocate, str(out / "model.tflite"), str(arena)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_native_output_beyond_a_pipes_buffer_is_read_whole() -> None:
    """The recording run prints a line per allocation; a large model's lines can exceed a pipe's 64 KiB buffer,
    which must not block the measurement (run in a child, so a regression fails here instead of hanging)."""
    script = ("import os; from edgecc.arena import _fd_output; "
              "print(len(_fd_output(lambda: [os.write(fd, b'x' * 1000) for fd in (1, 2) for _ in range(200)])))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == str(2 * 200 * 1000), result.stderr


def test_an_op_tflite_micro_lacks_is_named(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = tiny_models["gelu_int8"].read_bytes()
    with pytest.raises(EdgeccError, match="GELU"):
        write_micro_sources(tmp_path / "out", model, read_graph(model), 4096, load_target("esp32s3"))
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_a_target_without_tflite_micro_is_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = tiny_models["vit_int8"].read_bytes()
    with pytest.raises(EdgeccError, match="rpi4 runs litert-xnnpack"):
        write_micro_sources(tmp_path, model, read_graph(model), 4096, load_target("rpi4"))


def test_vela_model_registers_the_ethos_u_op(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    target = load_target("ethos-u55")
    assert target.ethosu is not None
    vela = compile_for_ethos_u(tiny_models["vit_int8"].read_bytes(), target.ethosu)
    names = write_micro_sources(tmp_path, vela.model, read_graph(vela.model), arena_size(vela.sram_bytes, target),
                                target)
    assert names == FILES
    resolver = (tmp_path / "op_resolver.h").read_text()
    assert "resolver.AddEthosU()" in resolver
    capacity, registered_ops = registered(resolver)
    assert sorted(registered_ops) == sorted({"ethos-u", *vela.cpu_ops}) == sorted(used_ops(vela.model))
    assert capacity == len(registered_ops)
    assert "ethosu_init" in (tmp_path / "main.cc").read_text()
    assert "Vela compiler planned" in (tmp_path / "model_settings.h").read_text()


def test_the_table_is_tflite_micros_builtin_list() -> None:
    """The resolver table and the profiles' legal_ops come from the same TFLM header: they must agree."""
    from ai_edge_litert import schema_py_generated as schema

    assert sorted(BUILTIN_METHODS) == sorted(load_target("esp32s3").legal_ops)
    assert all(hasattr(schema.BuiltinOperator, name) for name in BUILTIN_METHODS)
    assert "GELU" not in BUILTIN_METHODS


def test_no_tensorflow_import() -> None:
    code = "import sys, edgecc.micro; sys.exit(any(m.split('.')[0] == 'tensorflow' for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0



def test_a_microcontroller_build_measures_its_test_accuracy_with_tflite_micro(tmp_path: Path) -> None:
    """The manifest's TFLite Micro accuracy is model.tflite's run example by example by the TFLite Micro interpreter
    here, and the report says where that interpreter's outputs first part from LiteRT's."""
    from conftest import TINY_RECIPE, needs_train_extra

    needs_train_extra()
    import numpy as np

    from edgecc.build import build
    from edgecc.data import load_dataset
    from edgecc.micro_eval import MicroModel
    from edgecc.progress import Reporter
    from edgecc.recipe import load_recipe

    (tmp_path / "tiny.toml").write_text(TINY_RECIPE)
    result = build("stm32h7", tmp_path / "tiny.toml", tmp_path / "out", Reporter(quiet=True))
    micro = result.manifest["metrics"]["tflite_micro"]
    dataset = load_dataset(load_recipe(tmp_path / "tiny.toml").recipe.data, seed=0)
    model = MicroModel((tmp_path / "out" / "model.tflite").read_bytes())
    x, y = dataset.x[dataset.test_index], dataset.y[dataset.test_index]
    assert micro["examples"] == len(y)
    assert micro["accuracy"] == pytest.approx(np.mean([int(np.argmax(model.raw(e))) == label for e, label in zip(x, y)]))
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"the int8 accuracy is {micro['accuracy']:.4f} (LiteRT {micro['litert_accuracy']:.4f})" in report
    # its one block's two heads run as one BATCH_MATMUL pair, the rewrite a TFLite Micro target's build adds
    assert result.manifest["model"]["graph_passes"]["rewrites"]["heads_as_batch_matmul"] == 1
    assert read_graph((tmp_path / "out" / "model.tflite").read_bytes()).op_counts()["BATCH_MATMUL"] == 2
    first = micro["first_difference"]
    if micro["identical_outputs"] == micro["examples"]:
        assert first is None and "They first part" not in report
    else:
        assert f"They first part at operator {first['operator']} ({first['kind']}) on test example {first['example']}" in report


def test_heads_at_once_are_not_kept_where_their_scores_outweigh_what_they_save() -> None:
    """On a long sequence all heads' scores held at once need more arena than the per-head operators they replace
    cost: the build measures both with TFLite Micro and keeps the per-head graph, saying why."""
    from conftest import needs_train_extra

    needs_train_extra()
    import numpy as np

    from edgecc.build import micro_rewrites
    from edgecc.graphpass import optimize
    from edgecc.train.convert import to_int8_tflite
    from edgecc.train.transformer import VitConfig, text_transformer

    config = VitConfig(stem_filters=(), stem_strides=(), dim=16, depth=1, heads=4, mlp_dim=16, dropout=0.0)
    model = text_transformer(config, sequence_length=128, vocabulary_size=50, num_classes=3, batch_size=1)
    ids = np.random.default_rng(0).integers(0, 50, (8, 128)).astype(np.int32)
    content = optimize(to_int8_tflite(model, ids, per_channel=False))[0]
    kept, report = micro_rewrites(content)
    assert kept is content
    assert report.rewrites == {"heads_as_batch_matmul": 1} and "not smaller" in report.skipped
    assert (report.operators_after, report.tensors_after) == (report.operators_before, report.tensors_before)


def test_the_report_says_which_rewrite_was_not_kept_and_why() -> None:
    from edgecc.report import _micro_blocks

    passes = {"operators": [93, 93], "tensors": [157, 157], "rewrites": {"heads_as_batch_matmul": 2},
              "skipped": "measured, TFLite Micro's arena is not smaller after heads_as_batch_matmul (1 B before, 2 B "
                         "after): the rewrite not kept"}
    (_, text), = _micro_blocks(None, passes)
    assert "93 -> 93 operators" in text and text.endswith(f"Not all kept: {passes['skipped']}.")
    (_, kept), = _micro_blocks(None, {**passes, "skipped": None})
    assert "Not all kept" not in kept
