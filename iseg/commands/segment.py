"""``iseg segment IMAGE... --classes "cat,dog"``: label and overlay images per input.

For each input ``OUT/<name>_labels.png`` (palette PNG: 0 = background, k = the k-th class, VOC
colours) and ``OUT/<name>_overlay.png`` (or ``.jpg``; none with ``--no-overlay``): the image with
the labels' colours blended in. ``<name>`` is the input's stem, ``<stem>_<i>`` where stems
clash (i = the input's position), and ``OUT/iseg-manifest.json`` records which input each name
came from (:mod:`iseg.runner`).

Example:
    $ iseg segment cat.jpg dog.jpg --classes "cat, dog, sofa" --out masks
    $ iseg segment photos/ "more/**/*.jpg" --classes person --device cpu --no-overlay
"""

from __future__ import annotations

import argparse

from ..choices import SEED_MAX, noise_seeds, parse_classes, vocabulary_ids
from ..errors import first_line
from ..recipes import AUTHORS_SEED, DEFAULT_GAMMA, DEFAULT_ITERS, DEFAULT_LAM, default_recipe_for, get_recipe
from ..runner import Runner
from . import _common, _io, _model
from ._common import CommandError
from .tag import (
    add_tagger_options,
    check_tagger_model,
    check_vocabulary_fits,
    load_tagger,
    resolve_tagger_vocabulary,
    tagger_settings,
)

NAME = "segment"


def _classes(text: str) -> tuple[str, ...]:
    try:
        return parse_classes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="segment images into the given classes",
        description=(
            "Write OUT/<name>_labels.png (palette PNG: 0 = background, k = the k-th class) and "
            "OUT/<name>_overlay.png for each IMAGE. <name> is the image's stem (<stem>_<i> where "
            "stems clash); OUT/iseg-manifest.json records the mapping and the settings. A rerun "
            "of the same command skips finished images, so a stopped run resumes."
        ),
    )
    # fmt: off
    add = parser.add_argument
    add("images", nargs="+", metavar="IMAGE",
        help="image files, folders (their images) or quoted glob patterns ('shots/**/*.jpg')")
    add("--classes", type=_classes, default=None, metavar="NAMES",
        help="comma-separated class names, e.g. 'cat,potted plant' (label k = the k-th name)")
    add("--vocabulary", default=None, metavar="voc|context|coco|FILE",
        help="instead of --classes: tag each image with CLIP (TagCLIP) first, from a dataset's "
             "classes (then the recipe <name>-ovs by default) or a file with one name per line; "
             "label k = the k-th vocabulary name (VOC ids and colours for --vocabulary voc)")
    _model.add_model_options(parser)

    add = parser.add_argument_group("iSeg settings (default: the recipe's)").add_argument
    add("--recipe", default=None, metavar="NAME",
        help="a named configuration (see `iseg recipes`; default: paper, <preset>-ovs with a --vocabulary "
             "preset, sdxl on an SDXL model)")
    add("--iters", type=_common.iterations, default=None,
        help=f"refinement iterations N (paper: {DEFAULT_ITERS}; at most {_common.MAX_ITERS})")
    add("--lam", type=_common.lam, default=None,
        help=f"Ent-Self strength λ, or 'none' for the raw self-attention (paper: {DEFAULT_LAM})")
    add("--gamma", type=_common.gamma, default=None,
        help=f"Cat-Cross weight γ in (0, 100] (paper: {DEFAULT_GAMMA})")
    add("--background-threshold", type=_common.open_unit, default=None, metavar="TAU",
        help="pixels whose best heat is below TAU in (0, 1) are background "
             "(default: the background score (1 - max heat)²)")
    add("--seed", type=_common.seed, default=None,
        help="noise seed in [0, 2**64); the i-th IMAGE uses seed + i (default: the recipe's "
             f"seed for every image, e.g. the authors' {AUTHORS_SEED}, or 0 + i if it has none)")

    add_tagger_options(parser)
    _common.add_output_options(parser)
    _io.add_overlay_options(parser)
    # fmt: on


def _pipeline_options(args: argparse.Namespace) -> dict:
    """The keyword arguments given on the command line (the others stay the recipe's)."""
    options = {}
    if args.recipe is not None:
        options["recipe"] = args.recipe
    if args.iters is not None:
        options["iters"] = args.iters
    if args.lam is not None:
        options["lam"] = _common.unset(args.lam)
    if args.gamma is not None:
        options["gamma"] = args.gamma
    if args.background_threshold is not None:
        options["background_threshold"] = args.background_threshold
    return options


