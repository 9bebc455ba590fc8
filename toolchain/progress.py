"""Progress bars and status lines on stderr, so stdout stays clean for --json."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class Reporter:
    """Shows long work as progress bars; prints nothing when `quiet`."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.console = Console(stderr=True, quiet=quiet)

    def info(self, message: str) -> None:
        self.console.print(message, highlight=False)

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[..., None]]:
        """Yields `advance(steps=1, **fields)`; `fields` show as text after the bar."""
        columns = (
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
        )
        with Progress(*columns, console=self.console, disable=self.quiet, transient=False) as bar:
            task_id = bar.add_task(description, total=total, status="")

            def advance(steps: int = 1, status: str = "") -> None:
                bar.update(task_id, advance=steps, status=status)

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
