"""The text prompt of iSeg and the positions of each class's tokens in it (METHOD §1)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .recipes import DEFAULT_TEMPLATE, Recipe


@dataclass(frozen=True)
class ClassPrompt:
    """A tokenized prompt: ``input_ids`` padded to the tokenizer's length, and for each class
    the positions of its selected tokens in ``input_ids`` (several for a multi-token name; a
    token subset such as "potted plant" → "plant" keeps only those)."""

    text: str
    input_ids: tuple[int, ...]
    class_positions: tuple[tuple[int, ...], ...]


def check_classes(classes: object, where: str = "classes") -> tuple[str, ...]:
    """A non-empty sequence of non-empty class names, as a tuple of stripped strings (inner
    whitespace collapsed).

    Names that the text encoder cannot tell apart are an error, never silently merged: the
    same name twice, also in another case or spacing (``"Cat"`` and ``"cat "``: CLIP's
    tokenizer lowercases and splits on whitespace). :func:`build_prompt` also refuses two
    names that give the same tokens.
    """
    if isinstance(classes, str) or not isinstance(classes, Sequence):
        raise TypeError(f"{where} must be a list of class names, got {type(classes).__name__}")
    if len(classes) == 0:
        raise ValueError(f"{where} must name at least one class, got an empty list")
    names: list[str] = []
    seen: dict[str, str] = {}
    for name in classes:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where} must hold non-empty strings, got {name!r}")
        name = " ".join(name.split())
        if name.casefold() in seen:
            raise ValueError(_same_class(where, seen[name.casefold()], name))
        seen[name.casefold()] = name
        names.append(name)
    return tuple(names)


def _same_class(where: str, first: str, second: str) -> str:
    if first == second:
        return f"{where}: class {first!r} is given twice"
    return (f"{where}: {first!r} and {second!r} are the same class to the text encoder (the "
            "same tokens); give it once")  # fmt: skip


def recipe_classes(recipe: Recipe, classes: Sequence[str]):
    """The prompt of ``classes`` under ``recipe``'s class table.

    Returns ``(prompt_names, token_offsets, order)``: each class's name as the table spells it
    (a class given by another spelling, e.g. VOC's "aeroplane" for "plane", is renamed), its
    token subset (``None`` = all tokens), and the order in which the classes go into the prompt
    (label order when ``recipe.dataset_order``; classes not in the table follow, as given).
    Without a dataset the classes are used as given.
    """
    table = {}
    for entry in recipe.classes:
        for name in (entry.prompt_name, *entry.aliases):
            table.setdefault(name.lower(), entry)
    entries = [table.get(name.lower()) for name in classes]
    names = tuple(e.prompt_name if e else name for e, name in zip(entries, classes))
    offsets = tuple(e.token_offsets if e else None for e in entries)
    order = list(range(len(classes)))
    if recipe.dataset_order:
        order.sort(key=lambda i: (entries[i] is None, entries[i].label_id if entries[i] else i))
    return names, offsets, tuple(order)


def build_prompt(
    tokenizer,
    classes: Sequence[str],
    template: str = DEFAULT_TEMPLATE,
    background_words: Sequence[str] = (),
    suffix: str = "",
    token_offsets: Sequence[Sequence[int] | None] | None = None,
) -> ClassPrompt:
    """Tokenize ``template`` with ``{classes}`` replaced by the class names joined by " and ",
    followed verbatim by ``suffix`` and by the background words (" and w"), and locate each
    class's tokens (``token_offsets[k]``: which of class k's tokens to keep, ``None`` = all).

    The prompt is tokenized piece by piece (CLIP's BPE works word by word, so the pieces
    concatenate to the tokenization of the whole text), which gives the class positions
    without any hard-coded token table.

    Raises:
        ValueError: the template lacks ``{classes}``, or the prompt does not fit the text
            encoder; the message names the classes that do not fit.
    """
    classes = check_classes(classes)
    if template.count("{classes}") != 1:
        raise ValueError(f"prompt_template must contain '{{classes}}' once, got {template!r}")
    prefix, tail = template.split("{classes}")
    suffix_text = tail + suffix + "".join(f" and {w}" for w in background_words)
    if token_offsets is None:
        token_offsets = [None] * len(classes)

    def encode(text: str) -> list[int]:
        text = text.strip()  # verbose=False: a long text is our error below, not a warning
        return tokenizer(text, add_special_tokens=False, verbose=False).input_ids if text else []

    ids = [tokenizer.bos_token_id, *encode(prefix)]
    positions, class_ends = [], []
    by_tokens: dict[tuple[int, ...], str] = {}
    for i, name in enumerate(classes):
        if i:
            ids += encode("and")
        tokens = encode(name)
        if not tokens:
            raise ValueError(f"classes: {name!r} gives no tokens")
        if tuple(tokens) in by_tokens:
            raise ValueError(_same_class("classes", by_tokens[tuple(tokens)], name))
        by_tokens[tuple(tokens)] = name
        offsets = token_offsets[i]
        if offsets is None:
            offsets = range(len(tokens))
        elif not offsets or not all(0 <= o < len(tokens) for o in offsets):
            raise ValueError(
                f"classes: {name!r} has {len(tokens)} token(s); cannot select offsets {tuple(offsets)}"
            )
        positions.append(tuple(len(ids) + o for o in offsets))
        ids += tokens
        class_ends.append(len(ids) - 1)  # the last token of the class, selected or not
    ids += encode(suffix_text)
    ids.append(tokenizer.eos_token_id)

    max_length = tokenizer.model_max_length
    if len(ids) > max_length:
        # The EOS token and the suffix must fit too: a class fits if it ends early enough.
        room = max_length - (len(ids) - class_ends[-1] - 1)
        too_long = [name for name, e in zip(classes, class_ends) if e >= room]
        raise ValueError(
            f"classes: the prompt has {len(ids)} tokens but the text encoder takes "
            f"{max_length}; these classes do not fit: {', '.join(map(repr, too_long))}"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids += [pad] * (max_length - len(ids))
    text = (prefix + " and ".join(classes) + suffix_text).strip()
    return ClassPrompt(text, tuple(ids), tuple(positions))