def run(args: argparse.Namespace) -> int:
    """``iseg segment``: returns the exit status (raises CommandError for a failed run)."""
    _model.check_ops_backend()
    paths = _io.expand_inputs(args.images)
    _io.check_images(paths)  # before the model loads, so a typo fails fast
    if args.seed is not None and args.seed + len(paths) - 1 > SEED_MAX:
        raise CommandError(
            f"--seed {args.seed}: image {len(paths) - 1} would use seed {args.seed + len(paths) - 1}, "
            "beyond 2**64 - 1; give a smaller --seed",
            code=2,
        )
    if (args.classes is None) == (args.vocabulary is None):
        raise CommandError("give --classes NAMES or --vocabulary voc|context|coco|FILE (one of them)", code=2)
    vocabulary = None
    if args.vocabulary is not None:
        vocabulary = resolve_tagger_vocabulary(args.vocabulary)
        check_tagger_model(args.tagger_model)
    if args.recipe is not None:
        _model.check_recipe_name(args.recipe)
    options = _pipeline_options(args)
    options.pop("recipe", None)
    _model.check_recipe_options(args.recipe or "paper", options)
    device, dtype = _model.resolve_device(args.device, args.dtype)

    settings = {
        "model": _model.model_setting(args.model),
        "dtype": str(dtype).removeprefix("torch."),
        "classes": None if args.classes is None else list(args.classes),
        "vocabulary": None if vocabulary is None else list(vocabulary.vocabulary),
        "recipe": args.recipe,  # None: the model's default (iseg.recipes.default_recipe_for)
        "iters": args.iters,
        "lam": args.lam,
        "gamma": args.gamma,
        "background_threshold": args.background_threshold,
        "seed": args.seed,
    }
    if vocabulary is not None:
        settings["tagger"] = {"model": _model.model_setting(args.tagger_model), **tagger_settings(args)}
    runner = Runner(args.out, NAME, settings, overwrite=args.overwrite, quiet=args.quiet)
    todo = runner.plan(paths, _io.label_outputs(args))
    if todo:
        pipe = _model.load_pipeline(args.model, device, dtype, quiet=args.quiet)
        if args.recipe is None:  # SD: paper (<preset>-ovs with a tagger preset); SDXL: sdxl
            args.recipe = default_recipe_for(pipe, vocabulary=vocabulary and vocabulary.name)
        args.batch_size = _common.batch_size(args, device)
        _check_loaded(pipe, args, options)
        if vocabulary is None:
            _check_classes_fit(pipe, args.classes, args.recipe)
        else:  # fp32 whatever the SD dtype, as the authors (bf16 flips tags)
            import torch

            pipe.tagger = load_tagger(args.tagger_model, device, torch.float32, quiet=args.quiet)
            check_vocabulary_fits(pipe.tagger, vocabulary)
        runner.run(todo, _io.load_image, _processor(pipe, args, device, dtype), args.batch_size)
    return runner.finish("segmented")


def _check_loaded(pipe, args: argparse.Namespace, options: dict) -> None:
    """What only the loaded model can check (the recipe's layers and heads, the timestep, the
    attention's memory at the batch size), before anything is written."""
    def check():
        _, _, grid = pipe.check_settings(args.recipe, None, True, **options)
        pipe.check_memory(grid, args.batch_size)

    _model.check_loaded(check)


def _check_classes_fit(pipe, classes, recipe=None) -> None:
    """Names that do not fit the text encoder, or that it cannot tell apart, fail once, here,
    not at every image."""
    try:
        pipe.prompt(list(classes), recipe)
    except ValueError as exc:
        raise CommandError(f"--classes: {first_line(exc).removeprefix('classes: ')}", code=2) from None


def _processor(pipe, args: argparse.Namespace, device: str, dtype):
    import torch

    from .. import masks

    options = {**_pipeline_options(args), "output_heatmaps": False}  # labels, no float heatmaps
    classes = None if args.classes is None else list(args.classes)
    outputs = _io.label_outputs(args)
    if args.vocabulary is not None:
        names = list(resolve_tagger_vocabulary(args.vocabulary).vocabulary)
        settings = tagger_settings(args)

    recipe_seed = get_recipe(args.recipe).seed  # args.recipe is resolved once the model loaded

    def process(items, images):
        seeds = noise_seeds(args.seed, recipe_seed, [item.index for item in items])
        if seeds is not None:
            options["generator"] = [torch.Generator().manual_seed(s) for s in seeds]
        tags = None
        try:
            if classes is None:  # tag first: each image gets its own classes
                tags = pipe.tag(images, args.vocabulary, **settings)
                output = pipe(images, [list(t) for t in tags], **options)
            else:
                output = pipe(images, classes, **options)
        except torch.OutOfMemoryError:
            raise CommandError(
                f"out of memory on {device} with --batch-size {args.batch_size}; "
                "try a smaller --batch-size or --dtype fp16"
            ) from None
        except ValueError as exc:  # the settings were checked: this batch's images failed
            raise RuntimeError(_model.model_failure(exc, dtype)) from None
        results = []
        for b, (item, image, label) in enumerate(zip(items, images, output.labels)):  # [B, H, W] or a list
            label = label.cpu()
            if tags is not None:  # label k = tags[k-1] → its vocabulary id (1-based)
                lut = torch.tensor(vocabulary_ids(tags[b], names))
                label = lut[label]
            labels_png = masks.label_image(label)
            files = {f"{item.name}_labels.png": _io.saver(labels_png, "PNG")}
            if not args.no_overlay:
                overlay = masks.overlay(image, label)
                fmt = "PNG" if args.overlay_format == "png" else "JPEG"
                files[outputs(item.name)[1]] = _io.saver(overlay, fmt)
            results.append(files)
        return results

    return process
