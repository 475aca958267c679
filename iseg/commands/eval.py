"""``iseg eval TASK --root DIR``: reproduce a table entry of the paper on a dataset on disk.

Segments the task's split with its recipe, writes one palette PNG per image under
``OUT/pred/`` (dataset label ids), then scores the written predictions with the authors' metric
(one confusion matrix over the split; mean IoU over the classes present in the ground truth)
and MMSegmentation's, and prints the per-class IoU table and mIoU / pixel accuracy / mean
accuracy beside the paper's figure; ``OUT/metrics.json`` and ``OUT/metrics.md`` keep them.

A rerun skips the images already predicted, so a killed run resumes and gives the metric of an
uninterrupted one. ``--num-shards N --shard-index I`` (or ``accelerate launch -m iseg eval …``,
which sets RANK and WORLD_SIZE) splits the images; the shard that finishes last scores, or a
rerun without shard flags does.

Example:
    $ iseg eval voc-wsss --root ~/data/VOCdevkit --out runs/voc-wsss
    $ iseg eval context-ovs --root ~/data/VOCdevkit --tags published --batch-size 4
    $ accelerate launch --num_processes 4 -m iseg eval coco-wsss --root ~/data/coco
    $ iseg eval cityscapes --root ~/data/cityscapes      # Table 3: DiffSeg + iSeg, Hungarian
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import first_line, report_error
from ..recipes import DEFAULT_TAGGER_MODEL, DIFFSEG_FIRST_PASSES, TABLE3_FIRST_PASS
from ..runner import os_error_line
from . import _common, _model
from ._common import CommandError

TASK_NAMES = ("voc-wsss", "coco-wsss", "voc-ovs", "context-ovs", "coco-ovs", "cityscapes", "cocostuff27")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="score a recipe on a dataset split as the paper does (Tables 1-2)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    parser.add_argument("task", choices=TASK_NAMES, help="which table entry to reproduce")
    parser.add_argument("--root", required=True, metavar="DIR", help="the dataset's folder")
    _model.add_model_options(parser)
    group = parser.add_argument_group("evaluation")
    group.add_argument("--recipe", default=None, help="pipeline recipe (default: the task's own)")
    group.add_argument(
        "--out", default=None, metavar="DIR", help="output folder (default: iseg-eval/TASK)"
    )
    group.add_argument(
        "--limit", type=_common.positive_int, default=None, metavar="N",
        help="evaluate only the first N images of the split",
    )  # fmt: skip
    group.add_argument(
        "--list", dest="ids_file", default=None, metavar="FILE",
        help="image ids to evaluate (one per line) instead of the paper's split",
    )  # fmt: skip
    group.add_argument(
        "--batch-size", type=_common.positive_int, default=1, help="images per model call (default: 1)"
    )
    group.add_argument(
        "--tags", default=None, metavar="FILE",
        help="OVS classes per image: lines 'id c1 c2 …' (0-based class indices), or 'published' "
             "for the TagCLIP tags the paper used (default: the built-in CLIP tagger)",
    )  # fmt: skip
    group.add_argument(
        "--tagger-model", default=None, metavar="REPO_OR_DIR",
        help=f"CLIP weights of the built-in tagger (default: {DEFAULT_TAGGER_MODEL})",
    )  # fmt: skip
    group.add_argument(
        "--context-order", choices=("official", "mmseg"), default=None,
        help="class order of Pascal Context label PNGs (default: detected)",
    )  # fmt: skip
    group.add_argument(
        "--workers", type=_common.non_negative_int, default=None,
        help="image decoding processes (default: min(4, CPUs); 0 = in the main process)",
    )  # fmt: skip
    group.add_argument(
        "--first-pass", choices=sorted(DIFFSEG_FIRST_PASSES), default=None,
        help="cityscapes/cocostuff27: DiffSeg's first merging pass, fp16 exactly as Google's code "
             f"(anchors that underflow are dropped and counted) or fp32 (default: {TABLE3_FIRST_PASS})",
    )  # fmt: skip
    group.add_argument(
        "--overwrite", action="store_true",
        help="start over in --out when it holds predictions made with other settings",
    )  # fmt: skip
    group.add_argument("--num-shards", type=_common.positive_int, default=None, metavar="N")
    group.add_argument("--shard-index", type=_common.non_negative_int, default=None, metavar="I")
    _common.add_quiet_option(group)


def shards_from(args: argparse.Namespace, environ=os.environ) -> tuple[int, int, int | None]:
    """``(num_shards, shard_index, local_rank)`` from the flags or, without them, from the
    launcher's environment (``accelerate launch``/``torchrun`` set WORLD_SIZE, RANK and
    LOCAL_RANK)."""
    if args.num_shards is None and args.shard_index is not None:
        raise CommandError("--shard-index needs --num-shards", code=2)
    if args.num_shards is not None:
        index = 0 if args.shard_index is None else args.shard_index
        if index >= args.num_shards:
            raise CommandError(
                f"--shard-index must be in [0, {args.num_shards}), got {index}", code=2
            )
        return args.num_shards, index, None
    try:
        world = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local = environ.get("LOCAL_RANK")
        local_rank = int(local) if local is not None else None
    except ValueError:
        raise CommandError("WORLD_SIZE, RANK and LOCAL_RANK must be integers", code=2) from None
    if world > 1 and not 0 <= rank < world:
        raise CommandError(f"RANK {rank} is outside [0, WORLD_SIZE={world})", code=2)
    return (world, rank, local_rank) if world > 1 else (1, 0, None)


def run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: they import torch, and `iseg --help` must stay fast.
    from ..data.datasets import DatasetError
    from ..evaluate import EvalError, format_table, run_eval

    num_shards, shard_index, local_rank = shards_from(args)
    device_name = args.device
    if device_name is None and local_rank is not None:
        import torch

        if torch.cuda.is_available():
            device_name = f"cuda:{local_rank % torch.cuda.device_count()}"
    device, dtype = _model.resolve_device(device_name, args.dtype)
    _model.check_ops_backend()
    if _model.looks_like_path(args.model):
        _model.check_model_folder(args.model)
    model = _model.model_setting(args.model)  # a folder is compared by what it means
    if args.first_pass is not None and args.task not in ("cityscapes", "cocostuff27"):
        raise CommandError("--first-pass applies to the unsupervised tasks (cityscapes, cocostuff27)", code=2)
    out = args.out or os.path.join("iseg-eval", args.task)
    dtype_name = str(dtype).replace("torch.", "")
    workers = args.workers if args.workers is not None else min(4, os.cpu_count() or 1)

    def load():
        return _model.load_pipeline(args.model, device, dtype, quiet=args.quiet)

    def log(message: str) -> None:
        print(f"iseg: {message}", file=sys.stderr)

    try:
        result = run_eval(
            args.task, args.root, out, load_pipe=load, recipe=args.recipe,
            settings={"model": model, "dtype": dtype_name}, limit=args.limit,
            ids_file=args.ids_file, batch_size=args.batch_size, tags=args.tags,
            tagger_model=args.tagger_model,
            num_shards=num_shards, shard_index=shard_index, context_order=args.context_order,
            first_pass=args.first_pass, overwrite=args.overwrite,
            workers=workers, progress=not args.quiet, log=log,
        )  # fmt: skip
    except (EvalError, DatasetError) as exc:
        raise CommandError(first_line(exc)) from None
    except OSError as exc:  # a full disk, an unwritable --out: the predictions written stay
        raise CommandError(f"{os_error_line(exc)} (the predictions already written are kept; rerun to resume)") from None
    if result.metrics is not None:
        print(format_table(result.metrics))
        print(f"metrics: {os.path.join(out, 'metrics.json')}, {os.path.join(out, 'metrics.md')}")
    failures = dict(result.failures)
    if result.metrics is not None:
        failures.update(result.metrics["failures"])
    # Each one is predicted again by the next run (a missing, unreadable or changed prediction).
    for message in list(failures.values())[:20]:
        report_error(message)
    if len(failures) > 20:
        report_error(f"… and {len(failures) - 20} more (see metrics.json)")
    if failures:
        report_error(
            f"{len(failures)} image(s) not scored; fix the files named above (the next run "
            "predicts again every prediction that is missing, unreadable or changed) and rerun"
        )
        return 1
    return 0
