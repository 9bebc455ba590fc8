"""`edgecc verify`: is a build directory still exactly what the build wrote?

Recomputes the sha256 of every artifact listed in manifest.json, so a model
copied to a board, a release bucket or a CI cache can be checked before it is
trusted. With the signer's public key, the signature over manifest.json
(manifest.sig, see edgecc.sign) is checked first, so a hash rewritten in the
manifest is caught too; without it the manifest's authenticity is unknown.

Verify reads only files inside the build folder. An artifact name that could
lead elsewhere (absolute, `..`, a backslash or drive, empty, a control
character, or a symlink resolving outside) is tampering: it is reported and
never opened. A build folder holds exactly its artifacts, manifest.json and
manifest.sig, so any other file is reported as unlisted (a `numpy.py` dropped
beside run.py would be imported by it on the board). Each of these findings
exits 1, like a changed file; a manifest that is not the manifest edgecc writes
(not JSON, no artifacts object, a sha256 that is not 64 hex digits) exits 2.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from edgecc.emit import loads, sha256_file
from edgecc.errors import EdgeccError
from edgecc.sign import MANIFEST, SIGNATURE, is_signed_by, load_public_key

SHA256 = re.compile(r"[0-9a-fA-F]{64}")


class NotAuthentic(EdgeccError):
    """The manifest cannot be trusted at all (bad or missing signature, or it lies outside the build): exit 1."""

    exit_code = 1


@dataclass(frozen=True, kw_only=True)
class Verification:
    """Each artifact the manifest lists sorted by what was found, the files it does not list, and its signature."""

    matched: list[str]
    changed: list[str]
    missing: list[str]
    tampered: list[str]
    unlisted: list[str]
    signed: bool  # manifest.sig is present
    authenticated: bool  # and was checked against the public key the user gave

    @property
    def ok(self) -> bool:
        return not (self.changed or self.missing or self.tampered or self.unlisted)


def verify(build_dir: Path, *, public_key: Path | None = None) -> Verification:
    """Compare every artifact in `build_dir` with the sha256 its manifest recorded, after its signature if a key is given."""
    key = load_public_key(public_key) if public_key is not None else None
    if not build_dir.is_dir():
        raise EdgeccError(f"{build_dir} is not a directory")
    root = build_dir.resolve()
    manifest_path, signature_path = _inside(root, MANIFEST), _inside(root, SIGNATURE)
    if manifest_path is None or signature_path is None:
        name = MANIFEST if manifest_path is None else SIGNATURE
        raise NotAuthentic(f"tampered: {name} in {build_dir} resolves outside it (not opened)")
    if not manifest_path.is_file():
        raise EdgeccError(f"{build_dir} has no manifest.json (not an edgecc build directory)")
    manifest = manifest_path.read_bytes()  # the bytes checked are the bytes parsed
    signed = signature_path.is_file()
    if key is not None:
        if not signed:
            raise NotAuthentic(f"{SIGNATURE} missing: {build_dir} is not signed")
        if not is_signed_by(manifest, signature_path.read_bytes(), key):
            raise NotAuthentic(f"{MANIFEST} is not signed by {public_key}")
    expected = _expected_hashes(manifest, build_dir / MANIFEST)
    matched, changed, missing, tampered = [], [], [], []
    for name, sha256 in expected.items():
        path = _inside(root, name)
        if path is None:
            tampered.append(name)
        elif not path.is_file():
            missing.append(name)
        elif sha256_file(path) != sha256.lower():
            changed.append(name)
        else:
            matched.append(name)
    unlisted = sorted(_files(root) - set(expected) - {MANIFEST, SIGNATURE})
    return Verification(matched=matched, changed=changed, missing=missing, tampered=tampered, unlisted=unlisted,
                        signed=signed, authenticated=key is not None)


def _inside(root: Path, name: str) -> Path | None:
    """The file `name` names under `root` (symlinks resolved), or None when it could be anywhere else."""
    relative = PurePosixPath(name)
    if (not name or not name.isprintable() or "\\" in name or relative.is_absolute() or PureWindowsPath(name).drive
            or str(relative) != name or ".." in relative.parts):
        return None
    resolved = (root / relative).resolve()  # lstat and readlink only: nothing is opened
    return resolved if resolved != root and resolved.is_relative_to(root) else None


def _expected_hashes(content: bytes, where: Path) -> dict[str, str]:
    """The artifacts' sha256 from the manifest, every malformed entry named at once."""
    try:
        data = loads(content)
    except ValueError:  # JSONDecodeError, NaN or Infinity, or UnicodeDecodeError  # JSONDecodeError or UnicodeDecodeError
        raise EdgeccError(f"{where} is not valid JSON") from None
    if not isinstance(data, dict):
        raise EdgeccError(f"{where} is not a JSON object")
    artifacts = data.get("artifacts")
    if not isinstance(artifacts, dict):
        raise EdgeccError(f'{where}: "artifacts" is not an object of file name -> {{"sha256": ...}}')
    problems = []
    for name, entry in artifacts.items():
        sha256 = entry.get("sha256") if isinstance(entry, dict) else None
        if not (isinstance(sha256, str) and SHA256.fullmatch(sha256)):
            problems.append(f"artifacts.{json.dumps(name)}.sha256: expected 64 hex digits, got {json.dumps(sha256)}")
    if problems:
        raise EdgeccError(f"{where}: " + "; ".join(problems))
    return {name: entry["sha256"] for name, entry in artifacts.items()}


def _files(root: Path) -> set[str]:
    """Every file under `root` (links and FIFOs included, none opened), as manifest names."""
    found = set()
    for folder, dirs, files in os.walk(root):  # does not descend into linked folders, which are listed themselves
        relative = PurePosixPath(Path(folder).relative_to(root))
        linked = [d for d in dirs if os.path.islink(os.path.join(folder, d))]
        found.update(str(relative / name) for name in [*files, *linked])
    return found
