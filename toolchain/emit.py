"""Writing the build's artifacts: all of them or none.

Artifacts are written into a temporary sibling directory and moved into place
only when complete, so an interrupted or failed build leaves the previous
result exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgecc.errors import EdgeccError


def ensure_writable(out: Path) -> None:
    """Fail before any work if `out` cannot be created or replaced (nothing is written here)."""
    if out.exists() and not out.is_dir():
        raise EdgeccError(f"output {out} exists and is not a directory")
    ancestor = out.parent.resolve()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise EdgeccError(f"output directory {out} cannot be created: {ancestor} is not a directory")
    try:  # a real write, since permission bits say nothing for root or a read-only mount
        os.rmdir(tempfile.mkdtemp(prefix=".edgecc-probe-", dir=ancestor))
    except OSError as err:
        raise EdgeccError(f"output directory {out} cannot be written: {err.strerror} ({ancestor})") from None


@contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Yield an empty staging directory that replaces `out` only if the block succeeds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    retired = out.parent / f".{out.name}.previous-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        out.rename(retired)
    staging.rename(out)
    shutil.rmtree(retired, ignore_errors=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def artifact_entries(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """sha256 and size of each named file, for the manifest."""
    return {
        name: {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
        for name in names
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
