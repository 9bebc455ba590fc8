"""`edgecc verify`: a real build passes untouched and fails by name when changed; it never reads outside the
build folder; with the signer's public key, a manifest rewritten to match an edited model is caught."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import edgecc
from edgecc import emit
from edgecc.sign import SIGNATURE, generate_keys, load_private_key, sign_manifest
from edgecc.verify import verify

UNCHECKED = "manifest.json's authenticity was not checked (no --public-key); it is not signed"


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
    assert result.stdout.splitlines() == [
        f"all {len(default_build[1]['artifacts'])} artifacts match {build_copy / 'manifest.json'}", UNCHECKED]


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
    assert result.stdout.splitlines() == ["changed: model.tflite (its sha256 is not the one in manifest.json)", UNCHECKED]


def test_a_missing_file_fails_naming_it(build_copy: Path) -> None:
    (build_copy / "float.tflite").unlink()
    result = edgecc("verify", str(build_copy))
    assert result.returncode == 1
    assert result.stdout.splitlines() == ["missing: float.tflite", UNCHECKED]


def small_build(root: Path, extra: dict[str, Any] | None = None) -> Path:
    """A build folder of two files and their manifest as edgecc writes it, with `extra` manifest entries."""
    root.mkdir()
    (root / "model.bin").write_bytes(b"model")
    (root / "labels.txt").write_text("a\nb\n")
    artifacts = emit.artifact_entries(root, ["model.bin", "labels.txt"])
    emit.write_json(root / "manifest.json", {"artifacts": {**artifacts, **(extra or {})}})
    return root


def outside_fifo(tmp_path: Path) -> Path:
    """A FIFO outside the build: opening it for reading blocks, so a verify that returns never opened it."""
    (tmp_path / "outside").mkdir(exist_ok=True)
    os.mkfifo(tmp_path / "outside" / "pipe")
    return tmp_path / "outside" / "pipe"


def test_names_that_lead_outside_are_tampering_and_never_opened(tmp_path: Path) -> None:
    fifo = outside_fifo(tmp_path)
    (tmp_path / "outside" / "copy").write_bytes(b"model")  # the same bytes as model.bin: its hash would match
    names = ["../outside/pipe", str(fifo), "link-out", "linked-dir/pipe", "..\\outside\\pipe", "C:pipe", "",
             "./model.bin", "model.bin/../../outside/copy", "a\nb", "link-to-copy", "alias.bin"]
    entry = {"sha256": hashlib.sha256(b"model").hexdigest(), "bytes": 5}
    build = small_build(tmp_path / "build", {name: entry for name in names})
    (build / "link-out").symlink_to(fifo)
    (build / "linked-dir").symlink_to(fifo.parent)
    (build / "link-to-copy").symlink_to(Path("..") / "outside" / "copy")
    (build / "alias.bin").symlink_to("model.bin")  # a link that stays inside is read like the file itself
    result = edgecc("verify", str(build), timeout=60)
    assert result.returncode == 1, result.stderr
    shown = [json.dumps(name) if name in ("", "a\nb") else name for name in names[:-1]]
    assert result.stdout.splitlines() == [
        *(f"tampered: {name} (outside the build folder; not opened)" for name in shown),
        "unlisted: linked-dir (in the build folder, not in manifest.json)", UNCHECKED]
    assert verify(build).matched == ["model.bin", "labels.txt", "alias.bin"]


@pytest.mark.parametrize("name", ["manifest.json", "manifest.sig"])
def test_a_manifest_or_signature_linked_outside_is_never_opened(tmp_path: Path, name: str) -> None:
    build = small_build(tmp_path / "build")
    (build / name).unlink(missing_ok=True)
    (build / name).symlink_to(outside_fifo(tmp_path))
    result = edgecc("verify", str(build), timeout=60)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"edgecc: error: tampered: {name} in {build} resolves outside it (not opened)"]


def test_files_the_manifest_does_not_list_fail_by_name_and_special_files_are_not_opened(tmp_path: Path) -> None:
    build = small_build(tmp_path / "build", {"pipe": {"sha256": "0" * 64}})
    os.mkfifo(build / "pipe")  # listed, but not a regular file
    os.mkfifo(build / "stray")
    (build / "numpy.py").write_text("import os  # run.py beside it would import this on the board\n")
    result = edgecc("verify", str(build), timeout=60)
    assert result.returncode == 1
    assert result.stdout.splitlines() == ["missing: pipe", "unlisted: numpy.py (in the build folder, not in manifest.json)",
                                          "unlisted: stray (in the build folder, not in manifest.json)", UNCHECKED]


@pytest.mark.parametrize(("manifest", "fragment"), [
    (None, "has no manifest.json"),
    (b"{not json", "is not valid JSON"),
    (b"\xff\xfe", "is not valid JSON"),
    (b"[]", "is not a JSON object"),
    (b'{"artifacts": ["model.bin"]}', '"artifacts" is not an object'),
    (b'{"artifacts": {"a": 3, "b": {"sha256": "abc"}, "c": {"sha256": "' + b"0" * 64 + b'"}}}',
     'artifacts."a".sha256: expected 64 hex digits, got null; artifacts."b".sha256: expected 64 hex digits, got "abc"'),
], ids=["no-manifest", "not-json", "not-utf8", "not-an-object", "artifacts-a-list", "bad-hashes"])
def test_a_malformed_manifest_exits_2_naming_every_problem(tmp_path: Path, manifest: bytes | None, fragment: str) -> None:
    build = small_build(tmp_path / "build")
    if manifest is None:
        (build / "manifest.json").unlink()
    else:
        (build / "manifest.json").write_bytes(manifest)
    result = edgecc("verify", str(build))
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("edgecc: error: ") and fragment in result.stderr, result.stderr


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keys(tmp_path / "keys")


def test_a_signed_build_verifies_with_its_public_key(default_build, build_copy: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    count = len(default_build[1]["artifacts"])
    signed = edgecc("sign", str(build_copy), "--key", str(private))
    assert signed.returncode == 0, signed.stderr
    assert signed.stdout.splitlines() == [f"wrote {build_copy / SIGNATURE}: manifest.json and its {count} artifacts signed"]
    result = edgecc("verify", str(build_copy), "--public-key", str(public))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"all {count} artifacts match {build_copy / 'manifest.json'}",
                                          f"manifest.json is signed by {public}"]
    unchecked = edgecc("verify", str(build_copy))
    assert unchecked.stdout.splitlines()[-1] == \
        "manifest.json's authenticity was not checked (no --public-key); it is signed (manifest.sig)"
    if shutil.which("openssl"):  # the signature is plain Ed25519 over the file's bytes: checkable without edgecc
        openssl = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(public), "-rawin",
                                  "-in", str(build_copy / "manifest.json"), "-sigfile", str(build_copy / SIGNATURE)],
                                 capture_output=True, text=True)
        assert openssl.returncode == 0, openssl.stderr


def test_an_edited_model_with_its_hash_rewritten_is_caught_only_with_the_key(build_copy: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    sign_manifest(build_copy, load_private_key(private))
    flip_one_byte(build_copy / "model.tflite")
    manifest = json.loads((build_copy / "manifest.json").read_text())
    manifest["artifacts"]["model.tflite"]["sha256"] = emit.sha256_file(build_copy / "model.tflite")
    emit.write_json(build_copy / "manifest.json", manifest)
    assert edgecc("verify", str(build_copy)).returncode == 0  # the hashes alone are fooled
    result = edgecc("verify", str(build_copy), "--public-key", str(public))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [f"edgecc: error: manifest.json is not signed by {public}"]


def test_another_key_or_no_signature_fails(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    build = small_build(tmp_path / "build")
    _, public = keys
    result = edgecc("verify", str(build), "--public-key", str(public))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"edgecc: error: manifest.sig missing: {build} is not signed"]
    other, _ = generate_keys(tmp_path / "other")
    sign_manifest(build, load_private_key(other))
    result = edgecc("verify", str(build), "--public-key", str(public))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"edgecc: error: manifest.json is not signed by {public}"]


def test_sign_refuses_a_build_that_does_not_verify(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    build = small_build(tmp_path / "build")
    (build / "model.bin").write_bytes(b"edited")
    result = edgecc("sign", str(build), "--key", str(keys[0]))
    assert result.returncode == 1
    assert result.stdout.splitlines() == ["changed: model.bin (its sha256 is not the one in manifest.json)",
                                          f"not signed: {build} does not match its manifest.json"]
    assert not (build / SIGNATURE).exists()
