"""Label PNGs from the datasets' original annotations (DATASETS.md), for ``iseg data``.

* :func:`coco_labels` — COCO ``instances_{split}2014.json`` → ``{12 digits}.png`` (the
  ``coco_seg_anno`` layout): each COCO category id through the fixed table of the 80 COCO
  categories (:func:`coco_category_table`: ids 1..90 with gaps → labels 1..80 in COCO category
  order, whatever subset the file lists; an id outside the table is an error), 0 background,
  an all-zero PNG for an image without annotations. Needs ``pycocotools``.

  **Overlaps.** Instances are painted in order of decreasing ``area`` (the annotation's own
  field), so where masks overlap the instance with the *smaller* area wins and small objects
  stay visible; between equal areas the annotation with the larger ``id`` is painted last and
  wins. **Crowd regions** (``iscrowd = 1``, RLE masks) are painted with their category by the
  same rule, like any other instance (not 255).
* :func:`context_labels` — Pascal Context ``trainval/{id}.mat`` (``LabelMap`` of 459-class ids)
  → ``{id}.png`` in the official 59-label order (the authors' ``SegmentationClassContext``):
  each of the 59 classes gets its label id, every other pixel 0.

Both run through the one runner (:class:`iseg.runner.MissingFiles`): each PNG is written
atomically and PNGs that exist are skipped, so an interrupted conversion resumes.

Example:
    >>> coco_labels("annotations/instances_train2014.json", "coco/coco_seg_anno")
    >>> context_labels("trainval", "VOCdevkit/VOC2010/SegmentationClassContext")
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from ..runner import MissingFiles, Runner, save_atomic
from .datasets import _table

__all__ = ["coco_category_table", "coco_labels", "context_labels", "context_lut", "write_png_atomic"]


def coco_category_table() -> dict[int, int]:
    """COCO category id → label id 1..80 (the fixed COCO-80 table: 1 person … 90 toothbrush)."""
    table = {int(c["coco_category_id"]): int(c["label_id"]) for c in _table("coco14")["classes"]}
    assert len(table) == 80 and sorted(table.values()) == list(range(1, 81))
    return table


def write_png_atomic(label: np.ndarray, path: Path) -> None:
    """``[H, W]`` uint8 → grayscale PNG at ``path`` through a temporary file and ``os.replace``
    (:func:`iseg.runner.save_atomic`).

    Raises:
        RunError: the write failed (e.g. a full disk), in one line naming ``path``; no
            partial file stays.
    """
    save_atomic(_png_saver(label), Path(path))


def _png_saver(label: np.ndarray):
    """A writer of ``label`` (``[H, W]`` uint8) as a grayscale PNG, for the runner."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return lambda f: f.write(buffer.getvalue())


def _run(out: Path, pairs, load, convert, progress: bool, desc: str) -> tuple[int, int]:
    """Convert each ``(source, PNG name)`` of ``pairs`` whose PNG is missing in ``out``, through
    the one runner (:class:`iseg.runner.MissingFiles`: a PNG that exists is kept, so a stopped
    conversion resumes). A malformed annotation (``ValueError``) ends the conversion: it names a
    file to fix, and the PNGs written before it stay. Returns ``(written, skipped)``."""
    runner = Runner.using(MissingFiles(out), noun="label", desc=desc, quiet=not progress, fatal=(ValueError,))
    pairs = list(pairs)
    sources = {name: source for source, name in pairs}
    todo = runner.plan(pairs)
    runner.run_batches(todo, ([(item, load(sources[item.id]))] for item in todo), convert)
    return runner.done, runner.skipped


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
    try:  # an optional dependency: only this converter needs it
        from pycocotools.coco import COCO
    except ImportError:
        raise ImportError("iseg data coco needs pycocotools: pip install pycocotools") from None

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
    label_of = coco_category_table()
    unknown = sorted({int(c) for c in coco.getCatIds()} - set(label_of))
    if unknown:
        raise ValueError(
            f"{instances}: category id {unknown[0]} is not one of the 80 COCO categories "
            f"({len(unknown)} unknown id(s)); iseg data coco writes COCO's fixed label ids 1..80"
        )
    image_ids = sorted(coco.getImgIds())

    def convert(items, image_ids):
        return [_png_saver(_coco_label_or_error(coco, image_id, label_of, instances)) for image_id in image_ids]

    written, skipped = _run(out, [(image_id, f"{image_id:012d}.png") for image_id in image_ids],
                            lambda image_id: image_id, convert, progress, "coco labels")  # fmt: skip
    if log is not None:
        log(f"{written} label PNGs written to {out}, {skipped} existed")
    return written, skipped


