"""``iseg tag IMAGE... --vocabulary voc|context|coco|FILE --out tags.txt``: CLIP image tags.

Writes one line per image, ``<id> <i1> <i2> ...``: the image's stem, then the 0-based
vocabulary indices of its tags (ascending) — the format of ``iseg/data/ovs_labels/`` and of
``iseg eval --tags``. The settings go to ``<out>.iseg-manifest.json`` beside it. A rerun of
the same command keeps the lines there and appends only the missing ids (a stopped run
resumes); the file is rewritten atomically every few images and at the end, so it is always
complete up to some image. A file this tool did not write is never overwritten.

Example:
    $ iseg tag JPEGImages/ --vocabulary voc --out voc_tags.txt --tagger-model ./clip-vit-b16
    $ iseg tag photos/*.jpg --vocabulary my_classes.txt --out tags.txt --r-final 0.5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import PROG, first_line
from ..recipes import DEFAULT_TAGGER_MODEL
from ..runner import LinesFile, Runner
from . import _common, _io, _model
from ._common import CommandError

NAME = "tag"


def _fraction(text: str) -> float:
    return _common.finite_float(text, 0.0, inclusive=True, high=1.0)


def _weight(text: str) -> float:
    return _common.finite_float(text, 0.0, inclusive=True)


_fraction.__name__ = "number in [0, 1]"
_weight.__name__ = "number ≥ 0"


def add_tagger_options(parser: argparse.ArgumentParser) -> None:
    """``--tagger-model`` and the four TagCLIP settings (shared with commands that tag)."""
    # fmt: off
    group = parser.add_argument_group("tagger (TagCLIP; default settings: the preset's, else VOC's)")
    group.add_argument("--tagger-model", default=DEFAULT_TAGGER_MODEL, metavar="REPO_OR_DIR",
                       help="CLIP model folder (model.safetensors, config.json, tokenizer files) "
                            f"or hub id (default: {DEFAULT_TAGGER_MODEL})")
    group.add_argument("--r-cwr", type=_fraction, default=None, metavar="R",
                       help="relative threshold of the crop re-identification candidates")
    group.add_argument("--w-local", type=_weight, default=None, metavar="W",
                       help="weight of the local score")
    group.add_argument("--w-crop", type=_weight, default=None, metavar="W",
                       help="weight of the crop score")
    group.add_argument("--r-final", type=_fraction, default=None, metavar="R",
                       help="relative threshold of the final scores")
    # fmt: on


def tagger_settings(args: argparse.Namespace) -> dict:
    """The TagCLIP settings given on the command line (the others stay the preset's)."""
    names = ("r_cwr", "w_local", "w_crop", "r_final")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def resolve_tagger_vocabulary(spec: str):
    """``voc|context|coco|FILE`` → :class:`iseg.tagger.Preset`, or a usage error."""
    from ..tagger import resolve_vocabulary

    try:
        return resolve_vocabulary(spec)
    except (OSError, ValueError, TypeError) as exc:
        raise CommandError(f"--vocabulary: {first_line(exc)}", code=2) from None


def check_vocabulary_fits(tagger, preset) -> None:
    """A vocabulary or background name that CLIP's 77 tokens cannot hold is one usage error,
    once, after the tagger loads and before anything is written (its embeddings are cached)."""
    try:
        tagger.text_embeddings([*preset.vocabulary, *preset.background])
    except ValueError as exc:
        raise CommandError(f"--vocabulary: {first_line(exc)}", code=2) from None


_TAGGER_TODO = "pass --tagger-model DIR (a CLIP folder: config.json, model.safetensors, tokenizer) or a hub id"


def check_tagger_model(model: str) -> None:
    """``--tagger-model`` before anything loads: a path-looking value is a folder that exists
    (never tried as a hub id), a hub id is cached or the hub can be asked."""
    if _model.looks_like_path(model):
        _model.check_folder(model, "the CLIP tagger from", _TAGGER_TODO)
    else:
        _model.check_hub_model(model, "the CLIP tagger from", "--tagger-model", "config.json")


def load_tagger(model: str, device: str, dtype, quiet: bool = False):
    """``CLIPTagger.from_pretrained(model)`` on ``device`` in ``dtype``, quietly.

    Raises:
        CommandError: one line saying what was tried and how to get the weights.
    """
    from ..tagger import CLIPTagger

    check_tagger_model(model)
    local = _model.looks_like_path(model)
    source = str(Path(model).expanduser()) if local else model
    try:
        with _model.quiet_loading(quiet):
            return CLIPTagger.from_pretrained(source, torch_dtype=dtype, device=device)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        cause = first_line(exc.__cause__ or exc)
        fetch = f"`{_model.download_command()} {DEFAULT_TAGGER_MODEL} --local-dir DIR`"
        where = f"the folder '{model}'" if local else f"the hub id '{model}'"
        raise CommandError(
            f"cannot load the CLIP tagger from {where}: {cause}; it needs a CLIPModel as "
            f"safetensors plus its tokenizer: {fetch}, then --tagger-model DIR"
        ) from None


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="tag images with the classes of a vocabulary found by CLIP (TagCLIP)",
        description=(
            "Write one line '<id> <i1> <i2> ...' per IMAGE to --out: the image's stem and the "
            "0-based vocabulary indices of the classes found (the format of the published "
            "TagCLIP tags and of `iseg eval --tags`). A rerun appends only the missing ids."
        ),
    )
    # fmt: off
    add = parser.add_argument
    add("images", nargs="+", metavar="IMAGE",
        help="image files, folders (their images) or quoted glob patterns ('shots/**/*.jpg')")
    add("--vocabulary", required=True, metavar="voc|context|coco|FILE",
        help="a dataset's classes, background list and settings, or a text file with one "
             "class name per line")
    add("--out", required=True, metavar="FILE", help="the tags file to write (e.g. tags.txt)")
    add("--overwrite", action="store_true",
        help="start over when --out holds tags of other settings (a file this tool did not "
             "write is never overwritten)")
    group = parser.add_argument_group("device")
    group.add_argument("--device", type=_common.device, default=None,
                       help="cuda, cuda:N, mps or cpu (default: cuda if available, else cpu)")
    group.add_argument("--dtype", choices=_model.DTYPES, default="fp32",
                       help="tagger precision (default: fp32, as the authors; bf16 and fp16 can "
                            "flip tags near the thresholds)")
    _common.add_quiet_option(parser)
    add_tagger_options(parser)
    # fmt: on


