"""Errors of ``scripts/generate.py`` / ``scripts/evaluate.py`` a user fixes from the message (a folder that is not a
generated one, mismatched folders, bad ``--rewards`` / ``--reward-options``): printed as ``error: <message>``."""

from __future__ import annotations

from diffalign.errors import DiffalignError


class EvalInputError(DiffalignError, ValueError):
    """Bad input to generation or evaluation; the message names the folder, file or option and what to do."""


class EvalFileNotFoundError(EvalInputError, FileNotFoundError):
    """A folder or file that generation or evaluation needs does not exist."""
