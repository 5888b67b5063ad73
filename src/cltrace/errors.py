"""User-facing errors: one clear sentence of what is wrong and one of what to do."""

from __future__ import annotations


class CltraceError(Exception):
    """An error caused by the user's input or environment, shown without a traceback.

    Args:
        message: what is wrong, e.g. "no model directory at /x/y".
        hint: what to do about it, e.g. "run `cltrace models` to see what is installed".
    """

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message}\n  hint: {self.hint}"
