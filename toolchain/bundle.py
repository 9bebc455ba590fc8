"""What each kind of board's toolchain consumes, written beside model.tflite by `edgecc build`.

Linux boards get a runner script that needs only the bundle directory; TFLite
Micro boards get C++ sources for their firmware build. Edge TPU boards also get
the model as a pipeline of segments (edgecc.lower), which run.py runs in order.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

from edgecc.check import Assessment
from edgecc.reader import read_graph
from edgecc.targets import Target

REQUIREMENTS = {
    "litert-xnnpack": "numpy\nai-edge-litert  # or tflite-runtime on boards without an ai-edge-litert wheel\n",
    "edgetpu": ("numpy\ntflite-runtime  # with the Edge TPU runtime from Coral's apt repository: libedgetpu1-std\n"),
}
IMAGES_REQUIREMENT = "pillow  # serve.py reads image files\n"
# run.py answers prepared arrays; serve.py is the rollout service (raw inputs, gates, audit log), see its docstring
BOARD_FILES = ("run.py", "serve.py", "preprocess.py", "gates.py", "stats.py")


def write_linux_bundle(directory: Path, target: Target, label_names: list[str], *, images: bool = False) -> list[str]:
    """labels.txt, requirements.txt (Pillow too for an image model) and the board scripts (which read
    manifest.json for the preprocessing)."""
    (directory / "labels.txt").write_text("".join(f"{name}\n" for name in label_names), encoding="utf-8")
    (directory / "requirements.txt").write_text(
        f"# Python packages {target.name} needs to run this bundle: pip install -r requirements.txt\n"
        + REQUIREMENTS.get(target.runtime, REQUIREMENTS["litert-xnnpack"]) + (IMAGES_REQUIREMENT if images else ""),
        encoding="utf-8")
    for name in BOARD_FILES:
        shutil.copyfile(Path(str(resources.files("edgecc.board").joinpath(name))), directory / name)
    return ["labels.txt", "requirements.txt", *BOARD_FILES]


def write_edgetpu_pipeline(directory: Path, content: bytes, fit: Assessment) -> list[str]:
    """The model's Edge TPU segments and CPU islands, one file each, and pipeline.json, which says their order; with
    `edgetpu_compiler` on PATH, the Edge TPU segments co-compiled too (`<segment>_edgetpu.tflite`, what run.py runs)."""
    from edgecc.edgetpu import compile_segments
    from edgecc.lower import PIPELINE_FILE, split_for_edgetpu

    pipeline = fit.pipeline or split_for_edgetpu(content, fit.target)
    files = {segment.file: segment.content for segment in pipeline.segments}
    compiled = compile_segments({name: files[name] for name in pipeline.edgetpu_files}) or {}
    for name, data in {**files, **compiled}.items():
        (directory / name).write_bytes(data)
    (directory / PIPELINE_FILE).write_text(json.dumps(pipeline.to_json(), indent=1) + "\n", encoding="utf-8")
    return [*files, *compiled, PIPELINE_FILE]


def write_board_files(directory: Path, content: bytes, fit: Assessment, label_names: list[str], *,
                      images: bool = False) -> list[str]:
    """The board files for the target's kind (`images`: the model reads image files); returns their names."""
    target = fit.target
    if not target.is_micro:
        written = write_linux_bundle(directory, target, label_names, images=images)
        if target.edgetpu is not None:
            written += write_edgetpu_pipeline(directory, content, fit)
        if fit.edgetpu is not None and fit.edgetpu.compiled_model is not None:  # edgetpu_compiler was on PATH
            (directory / "model_edgetpu.tflite").write_bytes(fit.edgetpu.compiled_model)
            written.append("model_edgetpu.tflite")
        return written
    from edgecc.micro import arena_size, write_micro_sources

    model = fit.vela.model if fit.vela is not None else content
    if fit.vela is not None:  # the NPU's working memory is Vela's SRAM plan
        measured = fit.vela.sram_bytes
    else:
        measured = fit.arena.bytes if fit.arena is not None else fit.memory.planned_bytes
    return write_micro_sources(directory, model, read_graph(model), arena_size(measured, target), target)
