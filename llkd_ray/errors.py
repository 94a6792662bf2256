"""User-facing errors: the CLI prints these as one line and exits non-zero, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class LlkdError(Exception):
    """A problem with the user's input (file, column, config, model path), not a bug."""


class ConfigError(LlkdError, ValueError):
    """The configuration is invalid; the message names the key and what is allowed."""


class DataError(LlkdError):
    """The corpus or gold set cannot be used as given."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def run_reporting_errors(handler: Callable[[T], int], args: T) -> int:
    """``handler(args)`` as a command runs it: a user error is one line on stderr and exit 2, Ctrl-C 130."""
    try:
        return handler(args)
    except LlkdError as error:
        print(f"llkd: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llkd: interrupted", file=sys.stderr)
        return 130
