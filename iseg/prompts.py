"""The text prompt of iSeg and the positions of each class's tokens in it (METHOD §1)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_TEMPLATE = "a photograph of {classes} and other object and background"


@dataclass(frozen=True)
class ClassPrompt:
    """A tokenized prompt: ``input_ids`` padded to the tokenizer's length, and for each class
    the positions of its tokens in ``input_ids`` (several for a multi-token name)."""

    text: str
    input_ids: tuple[int, ...]
    class_positions: tuple[tuple[int, ...], ...]


def check_classes(classes: object, where: str = "classes") -> tuple[str, ...]:
    """A non-empty sequence of non-empty class names, as a tuple of stripped strings."""
    if isinstance(classes, str) or not isinstance(classes, Sequence):
        raise TypeError(f"{where} must be a list of class names, got {type(classes).__name__}")
    if len(classes) == 0:
        raise ValueError(f"{where} must name at least one class, got an empty list")
    names = []
    for name in classes:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where} must hold non-empty strings, got {name!r}")
        names.append(" ".join(name.split()))
    return tuple(names)


def build_prompt(
    tokenizer,
    classes: Sequence[str],
    template: str = DEFAULT_TEMPLATE,
    background_words: Sequence[str] = (),
) -> ClassPrompt:
    """Tokenize ``template`` with ``{classes}`` replaced by the class names joined by " and ",
    followed by the background words, and locate each class's tokens.

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
    prefix, suffix = template.split("{classes}")
    suffix_text = suffix + "".join(f" and {w}" for w in background_words)

    def encode(text: str) -> list[int]:
        text = text.strip()
        return tokenizer(text, add_special_tokens=False).input_ids if text else []

    ids = [tokenizer.bos_token_id, *encode(prefix)]
    positions = []
    for i, name in enumerate(classes):
        if i:
            ids += encode("and")
        tokens = encode(name)
        if not tokens:
            raise ValueError(f"classes: {name!r} gives no tokens")
        positions.append(tuple(range(len(ids), len(ids) + len(tokens))))
        ids += tokens
    ids += encode(suffix_text)
    ids.append(tokenizer.eos_token_id)

    max_length = tokenizer.model_max_length
    if len(ids) > max_length:
        # The EOS token and the suffix must fit too: a class fits if it ends early enough.
        room = max_length - (len(ids) - positions[-1][-1] - 1)
        too_long = [name for name, pos in zip(classes, positions) if pos[-1] >= room]
        raise ValueError(
            f"classes: the prompt has {len(ids)} tokens but the text encoder takes "
            f"{max_length}; these classes do not fit: {', '.join(map(repr, too_long))}"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids += [pad] * (max_length - len(ids))
    text = (prefix + " and ".join(classes) + suffix_text).strip()
    return ClassPrompt(text, tuple(ids), tuple(positions))
