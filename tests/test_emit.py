from __future__ import annotations

from pathlib import Path

import pytest

from edgecc.emit import atomic_directory


def test_failure_inside_leaves_the_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.tflite").write_bytes(b"previous")
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as staging:
            (staging / "model.tflite").write_bytes(b"half")
            raise RuntimeError("disk full")
    assert (out / "model.tflite").read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_success_replaces_the_previous_output_whole(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "out"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("old")
    with atomic_directory(out) as staging:
        (staging / "model.tflite").write_bytes(b"new")
    assert [p.name for p in out.iterdir()] == ["model.tflite"]
    assert [p.name for p in out.parent.iterdir()] == ["out"]
