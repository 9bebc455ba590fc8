from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from edgecc import emit
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


OLD = {"model.tflite": b"old", "report.md": b"old report"}
NEW = {"model.tflite": b"new", "run.py": b"new board file"}


def _contents(folder: Path) -> dict[str, bytes] | None:
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.is_dir() else None


def _build_killed_at_line(out: Path, line: int) -> int:
    """Fork a real process that writes NEW through atomic_directory and SIGKILLs itself at its `line`-th traced line.

    Lines are counted in emit.py and in this function's child branch, so every gap between two
    statements of the write and the swap is a kill point. Returns the child's wait status.
    """
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            counted = 0

            def trace(frame, event, arg):  # noqa: ANN001, ANN202
                nonlocal counted
                if frame.f_code.co_filename in (emit.__file__, __file__) and event == "line":
                    counted += 1
                    if counted == line:
                        os.kill(os.getpid(), signal.SIGKILL)
                return trace

            sys.settrace(trace)
            with atomic_directory(out) as staging:
                for name, data in NEW.items():
                    (staging / name).write_bytes(data)
            sys.settrace(None)
        finally:
            os._exit(0)
    return os.waitpid(pid, 0)[1]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_sigkill_at_any_line_leaves_old_or_new_and_the_next_build_cleans_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool) -> None:
    if not exchange:  # a file system without RENAME_EXCHANGE: the fallback's recovery must put the old output back
        monkeypatch.setattr(emit, "_exchange", lambda a, b: False)
    killed = 0
    for line in range(1, 1000):
        parent = tmp_path / str(line)
        out = parent / "out"
        out.mkdir(parents=True)
        for name, data in OLD.items():
            (out / name).write_bytes(data)
        status = _build_killed_at_line(out, line)
        if not os.WIFSIGNALED(status):  # the child ran to the end: every line has been a kill point
            assert _contents(out) == NEW
            break
        assert os.WTERMSIG(status) == signal.SIGKILL
        killed += 1
        seen = _contents(out)
        assert seen in (OLD, NEW) or (not exchange and seen is None), (line, seen)
        with pytest.raises(RuntimeError), atomic_directory(out):  # the next build, failing: only recovery remains
            raise RuntimeError("next build fails")
        assert _contents(out) == (seen or OLD), line
        assert [p.name for p in parent.iterdir()] == ["out"], line
    assert killed > 20  # the write, the swap and the clean-up each had kill points


def test_a_live_builds_staging_is_never_removed(tmp_path: Path) -> None:
    """Another process's folder is left alone while it holds it; an unlocked one is removed once its pid is gone."""
    out = tmp_path / "out"
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            with atomic_directory(out) as staging:
                (staging / "model.tflite").write_bytes(b"slow build")
                os.write(ready_w, b"x")
                os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)  # only the child holds it now: should the child end before writing, the read gets EOF
    try:
        assert os.read(ready_r, 1) == b"x"
        with atomic_directory(out) as staging:  # a concurrent, faster build of the same output
            (staging / "model.tflite").write_bytes(b"fast build")
        assert (tmp_path / f".out.staging-{pid}" / "model.tflite").read_bytes() == b"slow build"
        os.write(go_w, b"x")
    finally:
        os.close(go_w)  # the child's read ends even when an assertion failed: no process is left waiting
    assert os.waitpid(pid, 0)[1] == 0
    assert (out / "model.tflite").read_bytes() == b"slow build"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_unlocked_leftover_of_a_reused_pid_is_removed_once_old(tmp_path: Path) -> None:
    """The pid in the name may belong to a new process: an unlocked folder is stale once older than STALE_AFTER_S."""
    out = tmp_path / "out"
    leftover = tmp_path / f".out.staging-{os.getppid()}"  # a live pid that is not building
    leftover.mkdir()
    emit.recover(out)
    assert leftover.is_dir()  # young: it may be a build between creating its folder and locking it
    old = time.time() - emit.STALE_AFTER_S - 1
    os.utime(leftover, (old, old))
    emit.recover(out)
    assert not leftover.exists()
