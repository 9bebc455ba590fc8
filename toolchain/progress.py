"""Progress on stderr, so stdout stays clean for --json: bars on a terminal, plain lines in a log.

A build sent to a log file must still say it is alive: a bar redrawn in place prints nothing there
until it ends, so off a terminal each task prints a line when it starts, at least every
`interval` seconds while it advances (training calls `advance` after every batch), and when it ends.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

LOG_INTERVAL_S = 30.0  # the longest a log goes without a line while a task advances


def duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`: short enough for a log line, exact enough to plan by."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass
class _LogLines:
    """One task's plain lines: where it stands, and when it last printed."""

    description: str
    total: int
    unit: str
    console: Console
    clock: Callable[[], float]
    interval: float
    done: int = 0
    partial: float = 0.0
    status: str = ""

    def __post_init__(self) -> None:
        self.started = self.last_line = self.clock()
        self._print("started")

    def advance(self, steps: int = 1, status: str = "", *, partial: float = 0.0) -> None:
        self.done += steps
        self.partial = partial
        self.status = status or self.status
        if self.clock() - self.last_line >= self.interval:
            self._print(self._eta())

    def end(self, finished: bool) -> None:
        self._print("done" if finished else "stopped")

    def _eta(self) -> str:
        progress = self.done + self.partial
        if progress <= 0:
            return "ETA unknown"
        return f"ETA {duration((self.clock() - self.started) / progress * max(self.total - progress, 0))}"

    def _print(self, when: str) -> None:
        now = self.clock()
        self.last_line = now
        figures = f", {self.status}" if self.status else ""
        self.console.print(f"{self.description}: {self.unit} {self.done}/{self.total}{figures}, "
                           f"{duration(now - self.started)} elapsed, {when}",
                           markup=False, highlight=False, soft_wrap=True)


class Reporter:
    """Shows long work as progress bars on a terminal, as plain timed lines otherwise; nothing when `quiet`.

    `console` and `clock` are there for tests (a console writing to a StringIO, a clock they move).
    """

    def __init__(self, quiet: bool = False, *, console: Console | None = None,
                 clock: Callable[[], float] = time.monotonic, interval: float = LOG_INTERVAL_S) -> None:
        self.quiet = quiet
        self.console = console or Console(stderr=True)
        self.clock = clock
        self.interval = interval

    def info(self, message: str) -> None:
        if not self.quiet:  # soft_wrap: a line in a log stays one line (rich would wrap it at 80 columns)
            self.console.print(message, highlight=False, soft_wrap=True)

    def warning(self, message: str) -> None:
        """A line a person must see even in a log (not hidden by a bar), without rich markup in the message."""
        if not self.quiet:
            self.console.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)

    @contextmanager
    def task(self, description: str, total: int, *, unit: str = "step") -> Iterator[Callable[..., None]]:
        """Yields `advance(steps=1, status="", *, partial=0.0)`.

        `status` is the task's latest figures (kept until the next non-empty one); `steps=0` with `partial`
        in [0, 1), the share of the current step done, is a heartbeat that moves the ETA and lets a log
        line through when `interval` seconds passed.
        """
        if self.quiet:
            yield lambda steps=1, status="", *, partial=0.0: None
        elif self.console.is_terminal:
            with self._bar(description, total) as advance:
                yield advance
        else:
            lines = _LogLines(description, total, unit, self.console, self.clock, self.interval)
            finished = False
            try:
                yield lines.advance
                finished = True
            finally:
                lines.end(finished)

    @contextmanager
    def _bar(self, description: str, total: int) -> Iterator[Callable[..., None]]:
        columns = (
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
        )
        with Progress(*columns, console=self.console, transient=False) as bar:
            task_id = bar.add_task(description, total=total, status="")
            done = 0

            def advance(steps: int = 1, status: str = "", *, partial: float = 0.0) -> None:
                nonlocal done
                done += steps
                bar.update(task_id, completed=done + partial, **({"status": status} if status else {}))

            yield advance


@contextmanager
def native_output_silenced() -> Iterator[None]:
    """Silence what C++ libraries (TensorFlow, the converter, XNNPACK) print to fds 1 and 2.

    Python exceptions still carry their messages; only native chatter is dropped.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)
