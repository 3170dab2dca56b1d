"""One error policy for every command (``scripts/train.py``, ``generate.py``, ``evaluate.py``, ``diffalign``,
``diffalign-data``): a :class:`~diffalign.errors.DiffalignError` prints ``error: <message>`` and exits with its
``exit_code``; Ctrl-C prints ``error: interrupted`` and exits 130; anything else is a bug and keeps its traceback.

``--debug`` anywhere on the command line (before a ``--``) is removed before the command parses the rest and prints
the traceback above the message; ``DIFFALIGN_DEBUG=1`` does the same (for launchers that build the command line).

Kept import-light (no torch): the commands' ``--help`` must stay fast.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from diffalign.errors import DiffalignError

__all__ = ["DEBUG_FLAG", "INTERRUPTED_EXIT_CODE", "debug_enabled", "print_error", "run_cli", "split_debug"]

DEBUG_FLAG = "--debug"
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports it
_state = {"debug": False}


def split_debug(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``argv`` without its ``--debug`` flags (those after a ``--`` are left alone) and whether one was there."""
    argv = list(argv)
    end = argv.index("--") if "--" in argv else len(argv)
    kept = [a for a in argv[:end] if a != DEBUG_FLAG] + argv[end:]
    return kept, len(kept) != len(argv)


def debug_enabled() -> bool:
    """Whether the running command was given ``--debug`` (or ``DIFFALIGN_DEBUG=1`` is set)."""
    return _state["debug"] or os.environ.get("DIFFALIGN_DEBUG", "") not in ("", "0")


def print_error(err: BaseException, *, debug: bool | None = None) -> None:
    """``error: <message>`` on stderr; under ``--debug`` the traceback first. For commands that catch an error
    themselves (e.g. to exit with another status) and still honour ``--debug``."""
    if debug_enabled() if debug is None else debug:
        traceback.print_exception(err)
    message = str(err) or type(err).__name__
    print(f"error: {message}", file=sys.stderr, flush=True)


def run_cli(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)`` (``sys.argv[1:]`` by default) with ``--debug`` removed; return its status (an int it
    returns, else 0), a DiffalignError's ``exit_code`` or 130 for Ctrl-C, each after :func:`print_error`."""
    args, debug = split_debug(sys.argv[1:] if argv is None else argv)
    previous, _state["debug"] = _state["debug"], debug or _state["debug"]
    try:
        result = main(args)
    except DiffalignError as err:
        print_error(err)
        return int(err.exit_code)
    except KeyboardInterrupt as err:
        if debug_enabled():
            traceback.print_exception(err)
        print("error: interrupted", file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT_CODE
    finally:
        _state["debug"] = previous
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
