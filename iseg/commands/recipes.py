"""``iseg recipes``: the named configurations of :mod:`iseg.recipes`, one per line."""

from __future__ import annotations

import argparse

from ..recipes import RECIPES

NAME = "recipes"


def add_parser(subparsers) -> None:
    subparsers.add_parser(
        NAME,
        help="list the named configurations (--recipe NAME)",
        description="List each recipe: its name, what it is, and the paper's figure or table "
        "it reproduces. Use one with `iseg segment --recipe NAME`.",
    )


def run(args: argparse.Namespace) -> int:
    width = max(len(name) for name in RECIPES)
    for name, recipe in RECIPES.items():
        print(f"{name:<{width}}  {recipe.description}  [{recipe.reproduces}]")
    return 0
