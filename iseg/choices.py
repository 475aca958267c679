"""What a user chooses, parsed and decided once for the ``iseg`` commands and the demo: class
lists, noise seeds and the label ids of tagged runs. Standard library only at import (the
``iseg`` command imports it for ``--help``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .prompts import check_classes

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes [0, 2⁶⁴) (and negatives, which we refuse)
"""The largest noise seed."""


def parse_classes(text: str) -> tuple[str, ...]:
    """``"cat, potted plant"`` → ``("cat", "potted plant")``.

    Names are stripped and inner whitespace collapsed. Raises ``ValueError`` for an empty name
    (``"cat,,dog"``, ``" , "``) or a name given twice, also in another case (``"Cat,cat"``:
    the text encoder lowercases, so they would be one class; see
    :func:`iseg.prompts.check_classes`).
    """
    names = tuple(" ".join(name.split()) for name in text.split(","))
    hint = "give them comma-separated: --classes 'cat,dog'"
    if not any(names):
        raise ValueError(f"no class names in {text!r}; {hint}")
    if not all(names):
        raise ValueError(f"empty class name in {text!r}; {hint}")
    try:
        return check_classes(names)
    except ValueError as exc:  # the caller names the option
        raise ValueError(str(exc).removeprefix("classes: ")) from None


def noise_seeds(seed: int | None, recipe_seed: int | None, indices: Iterable[int]) -> list[int] | None:
    """The seed of each image's noise generator: ``seed + i`` for the i-th input when a seed
    is given; ``None`` (no generator: the pipeline seeds every image with the recipe's seed, as
    the authors do) when it is not and the recipe has a seed; else ``0 + i``."""
    if seed is None and recipe_seed is not None:
        return None
    return [(seed or 0) + i for i in indices]


def vocabulary_ids(tags: Sequence[str], vocabulary: Sequence[str]) -> list[int]:
    """The label-id table of an image tagged from ``vocabulary``: entry k (its label k, 0 =
    background) is the 1-based vocabulary id of ``tags[k-1]``, so that every image's labels use
    the vocabulary's ids (VOC ids and colours for the VOC vocabulary)."""
    return [0] + [vocabulary.index(tag) + 1 for tag in tags]
