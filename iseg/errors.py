"""The library's run errors and the one-line error text that the CLI, the runner and the demo
share. Standard library only: the ``iseg`` command imports it before anything heavy."""

from __future__ import annotations

import sys

PROG = "iseg"
"""The program name that starts every status and error line."""

MAX_LINE = 400
"""Longest ``iseg: error:`` line (characters): longer messages are cut in the middle."""
MAX_CAUSE = 200
"""Longest quoted cause (:func:`first_line`) inside a message."""


class RunError(Exception):
    """A failure that ends a run (an unreadable manifest, a full disk, an output folder that
    is not writable, ...). The CLI prints it as one ``iseg: error: ...`` line and exits with
    ``code`` (2: usage, e.g. a bad option value; 1: anything else)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def shorten(text: str, limit: int) -> str:
    """``text`` on one line (whitespace runs collapsed) of at most ``limit`` characters: a
    longer one keeps its start (what failed) and its end (what to do) around ``" … "``."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    head = (limit - 3) * 2 // 3
    return text[:head].rstrip() + " … " + text[len(text) - (limit - 3 - head) :].lstrip()


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its class name if it has none),
    at most :data:`MAX_CAUSE` characters."""
    if isinstance(exc, OSError) and exc.strerror:
        return shorten(exc.strerror, MAX_CAUSE)
    for line in str(exc).splitlines():
        if line.strip():
            return shorten(line, MAX_CAUSE)
    return type(exc).__name__


def error_line(message: object) -> str:
    """``iseg: error: <message>`` as one line of at most :data:`MAX_LINE` characters."""
    prefix = f"{PROG}: error: "
    return prefix + shorten(str(message), MAX_LINE - len(prefix))


def report_error(message: object) -> None:
    """Print :func:`error_line` of ``message`` on stderr."""
    print(error_line(message), file=sys.stderr, flush=True)
