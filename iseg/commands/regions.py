"""``iseg regions`` (segment what the user points at) and ``iseg refine-masks`` (refine given
masks), both on one text-free capture refined by Ent-Self (METHOD §5, the paper's Fig. 12 and 6).

``iseg regions IMAGE --point X,Y --box X0,Y0,X1,Y1 --line X,Y:X,Y[:X,Y...] --mask M.png
--negative-point X,Y --out DIR`` writes, per region r (1-based, in the order of the options,
interleaved as given), ``OUT/<name>_region<r>_mask.png`` (white = in the region's mask; a
``--negative-point`` (a background click, subtracted from the other regions) is a region
too, with an empty mask), plus ``OUT/<name>_labels.png`` (palette PNG: 0 = none, r =
region r) and ``OUT/<name>_overlay.png``. Coordinates are image pixels (x right, y down);
``--point X,Y:X,Y`` with several points is one region (their cells averaged).

``iseg refine-masks IMAGE... --masks DIR --out DIR`` reads, for each image, ``DIR/<stem>.png``
(a palette or greyscale PNG of class ids: 0 = background, 255 = ignore) and writes the refined
ids as ``OUT/<name>.png`` (palette PNG, VOC colours, 255 pixels kept). A missing or mismatched
mask is one error line for that image; the run goes on and exits with status 1 at the end.

Both are resumable like ``iseg segment`` (:mod:`iseg.runner`: manifest, atomic writes, finished
images skipped, files this tool did not write never overwritten).

Example:
    $ iseg regions cat.jpg --point 120,80 --box 10,20,200,180 --line 5,5:60,40:90,41 --out out
    $ iseg regions cat.jpg --point 120,80 --negative-point 300,30 --out out
    $ iseg refine-masks synthetic/images --masks synthetic/masks --out refined
"""

from __future__ import annotations

import argparse
import hashlib
import math
from pathlib import Path

from ..errors import first_line
from . import _common
from ._common import CommandError

REGIONS, REFINE = "regions", "refine-masks"
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


def _lam(text: str) -> float:
    return _common.finite_float(text, 0.0, inclusive=True)


_lam.__name__ = "λ (a number ≥ 0)"


# --- parsers --------------------------------------------------------------------------------


def _settings_options(parser: argparse.ArgumentParser, regions: bool) -> None:
    # fmt: off
    add = parser.add_argument_group("iSeg settings (default: the recipe's)").add_argument
    add("--recipe", default=None, metavar="NAME",
        help="a named configuration (see `iseg recipes`; default: interactive, sdxl-interactive on an "
             "SDXL model)")
    add("--iters", type=_common.iterations, default=None,
        help=f"refinement iterations N (interactive: 50; at most {_common.MAX_ITERS})")
    add("--lam", type=_lam, default=None, help="Ent-Self strength λ (interactive: 0.0434294)")
    add("--t-max", type=_common.positive_float, default=None, metavar="T",
        help="upper clamp of Ent-Self's T (interactive: 1)")
    add("--gamma", type=_common.gamma, default=None,
        help="weight γ in (0, 100] of the BOS token of the empty prompt (interactive: 1.6)")
    if regions:
        add("--threshold", type=_common.open_unit, default=None,
            help="a pixel is in a region's mask where its heat is above this, in (0, 1) "
                 "(interactive: 0.5)")
    else:
        add("--background-threshold", type=_common.open_unit, default=None, metavar="TAU",
            help="pixels whose best heat is below TAU in (0, 1) are background "
                 "(default: the background score (1 - max heat)²)")
    add("--seed", type=_common.seed, default=0,
        help="noise seed in [0, 2**64)" + ("" if regions else "; the i-th IMAGE uses seed + i")
             + " (default: 0)")
    group = parser.add_argument_group("run")
    group.add_argument("--out", default="iseg-out", metavar="DIR",
                       help="output folder, created after the model loads (default: iseg-out)")
    group.add_argument("--overwrite", action="store_true",
                       help="recompute finished images and replace results of other settings "
                            "(files this tool did not write are never overwritten)")
    _common.add_quiet_option(group)
    # fmt: on


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        REGIONS,
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
    _common.add_model_options(parser)
    _settings_options(parser, regions=True)

    parser = subparsers.add_parser(
        REFINE,
        help="refine given masks (e.g. a synthetic dataset's) by Ent-Self",
        description=(
            "For each IMAGE, read MASKS/<stem>.png (palette or greyscale PNG of class ids: 0 = "
            "background, 255 = ignore) and write the refined ids to OUT/<name>.png (palette "
            "PNG; 255 pixels kept). A missing or mismatched mask is reported for that image and "
            "the run goes on. A rerun of the same command skips finished images."
        ),
    )
    parser.add_argument(
        "images", nargs="+", metavar="IMAGE",
        help="image files, folders (their images) or quoted glob patterns ('shots/**/*.jpg')",
    )  # fmt: skip
    parser.add_argument(
        "--masks", required=True, metavar="DIR",
        help="folder of the masks to refine, named after the images' stems (<stem>.png)",
    )  # fmt: skip
    _common.add_model_options(parser)
    _settings_options(parser, regions=False)


