"""Scoring segmentations as the papers do: the authors' mIoU, MMSegmentation's, and DiffSeg's
per-image Hungarian matching — plus the resumable ``iseg eval`` runner (:func:`run_eval`).

Metrics (DATASETS.md, METHOD §6):
    * :func:`confusion_matrix` — ``hist[n, n]`` (rows ground truth, columns prediction) by one
      ``bincount``; ground-truth pixels outside ``[0, n)`` (255) are ignored.
    * :func:`scores` — per-class IoU ``diag / (rowsum + colsum − diag)``, the authors' mIoU (mean
      over the classes present in the ground truth, ``rowsum > 0``), MMSegmentation's (mean over
      ``union > 0``), pixel accuracy and mean class accuracy, from one matrix summed over a split.
    * :func:`hungarian_match` / :class:`HungarianScores` / :func:`hungarian_scores` — the
      unsupervised protocol of UNSUPERVISED.md §2: per image, the predicted segment ids are
      matched one-to-one to the classes by ``scipy.optimize.linear_sum_assignment`` on the
      per-image confusion matrix, and TP/FP/FN are accumulated over the dataset.

Example:
    >>> gt = np.array([[0, 1], [1, 255]]); pred = np.array([[0, 1], [0, 1]])
    >>> s = scores(confusion_matrix(gt, pred, 2))
    >>> s.iou, s.miou, round(s.pixel_acc, 4)   # hist = [[1, 0], [1, 1]]
    ((0.5, 0.5), 0.5, 0.6667)
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .files import HOST, remove_stale_temps, write_atomic
from .recipes import get_recipe

__all__ = [
    "SegmentationScores",
    "HungarianScores",
    "confusion_matrix",
    "scores",
    "mmseg_miou",
    "hungarian_match",
    "hungarian_scores",
]


def _as_numpy(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype.kind not in "iub":
        raise TypeError(f"{name} must hold integer labels, got dtype {x.dtype}")
    return x


def confusion_matrix(gt, pred, num_classes: int):
    """The confusion matrix of one label map (or a stack of them).

    Args:
        gt: ground truth ``[H, W]`` (any shape) of ints; values outside ``[0, num_classes)``
            (255, -1, …) are ignored.
        pred: prediction of the same shape, values in ``[0, num_classes)`` where ``gt`` is valid.
        num_classes: n, the number of labels including background.

    Returns:
        ``hist [n, n]`` int64, ``hist[g, p]`` = the number of pixels of class g predicted p. A
        numpy array for numpy input; for two torch tensors, a tensor on their device (the
        bincount then runs there on a GPU; on the CPU through numpy).

    Speed: for unsigned labels (decoded PNGs) ``gt · n + pred`` is formed in the smallest
    unsigned dtype that holds it (uint16 for uint8 labels) with no mask and no int64 copy, and
    one ``bincount`` counts it: faster than the usual masked int64 ``bincount`` (timed in
    ``bench/test_eval_speed.py``).

    Raises:
        ValueError: shapes differ, or a prediction outside ``[0, n)`` at a scored pixel.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int ≥ 1, got {num_classes!r}")
    n = num_classes
    if hasattr(gt, "detach") and hasattr(pred, "detach") and gt.device.type == "cpu" and pred.device.type == "cpu":
        if gt.is_floating_point() or pred.is_floating_point():
            raise TypeError("confusion_matrix: gt and pred must hold integer labels")
        import torch  # on the CPU numpy's bincount is ~10× faster than torch's

        return torch.from_numpy(confusion_matrix(gt.detach().numpy(), pred.detach().numpy(), n))
    if hasattr(gt, "detach") and hasattr(pred, "detach"):
        import torch

        if gt.shape != pred.shape:
            raise ValueError(f"confusion_matrix: gt is {tuple(gt.shape)} but pred is {tuple(pred.shape)}")
        if gt.is_floating_point() or pred.is_floating_point():
            raise TypeError("confusion_matrix: gt and pred must hold integer labels")
        gt, pred = gt.reshape(-1).long(), pred.reshape(-1).to(gt.device).long()
        valid = (gt >= 0) & (gt < n)
        g, p = gt[valid], pred[valid]
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= n):
            raise ValueError(f"confusion_matrix: predictions must be in [0, {n}), got {int(p.min())}..{int(p.max())}")
        return torch.bincount(g * n + p, minlength=n * n).reshape(n, n)
    gt, pred = _as_numpy(gt, "gt"), _as_numpy(pred, "pred")
    if gt.shape != pred.shape:
        raise ValueError(f"confusion_matrix: gt is {gt.shape} but pred is {pred.shape}")
    return _bincount_matrix(gt.reshape(-1), pred.reshape(-1), n)


