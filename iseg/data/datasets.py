"""Readers for the segmentation datasets of the paper's tables, in their usual layouts on disk.

:func:`open_dataset` finds a dataset under a root folder, checks the layout once (a missing folder
or file is one :class:`DatasetError` line naming it and the layout expected) and returns a
:class:`SegDataset` that maps an image id to its image and label paths. :func:`read_label` reads a
label PNG as class indices (palette PNGs by index, never through RGB), mapped to the dataset's
label ids; a value outside the dataset's range other than 255 is a :class:`LabelError` naming the
file. Layouts (DATASETS.md):

* ``voc`` — ``[VOCdevkit/][VOC2012/]JPEGImages/{id}.jpg`` with ``SegmentationClassAug/{id}.png``
  (grayscale 0..20, 255) or the official palette ``SegmentationClass/{id}.png``.
* ``coco14`` — images ``[images/]{split}2014/COCO_{split}2014_{12d}.jpg`` (or the 2017 names
  ``[images/]{split}2017/{12d}.jpg``); labels 0..80 (COCO category order), 255, in one of
  (a) ``coco_seg_anno/{12d}.png``, (b) ``SegmentationClass/[{split}2014/]COCO_{split}2014_{12d}.png``,
  (c) ``annotations/{split}2017/{12d}_instanceTrainIds.png``.
* ``voc_context`` — ``[VOCdevkit/][VOC2010/]JPEGImages/{id}.jpg`` with
  ``SegmentationClassContext/{id}.png`` in the official 59-label order (the authors') or
  MMSegmentation's alphabetical order, detected from a few PNGs against ``val_cls.txt``.

Example:
    >>> ds = open_dataset("voc", "/data/VOCdevkit", "train")
    >>> ds.image_path("2007_000032"), ds.num_classes
    (PosixPath('/data/VOCdevkit/VOC2012/JPEGImages/2007_000032.jpg'), 21)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from ..runner import check_plain_name
from . import data_path

__all__ = [
    "DATASETS",
    "DatasetError",
    "LabelError",
    "SegDataset",
    "class_names",
    "detect_context_order",
    "open_dataset",
    "check_id",
    "read_ids",
    "read_image",
    "read_label",
    "read_tags",
    "split_ids",
]

DATASETS = ("voc", "coco14", "voc_context")
UNSUPERVISED_DATASETS = ("cityscapes", "cocostuff27")
NUM_CLASSES = {"voc": 21, "coco14": 81, "voc_context": 60, "cityscapes": 27, "cocostuff27": 27}
# (background included for the first three)
CITYSCAPES_NAMES = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail",
    "bridge", "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train",
    "motorcycle", "bicycle",
)  # labelIds 7..33 → 0..26 (UNSUPERVISED.md §2)
IGNORE = 255


class DatasetError(ValueError):
    """A dataset cannot be read: a missing folder or file, or a layout not recognised."""


class LabelError(ValueError):
    """One label PNG cannot be used (unreadable, RGB, or a value outside the dataset's range)."""


@lru_cache(maxsize=None)
def _table(dataset: str) -> dict:
    return json.loads(data_path(dataset, "class_names.json").read_text())


def class_names(dataset: str) -> tuple[str, ...]:
    """The prompt names of ``dataset``'s classes as the authors spell them, label id k at k−1
    (for the unsupervised datasets: the 27 class names, id k at k)."""
    if dataset == "cityscapes":
        return CITYSCAPES_NAMES
    if dataset == "cocostuff27":
        return _cocostuff_coarse_names()
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    return tuple(c["prompt_name"] for c in _table(dataset)["classes"])


def _identity_lut(num_classes: int) -> np.ndarray:
    """raw value → label id: ``0..n−1`` kept, 255 kept, anything else −1 (an error)."""
    lut = np.full(256, -1, np.int16)
    lut[:num_classes] = np.arange(num_classes)
    lut[IGNORE] = IGNORE
    return lut


@lru_cache(maxsize=None)
def _context_mmseg_lut() -> np.ndarray:
    lut = np.full(256, -1, np.int16)
    table = _table("voc_context")["mmseg_to_iseg_lut"]["lut"]
    lut[: len(table)] = table
    lut[IGNORE] = IGNORE
    return lut


@dataclass(frozen=True)
class SegDataset:
    """One dataset found on disk: where each id's image and label are, and how labels map.

    Attributes:
        name: ``voc``, ``coco14`` or ``voc_context``.
        root: the folder given by the user.
        layout: a short description of the layout found (for messages and metrics.json).
        image_template, label_template: paths relative to ``root`` with ``{id}`` (the full id),
            ``{num}`` (COCO's 12 digits) and ``{split}`` (``train``/``val``) fields.
        num_classes: label ids ``0..num_classes−1`` (background included).
        lut: ``[256]`` raw PNG value → label id (255 = ignore, −1 = invalid).
        order: the Context class order of the PNGs (``official`` or ``mmseg``), else ``None``.
    """

    name: str
    root: Path
    layout: str
    image_template: str
    label_template: str
    num_classes: int
    lut: np.ndarray = field(repr=False, compare=False)
    order: str | None = None

    @property
    def class_names(self) -> tuple[str, ...]:
        return class_names(self.name)

    def _fields(self, image_id: str) -> dict[str, str]:
        return {"id": image_id, "num": image_id[-12:], "split": _coco_split(image_id)}

    def image_path(self, image_id: str) -> Path:
        return self.root / self.image_template.format(**self._fields(image_id))

    def label_path(self, image_id: str) -> Path:
        return self.root / self.label_template.format(**self._fields(image_id))

    def read_label(self, image_id: str) -> np.ndarray:
        """``[H, W]`` uint8 label ids (255 = ignore) of ``image_id``; :class:`LabelError` on a
        bad file."""
        return read_label(self.label_path(image_id), self.lut, self.num_classes)


def _coco_split(image_id: str) -> str:
    if image_id.startswith("COCO_"):
        return image_id.split("_")[1][: -len("2014")]  # COCO_train2014_… → train
    return ""


def read_image(path: str | Path) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB, fully decoded (a truncated file raises ``OSError`` here)."""
    with Image.open(path) as img:
        img.load()
        return np.asarray(img.convert("RGB"))


def read_label(path: str | Path, lut: np.ndarray, num_classes: int) -> np.ndarray:
    """A label PNG as ``[H, W]`` uint8 label ids: grayscale values or palette indices (never
    the palette's colours) mapped through ``lut``.

    Raises:
        LabelError: the file cannot be decoded, is not a one-channel image, or holds a value
            outside ``[0, num_classes)`` other than 255 — the message names the file.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            raw = np.asarray(img)
    except FileNotFoundError:
        raise LabelError(f"{path}: label file not found") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise LabelError(f"{path}: cannot read the label PNG ({exc})") from None
    if raw.ndim != 2 or mode not in ("L", "P", "I", "I;16"):
        raise LabelError(
            f"{path}: a label must be a grayscale or palette PNG of class indices, got mode {mode}"
        )
    if raw.dtype != np.uint8:
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            bad = int(raw.max()) if raw.max() > 255 else int(raw.min())
            raise LabelError(f"{path}: label value {bad} outside [0, {num_classes}) and not 255")
        raw = raw.astype(np.uint8)
    labels = lut[raw]
    if labels.size and labels.min() < 0:
        bad = sorted(set(np.unique(raw[labels < 0]).tolist()))
        raise LabelError(
            f"{path}: label value{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad[:5]))} "
            f"outside [0, {num_classes}) and not 255"
        )
    return labels.astype(np.uint8)


# --- split lists, tags --------------------------------------------------------------------


SPLITS = {
    ("voc", "train"): ("voc", "train.txt"),
    ("voc", "val"): ("voc", "val.txt"),
    ("coco14", "train"): ("coco14", "train.txt"),
    ("coco14", "val_5k"): ("coco14", "val_5k.txt"),
    ("voc_context", "val"): ("voc_context", "val.txt"),
}


def check_id(image_id: str, where: str, folders: bool = False) -> None:
    """An id names files under the dataset root and ``OUT/pred/``: it must stay there. No
    absolute path, no ``..``, no backslash, no empty or hidden part; a ``/`` only where the
    dataset's ids hold a folder (``folders``: Cityscapes' ``city/frame``)."""
    parts = image_id.split("/") if folders and not image_id.startswith("/") else [image_id]
    try:
        for part in parts:
            check_plain_name(part, "image id")
        bad = image_id.startswith("~") or any(part.startswith(".") for part in parts)
    except ValueError:
        bad = True
    if bad:
        rule = "a folder and a name" if folders else "a file name"
        raise DatasetError(
            f"{where}: image id {image_id!r} is not {rule} (no path separators, '..' or hidden parts)"
        )


def read_ids(path: str | Path, folders: bool = False) -> list[str]:
    """Image ids from a list file: the first word of each non-empty line (``#`` comments
    skipped). Each id must be a plain name (:func:`check_id`; ``folders`` allows Cityscapes'
    ``city/frame``)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"split list {path} not found")
    ids = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"split list {path}: cannot read it as text ({exc})") from None
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if words and not words[0].startswith("#"):
            check_id(words[0], f"{path}:{number}", folders)
            ids.append(words[0])
    if not ids:
        raise DatasetError(f"split list {path} holds no image ids")
    if len(set(ids)) != len(ids):
        raise DatasetError(f"split list {path} lists an image id twice")
    return ids


def split_ids(dataset: str, split: str) -> list[str]:
    """The paper's image ids of ``dataset``'s ``split`` (shipped with iseg)."""
    try:
        parts = SPLITS[(dataset, split)]
    except KeyError:
        raise ValueError(f"no split {split!r} of {dataset!r}; known: {sorted(SPLITS)}") from None
    return read_ids(data_path(*parts))


def read_tags(path: str | Path, num_classes: int) -> dict[str, tuple[int, ...]]:
    """A tags file (``id c1 c2 …`` per line, 0-based class indices, as in ``ovs_labels/``) as
    ``{id: sorted label ids (index + 1)}``.

    Raises:
        DatasetError: the file is missing, or a line has a non-integer or out-of-range index
            (the message names the file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"tags file {path} not found")
    tags: dict[str, tuple[int, ...]] = {}
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"tags file {path}: cannot read it as text ({exc})") from None
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        try:
            indices = [int(w) for w in words[1:]]
        except ValueError:
            raise DatasetError(f"{path}:{number}: class indices must be integers, got {line!r}") from None
        bad = [i for i in indices if not 0 <= i < num_classes - 1]
        if bad:
            raise DatasetError(
                f"{path}:{number}: class index {bad[0]} outside [0, {num_classes - 1}) (0-based, "
                "background not counted)"
            )
        tags[words[0]] = tuple(sorted({i + 1 for i in indices}))
    return tags


# --- layouts ------------------------------------------------------------------------------


def _first_dir(candidates: list[Path]) -> Path | None:
    return next((c for c in candidates if c.is_dir()), None)


def _check_first(ds: SegDataset, first_id: str | None) -> SegDataset:
    """Fail early, naming the file, when the first listed image or label is missing."""
    if first_id is not None:
        for kind, path in (("image", ds.image_path(first_id)), ("label", ds.label_path(first_id))):
            if not path.is_file():
                raise DatasetError(
                    f"{kind} {path} not found (the first of the split; layout {ds.layout}, "
                    f"expected {ds.root / (ds.image_template if kind == 'image' else ds.label_template)})"
                )
    return ds


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path != root else ""


def _voc_like(root: Path, year: str, label_dirs: tuple[str, ...], expected: str):
    bases = [root, root / f"VOC{year}", root / "VOCdevkit" / f"VOC{year}"]
    base = _first_dir([b / "JPEGImages" for b in bases])
    if base is None:
        raise DatasetError(
            f"no JPEGImages/ folder in {root} (nor in VOC{year}/ or VOCdevkit/VOC{year}/ under it); "
            f"expected {expected}"
        )
    base = base.parent
    for label_dir in label_dirs:
        found = _first_dir([base / label_dir, root / label_dir])
        if found is not None:
            return base, found, label_dir
    raise DatasetError(f"no {' or '.join(d + '/' for d in label_dirs)} folder in {base}; expected {expected}")


def open_dataset(
    dataset: str,
    root: str | Path,
    first_id: str | None = None,
    *,
    context_order: str | None = None,
    context_ids: list[str] | None = None,
) -> SegDataset:
    """Find ``dataset`` under ``root`` and check its layout.

    Args:
        dataset: ``voc``, ``coco14`` or ``voc_context``.
        root: the dataset's folder (or a parent: ``VOCdevkit``, its parent, …).
        first_id: an id that must exist (the split's first); its image and label are checked.
        context_order: ``official`` or ``mmseg`` for Context labels; ``None`` detects it from
            up to 20 labels of ``context_ids`` (default the val split) against ``val_cls.txt``.

    Raises:
        DatasetError: one line naming the first missing folder or file and the layout expected.
    """
    if dataset in UNSUPERVISED_DATASETS:
        return _unsupervised(dataset, Path(root).expanduser(), first_id)
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} not found (or not a folder)")
    n = NUM_CLASSES[dataset]
    if dataset == "voc":
        expected = "VOCdevkit/VOC2012/JPEGImages/<id>.jpg with SegmentationClassAug/<id>.png or SegmentationClass/<id>.png"
        base, labels, kind = _voc_like(root, "2012", ("SegmentationClassAug", "SegmentationClass"), expected)
        ds = SegDataset(
            "voc", root, f"VOC 2012 {kind}", _join(base, root, "JPEGImages/{id}.jpg"),
            _join(labels, root, "{id}.png"), n, _identity_lut(n),
        )  # fmt: skip
        return _check_first(ds, first_id)
    if dataset == "voc_context":
        expected = "VOCdevkit/VOC2010/JPEGImages/<id>.jpg with SegmentationClassContext/<id>.png"
        base, labels, kind = _voc_like(root, "2010", ("SegmentationClassContext",), expected)
        ds = SegDataset(
            "voc_context", root, f"Pascal Context {kind}", _join(base, root, "JPEGImages/{id}.jpg"),
            _join(labels, root, "{id}.png"), n, _identity_lut(n), "official",
        )  # fmt: skip
        _check_first(ds, first_id)
        if context_order is None:
            context_order = detect_context_order(ds, context_ids)
        if context_order not in ("official", "mmseg"):
            raise ValueError(f"context_order must be 'official' or 'mmseg', got {context_order!r}")
        lut = _identity_lut(n) if context_order == "official" else _context_mmseg_lut()
        return SegDataset(
            ds.name, root, f"{ds.layout} ({context_order} class order)", ds.image_template,
            ds.label_template, n, lut, context_order,
        )  # fmt: skip
    return _check_first(_coco(root, first_id or "COCO_train2014_000000000009"), first_id)