# --- shared ---------------------------------------------------------------------------------


def _check_recipe(name: str | None) -> None:
    if name is None:
        return
    from ..recipes import RECIPES

    if name not in RECIPES:
        known = ", ".join(RECIPES)
        raise CommandError(f"--recipe: unknown recipe {name!r}; known: {known}", code=2)


def _options(args: argparse.Namespace) -> dict:
    """The pipeline keywords given on the command line (the others stay the recipe's)."""
    options = {"recipe": args.recipe}  # None: the model's default (interactive; SDXL's on SDXL)
    names = ("iters", "lam", "t_max", "gamma", "threshold", "background_threshold")
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            options[name] = value
    return options


def _settings(args: argparse.Namespace, dtype) -> dict:
    options = _options(args)
    return {
        "model": _common.model_setting(args.model),
        "dtype": str(dtype).removeprefix("torch."),
        **{k: options.get(k) for k in ("recipe", "iters", "lam", "t_max", "gamma")},
        "seed": args.seed,
    }


def _check_options(args: argparse.Namespace) -> dict:
    """The pipeline keywords, after the checks that need no model (before it loads)."""
    options = _options(args)
    _common.check_recipe_options(
        options["recipe"] or "interactive", {k: v for k, v in options.items() if k != "recipe"}
    )
    return options


def _load(args: argparse.Namespace, device, dtype, options: dict):
    """The pipeline, and what only the loaded model can check (layers, timestep, memory):
    a setting it refuses is one usage error, before anything is written."""
    pipe = _common.load_pipeline(args.model, device, dtype, quiet=args.quiet)
    if hasattr(pipe, "check_settings"):

        def check():
            _, _, grid = pipe.check_settings(text=False, **options)
            pipe.check_memory(grid, 1)

        _common.check_loaded(check)
    return pipe


