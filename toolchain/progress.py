"""Progress bars and status lines on stderr, so stdout stays clean for --json."""

from __future__ import annotations

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
