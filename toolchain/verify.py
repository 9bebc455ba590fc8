"""`edgecc verify`: is a build directory still exactly what the build wrote?

Recomputes the sha256 of every artifact listed in manifest.json, so a model
copied to a board, a release bucket or a CI cache can be checked before it is
trusted. manifest.json itself cannot list its own hash and is not covered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgecc.emit import sha256_file
from edgecc.errors import EdgeccError


@dataclass(frozen=True)
class Verification:
    """Each artifact the manifest lists, sorted into those that match, changed or are missing."""

    matched: list[str]
    changed: list[str]
    missing: list[str]

    @property
    def ok(self) -> bool:
        return not (self.changed or self.missing)


def verify(build_dir: Path) -> Verification:
    """Compare every artifact in `build_dir` with the sha256 its manifest recorded."""
    manifest_path = build_dir / "manifest.json"
    if not manifest_path.is_file():
        raise EdgeccError(f"{build_dir} has no manifest.json (not an edgecc build directory)")
    try:
        artifacts = json.loads(manifest_path.read_text(encoding="utf-8"))["artifacts"]
        expected = {str(name): str(entry["sha256"]) for name, entry in artifacts.items()}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise EdgeccError(f"{manifest_path} is not valid JSON") from None
    except (KeyError, TypeError, AttributeError):
        raise EdgeccError(f"{manifest_path} has no \"artifacts\" with a sha256 for each file") from None
    matched, changed, missing = [], [], []
    for name, sha256 in expected.items():
        path = build_dir / name
        if not path.is_file():
            missing.append(name)
        elif sha256_file(path) != sha256:
            changed.append(name)
        else:
            matched.append(name)
    return Verification(matched, changed, missing)