def _join(folder: Path, root: Path, tail: str) -> str:
    rel = _rel(folder, root)
    return f"{rel}/{tail}" if rel else tail


_COCO_EXPECTED = (
    "{split}2014/COCO_{split}2014_<12 digits>.jpg with labels in coco_seg_anno/<12 digits>.png, "
    "SegmentationClass/[{split}2014/]COCO_{split}2014_<12 digits>.png or "
    "annotations/{split}2017/<12 digits>_instanceTrainIds.png"
)


def _coco(root: Path, some_id: str) -> SegDataset:
    split = _coco_split(some_id) or "train"
    expected = _COCO_EXPECTED.format(split=split)
    if (root / "coco_seg_anno").is_dir():
        label, kind = "coco_seg_anno/{num}.png", "coco_seg_anno"
    elif (root / "SegmentationClass").is_dir():
        nested = (root / "SegmentationClass" / f"{split}2014").is_dir()
        label = "SegmentationClass/{split}2014/{id}.png" if nested else "SegmentationClass/{id}.png"
        kind = "SegmentationClass"
    elif (root / "annotations" / f"{split}2017").is_dir():
        label, kind = "annotations/{split}2017/{num}_instanceTrainIds.png", "COCO-Object instanceTrainIds"
    else:
        raise DatasetError(f"no coco_seg_anno/, SegmentationClass/ or annotations/{split}2017/ folder in {root}; expected {expected}")
    images = None
    for folder, template in (
        (f"{split}2014", "{split}2014/{id}.jpg"),
        (f"images/{split}2014", "images/{split}2014/{id}.jpg"),
        (f"{split}2017", "{split}2017/{num}.jpg"),
        (f"images/{split}2017", "images/{split}2017/{num}.jpg"),
    ):
        if (root / folder).is_dir():
            images = template
            break
    if images is None:
        raise DatasetError(f"no {split}2014/ (or {split}2017/) image folder in {root}; expected {expected}")
    n = NUM_CLASSES["coco14"]
    return SegDataset("coco14", root, f"COCO {kind}", images, label, n, _identity_lut(n))


