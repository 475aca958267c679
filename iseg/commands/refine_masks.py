"""``iseg refine-masks IMAGE... --masks DIR --out DIR``: refine given masks (e.g. a synthetic
dataset's) by Ent-Self on one text-free capture (METHOD §5, the paper's Fig. 6).

Reads, for each image, ``DIR/<stem>.png`` (a palette or greyscale PNG of class ids: 0 =
background, 255 = ignore) and writes the refined ids as ``OUT/<name>.png`` (palette PNG, VOC
colours, 255 pixels kept). A missing or mismatched mask is one error line for that image; the
run goes on and exits with status 1 at the end. Resumable like ``iseg segment``
(:mod:`iseg.runner`: manifest, atomic writes, finished images skipped, files this tool did not
write never overwritten).

Example:
    $ iseg refine-masks synthetic/images --masks synthetic/masks --out refined
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..choices import SEED_MAX
from ..errors import first_line
from ..runner import Runner
from . import _io, _model, _text_free
from ._common import CommandError

NAME = "refine-masks"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        NAME,
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
    _model.add_model_options(parser)
    _text_free.settings_options(parser, regions=False)


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


def _run(args: argparse.Namespace) -> int:
    masks_dir = Path(args.masks)
    if not masks_dir.is_dir():
        raise CommandError(f"--masks {args.masks}: not a folder", code=2)
    paths = _io.expand_inputs(args.images)
    _io.check_images(paths)
    if args.seed + len(paths) - 1 > SEED_MAX:
        raise CommandError(f"--seed {args.seed}: too large for {len(paths)} images", code=2)
    _model.check_recipe_name(args.recipe)
    options = _text_free.check_options(args)
    device, dtype = _model.resolve_device(args.device, args.dtype)

    settings = {
        **_text_free.settings(args, dtype),
        "background_threshold": args.background_threshold,
        "masks": str(masks_dir.absolute()),
    }
    runner = Runner(args.out, NAME, settings, overwrite=args.overwrite, quiet=args.quiet)
    todo = runner.plan(paths, lambda name: [f"{name}.png"])
    if todo:
        pipe = _text_free.load(args, device, dtype, options)
        runner.run(todo, _io.load_image, _refine_processor(pipe, masks_dir, options, args, dtype))
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
            generator = _text_free.generator(args.seed + item.index)
            try:
                out = pipe.refine_masks(image, label_map, generator=generator, **options)
            except torch.OutOfMemoryError:
                raise CommandError(f"out of memory on {pipe.device}") from None
            except ValueError as exc:
                raise RuntimeError(_model.model_failure(exc, dtype)) from None
            labels = out.labels[0].cpu()
        return [{f"{item.name}.png": _io.saver(masks.label_image(labels))}]

    return process


def run(args: argparse.Namespace) -> int:
    """``iseg refine-masks``: the exit status (a failed run raises
    :class:`~iseg.commands._common.CommandError`)."""
    _model.check_ops_backend()
    return _run(args)
