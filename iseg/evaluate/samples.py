"""Per-image work of an evaluation, run in DataLoader workers: reading images, ground truth and
saved predictions, and the per-image confusion rows of scoring."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.datasets import LabelError, center_crop_resize, read_image
from .metrics import confusion_matrix, hungarian_match

# --- per-image work (DataLoader workers) ----------------------------------------------------


@dataclass
class Sample:
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


class PredictSamples:
    """Map-style dataset for the DataLoader: decode one image and its label, choose classes."""
    def __init__(self, ds, ids: Sequence[str], mode: str, tags: dict | None):
        self.ds, self.ids, self.mode, self.tags = ds, list(ids), mode, tags

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Sample:
        image_id = self.ids[index]
        sample = Sample(index, image_id)
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

    h, w = gt.shape
    c = min(h, w)
    top, left = (h - c) // 2, (w - c) // 2
    crop = torch.from_numpy(np.array(gt[top : top + c, left : left + c]))[None, None].float()
    size = (UNSUPERVISED_SIZE, UNSUPERVISED_SIZE)
    return F.interpolate(crop, size=size, mode="nearest-exact")[0, 0].to(torch.uint8).numpy()


def collate_list(batch):
    return batch


def _read_prediction(path, data: bytes, shape, num_classes: int) -> np.ndarray:
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


class ScoreSamples:
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
            checksum = digest(data)
            if checksum not in known:
                message = f"{path}: not the prediction iseg eval wrote (changed since); the next run predicts it again"
                return image_id, "error", None, message, None, 0
            dropped = known[checksum]
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


def collate_scores(batch):
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


def digest(data: bytes) -> str:
    """The checksum of a prediction file's bytes that eval's records keep."""
    return hashlib.sha256(data).hexdigest()[:32]
