"""User mistakes get one line and exit code 2; bugs keep their traceback.

Every error a user can cause (a config field, a data file, a checkpoint, a command-line
argument) is a `UserError` (or a subclass owned by the module that detects it) whose message
names the culprit and the fix. Entry points run through `run_main`, which prints
`error: <message>` and exits 2 for those, and lets anything else raise. `MDM_JAX_DEBUG=1` shows
the traceback for user errors too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

DEBUG_ENV = "MDM_JAX_DEBUG"


class UserError(Exception):
    """Bad input: the message names the input and what to do about it."""


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0", "false")


def fail(message: str) -> None:
    """Print one `error:` line and exit 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def run_main(main: Callable, *args, **kwargs):
    """Call an entry point's main; a UserError becomes one line and exit code 2."""
    try:
        return main(*args, **kwargs)
    except UserError as e:
        if debug():
            raise
        fail(str(e).strip().replace("\n", " "))


def absl_flags_parser(argv: list[str]) -> list[str]:
    """absl's flag parsing with bad flags reported as one line, exit 2 (absl prints two lines
    and exits 1); absl's "did you mean" suggestions stay in the line."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        if debug():
            raise
        fail(str(e).strip().replace("\n", " "))
    except UserError as e:  # a config file's get_config() may raise one
        fail(str(e).strip().replace("\n", " "))
