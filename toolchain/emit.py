"""Writing the build's artifacts: all of them or none.

Artifacts are written into a temporary sibling directory and moved into place
only when complete, so an interrupted or failed build leaves the previous
result exactly as it was.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
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


STALE_AFTER_S = 60.0  # an unlocked leftover of a living pid older than this is a dead build's (its pid reused)
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # from <fcntl.h> and <linux/fs.h>
_KINDS = ("staging", "previous")  # the folder a build writes into, and (fallback swap only) the output it replaces


@contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Yield an empty staging directory that replaces `out` only if the block succeeds.

    kill -9 at any moment leaves `out` whole, old or new, plus at most a hidden
    leftover that the next build removes: the swap is one renameat2(RENAME_EXCHANGE)
    (two renames where the file system cannot exchange; a kill between them leaves
    the old output retired and the next build puts it back). The staging folder is
    flock-ed while it is this process's, so recovery never touches a live build's.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    staging = _leftover(out, "staging", os.getpid())
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    with _locked(staging):
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _swap(staging, out)
    shutil.rmtree(staging, ignore_errors=True)  # after an exchange it holds the previous output


def recover(out: Path) -> None:
    """Remove the staging and retired folders that dead builds left beside `out`; put back a retired output."""
    prefix = f".{out.name}."
    for path in sorted(out.parent.iterdir()):
        kind, _, pid = path.name.removeprefix(prefix).rpartition("-")
        if (not path.name.startswith(prefix) or kind not in _KINDS or not pid.isdigit()
                or path.is_symlink() or not path.is_dir()):
            continue
        # FileNotFoundError: another build's recovery took it first
        with suppress(FileNotFoundError), _locked(path, wait=False) as owned:
            if not owned or (_alive(int(pid)) and time.time() - path.stat().st_mtime < STALE_AFTER_S):
                continue  # a live build's, or one that has just created it and not locked it yet
            if kind == "previous" and not out.exists():
                path.rename(out)
            else:
                shutil.rmtree(path, ignore_errors=True)


def _leftover(out: Path, kind: str, pid: int) -> Path:
    return out.parent / f".{out.name}.{kind}-{pid}"


def _alive(pid: int) -> bool:
    """Whether another process with this pid runs (this process's own leftovers are from an earlier, dead one)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _locked(path: Path, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive flock on directory `path`; yields False, without waiting, when another process holds it.

    The kernel releases the lock when its holder dies, however it dies, so a lock held means a live owner.
    """
    import fcntl  # POSIX only, as building is

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            owned = True
        except BlockingIOError:
            owned = False
        yield owned
    finally:
        os.close(fd)


def _swap(new: Path, out: Path) -> None:
    """Put directory `new` in place of `out`: one atomic exchange where the file system can, else two renames."""
    if not out.exists():
        new.rename(out)
    elif not _exchange(new, out):
        retired = _leftover(out, "previous", os.getpid())
        with _locked(out):  # the lock moves with the folder, so recovery leaves it alone until this process dies
            out.rename(retired)
            new.rename(out)
        shutil.rmtree(retired, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux renameat2(RENAME_EXCHANGE); False where that is not available."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # an old kernel, or a file system without it
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


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


def finite(data: Any) -> Any:
    """`data` with every NaN or infinity replaced by None, since strict JSON parsers reject them.

    A dict entry `k` that held one also gains `k_nonfinite` ("inf", "-inf" or "nan"), so a
    reader still learns why the figure is missing (e.g. a latency limit of `--latency-ms inf`).
    """
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            out[key] = finite(value)
            if isinstance(value, float) and not math.isfinite(value):
                out[f"{key}_nonfinite"] = str(value)
        return out
    if isinstance(data, (list, tuple)):
        return [finite(item) for item in data]
    return data


def dumps(data: Any, **options: Any) -> str:
    """Strict JSON (RFC 8259, no NaN or Infinity): every JSON edgecc prints or writes goes through here."""
    return json.dumps(finite(data), allow_nan=False, **options)


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON (strict JSON has no NaN or Infinity)")


_STRICT = json.JSONDecoder(parse_constant=_not_json)  # made once: `loads` runs per line of million-line audit logs


def loads(text: str | bytes) -> Any:
    """Parse strict JSON: NaN and Infinity, which Python's json accepts, are refused (ValueError) as in dumps."""
    if isinstance(text, (bytes, bytearray)):
        text = text.decode(json.detect_encoding(text), "surrogatepass")  # as json.loads decodes bytes
    return _STRICT.decode(text)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(dumps(data, indent=2) + "\n", encoding="utf-8")
