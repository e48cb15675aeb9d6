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


class RunStopped(Exception):
    """A training run that stopped on purpose before its end (a stop signal, a non-finite
    loss, a checkpoint that could not be written): one line on stderr and ``exit_code``,
    never a traceback. What was saved, and how to go on, is in the message."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
