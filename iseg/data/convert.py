"""Label PNGs from the datasets' original annotations (DATASETS.md), for ``iseg data``.

* :func:`coco_labels` — COCO ``instances_{split}2014.json`` → ``{12 digits}.png`` (the
  ``coco_seg_anno`` layout): ``label = 1 + sorted(category ids).index(category_id)`` (1..80 in
  COCO category order), 0 background, larger instances painted first so that small ones stay
  visible, an all-zero PNG for an image without annotations. Needs ``pycocotools``.
* :func:`context_labels` — Pascal Context ``trainval/{id}.mat`` (``LabelMap`` of 459-class ids)
  → ``{id}.png`` in the official 59-label order (the authors' ``SegmentationClassContext``):
  each of the 59 classes gets its label id, every other pixel 0.

Both write each PNG atomically and skip PNGs that exist, so an interrupted conversion resumes.

Example:
    >>> coco_labels("annotations/instances_train2014.json", "coco/coco_seg_anno")
    >>> context_labels("trainval", "VOCdevkit/VOC2010/SegmentationClassContext")
"""

from __future__ import annotations

import io
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from .datasets import _table

__all__ = ["coco_labels", "context_labels", "context_lut", "write_png_atomic"]


def write_png_atomic(label: np.ndarray, path: Path) -> None:
    """``[H, W]`` uint8 → grayscale PNG at ``path`` through a temporary file and ``os.replace``."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.iseg-tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(buffer.getvalue())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _progress(items: Iterable, total: int, show: bool, desc: str):
    if not show:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, unit="img", desc=desc, mininterval=1.0)


def coco_labels(
    instances: str | Path,
    out: str | Path,
    *,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> tuple[int, int]:
    """Write one label PNG per image of a COCO instances file.

    Args:
        instances: ``instances_{train,val}2014.json`` (or 2017).
        out: the output folder (created), e.g. ``ROOT/coco_seg_anno``.

    Returns:
        ``(written, skipped)``: PNGs written now and PNGs that existed already.

    Raises:
        ValueError: the file is not a COCO instances file (no images/annotations/categories),
            or an annotation names an unknown category.
    """
    try:
        from pycocotools.coco import COCO
    except ImportError:
        raise ImportError("iseg data coco needs pycocotools: pip install pycocotools") from None
    import contextlib

    instances, out = Path(instances), Path(out)
    if not instances.is_file():
        raise FileNotFoundError(f"instances file {instances} not found")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints while indexing
        try:
            coco = COCO(str(instances))
        except (ValueError, KeyError, TypeError, AssertionError) as exc:
            raise ValueError(f"{instances}: not a COCO instances file ({exc})") from None
    for key in ("images", "annotations", "categories"):
        if key not in coco.dataset:
            raise ValueError(f"{instances}: not a COCO instances file (no {key!r})")
    label_of = {cat: 1 + i for i, cat in enumerate(sorted(coco.getCatIds()))}
    if len(label_of) > 254:
        raise ValueError(f"{instances}: {len(label_of)} categories do not fit a uint8 label PNG")
    out.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    image_ids = sorted(coco.getImgIds())
    for image_id in _progress(image_ids, len(image_ids), progress, "coco labels"):
        path = out / f"{image_id:012d}.png"
        if path.is_file():
            skipped += 1
            continue
        info = coco.imgs[image_id]
        label = np.zeros((info["height"], info["width"]), np.uint8)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None))
        for ann in sorted(anns, key=lambda a: -a["area"]):  # larger first: small ones stay on top
            if ann["category_id"] not in label_of:
                raise ValueError(f"{instances}: annotation {ann.get('id')} has unknown category {ann['category_id']}")
            label[coco.annToMask(ann) > 0] = label_of[ann["category_id"]]
        write_png_atomic(label, path)
        written += 1
    if log is not None:
        log(f"{written} label PNGs written to {out}, {skipped} existed")
    return written, skipped


def context_lut(size: int = 460) -> np.ndarray:
    """``[size]`` uint8: Pascal Context 459-class id → label id in the official 59-label order
    (0 for the other classes)."""
    lut = np.zeros(size, np.uint8)
    for c in _table("voc_context")["classes"]:
        lut[int(c["pascal_context_459_id"])] = int(c["label_id"])
    return lut


def context_labels(
    mat_dir: str | Path,
    out: str | Path,
    *,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> tuple[int, int]:
    """Convert Pascal Context ``{id}.mat`` files (``LabelMap``, 459-class ids) to ``{id}.png``.

    Returns:
        ``(written, skipped)``.

    Raises:
        ValueError: a ``.mat`` without ``LabelMap`` or with ids outside 0..459 (names the file).
    """
    from scipy.io import loadmat

    mat_dir, out = Path(mat_dir), Path(out)
    if not mat_dir.is_dir():
        raise FileNotFoundError(f"folder {mat_dir} not found (expected the trainval/ folder of .mat files)")
    mats = sorted(mat_dir.glob("*.mat"))
    if not mats:
        raise FileNotFoundError(f"no .mat files in {mat_dir}")
    lut = context_lut()
    out.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    for mat in _progress(mats, len(mats), progress, "context labels"):
        path = out / f"{mat.stem}.png"
        if path.is_file():
            skipped += 1
            continue
        data = loadmat(mat)
        if "LabelMap" not in data:
            raise ValueError(f"{mat}: no LabelMap in the .mat file")
        ids = np.asarray(data["LabelMap"])
        if ids.ndim != 2 or ids.size == 0 or ids.min() < 0 or ids.max() >= len(lut):
            raise ValueError(f"{mat}: LabelMap must be a 2-D map of ids in 0..{len(lut) - 1}")
        write_png_atomic(lut[ids.astype(np.int64)], path)
        written += 1
    if log is not None:
        log(f"{written} label PNGs written to {out}, {skipped} existed")
    return written, skipped