def _smallest_index_dtype(gt: np.ndarray, pred: np.ndarray, n: int):
    """The smallest unsigned dtype holding ``gt · n + pred`` for every value of the inputs'
    dtypes (uint16 for uint8 labels and n ≤ 255), or ``None`` when the inputs are signed or
    wider than 16 bits."""
    if gt.dtype.kind not in "ub" or pred.dtype.kind not in "ub":
        return None
    top = (np.iinfo(gt.dtype).max if gt.dtype.kind == "u" else 1) * n + (
        np.iinfo(pred.dtype).max if pred.dtype.kind == "u" else 1
    )
    for dtype in (np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return dtype
    return None


def _bincount_matrix(gt: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    """``hist [n, n]`` of flat label arrays. For unsigned labels (the decoded PNGs), no mask
    and no int64 copy of the inputs: ``gt · n + pred`` in the smallest dtype that holds it,
    one ``bincount``, then the ``n²`` bins of valid ground truth (an ignored ``gt ≥ n`` lands
    past them). A prediction ``≥ n`` is only an error where the ground truth is scored."""
    dtype = _smallest_index_dtype(gt, pred, n)
    if dtype is None:  # signed or wide labels: mask, then int64
        gt, pred = gt.astype(np.int64), pred.astype(np.int64)
        valid = (gt >= 0) & (gt < n)
        g, p = gt[valid], pred[valid]
        if p.size and (p.min() < 0 or p.max() >= n):
            raise ValueError(f"confusion_matrix: predictions must be in [0, {n}), got {p.min()}..{p.max()}")
        return np.bincount(g * n + p, minlength=n * n).reshape(n, n)
    if pred.size and int(pred.max()) >= n:
        bad = pred[gt < n]
        if bad.size and int(bad.max()) >= n:
            raise ValueError(f"confusion_matrix: predictions must be in [0, {n}), got {bad.min()}..{bad.max()}")
        pred = np.where(gt < n, pred, 0).astype(pred.dtype)  # only ignored pixels held them
    index = gt.astype(dtype)
    index *= dtype(n)
    index += pred
    return np.bincount(index, minlength=n * n)[: n * n].reshape(n, n).astype(np.int64, copy=False)


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


@dataclass(frozen=True)
class SegmentationScores:
    """Scores of one confusion matrix (fractions in [0, 1]; ``None`` where undefined).

    Attributes:
        iou: per class ``diag / (rowsum + colsum − diag)``, ``None`` where the union is empty.
        acc: per class ``diag / rowsum`` (recall), ``None`` where the class is absent from GT.
        present: per class, whether it occurs in the ground truth (``rowsum > 0``).
        miou: the authors' mIoU, mean IoU over the classes present in the ground truth.
        miou_mmseg: MMSegmentation's averaging on this matrix: mean IoU over the classes
            with a non-empty union (a class only predicted counts with IoU 0). What MMSeg
            reports for a split is this on the matrix of *all* its images (:func:`mmseg_scores`).
        pixel_acc: ``trace / total``.
        mean_acc: mean of ``acc`` over the classes present.
        pixels: the number of scored pixels (``hist.sum()``).
    """

    iou: tuple[float | None, ...]
    acc: tuple[float | None, ...]
    present: tuple[bool, ...]
    miou: float | None
    miou_mmseg: float | None
    pixel_acc: float | None
    mean_acc: float | None
    pixels: int


def scores(hist) -> SegmentationScores:
    """:class:`SegmentationScores` of a confusion matrix ``hist [n, n]`` (rows ground truth),
    e.g. the sum of :func:`confusion_matrix` over a split. All-``None`` means with no pixels."""
    if hasattr(hist, "detach"):
        hist = hist.detach().cpu().numpy()
    hist = np.asarray(hist, dtype=np.float64)
    if hist.ndim != 2 or hist.shape[0] != hist.shape[1] or hist.shape[0] == 0:
        raise ValueError(f"scores: hist must be a square [n, n] matrix, got shape {hist.shape}")
    if (hist < 0).any() or not np.isfinite(hist).all():
        raise ValueError("scores: hist must hold finite counts ≥ 0")
    diag, rows, cols = np.diag(hist), hist.sum(1), hist.sum(0)
    union = rows + cols - diag
    present, nonempty = rows > 0, union > 0
    iou = np.divide(diag, union, out=np.zeros_like(diag), where=nonempty)
    acc = np.divide(diag, rows, out=np.zeros_like(diag), where=present)
    total = hist.sum()
    return SegmentationScores(
        iou=tuple(float(v) if ok else None for v, ok in zip(iou, nonempty)),
        acc=tuple(float(v) if ok else None for v, ok in zip(acc, present)),
        present=tuple(bool(v) for v in present),
        miou=_mean(iou[present]),
        miou_mmseg=_mean(iou[nonempty]),
        pixel_acc=float(diag.sum() / total) if total > 0 else None,
        mean_acc=_mean(acc[present]),
        pixels=int(total),
    )


def mmseg_miou(hist, ignore_background: bool = False) -> float | None:
    """MMSegmentation's ``IoUMetric`` mIoU from the sum of its per-image areas, which is the
    summed confusion matrix ``hist``: ``IoU_c = Σ intersect / Σ union``, NaN-mean over the
    classes with ``union > 0``.

    ``ignore_background`` is MMSeg's Pascal Context-59 setting (``reduce_zero_label``): ground
    truth 0 is ignored, the 59 classes are scored, and a pixel predicted 0 (background) counts in
    its true class's union but in no class's prediction."""
    if hasattr(hist, "detach"):
        hist = hist.detach().cpu().numpy()
    hist = np.asarray(hist, dtype=np.float64)
    if ignore_background:
        rows = hist[1:]  # ground truth 1..n-1
        intersect = np.diag(hist)[1:]
        union = rows.sum(1) + rows[:, 1:].sum(0) - intersect
    else:
        intersect = np.diag(hist)
        union = hist.sum(1) + hist.sum(0) - intersect
    nonempty = union > 0
    return float((intersect[nonempty] / union[nonempty]).mean()) if nonempty.any() else None


# --- unsupervised: per-image Hungarian matching (UNSUPERVISED.md §2) ----------------------------


def hungarian_match(gt, pred, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Match one image's predicted segment ids to its classes, DiffSeg's way.

    ``hist[C, P]`` counts pixels of class g (rows, ``C = num_classes``) in segment p (columns,
    ``P = max(C, max segment id + 1)``); ``linear_sum_assignment(hist, maximize=True)`` pairs
    every class with a distinct segment (a class absent from the image pairs with whatever
    segment is left: it adds only FP there). Pixels whose ground truth is outside ``[0, C)`` are
    ignored.

    Args:
        gt: ``[H, W]`` class ids (255 = unlabelled).
        pred: ``[H, W]`` segment ids ≥ 0 (arbitrary ids; only the partition matters).
        num_classes: C.

    Returns:
        ``(tp, fp, fn, total)``: per-class ``[C]`` int64 counts for this image and the number of
        scored pixels, ready to be summed over a dataset (:class:`HungarianScores`).
    """
    from scipy.optimize import linear_sum_assignment

    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int ≥ 1, got {num_classes!r}")
    gt, pred = _as_numpy(gt, "gt"), _as_numpy(pred, "pred")
    if gt.shape != pred.shape:
        raise ValueError(f"hungarian_match: gt is {gt.shape} but pred is {pred.shape}")
    gt, pred = gt.reshape(-1), pred.reshape(-1)
    if pred.size and pred.dtype.kind == "i" and int(pred[(gt >= 0) & (gt < num_classes)].min(initial=0)) < 0:
        raise ValueError(f"hungarian_match: segment ids must be ≥ 0, got {int(pred.min())}")
    c = num_classes
    valid = (gt >= 0) & (gt < c)
    segments = max(c, int(pred[valid].max()) + 1 if valid.any() else 0)
    if pred.size and (pred.dtype.kind == "i" or int(pred.max()) >= segments):
        pred = np.where(valid, pred, 0).astype(pred.dtype)  # ids off the scored pixels don't count
    hist = _bincount_matrix(gt, pred, segments)[:c]
    rows, cols = linear_sum_assignment(hist, maximize=True)  # rows = 0..C-1 since C ≤ P
    tp = np.zeros(c, np.int64)
    tp[rows] = hist[rows, cols]
    fn = hist.sum(1) - tp
    fp = np.zeros(c, np.int64)
    fp[rows] = hist[:, cols].sum(0) - tp[rows]
    return tp, fp, fn, int(hist.sum())


class HungarianScores:
    """Accumulates :func:`hungarian_match` over a dataset (UNSUPERVISED.md §2).

    Example:
        >>> meter = HungarianScores(27)
        >>> for gt, segments in pairs:
        ...     meter.update(gt, segments)
        >>> meter.acc, meter.miou          # ΣTP / Σpixels, nanmean_c TP / (TP + FP + FN)
    """

    def __init__(self, num_classes: int):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int ≥ 1, got {num_classes!r}")
        self.num_classes = num_classes
        self.tp = np.zeros(num_classes, np.int64)
        self.fp = np.zeros(num_classes, np.int64)
        self.fn = np.zeros(num_classes, np.int64)
        self.total = 0
        self.images = 0

    def update(self, gt, pred) -> None:
        """Add one image: ``gt [H, W]`` class ids, ``pred [H, W]`` segment ids."""
        tp, fp, fn, total = hungarian_match(gt, pred, self.num_classes)
        self.tp += tp
        self.fp += fp
        self.fn += fn
        self.total += total
        self.images += 1

    @property
    def iou(self) -> tuple[float | None, ...]:
        """Per class ``TP / (TP + FP + FN)`` (``None`` where the denominator is 0)."""
        denom = self.tp + self.fp + self.fn
        return tuple(float(t / d) if d > 0 else None for t, d in zip(self.tp, denom))

    @property
    def miou(self) -> float | None:
        """Mean of :attr:`iou` over the classes where it is defined (DiffSeg's ``nanmean``)."""
        values = [v for v in self.iou if v is not None]
        return sum(values) / len(values) if values else None

    @property
    def acc(self) -> float | None:
        """Pixel accuracy after matching, ``ΣTP / Σpixels`` (``None`` with no pixels)."""
        return float(self.tp.sum() / self.total) if self.total > 0 else None


def hungarian_scores(pairs: Iterable[tuple[object, object]], num_classes: int) -> HungarianScores:
    """Score ``(gt, segments)`` label-map pairs with per-image Hungarian matching.

    Args:
        pairs: ``(gt [H, W], pred [H, W])`` per image (numpy arrays or tensors of ints); gt
            values outside ``[0, num_classes)`` are ignored, pred holds arbitrary segment ids.
        num_classes: the number of ground-truth classes (27 for Cityscapes and COCO-Stuff-27).

    Returns:
        a :class:`HungarianScores` with ``.acc`` (ACC) and ``.miou`` (mIoU) as fractions.
    """
    meter = HungarianScores(num_classes)
    for gt, pred in pairs:
        meter.update(gt, pred)
    return meter


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
        Task("cityscapes", "cityscapes", "val", "unsupervised", 25.0, table="Table 3, Cityscapes val", kl_threshold=0.9, first_pass="fp16"),
        Task("cocostuff27", "cocostuff27", "val", "unsupervised", 45.2, table="Table 3, COCO-Stuff-27", kl_threshold=1.1, first_pass="fp16"),
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


_TAGGER_PRESETS = {"voc": "voc", "voc_context": "context", "coco14": "coco"}


def builtin_tagger(task: Task, device=None, model: str | None = None):
    """The built-in tagger for OVS runs without ``--tags``: a function ``image [H, W, 3] uint8
    → label ids`` (ascending, 1-based) that tags with :class:`iseg.tagger.CLIPTagger` and the
    dataset's preset (the authors' TagCLIP settings), or ``None`` for a dataset without one.

    The weights (``model``, default ``openai/clip-vit-base-patch16``) load on the first
    tagging, not here (this runs before the dataset is checked); missing weights end the run
    with one :class:`EvalError` saying how to get them or to give ``--tags``.
    """
    preset = _TAGGER_PRESETS.get(task.dataset)
    if preset is None:
        return None
    state: dict = {}

    def tag(image: np.ndarray) -> tuple[int, ...]:
        if "tagger" not in state:
            from .tagger import DEFAULT_TAGGER_MODEL, CLIPTagger

            try:
                state["tagger"] = CLIPTagger.from_pretrained(model or DEFAULT_TAGGER_MODEL, device=device)
            except OSError as exc:
                message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise EvalError(f"{message}; or give --tags FILE / --tags published") from None
        return tuple(i + 1 for i in state["tagger"](image, preset=preset).indices)

    return tag


# --- per-image work (DataLoader workers) ----------------------------------------------------


@dataclass
class _Sample:
    index: int
    image_id: str
    image: object = None  # uint8 tensor [3, H, W]
    gt: np.ndarray | None = None  # [H, W] uint8 label ids
    classes: tuple[int, ...] = ()  # dataset label ids, ascending
    skip: bool = False  # WSSS image with background only
    error: str | None = None


def _gt_classes(gt: np.ndarray, num_classes: int) -> tuple[int, ...]:
    present = np.flatnonzero(np.bincount(gt.reshape(-1), minlength=256)[1:num_classes]) + 1
    return tuple(int(c) for c in present)


class _PredictSamples:
    """Map-style dataset for the DataLoader: decode one image and its label, choose classes."""

    def __init__(self, ds, ids: Sequence[str], mode: str, tags: dict | None):
        self.ds, self.ids, self.mode, self.tags = ds, list(ids), mode, tags

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> _Sample:
        import torch

        from .data.datasets import LabelError, read_image

        image_id = self.ids[index]
        sample = _Sample(index, image_id)
        try:
            gt = self.ds.read_label(image_id)
        except LabelError as exc:
            sample.error = str(exc)
            return sample
        sample.gt = gt
        if self.mode == "unsupervised":
            sample.classes = ()
        elif self.mode == "wsss":
            sample.classes = _gt_classes(gt, self.ds.num_classes)
            if not sample.classes:
                sample.skip = True
                return sample
        else:
            sample.classes = tuple(self.tags.get(image_id, ())) if self.tags is not None else ()
        path = self.ds.image_path(image_id)
        try:
            pixels = read_image(path)
        except FileNotFoundError:
            sample.error = f"{path}: image file not found"
            return sample
        except (OSError, SyntaxError, ValueError) as exc:
            sample.error = f"{path}: cannot read the image ({exc})"
            return sample
        if pixels.shape[:2] != gt.shape:
            sample.error = (
                f"{self.ds.label_path(image_id)}: label is {gt.shape[0]}×{gt.shape[1]} but the image "
                f"{path.name} is {pixels.shape[0]}×{pixels.shape[1]} (H×W)"
            )
            return sample
        if self.mode == "unsupervised":  # DiffSeg's centre crop at 512, image and label alike
            from .data.datasets import center_crop_resize

            sample.image, sample.gt = center_crop_resize(pixels, gt, UNSUPERVISED_SIZE)
            return sample
        sample.image = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
        return sample


UNSUPERVISED_SIZE = 512  # UNSUPERVISED.md §2: evaluated at 512×512 after the crop


def _read_gt(ds, image_id: str, mode: str) -> np.ndarray:
    """The label as scored: as stored, or DiffSeg's centre crop at 512 for unsupervised tasks."""
    gt = ds.read_label(image_id)
    if mode != "unsupervised":
        return gt
    import torch
    import torch.nn.functional as F

    h, w = gt.shape
    c = min(h, w)
    top, left = (h - c) // 2, (w - c) // 2
    crop = torch.from_numpy(np.array(gt[top : top + c, left : left + c]))[None, None].float()
    size = (UNSUPERVISED_SIZE, UNSUPERVISED_SIZE)
    return F.interpolate(crop, size=size, mode="nearest-exact")[0, 0].to(torch.uint8).numpy()


def _collate_list(batch):
    return batch


def _read_prediction(path, data: bytes, shape, num_classes: int) -> np.ndarray:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        pred = np.asarray(img)
    if pred.ndim != 2 or pred.dtype != np.uint8:
        raise ValueError(f"{path}: a prediction must be a one-channel 8-bit PNG, got {pred.dtype} {pred.shape}")
    if pred.shape != shape:
        raise ValueError(f"{path}: prediction is {pred.shape} but its label is {shape} (H×W)")
    if pred.size and int(pred.max()) >= num_classes:
        raise ValueError(f"{path}: prediction value {int(pred.max())} outside [0, {num_classes})")
    return pred


def _image_row(hist: np.ndarray, columns: int) -> tuple:
    """One image's ``(pixel accuracy, IoU per class)`` from its confusion matrix (``None``
    where the class is neither in the ground truth nor predicted)."""
    diag = np.diag(hist)[:columns]
    union = hist.sum(1)[:columns] + hist.sum(0)[:columns] - diag
    total = hist.sum()
    ious = tuple(float(d / u) if u > 0 else None for d, u in zip(diag, union))
    return (float(np.trace(hist) / total) if total > 0 else None, ious)


class _ScoreSamples:
    """Map-style dataset: one image's confusion matrix from its written prediction and label."""

    def __init__(self, ds, ids: Sequence[str], mode: str, pred_dir, records: dict | None = None):
        self.ds, self.ids, self.mode, self.pred_dir = ds, list(ids), mode, pred_dir
        self.records = records

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        """``(image_id, status, hist | None, message | None, row | None, dropped)``; status
        ``scored``, ``skipped`` (WSSS background only: its matrix against an all-background
        prediction, for MMSegmentation's figure), ``missing`` (no prediction) or ``error``."""
        from pathlib import Path

        from .data.datasets import LabelError

        image_id = self.ids[index]
        n = self.ds.num_classes
        try:
            gt = _read_gt(self.ds, image_id, self.mode)
        except LabelError as exc:
            return image_id, "error", None, str(exc), None, 0
        if self.mode == "wsss" and not _gt_classes(gt, n):
            return image_id, "skipped", confusion_matrix(gt, np.zeros_like(gt), n), None, None, 0
        path = Path(self.pred_dir) / f"{image_id}.png"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return image_id, "missing", None, f"{path}: no prediction", None, 0
        except OSError as exc:
            return image_id, "error", None, f"{path}: {exc}", None, 0
        dropped = 0
        if self.records is not None:
            known = self.records.get(image_id, {})
            digest = _digest(data)
            if digest not in known:
                message = f"{path}: not the prediction iseg eval wrote (changed since); the next run predicts it again"
                return image_id, "error", None, message, None, 0
            dropped = known[digest]
        try:
            pred = _read_prediction(path, data, gt.shape, 256 if self.mode == "unsupervised" else n)
        except (OSError, SyntaxError, ValueError) as exc:
            return image_id, "error", None, f"{path}: {exc}", None, 0
        if self.mode == "unsupervised":  # (tp, fp, fn) per class stacked, and the pixel count
            tp, fp, fn, total = hungarian_match(gt, pred, n)
            denom = tp + fp + fn
            row = (float(tp.sum() / total) if total else None,
                   tuple(float(t / d) if d else None for t, d in zip(tp, denom)))  # fmt: skip
            return image_id, "scored", (np.stack([tp, fp, fn]), total), None, row, dropped
        hist = confusion_matrix(gt, pred, n)
        return image_id, "scored", hist, None, _image_row(hist, n), dropped


def _collate_scores(batch):
    """Sum the batch's matrices in the worker: one ``[n, n]`` per kind crosses the process
    boundary (the scored images', and the skipped background-only images')."""
    hist = skipped = None
    rows = []
    for image_id, status, h, message, row, dropped in batch:
        if isinstance(h, tuple):  # unsupervised: ([3, C] counts, pixels)
            h = (h[0], np.int64(h[1]))
            hist = h if hist is None else (hist[0] + h[0], hist[1] + h[1])
        elif h is not None and status == "skipped":
            skipped = h if skipped is None else skipped + h
        elif h is not None:
            hist = h if hist is None else hist + h
        rows.append((image_id, status, message, row, dropped))
    return hist, skipped, rows


# --- files ---------------------------------------------------------------------------------------


def _write_atomic(path, data: bytes) -> None:
    """Write ``data`` to ``path`` with :func:`iseg.files.write_atomic`, creating its folder (ids
    may hold one: Cityscapes' ``city/``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: f.write(data))


def _png_bytes(pred: np.ndarray) -> bytes:
    """``[H, W]`` uint8 label ids → a palette PNG (VOC colours)."""
    import io

    from PIL import Image

    from .masks import palette

    img = Image.fromarray(pred.astype(np.uint8), mode="P")
    img.putpalette(palette())
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- the runner -----------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """What :func:`run_eval` did: predictions made, per-image failures, and the metrics (when
    this process scored; ``None`` when another shard will)."""

    predicted: int
    skipped: int
    failures: dict[str, str]
    metrics: dict | None
    scored_by_this_process: bool

    @property
    def ok(self) -> bool:
        return not self.failures and (self.metrics is None or not self.metrics["failures"])


def _recipe_info(recipe: str | None, task: Task):
    """``(name, seed, applied)``: the recipe to ask the pipeline for, its noise seed, and that it
    applies."""
    name = recipe or task.name
    seed = get_recipe(name).seed  # ValueError on an unknown name
    return name, 1101 if seed is None else seed, True


def _segment(pipe, samples: list[_Sample], names: Sequence[str], recipe: str | None, seed: int, device):
    """Labels of ``samples`` (one pipeline call per image size), mapped to dataset ids:
    ``[H, W]`` uint8 numpy arrays and ``[n, n]`` per-batch confusion on the device."""
    import torch

    groups: dict[tuple, list[_Sample]] = {}
    for s in samples:
        groups.setdefault(tuple(s.image.shape), []).append(s)
    kwargs = {"recipe": recipe} if recipe is not None else {}
    kwargs["output_heatmaps"] = False  # labels only
    results = {}
    for group in groups.values():
        pixels = torch.stack([s.image for s in group]).to(device, non_blocking=True).float().div_(255)
        class_lists = [[names[c - 1] for c in s.classes] for s in group]
        generators = [torch.Generator().manual_seed(seed) for _ in group]
        out = pipe(pixels, class_lists, generator=generators, **kwargs)
        labels = out.labels
        for b, s in enumerate(group):
            lut = torch.tensor((0, *s.classes), dtype=torch.uint8, device=labels[b].device)
            results[s.index] = lut[labels[b]]
    return results, {}


def _segment_unsupervised(task: Task, first_pass: str):
    """A ``segment`` function for unsupervised tasks: ``pipe.segment_unsupervised`` on the
    512×512 crops (DiffSeg's τ of the task and the given first pass), segment ids as uint8, and
    the anchors each image's first pass dropped."""

    def segment(pipe, samples, names, recipe, seed, device):
        import torch

        pixels = torch.stack([s.image for s in samples]).to(device)
        out = pipe.segment_unsupervised(pixels, kl_threshold=task.kl_threshold, first_pass=first_pass)
        results, dropped = {}, {}
        for b, s in enumerate(samples):
            label = out.labels[b]
            if int(label.max()) > 255:
                raise ValueError(f"{int(label.max()) + 1} segments do not fit a uint8 PNG")
            results[s.index] = label.to(torch.uint8)
            dropped[s.index] = int((out.dropped_anchors or [0] * len(samples))[b])
        return results, dropped

    return segment


def run_eval(
    task: str | Task,
    root,
    out,
    *,
    pipe=None,
    load_pipe=None,
    recipe: str | None = None,
    settings: dict | None = None,
    limit: int | None = None,
    ids_file=None,
    batch_size: int = 1,
    tags=None,
    tagger_model: str | None = None,
    num_shards: int = 1,
    shard_index: int = 0,
    context_order: str | None = None,
    first_pass: str | None = None,
    overwrite: bool = False,
    workers: int = 2,
    device=None,
    progress: bool = True,
    log=print,
) -> EvalResult:
    """Segment a task's split with iSeg, write each prediction, and score the written ones.

    Args:
        task: a :data:`TASKS` name or :class:`Task`.
        root: the dataset folder (see :mod:`iseg.data.datasets` for the layouts).
        out: output folder: ``pred/<id>.png`` (palette PNG of dataset label ids), ``eval.json``
            (the settings, the resolved dataset root), ``records/`` (a checksum of every
            prediction written), ``shards/`` (per-shard completion), ``metrics.json``,
            ``metrics.md``, ``per_image.csv``.
        pipe / load_pipe: the :class:`~iseg.ISegPipeline`, or a callable returning it, called
            only when an image needs the model (a rerun that only scores loads nothing).
        recipe: the pipeline recipe (default: the task's name).
        settings: extra values recorded in ``eval.json`` that a rerun must repeat (model, dtype).
        limit: the first ``limit`` ids of the split only.
        ids_file: a list of ids instead of the paper's split (plain names; Cityscapes' are
            ``city/frame``).
        batch_size: images per pipeline call.
        tags: OVS classes: a tags file, ``"published"`` (the shipped TagCLIP tags) or ``None``
            (the built-in tagger, :func:`builtin_tagger`). A tags file whose ids are not the
            split's is an error; images it does not tag are predicted all background and
            counted in the metrics (``images_untagged``).
        num_shards, shard_index: this process predicts ``ids[shard_index::num_shards]``; the
            metric is computed by the shard that completes the set last.
        context_order: Context label order (``official``/``mmseg``; ``None`` detects it).
        first_pass: DiffSeg's first merging pass for unsupervised tasks (``fp16``, Google's, or
            ``fp32``; default the task's, ``fp16``).
        overwrite: start over in ``out`` (its predictions, records and metrics removed) when it
            holds a run with other settings.
        workers: DataLoader worker processes (0 = decode in this process).
        device: where the pixels go (default the pipeline's execution device).

    Returns:
        :class:`EvalResult`. Per-image problems (unreadable files, size mismatches, bad labels)
        are in ``failures`` and the run goes on; set-up problems raise :class:`EvalError`. A
        prediction that is missing, unreadable or not the one recorded is predicted again.
    """
    from pathlib import Path

    from .data.datasets import DatasetError, class_names, open_dataset

    task = task if isinstance(task, Task) else get_task(task)
    if not (isinstance(num_shards, int) and num_shards >= 1 and 0 <= shard_index < num_shards):
        raise EvalError(f"shard index {shard_index} must be in [0, {num_shards}) with num_shards ≥ 1")
    if task.mode == "unsupervised":
        first_pass = first_pass or task.first_pass
        if first_pass not in ("fp16", "fp32"):
            raise EvalError(f"first pass must be fp16 or fp32, got {first_pass!r}")
    ids = _task_ids(task, root, ids_file, limit)
    try:
        if task.mode == "unsupervised":  # DiffSeg + iSeg: no text recipe
            recipe_name, seed, have_recipes = f"diffseg+iseg (τ = {task.kl_threshold})", 1101, False
        else:
            recipe_name, seed, have_recipes = _recipe_info(recipe, task)
    except ValueError as exc:
        raise EvalError(str(exc)) from None
    tagger = None
    if task.mode == "ovs" and tags is None:
        tagger = builtin_tagger(task, device, tagger_model)
        if tagger is None:
            raise EvalError(
                f"{task.name}: give --tags FILE (lines 'id c1 c2 …', 0-based class indices) or "
                "--tags published (the TagCLIP tags the paper used)"
            )
    try:
        ds = open_dataset(task.dataset, root, ids[0], context_order=context_order, context_ids=ids)
    except DatasetError as exc:
        raise EvalError(str(exc)) from None
    names = class_names(task.dataset)
    tag_map, tags_id, coverage = _tags(task, tags, tagger_model, ds, ids, log)

    out = Path(out)
    pred_dir, shard_dir = out / "pred", out / "shards"
    manifest = {
        "task": task.name,
        "root": str(Path(root).expanduser().resolve()),
        "recipe": recipe_name,
        "recipes_applied": have_recipes,
        "tags": tags_id,
        "context_order": ds.order,
        **({"first_pass": first_pass} if task.mode == "unsupervised" else {}),
        "records": 1,  # predictions carry checksums in records/ (older folders have none)
        **(settings or {}),
    }
    _claim(out, manifest, overwrite)
    records = _Records(out / "records")
    known = records.load()

    ids_sha = _sha("\n".join(ids))
    mine = ids[shard_index::num_shards]
    todo = [i for i in mine if not _recorded(pred_dir / f"{i}.png", known.get(i))]
    if num_shards > 1:
        log(f"shard {shard_index + 1}/{num_shards}: {len(mine)} images, {len(mine) - len(todo)} already predicted")

    failures: dict[str, str] = {}
    predicted = skipped = 0
    if todo:
        segment = _segment_unsupervised(task, first_pass) if task.mode == "unsupervised" else _segment
        predicted, skipped, failures = _predict(
            task, ds, todo, tag_map, tagger, segment, names, recipe_name if have_recipes else None, seed,
            pipe, load_pipe, device, batch_size, workers, progress, pred_dir, records,
        )  # fmt: skip

    marker = {"ids_sha": ids_sha, "images": len(mine), "failures": failures, "finished": time.time()}
    _write_atomic(shard_dir / f"{shard_index}-of-{num_shards}.json", (json.dumps(marker, indent=1) + "\n").encode())

    # Score: always when unsharded; when sharded, the shard that finds every marker of this set.
    lock = None
    known_failures = dict(failures)
    if num_shards > 1:
        markers = []
        for i in range(num_shards):
            p = shard_dir / f"{i}-of-{num_shards}.json"
            m = _read_json(p) if p.is_file() else None
            if not isinstance(m, dict) or m.get("ids_sha") != ids_sha:
                log(f"shard {shard_index + 1}/{num_shards} done; the last shard to finish scores")
                return EvalResult(predicted, skipped, failures, None, False)
            markers.append(m)
        lock = shard_dir / f"score-{ids_sha}.lock"
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            log(f"shard {shard_index + 1}/{num_shards} done; another shard is scoring")
            return EvalResult(predicted, skipped, failures, None, False)
        known_failures = {k: v for m in markers for k, v in dict(m.get("failures") or {}).items()}
    try:
        metrics = score(
            task, ds, ids, out, workers=workers, known_failures=known_failures, settings=manifest,
            records=records.load(), untagged=coverage[0], tags_cover=coverage[1],
        )  # fmt: skip
    finally:
        if lock is not None:
            lock.unlink(missing_ok=True)
    return EvalResult(predicted, skipped, failures, metrics, True)


def _task_ids(task: Task, root, ids_file, limit) -> list[str]:
    """The ids to evaluate: ``ids_file``'s, or the task's split (Cityscapes: the frames found)."""
    from .data import data_path
    from .data.datasets import DatasetError, read_ids, split_ids

    try:
        if ids_file is not None:
            ids = read_ids(ids_file, folders=task.dataset == "cityscapes")
        elif task.dataset == "cityscapes":  # no shipped list: the val frames on disk
            from .data.datasets import cityscapes_ids

            ids = cityscapes_ids(root)
        elif task.dataset == "cocostuff27":
            ids = read_ids(data_path("diffseg", "Coco164kFull_Stuff_Coarse_7.txt"))
        else:
            ids = split_ids(task.dataset, task.split)
    except DatasetError as exc:
        raise EvalError(str(exc)) from None
    return ids[:limit] if limit is not None else ids


def _tags(task: Task, tags, tagger_model, ds, ids: Sequence[str], log):
    """``(tag map | None, what eval.json records about the tags, (untagged, coverage) | (None,
    None))`` for an OVS task. Tag ids that match no image of the split are an error (naming a
    few and the count); images without tags are counted."""
    from pathlib import Path

    from .data import data_path
    from .data.datasets import DatasetError, read_tags, split_ids

    if task.mode != "ovs":
        return None, None, (None, None)
    if tags is None:
        from .tagger import DEFAULT_TAGGER_MODEL, get_preset

        preset = get_preset(_TAGGER_PRESETS[task.dataset])
        model = tagger_model or DEFAULT_TAGGER_MODEL
        if Path(model).expanduser().exists():
            model = str(Path(model).expanduser().resolve())
        record = {"tagger": "builtin", "model": model, "preset": preset.name,
                  **{k: getattr(preset, k) for k in ("r_cwr", "w_local", "w_crop", "r_final")}}  # fmt: skip
        return None, record, (None, None)
    published = str(tags) == "published"
    path = data_path("ovs_labels", task.published_tags) if published else Path(tags)
    try:
        tag_map = read_tags(path, ds.num_classes)
    except DatasetError as exc:
        raise EvalError(str(exc)) from None
    split = set(split_ids(task.dataset, task.split)) | set(ids)
    unknown = [i for i in tag_map if i not in split]
    if unknown:
        example = next(iter(sorted(split)))
        raise EvalError(
            f"tags file {path}: {len(unknown)} of its {len(tag_map)} ids match no image of the "
            f"{task.dataset} {task.split} split (e.g. {', '.join(map(repr, unknown[:3]))}; the split's "
            f"ids look like {example!r})"
        )
    untagged = sum(1 for i in ids if i not in tag_map)
    split_size = len(split_ids(task.dataset, task.split))
    cover = f"{'published' if published else path.name} tags cover {len(tag_map)} of the {split_size} split images"
    if untagged:
        log(f"{untagged} of the {len(ids)} images have no tags: predicted all background and counted ({cover})")
    record = "published" if published else _sha(path.read_text())
    return tag_map, record, (untagged, cover)


def _read_json(path):
    """A JSON file iseg wrote, or ``None`` when it cannot be read as JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _claim(out, manifest: dict, overwrite: bool) -> None:
    """Make ``out`` this run's folder: write ``eval.json`` unless it holds these settings.
    A folder with predictions made with other settings is refused (or, with ``overwrite``,
    emptied of what iseg eval wrote); one whose earlier run wrote no prediction is simply
    taken over; a ``pred/`` that iseg eval did not write (no ``eval.json``) is never touched."""
    import shutil

    pred_dir, manifest_path = out / "pred", out / "eval.json"
    has_predictions = pred_dir.is_dir() and any(pred_dir.rglob("*.png"))
    if manifest_path.is_file():
        old = _read_json(manifest_path)
        if not isinstance(old, dict):
            raise EvalError(f"{manifest_path} is not an eval.json iseg eval wrote; use another --out")
        changed = {k: (old.get(k), v) for k, v in manifest.items() if old.get(k) != v}
        if not changed and not overwrite:
            if pred_dir.is_dir():
                remove_stale_temps(pred_dir, recursive=True)
            return
        if changed and has_predictions and not overwrite:
            what = ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in changed.items())
            raise EvalError(
                f"{out} holds predictions made with other settings ({what}); use --overwrite to start "
                "over or another --out"
            )
        for name in ("pred", "records", "shards"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("metrics.json", "metrics.md", "per_image.csv"):
            (out / name).unlink(missing_ok=True)
    elif pred_dir.exists() and any(pred_dir.iterdir()):
        raise EvalError(f"{pred_dir} holds files that iseg eval did not write (no eval.json); use another --out")
    pred_dir.mkdir(parents=True, exist_ok=True)
    (out / "shards").mkdir(exist_ok=True)
    _write_atomic(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()[:32]


def _recorded(path, known: dict | None) -> bool:
    """Whether ``path`` is a prediction this folder's records list (same checksum)."""
    if not known:
        return False
    try:
        return _digest(path.read_bytes()) in known
    except OSError:
        return False


class _Records:
    """The checksum of every prediction written: one JSON line ``{"id", "sha", "dropped"}`` per
    prediction, appended after its PNG is in place, in one file per process under ``records/``
    (shards on several machines never share a file). A line cut by a kill is ignored (its
    prediction is then predicted again)."""

    def __init__(self, folder):
        import threading

        self.folder = folder
        self.path = None
        self.lock = threading.Lock()

    def load(self) -> dict[str, dict[str, int]]:
        """``{id: {checksum: anchors dropped}}`` from every process's file."""
        known: dict[str, dict[str, int]] = {}
        if not self.folder.is_dir():
            return known
        for path in sorted(self.folder.glob("*.jsonl")):
            try:
                text = path.read_text()
            except (OSError, UnicodeDecodeError):
                continue
            for line in text.splitlines():
                try:
                    entry = json.loads(line)
                    known.setdefault(str(entry["id"]), {})[str(entry["sha"])] = int(entry.get("dropped", 0))
                except (ValueError, KeyError, TypeError):
                    continue
        return known

    def add(self, image_id: str, data: bytes, dropped: int = 0) -> None:
        line = json.dumps({"id": image_id, "sha": _digest(data), "dropped": dropped}) + "\n"
        with self.lock:
            if self.path is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                self.path = self.folder / f"{HOST}-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
            with open(self.path, "a") as f:
                f.write(line)


def _save_prediction(path, array: np.ndarray, records: _Records, image_id: str, dropped: int) -> None:
    data = _png_bytes(array)
    _write_atomic(path, data)
    records.add(image_id, data, dropped)


def _predict(task, ds, todo, tag_map, tagger, segment, names, recipe, seed, pipe, load_pipe, device,
             batch_size, workers, progress, pred_dir, records):  # fmt: skip
    """Predict ``todo`` and write each prediction (and its record); returns ``(predicted,
    skipped, failures)``."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    failures: dict[str, str] = {}
    predicted = skipped = 0
    loader = DataLoader(
        _PredictSamples(ds, todo, task.mode, tag_map), batch_size=batch_size,
        num_workers=workers, collate_fn=_collate_list, pin_memory=False,
    )  # fmt: skip
    n = ds.num_classes
    running = None
    model_failures = 0
    bar = tqdm(total=len(todo), unit="img", disable=not progress, dynamic_ncols=True, desc=task.name)
    from concurrent.futures import ThreadPoolExecutor

    writer = ThreadPoolExecutor(max_workers=2)
    pending = []
    try:
        for batch in loader:
            ready = []
            for s in batch:
                if tagger is not None and s.error is None and s.image is not None:
                    s.classes = tuple(sorted(set(tagger(s.image.permute(1, 2, 0).numpy()))))
                if s.error is not None:
                    failures[s.image_id] = s.error
                elif s.skip:
                    skipped += 1
                elif task.mode == "ovs" and not s.classes:  # untagged: all background, no model call
                    ready.append((s, torch.zeros(s.gt.shape, dtype=torch.uint8)))
                else:
                    ready.append((s, None))
            need = [s for s, p in ready if p is None]
            labels, dropped = {}, {}
            if need:
                if pipe is None:
                    pipe = load_pipe()
                    done = bar.n
                    bar.reset()  # the rate and ETA count from here, not from before the load
                    bar.update(done)
                if device is None:  # once: diffusers' _execution_device walks every module
                    device = pipe._execution_device
                try:
                    labels, dropped = segment(pipe, need, names, recipe, seed, device)
                except Exception:  # noqa: BLE001 — isolate the image that fails
                    for s in need:
                        try:
                            one, lost = segment(pipe, [s], names, recipe, seed, device)
                            labels.update(one)
                            dropped.update(lost)
                        except Exception as exc:  # noqa: BLE001
                            failures[s.image_id] = f"{ds.image_path(s.image_id)}: {type(exc).__name__}: {exc}"
                            model_failures += 1
                            if model_failures >= 3 and predicted == 0 and not labels:
                                raise EvalError(
                                    f"the model failed on the first {model_failures} images "
                                    f"(last: {type(exc).__name__}: {exc})"
                                ) from exc
            for s, pred in ready:
                pred = labels.get(s.index) if pred is None else pred
                if pred is None:
                    continue
                if task.mode == "unsupervised":
                    running = running or HungarianScores(n)
                    running.update(s.gt, pred.cpu().numpy())
                else:
                    h = confusion_matrix(s.gt, pred.cpu().numpy(), n)
                    running = h if running is None else running + h
                array = pred.cpu().numpy()
                path = pred_dir / f"{s.image_id}.png"
                pending.append(writer.submit(
                    _save_prediction, path, array, records, s.image_id, dropped.get(s.index, 0)
                ))  # fmt: skip
                predicted += 1
            while len(pending) > 16:
                pending.pop(0).result()
            bar.update(len(batch))
            if ready and running is not None:
                miou = running.miou if task.mode == "unsupervised" else scores(running).miou
                bar.set_postfix_str(f"mIoU {100 * miou:.1f}" if miou is not None else "")
        for f in pending:
            f.result()
    finally:
        for f in pending:
            f.cancel()
        writer.shutdown(wait=True)
        bar.close()
    return predicted, skipped, failures


def score(
    task: Task, ds, ids: Sequence[str], out, *, workers: int = 2, known_failures=None, settings=None,
    records: dict | None = None, untagged: int | None = None, tags_cover: str | None = None,
) -> dict:
    """Score the predictions written under ``out/pred`` for ``ids``; write ``metrics.json``,
    ``metrics.md`` and ``per_image.csv`` in ``out`` and return the metrics (percentages).

    ``records`` (id → {checksum: dropped anchors}) are what the run wrote: a prediction whose
    checksum is not among them is an error, not a score. ``untagged`` / ``tags_cover`` are the
    OVS tag coverage, reported as they are."""
    import json
    from pathlib import Path

    from torch.utils.data import DataLoader

    out = Path(out)
    n = ds.num_classes
    unsupervised = task.mode == "unsupervised"
    total = (np.zeros((3, n), np.int64), np.int64(0)) if unsupervised else np.zeros((n, n), np.int64)
    background_only = np.zeros((n, n), np.int64)
    counts = {"scored": 0, "skipped": 0, "missing": 0, "error": 0}
    failures, per_image = {}, {}
    dropped = dropped_images = 0
    loader = DataLoader(
        _ScoreSamples(ds, ids, task.mode, out / "pred", records), batch_size=32, num_workers=workers,
        collate_fn=_collate_scores,
    )  # fmt: skip
    for hist, skipped, rows in loader:
        if hist is not None:
            total = (total[0] + hist[0], total[1] + hist[1]) if unsupervised else total + hist
        if skipped is not None:
            background_only += skipped
        for image_id, status, message, row, lost in rows:
            counts[status] += 1
            if status in ("missing", "error"):
                failures[image_id] = (known_failures or {}).get(image_id, message) if status == "missing" else message
            if row is not None:
                per_image[image_id] = row
            dropped += lost
            dropped_images += lost > 0
    pct = lambda v: None if v is None else 100.0 * v  # noqa: E731
    extra = {}
    if unsupervised:
        meter = HungarianScores(n)
        (meter.tp, meter.fp, meter.fn), meter.total = total[0], int(total[1])
        present = meter.tp + meter.fn > 0
        s = SegmentationScores(
            iou=meter.iou,
            acc=tuple(float(t / (t + f)) if t + f > 0 else None for t, f in zip(meter.tp, meter.fn)),
            present=tuple(bool(v) for v in present),
            miou=meter.miou, miou_mmseg=None, pixel_acc=meter.acc, mean_acc=None, pixels=meter.total,
        )  # fmt: skip
        names = ds.class_names
        extra = {"first_pass": (settings or {}).get("first_pass"), "anchors_dropped": dropped,
                 "images_with_anchors_dropped": dropped_images}  # fmt: skip
    else:
        s = scores(total)
        names = ("background",) + ds.class_names
        # MMSegmentation sums every image's areas, background-only images included (which the
        # authors skip; iSeg, given no class, predicts them all background).
        s = dataclasses.replace(s, miou_mmseg=mmseg_miou(total + background_only))
        if task.dataset == "voc_context":
            extra = {"miou_context59": pct(mmseg_miou(total + background_only, ignore_background=True))}
    if untagged is not None:
        extra["images_untagged"] = untagged
        extra["tags_cover"] = tags_cover
    metrics = {
        "task": task.name,
        "table": task.table,
        "dataset": ds.name,
        "layout": ds.layout,
        "split": task.split,
        "images": len(ids),
        **{f"images_{k}": v for k, v in counts.items()},
        "metric": "Hungarian-matched per image (DiffSeg)" if unsupervised else "one confusion matrix (authors)",
        "miou": pct(s.miou),
        "miou_mmseg": pct(s.miou_mmseg),
        **{k: v for k, v in extra.items() if k == "miou_context59"},
        "pixel_acc": pct(s.pixel_acc),
        "mean_acc": pct(s.mean_acc),
        "paper_miou": task.paper_miou,
        "difference": None if s.miou is None else round(100.0 * s.miou - task.paper_miou, 6),
        **{k: v for k, v in extra.items() if k != "miou_context59"},
        "per_class": [
            {"id": c, "name": names[c], "iou": pct(s.iou[c]), "acc": pct(s.acc[c]), "present": s.present[c]}
            for c in range(n)
        ],
        "settings": settings or {},
        "failures": dict(sorted(failures.items())),
        "pixels": s.pixels,
    }
    _write_atomic(out / "per_image.csv", _per_image_csv(ids, per_image, names).encode())
    _write_atomic(out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    _write_atomic(out / "metrics.md", format_markdown(metrics).encode())
    return metrics


def _per_image_csv(ids: Sequence[str], rows: dict, names: Sequence[str]) -> str:
    """``id, pixel_acc, IoU of each class`` (percentages; empty where the class is neither in
    the image's ground truth nor predicted, i.e. only the present classes have a value)."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "pixel_acc", *[f"iou_{name}" for name in names]])
    fmt = lambda v: "" if v is None else f"{100.0 * v:.4f}"  # noqa: E731
    for image_id in ids:
        if image_id in rows:
            acc, ious = rows[image_id]
            writer.writerow([image_id, fmt(acc), *map(fmt, ious)])
    return buffer.getvalue()


def _fmt(v, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def format_table(metrics: dict) -> str:
    """The per-class IoU table and the summary, as plain text for the terminal."""
    width = max(len(c["name"]) for c in metrics["per_class"])
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'acc':>6}"]
    for c in metrics["per_class"]:
        mark = "" if c["present"] else "  (not in GT)"
        lines.append(f"{c['name']:<{width}}  {_fmt(c['iou']):>6}  {_fmt(c['acc']):>6}{mark}")
    diff = metrics["difference"]
    lines += [
        "",
        f"{metrics['task']}: mIoU {_fmt(metrics['miou'])} (paper {metrics['paper_miou']:.1f}, "
        f"{'–' if diff is None else f'{diff:+.2f}'})  mIoU(mmseg) {_fmt(metrics['miou_mmseg'])}  "
        f"pixAcc {_fmt(metrics['pixel_acc'])}  mAcc {_fmt(metrics['mean_acc'])}",
        f"images: {metrics['images_scored']} scored, {metrics['images_skipped']} skipped (background only), "
        f"{metrics['images_missing']} missing, {metrics['images_error']} with errors, of {metrics['images']}",
        *_notes(metrics),
    ]
    return "\n".join(lines)


def _notes(metrics: dict) -> list[str]:
    """The lines that say what else shaped the figure: Context-59, tag coverage, DiffSeg's
    dropped anchors."""
    notes = []
    if metrics.get("miou_context59") is not None:
        notes.append(f"mIoU Context-59 (MMSegmentation, background ignored): {_fmt(metrics['miou_context59'])}")
    if metrics.get("images_untagged") is not None:
        notes.append(
            f"tags: {metrics['tags_cover']}; {metrics['images_untagged']} image(s) of this run had no tags "
            "and were predicted all background (counted in the figure)"
        )
    if metrics.get("first_pass") is not None:
        notes.append(
            f"DiffSeg first pass: {metrics['first_pass']}; {metrics['anchors_dropped']} anchor(s) dropped for "
            f"fp16 underflow in {metrics['images_with_anchors_dropped']} image(s)"
        )
    return notes


_PROTOCOLS = (
    "- **mIoU (authors)**: the authors' `ShowSegmentResult`: one confusion matrix summed over the images "
    "scored (background-only images skipped in WSSS), ground truth 255 ignored, background a class, "
    "mean IoU over the classes present in the ground truth (`rowsum > 0`).",
    "- **mIoU (MMSegmentation, all images)**: MMSegmentation's `IoUMetric` on the same predictions: "
    "each image's intersect / union / prediction / label areas summed over *all* images of the run "
    "(WSSS background-only images included, predicted all background), `IoU = Σ intersect / Σ union`, "
    "NaN-mean over the classes with `union > 0` (a class only predicted counts with IoU 0).",
    "- **mIoU Context-59** (Pascal Context only): MMSegmentation's `PascalContextDataset59` "
    "(`reduce_zero_label`): ground-truth background ignored, the 59 classes averaged as above; a "
    "pixel predicted background counts in its true class's union.",
    "- **pixel accuracy / mean accuracy**: `trace / total` and the mean per-class recall over the "
    "classes present, from the authors' matrix. `per_image.csv`: each image's pixel accuracy and "
    "IoU of each class in its ground truth or prediction.",
)
_PROTOCOLS_HUNGARIAN = (
    "- **mIoU / pixel accuracy (DiffSeg)**: per image, the predicted segments are matched one-to-one "
    "to the 27 classes by `linear_sum_assignment` on the image's confusion matrix; TP, FP, FN and the "
    "pixel count are summed over the dataset; mIoU = NaN-mean of TP / (TP + FP + FN), accuracy = "
    "ΣTP / Σpixels (DiffSeg's benchmark notebook). `per_image.csv`: the same per image.",
)


def format_markdown(metrics: dict) -> str:
    """``metrics.md``: the summary beside the paper's figure, then the per-class table."""
    diff = metrics["difference"]
    hungarian = metrics.get("metric", "").startswith("Hungarian")
    miou_label = "mIoU (Hungarian-matched per image)" if hungarian else "mIoU (authors: classes in GT)"
    lines = [
        f"# iseg eval {metrics['task']} ({metrics['table']})",
        "",
        f"Recipe `{metrics['settings'].get('recipe', '?')}`, {metrics['layout']}, "
        f"{metrics['images_scored']} of {metrics['images']} images scored "
        f"({metrics['images_skipped']} background-only skipped, {metrics['images_missing']} missing, "
        f"{metrics['images_error']} errors).",
        "",
        "| metric | ours | paper | difference |",
        "|---|---:|---:|---:|",
        f"| {miou_label} | {_fmt(metrics['miou'])} | {metrics['paper_miou']:.1f} | "
        f"{'–' if diff is None else f'{diff:+.2f}'} |",
        *([] if hungarian else [f"| mIoU (MMSegmentation, all images) | {_fmt(metrics['miou_mmseg'])} | | |"]),
        *([f"| mIoU Context-59 (MMSegmentation, background ignored) | {_fmt(metrics['miou_context59'])} | | |"]
          if metrics.get("miou_context59") is not None else []),
        f"| pixel accuracy | {_fmt(metrics['pixel_acc'])} | | |",
        f"| mean accuracy | {_fmt(metrics['mean_acc'])} | | |",
        "",
        *[f"{line}." for line in _notes(metrics)[1 if metrics.get("miou_context59") is not None else 0:]],
        "",
        "## Protocols",
        "",
        *(_PROTOCOLS_HUNGARIAN if hungarian else _PROTOCOLS),
        "",
        "| id | class | IoU | acc | in GT |",
        "|---:|---|---:|---:|:---:|",
    ]
    for c in metrics["per_class"]:
        lines.append(f"| {c['id']} | {c['name']} | {_fmt(c['iou'])} | {_fmt(c['acc'])} | {'yes' if c['present'] else 'no'} |")
    if metrics["failures"]:
        lines += ["", "## Images not scored", ""]
        lines += [f"- `{k}`: {v}" for k, v in metrics["failures"].items()]
    return "\n".join(lines) + "\n"