def detect_context_order(ds: SegDataset, ids: list[str] | None = None, probe: int = 20) -> str:
    """``official`` or ``mmseg``: which class order Context's label PNGs use, decided on up to
    ``probe`` PNGs whose class sets are in ``val_cls.txt`` (official order).

    Raises:
        DatasetError: neither order matches (e.g. other labels): pass the order explicitly.
    """
    truth = {}
    for line in data_path("voc_context", "val_cls.txt").read_text().splitlines():
        words = line.split()
        if words:
            truth[words[0]] = {int(w) + 1 for w in words[1:]}
    mmseg = _context_mmseg_lut()
    votes = {"official": 0, "mmseg": 0}
    checked = 0
    for image_id in ids if ids is not None else list(truth):
        if image_id not in truth or not ds.label_path(image_id).is_file():
            continue
        raw = read_label(ds.label_path(image_id), _identity_lut(60), 60)
        present = {int(v) for v in np.unique(raw)} - {0, IGNORE}
        official_ok = present == truth[image_id]
        mmseg_ok = {int(mmseg[v]) for v in present} == truth[image_id]
        if official_ok != mmseg_ok:
            votes["official" if official_ok else "mmseg"] += 1
        checked += 1
        if checked >= probe or max(votes.values()) >= 3:
            break
    if votes["official"] > votes["mmseg"]:
        return "official"
    if votes["mmseg"] > votes["official"]:
        return "mmseg"
    raise DatasetError(
        f"cannot tell the class order of the Context labels in {ds.root / ds.label_template.split('{')[0]} "
        f"from {checked} PNGs checked against val_cls.txt; give --context-order official|mmseg"
    )


