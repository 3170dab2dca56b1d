"""The project's own error types: one base class, so every command prints ``error: <message>`` for them and exits
with :attr:`DiffalignError.exit_code` (the traceback only with ``--debug``).

A message names the file, row or key and says what to do; anything not derived from :class:`DiffalignError` is a
bug and keeps its traceback.
"""

from __future__ import annotations


class DiffalignError(Exception):
    """Base class of errors a user can fix from the message alone (bad config, data, checkpoint, missing package)."""

    exit_code: int = 2
