"""Errors a user can act on; the CLI prints them as one line (``dpldm <cmd>: error: ...``)."""
from __future__ import annotations


class RunError(RuntimeError):
    """A stage refuses at run time because of what is on disk or in the data (exit status 1).

    Raised before the stage changes anything, with the file or key to look at.
    """


class UsageError(ValueError):
    """A bad command-line argument (exit status 2); the message names the flag."""


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message, or its type's name when it has none (for one-line errors)."""
    return (str(err).splitlines() or [type(err).__name__])[0].rstrip(":")