def run(args: argparse.Namespace) -> int:
    """``iseg tag``: returns the exit status (raises CommandError for a failed run)."""
    # 1. Check everything before the model loads
    paths = _io.expand_inputs(args.images)
    _io.check_images(paths)
    ids: dict[str, Path] = {}
    for path in paths:
        if path.stem in ids:
            raise CommandError(
                f"images '{ids[path.stem]}' and '{path}' have the same id '{path.stem}'; "
                "tag them into separate --out files",
                code=2,
            )
        if any(c.isspace() for c in path.stem):
            raise CommandError(f"image '{path}': its id (the file stem) holds whitespace", code=2)
        ids[path.stem] = path
    preset = resolve_tagger_vocabulary(args.vocabulary)
    device, dtype = _model.resolve_device(args.device, args.dtype)
    overrides = tagger_settings(args)
    settings = {
        "tagger_model": _model.model_setting(args.tagger_model),
        "dtype": str(dtype).removeprefix("torch."),
        "vocabulary": preset.name or list(preset.vocabulary),
        "background": list(preset.background),
        **{k: overrides.get(k, getattr(preset, k)) for k in ("r_cwr", "w_local", "w_crop", "r_final")},
    }
    out = Path(args.out)
    runner = Runner.using(LinesFile(out, NAME, settings, overwrite=args.overwrite, what="tags"), quiet=args.quiet)
    todo = runner.plan(ids)
    if not todo:
        if not args.quiet:
            print(f"{PROG}: all {len(ids)} images already tagged in '{out}'", file=sys.stderr)
        return 0

    # 2. Load the tagger; the runner writes the kept lines (none after --overwrite), then the
    #    settings, then tags, appending lines and rewriting the file now and then
    tagger = load_tagger(args.tagger_model, device, dtype, quiet=args.quiet)
    check_vocabulary_fits(tagger, preset)
    call = {"preset": preset.name} if preset.name else {"vocabulary": preset.vocabulary}

    def tag(items, images):
        return [" ".join([item.id, *map(str, tagger(image, **call, **overrides).indices)])
                for item, image in zip(items, images)]  # fmt: skip

    runner.run(todo, _io.load_image, tag)
    failed = len(runner.failed)
    if not args.quiet:
        print(
            f"{PROG}: tagged {runner.done} image(s) into '{out}'"
            + (f", {runner.skipped} already there" if runner.skipped else "")
            + (f", {failed} failed" if failed else ""),
            file=sys.stderr,
        )
    return 1 if failed else 0
