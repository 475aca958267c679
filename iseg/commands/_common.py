"""Pieces shared by the ``iseg`` subcommands' parsers: :class:`CommandError`, warnings, the
argparse value types and the option adders. Model loading is :mod:`._model`; inputs and
per-image outputs are :mod:`._io`. Standard library only (``iseg --help`` imports it).
"""

from __future__ import annotations

import argparse
import re
import sys

from ..choices import SEED_MAX
from ..errors import MAX_LINE, PROG, RunError, shorten
from ..recipes import MAX_GAMMA


class CommandError(RunError):
    """A bad command line or input found by a subcommand: one ``iseg: error: ...`` line and exit
    status ``code`` (2: usage, e.g. a bad option value; 1: anything else)."""


def warn(message: str) -> None:
    """One ``iseg: warning: ...`` line on stderr."""
    print(f"{PROG}: warning: {shorten(message, MAX_LINE)}", file=sys.stderr)


# --- argparse value types (their __name__ is what argparse's messages show) -------------------


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {value}")
    return value


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def finite_float(text: str, low: float, inclusive: bool, high: float = 3.4e38) -> float:
    """A finite number ``> low`` (``≥`` if ``inclusive``) and ``≤ high`` (float32's range by
    default, so that it survives the cast to the model's dtype)."""
    value = _float(text)
    ok_low = value >= low if inclusive else value > low
    if value != value or abs(value) == float("inf") or not ok_low or value > high:
        raise argparse.ArgumentTypeError(
            f"must be a finite number {'≥' if inclusive else '>'} {low:g} and ≤ {high:g}, "
            f"got {text}"
        )
    return value


def positive_float(text: str) -> float:
    return finite_float(text, 0.0, inclusive=False)


def open_unit(text: str) -> float:
    """A number in (0, 1): the thresholds ``threshold`` and ``background_threshold``."""
    value = _float(text)
    if not 0.0 < value < 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {text}")
    return value


MAX_ITERS = 10_000
"""Largest ``--iters``: the paper uses 10 (interactive 50); the refinement has converged long
before, and a typo such as ``--iters 10000000`` would run for days without a word."""


def iterations(text: str) -> int:
    value = non_negative_int(text)
    if value > MAX_ITERS:
        raise argparse.ArgumentTypeError(
            f"must be ≤ {MAX_ITERS} (the paper uses 10; the refinement converges long before), "
            f"got {value}"
        )
    return value


NONE = "none"
"""What ``--lam none`` (and ``unsupervised --iters none``) parse to: "switch this step off",
distinct from ``None`` ("not given: the recipe's")."""


def optional(kind, what: str):
    """An argparse type: ``kind(text)``, or ``'none'`` → :data:`NONE`; ``what`` names it in
    argparse's error."""

    def parse(text: str):
        if text.strip().lower() == NONE:
            return NONE
        return kind(text)

    parse.__name__ = what
    return parse


# The one ``--lam`` parser of every command: Ent-Self's λ ≥ 0, or ``none`` (:data:`NONE`: refine
# with the raw attention, no Ent-Self).
lam = optional(lambda text: finite_float(text, 0.0, inclusive=True), "λ (a number ≥ 0 or 'none')")


def unset(value):
    """A parsed option for the library: :data:`NONE` → ``None`` (the step off), else as is."""
    return None if value == NONE else value


def gamma(text: str) -> float:
    """Cat-Cross γ in (0, MAX_GAMMA] (the recipes' bound: larger overflows the attention)."""
    return finite_float(text, 0.0, inclusive=False, high=MAX_GAMMA)


def seed(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64 - 1], got {value}")
    return value


_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def device(text: str) -> str:
    text = text.strip().lower()
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or mps, got {text!r}")
    return text


non_negative_int.__name__ = "non-negative int"
positive_int.__name__ = "positive int"
positive_float.__name__ = "positive number"
open_unit.__name__ = "number in (0, 1)"
iterations.__name__ = f"int in [0, {MAX_ITERS}]"
gamma.__name__ = "γ"
seed.__name__ = "seed"
device.__name__ = "device"


# --- shared options -------------------------------------------------------------------------


CUDA_BATCH_SIZE = 8
"""Default images per model call on CUDA: on an H200 a batch of 8 took 19.7 ms/image against
61 ms at batch 1 (SD 2.1-base, fp16), with a peak of 4.3 GB."""


def batch_size(args: argparse.Namespace, device: str) -> int:
    """``--batch-size``, or the default for ``device`` (8 on CUDA, 1 elsewhere)."""
    if args.batch_size is not None:
        return args.batch_size
    return CUDA_BATCH_SIZE if str(device).startswith("cuda") else 1


def add_output_options(parser: argparse.ArgumentParser, default_out: str = "iseg-out") -> None:
    """``--out``, ``--batch-size``, ``--overwrite`` (what :class:`iseg.runner.Runner` takes)."""
    group = parser.add_argument_group("run")
    group.add_argument(
        "--out", default=default_out, metavar="DIR",
        help=f"output folder, created after the model loads (default: {default_out})",
    )  # fmt: skip
    group.add_argument(
        "--batch-size", type=positive_int, default=None,
        help=f"images per model call (default: {CUDA_BATCH_SIZE} on CUDA, 1 elsewhere)",
    )
    group.add_argument(
        "--overwrite", action="store_true",
        help="recompute finished images and replace results of other settings "
             "(files this tool did not write are never overwritten)",
    )  # fmt: skip
    add_quiet_option(group)


def add_quiet_option(parser) -> None:
    """``--quiet``: no progress, no loading bars, no summary; warnings and errors only."""
    parser.add_argument(
        "--quiet", "-q", action="store_true",
        help="print only warnings and errors (no progress, loading bars or summary)",
    )  # fmt: skip
