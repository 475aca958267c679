"""``iseg regions IMAGE --point X,Y --box X0,Y0,X1,Y1 --line X,Y:X,Y[:X,Y...] --mask M.png
--negative-point X,Y --out DIR``: segment what the user points at, on one text-free capture
refined by Ent-Self (METHOD §5, the paper's Fig. 12).

Writes, per region r (1-based, in the order of the options, interleaved as given),
``OUT/<name>_region<r>_mask.png`` (white = in the region's mask; a ``--negative-point`` (a
background click, subtracted from the other regions) is a region too, with an empty mask), plus
``OUT/<name>_labels.png`` (palette PNG: 0 = none, r = region r) and ``OUT/<name>_overlay.png``.
Coordinates are image pixels (x right, y down); ``--point X,Y:X,Y`` with several points is one
region (their cells averaged). Resumable like ``iseg segment`` (:mod:`iseg.runner`).

Example:
    $ iseg regions cat.jpg --point 120,80 --box 10,20,200,180 --line 5,5:60,40:90,41 --out out
    $ iseg regions cat.jpg --point 120,80 --negative-point 300,30 --out out
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
from pathlib import Path

from ..errors import first_line
from ..runner import Runner
from . import _io, _model, _text_free
from ._common import CommandError

NAME = "regions"
REGION_MASK_SUFFIX = "_mask.png"  # <name>_region<r>_mask.png


# --- argparse value types -------------------------------------------------------------------


def _coordinate(text: str) -> int | float:
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"coordinates must be finite numbers, got {text!r}")
    return value


def _pair(text: str) -> tuple[int | float, int | float]:
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected X,Y, got {text!r}")
    return _coordinate(parts[0]), _coordinate(parts[1])


def parse_point(text: str) -> tuple[str, str, list]:
    """``"X,Y"`` or ``"X,Y:X,Y:..."`` (one region of several clicks) →
    ``("point", text, [(x, y), ...])``."""
    return ("point", text, [_pair(p) for p in text.split(":")])


def parse_negative_point(text: str) -> tuple[str, str, list]:
    """``"X,Y"`` or ``"X,Y:X,Y:..."`` → ``("negative-point", text, [(x, y), ...])``: a
    background click, subtracted from the other regions (:mod:`iseg.seeds`)."""
    return ("negative-point", text, [_pair(p) for p in text.split(":")])


def parse_box(text: str) -> tuple[str, str, tuple]:
    """``"X0,Y0,X1,Y1"`` → ``("box", text, (x0, y0, x1, y1))``."""
    parts = text.split(",")
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"expected X0,Y0,X1,Y1, got {text!r}")
    return ("box", text, tuple(_coordinate(p) for p in parts))


def parse_line(text: str) -> tuple[str, str, list]:
    """``"X,Y:X,Y[:X,Y...]"`` → ``("line", text, [(x, y), ...])`` (at least 2 vertices)."""
    vertices = [_pair(p) for p in text.split(":")]
    if len(vertices) < 2:
        raise argparse.ArgumentTypeError(f"a line needs at least 2 vertices X,Y:X,Y, got {text!r}")
    return ("line", text, vertices)


def parse_mask(text: str) -> tuple[str, str, str]:
    return ("mask", text, text)


parse_point.__name__ = "point X,Y[:X,Y...]"
parse_negative_point.__name__ = "negative point X,Y[:X,Y...]"
parse_box.__name__ = "box X0,Y0,X1,Y1"
parse_line.__name__ = "line X,Y:X,Y[:X,Y...]"
parse_mask.__name__ = "mask file"


# --- parser ---------------------------------------------------------------------------------


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="segment the regions given by points, boxes, lines and masks",
        description=(
            "Segment what you point at in IMAGE: each --point, --box, --line, --mask or "
            "--negative-point is one region (numbered in the order given), refined by Ent-Self "
            "from one text-free capture; a --negative-point marks background, subtracted from "
            "the other regions (its own mask is empty). Writes OUT/<name>_region<r>_mask.png per "
            "region r, OUT/<name>_labels.png (0 = none, r = region r) and OUT/<name>_overlay.png. "
            "Coordinates are image pixels, x right, y down."
        ),
    )
    # fmt: off
    parser.add_argument("image", metavar="IMAGE", help="the image file")
    group = parser.add_argument_group("regions (at least one; repeat any of them)")
    group.add_argument("--point", dest="regions", action="append", type=parse_point,
                       metavar="X,Y[:X,Y...]",
                       help="a click; several clicks joined by ':' are one region")
    group.add_argument("--box", dest="regions", action="append", type=parse_box,
                       metavar="X0,Y0,X1,Y1", help="a box, top-left and bottom-right corners")
    group.add_argument("--line", dest="regions", action="append", type=parse_line,
                       metavar="X,Y:X,Y[:X,Y...]",
                       help="a polyline (a stroke) through the vertices")
    group.add_argument("--mask", dest="regions", action="append", type=parse_mask,
                       metavar="M.png",
                       help="a mask image at the image's size (nonzero pixels are in the region)")
    group.add_argument("--negative-point", dest="regions", action="append",
                       type=parse_negative_point, metavar="X,Y[:X,Y...]",
                       help="a background click, subtracted from the other regions (its own "
                            "mask is empty); needs at least one other region")
    # fmt: on
    _model.add_model_options(parser)
    _text_free.settings_options(parser, regions=True)


# --- iseg regions ---------------------------------------------------------------------------


def _read_region_mask(path: str):
    """A mask file → bool ``[H, W]``: nonzero pixels (palette index for 'P' images, any channel
    for colour images)."""
    import numpy as np
    from PIL import Image

    from ..images import accept_large_images

    try:
        with accept_large_images(), Image.open(path) as image:
            image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CommandError(f"--mask {path}: cannot read it: {first_line(exc)}", code=2) from None
    array = np.asarray(image)
    return array.any(axis=-1) if array.ndim == 3 else array != 0


def _regions(specs: list, size: tuple[int, int]) -> list:
    """The option values → Point/Box/Line/Mask, validated against the image ``size`` (H, W);
    a bad one is a usage error naming the option."""
    from .. import seeds

    regions = []
    for kind, _text, value in specs:
        if kind in ("point", "negative-point"):
            regions.append(seeds.Point(value, negative=kind == "negative-point"))
        elif kind == "box":
            regions.append(seeds.Box(*value))
        elif kind == "line":
            regions.append(seeds.Line(value))
        else:
            regions.append(seeds.Mask(_read_region_mask(value)))
    try:
        seeds.validate_regions(regions, size)
    except (ValueError, TypeError) as exc:
        message = first_line(exc)
        found = re.match(r"regions\[(\d+)\] \(\w+\):? ?(.*)", message)
        if found:
            kind, text, _ = specs[int(found.group(1))]
            message = f"--{kind} {text}: {found.group(2)}"
        elif "only negative points" in message:
            message = ("--negative-point only marks background: give a region to segment too "
                       "(--point, --box, --line or --mask)")
        raise CommandError(message, code=2) from None
    return regions


def _run(args: argparse.Namespace) -> int:
    if not args.regions:
        raise CommandError(
            "give at least one region: --point X,Y, --box X0,Y0,X1,Y1, --line X,Y:X,Y or "
            "--mask M.png (and, optionally, --negative-point X,Y)",
            code=2,
        )
    path = Path(args.image)
    _io.check_images([path])
    from ..images import load_image

    try:
        image = load_image(path)
    except Exception as exc:
        raise CommandError(f"cannot read image '{path}': {first_line(exc)}") from None
    regions = _regions(args.regions, (image.height, image.width))  # before the model loads
    _model.check_recipe_name(args.recipe)
    options = _text_free.check_options(args)
    device, dtype = _model.resolve_device(args.device, args.dtype)

    described = []
    for kind, text, value in args.regions:
        if kind == "mask":  # the file's content, so that an edited mask is recomputed
            digest = hashlib.sha256(Path(value).read_bytes()).hexdigest()[:16]
            text = f"{Path(value).absolute()}@{digest}"
        described.append(f"--{kind} {text}")
    settings = {**_text_free.settings(args, dtype), "threshold": args.threshold, "regions": described}
    count = len(regions)

    def outputs(name: str) -> list[str]:
        masks = [f"{name}_region{r}{REGION_MASK_SUFFIX}" for r in range(1, count + 1)]
        return [*masks, f"{name}_labels.png", f"{name}_overlay.png"]

    runner = Runner(args.out, NAME, settings, overwrite=args.overwrite, quiet=args.quiet)
    todo = runner.plan([path], outputs)
    if todo:
        pipe = _text_free.load(args, device, dtype, options)
        process = _regions_processor(pipe, regions, options, args, outputs, dtype)
        runner.run(todo, lambda _: image, process)
    return runner.finish("segmented the regions of")


def _regions_processor(pipe, regions, options, args, outputs, dtype):
    def process(items, images):
        from PIL import Image

        from .. import masks

        item, image = items[0], images[0]
        try:
            generator = _text_free.generator(args.seed)
            out = pipe.segment_regions(image, regions, generator=generator, **options)
        except ValueError as exc:
            raise RuntimeError(_model.model_failure(exc, dtype)) from None
        files = {}
        names = outputs(item.name)
        for r, mask in enumerate(out.masks[0]):
            white = Image.fromarray(mask.cpu().numpy().astype("uint8") * 255, mode="L")
            files[names[r]] = _io.saver(white)
        label = out.labels[0].cpu()
        files[names[-2]] = _io.saver(masks.label_image(label))
        files[names[-1]] = _io.saver(masks.overlay(image, label))
        return [files]

    return process


def run(args: argparse.Namespace) -> int:
    """``iseg regions``: the exit status (a failed run raises
    :class:`~iseg.commands._common.CommandError`)."""
    _model.check_ops_backend()
    return _run(args)