def _coco_label_or_error(coco, image_id: int, label_of: dict[int, int], instances: Path) -> np.ndarray:
    try:
        return _coco_label(coco, image_id, label_of)
    except (KeyError, TypeError, ValueError, IndexError, AssertionError) as exc:
        detail = f"no {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise ValueError(f"{instances}: image {image_id}: malformed image or annotation entry ({detail})") from None


def _coco_label(coco, image_id: int, label_of: dict[int, int]) -> np.ndarray:
    """One image's label map: instances painted by decreasing ``area`` (equal areas: the higher
    annotation id last, on top), crowd regions like the others."""
    info = coco.imgs[image_id]
    label = np.zeros((int(info["height"]), int(info["width"])), np.uint8)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None))
    for ann in sorted(anns, key=lambda a: (-float(a["area"]), int(a["id"]))):
        if ann["category_id"] not in label_of:
            raise ValueError(f"annotation {ann.get('id')} has unknown category {ann['category_id']}")
        mask = coco.annToMask(ann)
        if mask.shape != label.shape:
            raise ValueError(f"annotation {ann['id']} is {mask.shape} but the image is {label.shape}")
        label[mask > 0] = label_of[ann["category_id"]]
    return label


def context_lut(size: int = 460) -> np.ndarray:
    """``[size]`` uint8: Pascal Context 459-class id → label id in the official 59-label order
    (0 for the other classes)."""
    lut = np.zeros(size, np.uint8)
    for c in _table("voc_context")["classes"]:
        lut[int(c["pascal_context_459_id"])] = int(c["label_id"])
    return lut


def _context_ids(mat: Path, size: int) -> np.ndarray:
    """The ``LabelMap`` of one Pascal Context ``.mat`` as int64 ids; ``ValueError`` naming the
    file for anything that is not such an annotation (not a .mat, no LabelMap, not a 2-D map of
    integer ids in ``[0, size)``)."""
    from scipy.io import loadmat  # start-up time: scipy.io is needed by this converter only

    try:
        data = loadmat(mat)
    except Exception as exc:  # noqa: BLE001 — scipy raises many kinds for a file that is not a .mat
        raise ValueError(f"{mat}: not a MATLAB .mat file ({type(exc).__name__}: {exc})") from None
    if "LabelMap" not in data:
        raise ValueError(f"{mat}: no LabelMap in the .mat file (not a Pascal Context annotation)")
    ids = np.asarray(data["LabelMap"])
    expected = f"{mat}: LabelMap must be a 2-D map of integer ids in 0..{size - 1}"
    if ids.ndim != 2 or ids.size == 0 or ids.dtype.kind not in "iuf":
        raise ValueError(f"{expected}, got a {ids.dtype} array of shape {ids.shape}")
    if ids.dtype.kind == "f" and not (np.isfinite(ids).all() and (ids == np.round(ids)).all()):
        raise ValueError(f"{expected}, got non-integer values")
    if ids.min() < 0 or ids.max() >= size:
        raise ValueError(f"{expected}, got {ids.min():g}..{ids.max():g}")
    return ids.astype(np.int64)


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
        ValueError: a file that is not a Pascal Context annotation: not a ``.mat``, no
            ``LabelMap``, or not a 2-D map of integer ids in 0..459 (names the file).
    """
    mat_dir, out = Path(mat_dir), Path(out)
    if not mat_dir.is_dir():
        raise FileNotFoundError(f"folder {mat_dir} not found (expected the trainval/ folder of .mat files)")
    mats = sorted(mat_dir.glob("*.mat"))
    if not mats:
        raise FileNotFoundError(f"no .mat files in {mat_dir}")
    lut = context_lut()

    def convert(items, ids):
        return [_png_saver(lut[one]) for one in ids]

    written, skipped = _run(out, [(mat, f"{mat.stem}.png") for mat in mats],
                            lambda mat: _context_ids(mat, len(lut)), convert, progress, "context labels")  # fmt: skip
    if log is not None:
        log(f"{written} label PNGs written to {out}, {skipped} existed")
    return written, skipped
