"""Signed builds: an Ed25519 signature over manifest.json, with a key the user holds.

manifest.json lists the sha256 of every artifact, so one signature over its exact
bytes covers the whole build: `edgecc verify --public-key` checks the signature,
then each hash. manifest.sig is the raw 64-byte signature, so a third party can
check it without edgecc:
`openssl pkeyutl -verify -pubin -inkey edgecc-signing.pub -rawin -in manifest.json -sigfile manifest.sig`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgecc.errors import EdgeccError

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
PRIVATE_KEY = "edgecc-signing.key"
PUBLIC_KEY = "edgecc-signing.pub"
K = TypeVar("K", Ed25519PrivateKey, Ed25519PublicKey)


def generate_keys(out: Path) -> tuple[Path, Path]:
    """Write a new key pair into `out`: the private key readable by its owner only, never over an existing one."""
    private_path, public_path = out / PRIVATE_KEY, out / PUBLIC_KEY
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise EdgeccError(f"{path} already exists; edgecc keygen never overwrites a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_new(private_path, private_pem, 0o600)
        _write_new(public_path, public_pem, 0o644)
    except OSError as err:
        raise EdgeccError(f"cannot write the key pair in {out}: {err.strerror}") from None
    return private_path, public_path


def _write_new(path: Path, content: bytes, mode: int) -> None:
    """Create `path` with `mode` from the start (O_EXCL: an existing file or link is an error, not replaced)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(content)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in a PEM file without a passphrase, as `edgecc keygen` writes it."""
    return _load(path, "private", lambda data: serialization.load_pem_private_key(data, password=None),
                 Ed25519PrivateKey)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The Ed25519 public key in a PEM file (`edgecc-signing.pub`)."""
    return _load(path, "public", serialization.load_pem_public_key, Ed25519PublicKey)


def _load(path: Path, kind: str, parse: Callable[[bytes], object], expected: type[K]) -> K:
    """A key of type `expected` from `path`, or an EdgeccError naming the file (exit 2)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise EdgeccError(f"{kind} key {path} cannot be read: {err.strerror}") from None
    try:
        key = parse(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):  # not PEM, a passphrase, or an unknown algorithm
        key = None
    if not isinstance(key, expected):  # also an RSA or EC key, or a public key given as the private one
        raise EdgeccError(f"{kind} key {path} is not a PEM Ed25519 {kind} key as edgecc keygen writes it")
    return key


def sign_manifest(build_dir: Path, key: Ed25519PrivateKey) -> Path:
    """Write manifest.sig beside manifest.json: the signature over its exact bytes."""
    signature_path = build_dir / SIGNATURE
    try:
        signature_path.write_bytes(key.sign((build_dir / MANIFEST).read_bytes()))
    except OSError as err:
        raise EdgeccError(f"cannot write {signature_path}: {err.strerror}") from None
    return signature_path


def is_signed_by(manifest: bytes, signature: bytes, key: Ed25519PublicKey) -> bool:
    try:
        key.verify(signature, manifest)
    except InvalidSignature:
        return False
    return True
