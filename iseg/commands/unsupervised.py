"""``iseg unsupervised IMAGE... --out DIR``: segments without class names (DiffSeg + iSeg).

For each input ``OUT/<name>_labels.png`` (palette PNG of segment ids 0..M-1, DiffSeg's merged-map
order, VOC colours) and ``OUT/<name>_overlay.png`` (or ``.jpg``; none with ``--no-overlay``): the
image with every segment's colour blended in. Names, the manifest, resuming and atomic writes as
in ``iseg segment`` (:mod:`iseg.runner`).

Example:
    $ iseg unsupervised street.jpg --kl-threshold 0.9 --out segments
    $ iseg unsupervised photos/ --iters none --model CompVis/stable-diffusion-v1-4
"""

from __future__ import annotations

import argparse
import sys

from ..recipes import (
    DIFFSEG_FIRST_PASSES,
    DIFFSEG_INITS,
    DIFFSEG_MODEL,
    DIFFSEG_REFINE_ATTENTIONS,
    DIFFSEG_SETTINGS,
    DiffSegSettings,
)
from ..runner import Runner
from . import _common, _io, _model
from ._common import CommandError

NAME = "unsupervised"
DEFAULTS = DiffSegSettings()


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="segment images without class names (DiffSeg's segments refined by iSeg)",
        description=(
            "Write OUT/<name>_labels.png (palette PNG of segment ids) and OUT/<name>_overlay.png "
            "for each IMAGE: DiffSeg's unsupervised segments (one UNet call, self-attention "
            "aggregated over all layers, KL merging) refined by iSeg's Ent-Self. A rerun of the "
            "same command skips finished images, so a stopped run resumes."
        ),
    )
    # fmt: off
    add = parser.add_argument
    add("images", nargs="+", metavar="IMAGE",
        help="image files, folders (their images) or quoted glob patterns ('shots/**/*.jpg')")
    _model.add_model_options(parser)
    parser.set_defaults(model=DIFFSEG_MODEL)
    for action in parser._actions:  # say the default this command uses
        if action.dest == "model":
            action.help = f"diffusers Stable Diffusion repo id or local folder (default: {DIFFSEG_MODEL}, DiffSeg's)"

    add = parser.add_argument_group("DiffSeg and iSeg settings").add_argument
    add("--kl-threshold", type=_common.positive_float, default=DEFAULTS.kl_threshold, metavar="TAU",
        help="DiffSeg's merging threshold τ: larger merges more "
             f"({DIFFSEG_SETTINGS['cocostuff27'].kl_threshold} COCO-Stuff, "
             f"{DIFFSEG_SETTINGS['cityscapes'].kl_threshold} Cityscapes; default {DEFAULTS.kl_threshold})")
    add("--iters", type=_common.optional(_common.iterations, f"an int in [0, {_common.MAX_ITERS}] or 'none'"),
        default=DEFAULTS.iters,
        help=f"refinement iterations N, or 'none' for DiffSeg's own segments (default: {DEFAULTS.iters}; at "
             f"most {_common.MAX_ITERS})")
    add("--lam", type=_common.lam, default=DEFAULTS.lam,
        help=f"Ent-Self strength λ, or 'none' for the raw aggregated attention (default: {DEFAULTS.lam})")
    add("--init", choices=DIFFSEG_INITS, default=DEFAULTS.init,
        help="the refinement's initial maps: DiffSeg's merged maps or their one-hot argmax "
             f"(default: {DEFAULTS.init})")
    add("--refine-attention", choices=DIFFSEG_REFINE_ATTENTIONS, default=DEFAULTS.refine_attention,
        help="the attention the refinement propagates with: DiffSeg's aggregate of all layers, "
             f"or the latent-resolution (64×64) layers only (default: {DEFAULTS.refine_attention})")
    add("--anchor-grid", type=_common.positive_int, default=DEFAULTS.anchor_grid, metavar="N",
        help=f"DiffSeg's anchors per side (default: {DEFAULTS.anchor_grid}, {DEFAULTS.anchor_grid ** 2} anchors)")
    add("--first-pass", choices=DIFFSEG_FIRST_PASSES, default=DEFAULTS.first_pass,
        help="arithmetic of DiffSeg's first merging pass: fp32, or fp16 exactly as Google's code "
             "(values below 2.98e-8 underflow; anchors that match nothing are dropped and "
             f"counted) (default: {DEFAULTS.first_pass})")

    _common.add_output_options(parser)
    _io.add_overlay_options(parser)
    # fmt: on