def _generator(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


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
    import re

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


def _run_regions(args: argparse.Namespace) -> int:
    if not args.regions:
        raise CommandError(
            "give at least one region: --point X,Y, --box X0,Y0,X1,Y1, --line X,Y:X,Y or "
            "--mask M.png (and, optionally, --negative-point X,Y)",
            code=2,
        )
    path = Path(args.image)
    _common.check_images([path])
    from ..images import load_image

    try:
        image = load_image(path)
    except Exception as exc:
        raise CommandError(f"cannot read image '{path}': {first_line(exc)}") from None
    regions = _regions(args.regions, (image.height, image.width))  # before the model loads
    _check_recipe(args.recipe)
    options = _check_options(args)
    device, dtype = _common.resolve_device(args.device, args.dtype)

    from ..runner import Runner

    described = []
    for kind, text, value in args.regions:
        if kind == "mask":  # the file's content, so that an edited mask is recomputed
            digest = hashlib.sha256(Path(value).read_bytes()).hexdigest()[:16]
            text = f"{Path(value).absolute()}@{digest}"
        described.append(f"--{kind} {text}")
    settings = {**_settings(args, dtype), "threshold": args.threshold, "regions": described}
    count = len(regions)

    def outputs(name: str) -> list[str]:
        masks = [f"{name}_region{r}{REGION_MASK_SUFFIX}" for r in range(1, count + 1)]
        return [*masks, f"{name}_labels.png", f"{name}_overlay.png"]

    runner = Runner(args.out, REGIONS, settings, overwrite=args.overwrite, quiet=args.quiet)
    todo = runner.plan([path], outputs)
    if todo:
        pipe = _load(args, device, dtype, options)
        process = _regions_processor(pipe, regions, options, args, outputs, dtype)
        runner.run(todo, lambda _: image, process)
    return runner.finish("segmented the regions of")


def _regions_processor(pipe, regions, options, args, outputs, dtype):
    def process(items, images):
        from PIL import Image

        from .. import masks

        item, image = items[0], images[0]
        try:
            out = pipe.segment_regions(image, regions, generator=_generator(args.seed), **options)
        except ValueError as exc:
            raise RuntimeError(_common.model_failure(exc, dtype)) from None
        files = {}
        names = outputs(item.name)
        for r, mask in enumerate(out.masks[0]):
            white = Image.fromarray(mask.cpu().numpy().astype("uint8") * 255, mode="L")
            files[names[r]] = _common.saver(white)
        label = out.labels[0].cpu()
        files[names[-2]] = _common.saver(masks.label_image(label))
        files[names[-1]] = _common.saver(masks.overlay(image, label))
        return [files]

    return process


# --- iseg refine-masks ----------------------------------------------------------------------


def read_label_map(path: Path, size: tuple[int, int]):
    """A mask PNG of class ids → ``[H, W]`` int64 tensor.

    Raises:
        ValueError: a missing or unreadable file, a colour image, or another size than ``size``
            (H, W); each in one line naming the file.
    """
    import numpy as np
    import torch
    from PIL import Image

    from ..images import accept_large_images

    if not path.is_file():
        raise ValueError(f"no mask '{path}' for this image")
    try:
        with accept_large_images(), Image.open(path) as image:
            image.load()
    except (OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read mask '{path}': {first_line(exc)}") from None
    if image.mode not in ("P", "L", "I", "I;16", "1"):
        raise ValueError(
            f"mask '{path}' is a {image.mode} image; expected a palette (P) or greyscale (L) "
            f"PNG of class ids"
        )
    ids = torch.from_numpy(np.asarray(image).astype(np.int64))
    if tuple(ids.shape) != size:
        raise ValueError(
            f"mask '{path}' is {ids.shape[1]}×{ids.shape[0]} but the image is {size[1]}×{size[0]} "
            f"(W×H)"
        )
    return ids


def _run_refine(args: argparse.Namespace) -> int:
    masks_dir = Path(args.masks)
    if not masks_dir.is_dir():
        raise CommandError(f"--masks {args.masks}: not a folder", code=2)
    paths = _common.expand_inputs(args.images)
    _common.check_images(paths)
    if args.seed + len(paths) - 1 > _common.SEED_MAX:
        raise CommandError(f"--seed {args.seed}: too large for {len(paths)} images", code=2)
    _check_recipe(args.recipe)
    options = _check_options(args)
    device, dtype = _common.resolve_device(args.device, args.dtype)

    from ..runner import Runner

    settings = {
        **_settings(args, dtype),
        "background_threshold": args.background_threshold,
        "masks": str(masks_dir.absolute()),
    }
    runner = Runner(args.out, REFINE, settings, overwrite=args.overwrite, quiet=args.quiet)
    todo = runner.plan(paths, lambda name: [f"{name}.png"])
    if todo:
        pipe = _load(args, device, dtype, options)
        runner.run(todo, _common.load_image, _refine_processor(pipe, masks_dir, options, args, dtype))
    return runner.finish("refined the masks of")


def _refine_processor(pipe, masks_dir: Path, options: dict, args, dtype):
    def process(items, images):
        import torch

        from .. import masks

        item, image = items[0], images[0]
        label_map = read_label_map(masks_dir / f"{Path(item.path).stem}.png",
                                   (image.height, image.width))  # fmt: skip
        present = set(label_map.unique().tolist()) - {0, 255}
        if not present:  # only background and ignore: nothing to refine
            labels = label_map
        else:
            generator = _generator(args.seed + item.index)
            try:
                out = pipe.refine_masks(image, label_map, generator=generator, **options)
            except torch.OutOfMemoryError:
                raise CommandError(f"out of memory on {pipe.device}") from None
            except ValueError as exc:
                raise RuntimeError(_common.model_failure(exc, dtype)) from None
            labels = out.labels[0].cpu()
        return [{f"{item.name}.png": _common.saver(masks.label_image(labels))}]

    return process


def run(args: argparse.Namespace) -> int:
    """``iseg regions`` or ``iseg refine-masks``: the exit status (a failed run raises
    :class:`~iseg.commands._common.CommandError`)."""
    _common.check_ops_backend()
    return _run_regions(args) if args.command == REGIONS else _run_refine(args)
