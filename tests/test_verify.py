"""`edgecc verify` on a real build: an untouched copy passes, one flipped byte or a missing file fails by name."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import edgecc
from edgecc.verify import verify


@pytest.fixture
def build_copy(default_build, tmp_path: Path) -> Path:
    """A copy of the session's build, so no test can change the shared fixture's files."""
    return Path(shutil.copytree(default_build[0], tmp_path / "build"))


def flip_one_byte(path: Path) -> None:
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0x01
    path.write_bytes(bytes(content))


def test_an_untouched_build_passes(default_build, build_copy: Path) -> None:
    result = edgecc("verify", str(build_copy))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"all {len(default_build[1]['artifacts'])} artifacts match ")


def test_one_flipped_byte_in_any_artifact_is_found(default_build, build_copy: Path) -> None:
    """Every artifact the manifest lists (known only once the fixture has built), each flipped alone."""
    names = list(default_build[1]["artifacts"])
    assert {"model.tflite", "float.tflite", "report.md"} <= set(names)
    for name in names:
        original = (build_copy / name).read_bytes()
        flip_one_byte(build_copy / name)
        result = verify(build_copy)
        assert (result.changed, result.missing, len(result.matched)) == ([name], [], len(names) - 1), name
        (build_copy / name).write_bytes(original)
    assert verify(build_copy).ok


def test_the_command_names_the_changed_file_and_exits_1(build_copy: Path) -> None:
    flip_one_byte(build_copy / "model.tflite")
    result = edgecc("verify", str(build_copy))
    assert result.returncode == 1, result.stdout
    assert result.stdout.splitlines() == ["changed: model.tflite (its sha256 is not the one in manifest.json)"]


def test_a_missing_file_fails_naming_it(build_copy: Path) -> None:
    (build_copy / "float.tflite").unlink()
    result = edgecc("verify", str(build_copy))
    assert result.returncode == 1
    assert result.stdout.splitlines() == ["missing: float.tflite"]


@pytest.mark.parametrize(("manifest", "fragment"), [
    (None, "has no manifest.json"),
    ("{not json", "is not valid JSON"),
    ('{"artifacts": {"model.tflite": 3}}', 'has no "artifacts" with a sha256'),
], ids=["no-manifest", "not-json", "no-hashes"])
def test_an_unreadable_manifest_exits_2(build_copy: Path, manifest: str | None, fragment: str) -> None:
    if manifest is None:
        (build_copy / "manifest.json").unlink()
    else:
        (build_copy / "manifest.json").write_text(manifest)
    result = edgecc("verify", str(build_copy))
    assert result.returncode == 2
    assert result.stderr.startswith("edgecc: error: ") and fragment in result.stderr, result.stderr