def run(args: argparse.Namespace) -> int:
    """``iseg unsupervised``: returns the exit status (raises CommandError for a failed run)."""
    _model.check_ops_backend()
    paths = _io.expand_inputs(args.images)
    _io.check_images(paths)
    device, dtype = _model.resolve_device(args.device, args.dtype)

    settings = {
        "model": _model.model_setting(args.model),
        "dtype": str(dtype).removeprefix("torch."),
        "kl_threshold": args.kl_threshold,
        "iters": args.iters,
        "lam": args.lam,
        "init": args.init,
        "refine_attention": args.refine_attention,
        "anchor_grid": args.anchor_grid,
        "first_pass": args.first_pass,
    }
    runner = Runner(args.out, NAME, settings, overwrite=args.overwrite, quiet=args.quiet)
    todo = runner.plan(paths, _io.label_outputs(args))
    if todo:
        pipe = _model.load_pipeline(args.model, device, dtype, quiet=args.quiet)
        args.batch_size = _common.batch_size(args, device)
        _model.check_loaded(lambda: _check_loaded(pipe, args))
        runner.run(todo, _io.load_image, _processor(pipe, args, device, dtype), args.batch_size)
    return runner.finish("segmented")


def _check_loaded(pipe, args: argparse.Namespace) -> None:
    """What only the loaded model can check, before anything is written: DiffSeg's anchors fit
    the latent grid, and the aggregated attention of a batch fits in memory."""
    side = pipe.unet.config.sample_size
    if args.anchor_grid > side:
        raise ValueError(f"--anchor-grid must be ≤ the latent grid side {side}, got {args.anchor_grid}")
    pipe.check_memory((side, side), args.batch_size)


def overlay(image, label, alpha: float = 0.5):
    """The image with every segment's palette colour blended in (segment 0 too)."""
    from PIL import Image

    from .. import masks

    return Image.blend(image.convert("RGB"), masks.label_image(label).convert("RGB"), alpha)


def _processor(pipe, args: argparse.Namespace, device: str, dtype):
    import torch

    from .. import masks
    options = {
        "kl_threshold": args.kl_threshold,
        "iters": _common.unset(args.iters),
        "lam": _common.unset(args.lam),
        "init": args.init,
        "refine_attention": args.refine_attention,
        "anchor_grid": args.anchor_grid,
        "first_pass": args.first_pass,
    }
    outputs = _io.label_outputs(args)

    def process(items, images):
        try:
            output = pipe.segment_unsupervised(images, **options)
        except torch.OutOfMemoryError:
            raise CommandError(
                f"out of memory on {device} with --batch-size {args.batch_size}; "
                "try a smaller --batch-size or --dtype fp16"
            ) from None
        except (ValueError, RuntimeError) as exc:  # settings were checked: these images failed
            raise RuntimeError(_model.model_failure(exc, dtype, gamma=False)) from None
        results = []
        for item, image, label, lost in zip(items, images, output.labels, output.dropped_anchors):
            label = label.cpu()
            if lost:  # only Google's fp16 first pass drops anchors
                print(f"iseg: {item.name}: {lost} anchor(s) dropped (fp16 underflow in the first pass)", file=sys.stderr)
            files = {f"{item.name}_labels.png": _io.saver(masks.label_image(label), "PNG")}
            if not args.no_overlay:
                fmt = "PNG" if args.overlay_format == "png" else "JPEG"
                files[outputs(item.name)[1]] = _io.saver(overlay(image, label), fmt)
            results.append(files)
        return results

    return process
