"""Errors that reach the user as one clear line and a non-zero exit code."""

from __future__ import annotations


def one_line(text: object) -> str:
    """`text` with its line breaks and runs of spaces made single spaces: native errors span lines, ours may not."""
    return " ".join(str(text).split())


class EdgeccError(Exception):
    """Bad input or an environment problem the user can fix (CLI exit code 2)."""

    exit_code = 2
