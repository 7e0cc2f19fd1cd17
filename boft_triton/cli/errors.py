"""Errors the command line reports as one line (``error: ...``, exit status 2), not a traceback.

Raise :class:`CLIError` (or a subclass) for anything the user can fix: a missing column, an empty
dataset, an option that does not fit the model. ``boft_triton.cli.main`` catches it and exits
with the error's ``exit_code``. Bugs keep their traceback.
"""

from __future__ import annotations


class CLIError(Exception):
    """A problem with the user's input; the message is shown as ``error: <message>``."""

    exit_code = 2


class CheckFailed(CLIError):
    """A self-check of the run failed (e.g. the merged model disagrees with the adapter): reported
    as one line like any CLI error, with exit status 1 so scripts can tell it from bad input."""

    exit_code = 1


class DataError(CLIError):
    """A dataset that cannot be used: missing file or column, no rows, unknown labels."""
