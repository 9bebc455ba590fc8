"""Errors that reach the user as one clear line and a non-zero exit code."""

from __future__ import annotations


class EdgeccError(Exception):
    """Bad input or an environment problem the user can fix (CLI exit code 2)."""

    exit_code = 2
