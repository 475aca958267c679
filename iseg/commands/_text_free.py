"""The settings options, their checks and the model loading that ``iseg regions`` and ``iseg
refine-masks`` (the two text-free tasks) share."""

from __future__ import annotations

import argparse

from ..recipes import get_recipe
from . import _common, _model

INTERACTIVE = get_recipe("interactive")  # the default recipe, whose values the help names


# --- parsers --------------------------------------------------------------------------------


def settings_options(parser: argparse.ArgumentParser, regions: bool) -> None:
    # fmt: off
    add = parser.add_argument_group("iSeg settings (default: the recipe's)").add_argument
    add("--recipe", default=None, metavar="NAME",
        help="a named configuration (see `iseg recipes`; default: interactive, sdxl-interactive on an "
             "SDXL model)")
    add("--iters", type=_common.iterations, default=None,
        help=f"refinement iterations N (interactive: {INTERACTIVE.iters}; at most {_common.MAX_ITERS})")
    add("--lam", type=_common.lam, default=None,
        help=f"Ent-Self strength λ, or 'none' for the raw attention (interactive: {INTERACTIVE.lam:g})")
    add("--t-max", type=_common.positive_float, default=None, metavar="T",
        help=f"upper clamp of Ent-Self's T (interactive: {INTERACTIVE.t_max:g})")
    add("--gamma", type=_common.gamma, default=None,
        help=f"weight γ in (0, 100] of the BOS token of the empty prompt (interactive: {INTERACTIVE.gamma:g})")
    if regions:
        add("--threshold", type=_common.open_unit, default=None,
            help="a pixel is in a region's mask where its heat is above this, in (0, 1) "
                 f"(interactive: {INTERACTIVE.threshold:g})")
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



# --- shared ---------------------------------------------------------------------------------


def _options(args: argparse.Namespace) -> dict:
    """The pipeline keywords given on the command line (the others stay the recipe's)."""
    options = {"recipe": args.recipe}  # None: the model's default (interactive; SDXL's on SDXL)
    names = ("iters", "lam", "t_max", "gamma", "threshold", "background_threshold")
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            options[name] = _common.unset(value)  # --lam none: λ = None, no Ent-Self
    return options


def settings(args: argparse.Namespace, dtype) -> dict:
    options = _options(args)
    return {
        "model": _model.model_setting(args.model),
        "dtype": str(dtype).removeprefix("torch."),
        **{k: options.get(k) for k in ("recipe", "iters", "t_max", "gamma")},
        "lam": args.lam,  # None (the recipe's) and "none" (no Ent-Self) stay apart
        "seed": args.seed,
    }


def check_options(args: argparse.Namespace) -> dict:
    """The pipeline keywords, after the checks that need no model (before it loads)."""
    options = _options(args)
    _model.check_recipe_options(
        options["recipe"] or "interactive", {k: v for k, v in options.items() if k != "recipe"}
    )
    return options


def load(args: argparse.Namespace, device, dtype, options: dict):
    """The pipeline, and what only the loaded model can check (layers, timestep, memory):
    a setting it refuses is one usage error, before anything is written."""
    pipe = _model.load_pipeline(args.model, device, dtype, quiet=args.quiet)

    def check():
        _, _, grid = pipe.check_settings(text=False, **options)
        pipe.check_memory(grid, 1)

    _model.check_loaded(check)
    return pipe


def generator(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)
