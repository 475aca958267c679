"""The evaluation tasks of the paper's tables (dataset, split, mode, classes) and the built-in
tagger of open-vocabulary runs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..choices import vocabulary_ids
from ..recipes import DIFFSEG_SETTINGS, TABLE3_FIRST_PASS

# --- tasks --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One table entry the paper reports: a dataset split, how classes are chosen, the figure.

    Attributes:
        name: the task (also the name of its default recipe).
        dataset, split: the class table / layout (``voc``, ``coco14``, ``voc_context``) and the
            shipped split list.
        mode: ``wsss`` (classes = the GT classes present; background-only images skipped),
            ``ovs`` (classes from tags; no skipping) or ``unsupervised`` (DiffSeg's segments
            refined by iSeg, scored by per-image Hungarian matching, UNSUPERVISED.md §2).
        paper_miou: the paper's mIoU (%) for this task (Tables 1–3).
        published_tags: the shipped TagCLIP tags of this split (``ovs_labels/``), for OVS.
        kl_threshold: DiffSeg's merging threshold τ (unsupervised tasks).
        first_pass: the arithmetic of DiffSeg's first merging pass (unsupervised tasks):
            ``"fp16"``, Google's (the default of both Table 3 tasks), or ``"fp32"``.
    """
    name: str
    dataset: str
    split: str
    mode: str
    paper_miou: float
    published_tags: str | None = None
    table: str = ""
    kl_threshold: float | None = None
    first_pass: str | None = None


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("voc-wsss", "voc", "train", "wsss", 75.2, table="Table 1, VOC train"),
        Task("coco-wsss", "coco14", "train", "wsss", 45.5, table="Table 1, COCO train2014"),
        Task("voc-ovs", "voc", "val", "ovs", 68.2, "voc2012_val_tagclip_example.txt", "Table 2, VOC val"),
        Task("context-ovs", "voc_context", "val", "ovs", 30.9, "voc_context_val_tagclip.txt", "Table 2, Context val"),
        Task("coco-ovs", "coco14", "val_5k", "ovs", 38.4, "coco2014_val_tagclip.txt", "Table 2, COCO-Object val"),
        Task("cityscapes", "cityscapes", "val", "unsupervised", 25.0, table="Table 3, Cityscapes val", kl_threshold=DIFFSEG_SETTINGS["cityscapes"].kl_threshold, first_pass=TABLE3_FIRST_PASS),
        Task("cocostuff27", "cocostuff27", "val", "unsupervised", 45.2, table="Table 3, COCO-Stuff-27", kl_threshold=DIFFSEG_SETTINGS["cocostuff27"].kl_threshold, first_pass=TABLE3_FIRST_PASS),
    )
}  # fmt: skip


def get_task(name: str) -> Task:
    """The :class:`Task` named ``name`` (``ValueError`` listing the known ones otherwise)."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"task: unknown task {name!r}; known: {', '.join(TASKS)}") from None


class EvalError(ValueError):
    """A run that cannot start (bad root, layout, tags, settings that differ from --out's)."""


TAGGER_PRESETS = {"voc": "voc", "voc_context": "context", "coco14": "coco"}


def builtin_tagger(task: Task, device=None, model: str | None = None):
    """The built-in tagger for OVS runs without ``--tags``: a function ``image [H, W, 3] uint8
    → label ids`` (ascending, 1-based) that tags with :class:`iseg.tagger.CLIPTagger` and the
    dataset's preset (the authors' TagCLIP settings), or ``None`` for a dataset without one.

    The weights (``model``, default ``openai/clip-vit-base-patch16``) load on the first
    tagging, not here (this runs before the dataset is checked); missing weights end the run
    with one :class:`EvalError` saying how to get them or to give ``--tags``.
    """
    preset = TAGGER_PRESETS.get(task.dataset)
    if preset is None:
        return None
    state: dict = {}

    def tag(image: np.ndarray) -> tuple[int, ...]:
        if "tagger" not in state:
            # transformers' CLIP: imported when the first image is tagged (start-up time)
            from ..tagger import DEFAULT_TAGGER_MODEL, CLIPTagger, get_preset

            try:
                state["tagger"] = CLIPTagger.from_pretrained(model or DEFAULT_TAGGER_MODEL, device=device)
            except OSError as exc:
                message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise EvalError(f"{message}; or give --tags FILE / --tags published") from None
            state["vocabulary"] = get_preset(preset).vocabulary
        tags = state["tagger"](image, preset=preset).tags
        return tuple(vocabulary_ids(tags, state["vocabulary"])[1:])

    return tag
