"""Errors a user can act on; the CLI prints them as one line (``dpldm <cmd>: error: ...``)."""
from __future__ import annotations


class RunError(RuntimeError):
    """A stage refuses at run time because of what is on disk or in the data (exit status 1).

    Raised before the stage changes anything, with the file or key to look at.
    """


class DataError(ValueError):
    """A data file's content cannot be used where a stage reads it (a shard that is not a tar, a sample
    without an image, an image that does not decode, a label that is not a number): exit status 1 when
    found while a stage runs (2 where a stage checks the files a config key names before it starts).
    Its message names the file and the sample, never the sample's content."""


class UsageError(ValueError):
    """A bad command-line argument (exit status 2); the message names the flag."""


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message, or its type's name when it has none (for one-line errors)."""
    return (str(err).splitlines() or [type(err).__name__])[0].rstrip(":")


def user_message(err: BaseException) -> str:
    """``err``'s message for the one-line report: an error raised in a DataLoader worker process
    arrives with the worker's traceback in its message; its last line is what the user needs."""
    text = str(err)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text
