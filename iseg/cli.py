"""The ``iseg`` command: a thin dispatcher over the subcommands in :mod:`iseg.commands`.

Nothing here imports torch or diffusers (``iseg --help`` and ``iseg --version`` are fast);
each subcommand imports them when it runs. Errors are one ``iseg: error: ...`` line on
stderr (at most a few hundred characters) and no traceback: exit status 2 for usage errors,
1 for other failures (an unexpected exception too: its type and first line; ``ISEG_DEBUG=1``
shows the traceback), 130 after Ctrl-C and 143 after SIGTERM (a rerun of the same command
resumes).

Example:
    $ iseg segment cat.jpg dog.jpg --classes "cat, dog, sofa" --out masks
    $ python -m iseg recipes
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
from collections.abc import Iterator

PROG = "iseg"

# The subcommands: one module of iseg.commands each (add one line per new subcommand).
COMMANDS = [
    "segment",
    "recipes",
    "eval",
    "data",
    "tag",
    "demo",
    "unsupervised",
    "regions",
    "refine_masks",
]


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    """The ``iseg`` parser and ``{subcommand name: its module}``."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Training-free segmentation by class names with iSeg on Stable Diffusion.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = {}
    for module_name in COMMANDS:
        module = importlib.import_module(f"{__package__}.commands.{module_name}")
        before = set(subparsers.choices)
        module.add_parser(subparsers)
        for name in set(subparsers.choices) - before:
            modules[name] = module
    return parser, modules


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that the run stops as on Ctrl-C."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum, frame):
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave SIGTERM alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``iseg`` command; returns the exit status.

    Usage errors found by argparse exit through ``SystemExit(2)``; the others return.
    """
    from .errors import RunError, error_line, first_line

    try:
        with _sigterm_as_interrupt():
            parser, modules = build_parser()
            args = parser.parse_args(argv)
            return modules[args.command].run(args)
    except RunError as exc:
        print(error_line(exc), file=sys.stderr)
        return exc.code
    except Exception as exc:  # a bug or an input no check foresaw: one line
        if os.environ.get("ISEG_DEBUG", "").strip() not in ("", "0"):
            raise
        print(error_line(f"{type(exc).__name__}: {first_line(exc)} (unexpected; rerun with "
                         "ISEG_DEBUG=1 for the traceback and please report it)"), file=sys.stderr)  # fmt: skip
        return 1
    except Terminated:
        print(f"{PROG}: terminated; rerun the same command to resume", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
