"""Inputs and per-image outputs of the ``iseg`` subcommands: image files, folders and globs
(skipping this tool's outputs), the overlay options and output names, the runner's loader and
savers. Standard library at import (``iseg --help`` imports it).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import PROG, first_line
from ..files import TEMP_SUFFIX
from ..runner import MANIFEST, manifest_outputs
from ._common import CommandError

# Name endings of files this tool writes; a folder or glob given as input skips them (files named
# explicitly are always taken). A subcommand that writes other names adds its endings here.
OUTPUT_SUFFIXES: list[str] = ["_labels.png", "_overlay.png", "_overlay.jpg"]



# --- inputs ---------------------------------------------------------------------------------


def is_tool_output(path: Path) -> bool:
    """Whether ``path`` is named like a file this tool writes (outputs, temporary files and
    manifests)."""
    name = path.name
    return (
        name == MANIFEST
        or name.endswith(TEMP_SUFFIX)
        or any(name.endswith(suffix) for suffix in OUTPUT_SUFFIXES)
    )


def _recorded_outputs(folder: Path, cache: dict[Path, set[str]]) -> set[str]:
    """Names of the files that a manifest in ``folder`` says this tool wrote there."""
    if folder not in cache:
        cache[folder] = manifest_outputs(folder)
    return cache[folder]


def expand_inputs(specs: Sequence[str]) -> list[Path]:
    """Image paths from files, folders and glob patterns, in order, without duplicates.

    * a file is taken as given (it is checked later, when it is read), unless it is one this
      tool wrote (recorded in the manifest next to it, or the manifest or a temporary file
      itself): the shell's expansion of an unquoted ``ds/*`` lists them too. Those are skipped
      with one note line;
    * a folder gives its image files (by extension, sorted, not recursive);
    * a pattern with ``*``, ``?`` or ``[`` (quoted, so the shell leaves it) gives its
      matching image files, sorted (``**`` recurses).

    Folders and patterns skip hidden files and this tool's outputs (named ``*_labels.png``,
    ``*_overlay.png|jpg``, or recorded in an ``iseg-manifest.json`` next to them).

    Raises:
        CommandError: a folder or pattern that gives no image.
    """
    from PIL import Image

    extensions = {ext.lower() for ext in Image.registered_extensions()}
    manifests: dict[Path, set[str]] = {}

    def keep(path: Path) -> bool:
        return (
            path.is_file()
            and not path.name.startswith(".")
            and path.suffix.lower() in extensions
            and not is_tool_output(path)
            and path.name not in _recorded_outputs(path.parent, manifests)
        )

    paths: list[Path] = []
    skipped = 0
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if keep(p))
            if not found:
                raise CommandError(f"no images in folder '{spec}'")
        elif not path.exists() and glob.has_magic(spec):
            found = sorted(p for p in map(Path, glob.glob(spec, recursive=True)) if keep(p))
            if not found:
                raise CommandError(f"no images match '{spec}'")
        elif path.is_file() and (
            path.name == MANIFEST
            or path.name.endswith(TEMP_SUFFIX)
            or path.name in _recorded_outputs(path.parent, manifests)
        ):
            skipped += 1
            continue
        else:
            found = [path]
        paths += found
    if skipped:
        print(f"{PROG}: note: skipped {skipped} input file{'s' * (skipped != 1)} that this tool "
              "wrote (outputs, manifest)", file=sys.stderr)  # fmt: skip
        if not paths:
            raise CommandError("no images left: every input is a file this tool wrote")
    seen: set[str] = set()
    unique = []
    for path in paths:
        key = os.path.normcase(os.path.abspath(path))
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def check_images(paths: Sequence[Path]) -> None:
    """Fail fast (before the model loads) on a missing file or one PIL cannot identify; only
    headers are read here, the full decode happens per image in the run."""
    from PIL import Image

    from ..images import accept_large_images

    for path in paths:
        try:
            with accept_large_images(), Image.open(path):
                pass
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise CommandError(f"cannot read image '{path}': {first_line(exc)}") from None


# --- per-image label outputs (segment, unsupervised, regions) ------------------------------

OVERLAY_FORMATS = ("png", "jpg")


def add_overlay_options(parser: argparse.ArgumentParser) -> None:
    """``--no-overlay`` and ``--overlay-format``."""
    group = parser.add_argument_group("overlays")
    group.add_argument(
        "--no-overlay", action="store_true",
        help="write only the label PNGs (the overlay is most of the time and disk per image at "
             "large sizes)",
    )  # fmt: skip
    group.add_argument(
        "--overlay-format", choices=OVERLAY_FORMATS, default="png",
        help="overlay file format (default: png; jpg is smaller and faster)",
    )  # fmt: skip


def label_outputs(args: argparse.Namespace):
    """The runner's ``outputs(name)``: ``<name>_labels.png`` and, unless ``--no-overlay``,
    ``<name>_overlay.<png|jpg>``."""

    def outputs(name: str) -> list[str]:
        files = [f"{name}_labels.png"]
        if not args.no_overlay:
            files.append(f"{name}_overlay.{args.overlay_format}")
        return files

    return outputs


def load_image(path):
    """The runner's loader: :func:`iseg.images.load_image` (imported when first used)."""
    from ..images import load_image as load

    return load(path)


def saver(image, fmt: str = "PNG"):
    """A writer of ``image`` for the runner's atomic files (JPEG at quality 90)."""
    options = {"quality": 90} if fmt == "JPEG" else {}
    return lambda f: image.save(f, format=fmt, **options)
