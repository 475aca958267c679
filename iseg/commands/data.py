"""``iseg data coco|context``: make the label PNGs ``iseg eval`` reads from original annotations.

Example:
    $ iseg data coco --instances annotations/instances_train2014.json --out coco/coco_seg_anno
    $ iseg data context --mat-dir trainval --out VOCdevkit/VOC2010/SegmentationClassContext
"""

from __future__ import annotations

import argparse
import sys

from ..errors import first_line
from ..runner import os_error_line
from . import _common
from ._common import CommandError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "data",
        help="convert dataset annotations to the label PNGs that iseg eval reads",
        description="Convert dataset annotations to label PNGs (written atomically; existing "
        "PNGs are kept, so an interrupted conversion resumes).",
    )
    kinds = parser.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    coco = kinds.add_parser(
        "coco",
        help="COCO instances JSON → coco_seg_anno/<12 digits>.png (labels 1..80, needs pycocotools)",
    )
    coco.add_argument("--instances", required=True, metavar="FILE", help="instances_{train,val}2014.json")
    coco.add_argument("--out", required=True, metavar="DIR", help="output folder, e.g. ROOT/coco_seg_anno")
    _common.add_quiet_option(coco)
    context = kinds.add_parser(
        "context",
        help="Pascal Context trainval/*.mat → SegmentationClassContext/<id>.png (official 59-label order)",
    )
    context.add_argument("--mat-dir", required=True, metavar="DIR", help="the trainval/ folder of .mat files")
    context.add_argument(
        "--out", required=True, metavar="DIR", help="output folder, e.g. VOCdevkit/VOC2010/SegmentationClassContext"
    )
    _common.add_quiet_option(context)


def run(args: argparse.Namespace) -> int:
    from ..data.convert import (  # numpy, PIL: not for `iseg --help`
        coco_labels,
        context_labels,
    )

    def log(message: str) -> None:
        if not args.quiet:
            print(f"iseg: {message}", file=sys.stderr)

    try:
        if args.dataset == "coco":
            coco_labels(args.instances, args.out, progress=not args.quiet, log=log)
        else:
            context_labels(args.mat_dir, args.out, progress=not args.quiet, log=log)
    except OSError as exc:  # a read (a write that fails is save_atomic's RunError)
        raise CommandError(os_error_line(exc)) from None
    except (ImportError, ValueError) as exc:
        raise CommandError(first_line(exc)) from None
    return 0