# --- unsupervised benchmarks (UNSUPERVISED.md §2) ----------------------------------------------


def _cocostuff_coarse_names() -> tuple[str, ...]:
    """Names of the 27 coarse COCO-Stuff classes by id. DiffSeg's tables map fine ids to coarse
    ids and fine names to coarse names, but not ids to names, so the ids name them."""
    return tuple(f"coarse {k}" for k in range(27))


def cityscapes_ids(root: str | Path) -> list[str]:
    """Cityscapes val ids (``<city>/<city>_<seq>_<frame>``) found under ``root``, sorted."""
    base = Path(root).expanduser() / "leftImg8bit" / "val"
    if not base.is_dir():
        raise DatasetError(
            f"no leftImg8bit/val/ folder in {root}; expected leftImg8bit/val/<city>/*_leftImg8bit.png "
            "and gtFine/val/<city>/*_gtFine_labelIds.png"
        )
    ids = sorted(str(p.relative_to(base))[: -len("_leftImg8bit.png")] for p in base.glob("*/*_leftImg8bit.png"))
    if not ids:
        raise DatasetError(f"no */*_leftImg8bit.png images in {base}")
    return ids


def _unsupervised(dataset: str, root: Path, first_id: str | None) -> SegDataset:
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} not found (or not a folder)")
    lut = np.full(256, IGNORE, np.int16)
    if dataset == "cityscapes":
        lut[7:34] = np.arange(27)  # labelIds 7..33 → 0..26, every other id ignored
        for folder in ("leftImg8bit/val", "gtFine/val"):
            if not (root / folder).is_dir():
                raise DatasetError(
                    f"no {folder}/ folder in {root}; expected leftImg8bit/val/<city>/*_leftImg8bit.png "
                    "and gtFine/val/<city>/*_gtFine_labelIds.png"
                )
        ds = SegDataset(
            dataset, root, "Cityscapes gtFine labelIds", "leftImg8bit/val/{id}_leftImg8bit.png",
            "gtFine/val/{id}_gtFine_labelIds.png", 27, lut,
        )  # fmt: skip
    else:
        table = json.loads(data_path("diffseg", "fine_to_coarse_dict.json").read_text())
        lut[:182] = -1
        for fine, coarse in table["fine_index_to_coarse_index"].items():
            lut[int(fine)] = coarse
        lut[182:255] = -1  # not COCO-Stuff ids: an error
        images = "val2017" if (root / "val2017").is_dir() else "images/val2017"
        labels = next(
            (f for f in ("stuffthingmaps/val2017", "stuffthingmaps_trainval2017/val2017", "annotations/val2017",
                         "annotation_val2017")  # the last: DiffSeg's own layout
             if (root / f).is_dir()), None,
        )  # fmt: skip
        if labels is None:
            raise DatasetError(
                f"no stuffthingmaps/val2017/ (or DiffSeg's annotation_val2017/) folder in {root}; expected "
                "val2017/<id>.jpg and stuffthingmaps/val2017/<id>.png (COCO-Stuff fine ids 0..181, 255)"
            )
        ds = SegDataset(dataset, root, f"COCO-Stuff-27 {labels}", images + "/{id}.jpg", labels + "/{id}.png", 27, lut)
    return _check_first(ds, first_id)


def center_crop_resize(image, label, size: int = 512):
    """DiffSeg's input: the centre square crop of side ``min(H, W)`` resized to ``size`` —
    the image ``[H, W, 3]`` uint8 bilinearly without antialias (half-pixel centres) to float
    ``[3, size, size]`` in [0, 1], the label ``[H, W]`` by nearest-exact.

    Returns ``(image tensor, label array)``.
    """
    # torch: only this crop needs it; the readers stay NumPy-only (`iseg data` starts fast)
    import torch
    import torch.nn.functional as F

    h, w = label.shape
    c = min(h, w)
    top, left = (h - c) // 2, (w - c) // 2
    # np.array copies: a crop of the full width is a view of PIL's read-only buffer
    pixels = torch.from_numpy(np.array(image[top : top + c, left : left + c])).permute(2, 0, 1)
    pixels = F.interpolate(
        pixels[None].float() / 255, size=(size, size), mode="bilinear", align_corners=False, antialias=False
    )[0]
    crop = torch.from_numpy(np.array(label[top : top + c, left : left + c]))
    crop = F.interpolate(crop[None, None].float(), size=(size, size), mode="nearest-exact")[0, 0]
    return pixels, crop.to(torch.uint8).numpy()
