"""Scoring segmentations as the papers do: the authors' mIoU, MMSegmentation's, and DiffSeg's
per-image Hungarian matching.

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

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

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
    # On the CPU numpy's bincount is ~10× faster than torch's.
    if hasattr(gt, "detach") and hasattr(pred, "detach") and gt.device.type == "cpu" and pred.device.type == "cpu":
        if gt.is_floating_point() or pred.is_floating_point():
            raise TypeError("confusion_matrix: gt and pred must hold integer labels")
        return torch.from_numpy(confusion_matrix(gt.detach().numpy(), pred.detach().numpy(), n))
    if hasattr(gt, "detach") and hasattr(pred, "detach"):
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
