"""Signing keys: `edgecc keygen`, bad key files, and `build --sign-key` failing before any work."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import edgecc
from edgecc.errors import EdgeccError
from edgecc.sign import PRIVATE_KEY, PUBLIC_KEY, generate_keys, is_signed_by, load_private_key, load_public_key


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    result = edgecc("keygen", "--out", str(keys))
    assert result.returncode == 0, result.stderr
    private, public = load_private_key(keys / PRIVATE_KEY), load_public_key(keys / PUBLIC_KEY)
    assert (keys / PRIVATE_KEY).stat().st_mode & 0o777 == 0o600
    assert is_signed_by(b"manifest", private.sign(b"manifest"), public)
    assert not is_signed_by(b"manifest!", private.sign(b"manifest"), public)
    before = (keys / PRIVATE_KEY).read_bytes()
    again = edgecc("keygen", "--out", str(keys))
    assert again.returncode == 2 and again.stderr.splitlines() == [
        f"edgecc: error: {keys / PRIVATE_KEY} already exists; edgecc keygen never overwrites a key"]
    assert (keys / PRIVATE_KEY).read_bytes() == before


def bad_keys(folder: Path) -> dict[str, Path]:
    """Files that are not an Ed25519 private key: absent, not PEM, an EC key, the public half, a passphrase."""
    generate_keys(folder)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    files = {
        "not-pem": b"hello\n",
        "ec-key": ec_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()),
        "passphrase": load_private_key(folder / PRIVATE_KEY).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret")),
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return {"absent": folder / "absent.key", "public-half": folder / PUBLIC_KEY, **{n: folder / n for n in files}}


def test_every_bad_private_key_is_refused_naming_the_file(tmp_path: Path) -> None:
    for name, key in bad_keys(tmp_path).items():
        with pytest.raises(EdgeccError, match=f"^private key {re.escape(str(key))} ") as caught:
            load_private_key(key)
        assert caught.value.exit_code == 2, name


def test_a_bad_signing_key_fails_the_build_before_any_work_and_writes_nothing(tmp_path: Path) -> None:
    key = bad_keys(tmp_path / "keys")["ec-key"]
    started = time.monotonic()
    result = edgecc("build", "--target", "rpi4", "--out", str(tmp_path / "out"), "--sign-key", str(key))
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"edgecc: error: private key {key} is not a PEM Ed25519 private key as edgecc keygen writes it"]
    assert time.monotonic() - started < 30  # the default build trains for about two minutes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys"]


def test_a_bad_public_key_exits_2_naming_it(tmp_path: Path) -> None:
    generate_keys(tmp_path)
    (tmp_path / "manifest.json").write_text('{"artifacts": {}}')
    result = edgecc("verify", str(tmp_path), "--public-key", str(tmp_path / PRIVATE_KEY))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"edgecc: error: public key {tmp_path / PRIVATE_KEY} is not a PEM Ed25519 public key as edgecc keygen writes it"]


def test_sign_refuses_a_bad_key_before_reading_the_build(tmp_path: Path) -> None:
    key = bad_keys(tmp_path / "keys")["public-half"]
    result = edgecc("sign", str(tmp_path / "no-such-build"), "--key", str(key))
    assert result.returncode == 2 and f"private key {key} " in result.stderr, result.stderr
