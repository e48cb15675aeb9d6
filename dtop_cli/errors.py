"""Errors the CLI turns into one clear line and an exit code.

`UserError` means the user gave something we cannot work with (bad preset, missing file,
wrong checkpoint): the CLI prints its message and exits 2. Anything else is a bug or an
environment failure and exits 1.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""

    exit_code = 2


class UnsafeCheckpointError(UserError):
    """A checkpoint's pickle would construct something outside the allow-list."""
