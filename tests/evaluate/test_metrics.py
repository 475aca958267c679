"""Tests for ``iseg.evaluate``'s metrics: the confusion matrix, the authors' and MMSegmentation's
mIoU, and DiffSeg's per-image Hungarian matching — against hand-computed matrices and against
independent plain-Python computations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iseg.evaluate import (
    HungarianScores,
    confusion_matrix,
    hungarian_match,
    hungarian_scores,
    scores,
)


def loop_confusion(gt: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    """The confusion matrix by a plain loop over pixels (the independent reference)."""
    hist = np.zeros((n, n), np.int64)
    for g, p in zip(gt.reshape(-1).tolist(), pred.reshape(-1).tolist()):
        if 0 <= g < n:
            hist[g, p] += 1
    return hist


# --- confusion matrix ------------------------------------------------------------------------


def test_confusion_matrix_by_hand():
    gt = np.array([[0, 0, 1], [2, 255, 1]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])  # the 255 pixel's prediction (2) is ignored
    expected = np.array([[1, 1, 0], [1, 1, 0], [0, 1, 0]])
    np.testing.assert_array_equal(confusion_matrix(gt, pred, 3), expected)


def test_confusion_matrix_torch_equals_numpy():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 5, (17, 23))
    gt[rng.random(gt.shape) < 0.2] = 255
    pred = rng.integers(0, 5, (17, 23))
    hist_t = confusion_matrix(torch.from_numpy(gt), torch.from_numpy(pred).to(torch.uint8), 5)
    assert isinstance(hist_t, torch.Tensor)
    np.testing.assert_array_equal(hist_t.numpy(), confusion_matrix(gt, pred, 5))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 6),
    shape=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    seed=st.integers(0, 2**31 - 1),
)
def test_confusion_matrix_matches_loop_on_random_maps(n, shape, seed):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, n, shape).astype(np.uint8)
    gt[rng.random(shape) < 0.3] = 255  # ignored
    pred = rng.integers(0, n, shape).astype(np.uint8)
    np.testing.assert_array_equal(confusion_matrix(gt, pred, n), loop_confusion(gt, pred, n))


def test_confusion_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match="shape|is"):
        confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 3), int), 2)
    with pytest.raises(ValueError, match=r"predictions must be in \[0, 2\)"):
        confusion_matrix(np.zeros((2, 2), int), np.full((2, 2), 2), 2)
    with pytest.raises(TypeError, match="integer"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 2), int), 2)
    with pytest.raises(ValueError, match="num_classes"):
        confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 2), int), 0)
    # a prediction out of range where the ground truth is ignored does not count
    assert confusion_matrix(np.array([255]), np.array([7]), 2).sum() == 0


# --- scores ------------------------------------------------------------------------------------


def test_scores_by_hand_authors_vs_mmseg():
    # 3 classes; class 2 never occurs in the GT but is predicted on one pixel.
    hist = np.array([
        [5, 1, 1],   # background: 5 right, 1 → class 1, 1 → class 2
        [2, 3, 0],   # class 1
        [0, 0, 0],   # class 2 absent from GT
    ])  # fmt: skip
    s = scores(hist)
    iou0 = 5 / (7 + 7 - 5)
    iou1 = 3 / (5 + 4 - 3)
    assert s.iou[0] == pytest.approx(iou0) and s.iou[1] == pytest.approx(iou1)
    assert s.iou[2] == 0.0  # union 1 (one false positive), intersection 0
    assert s.present == (True, True, False)
    assert s.miou == pytest.approx((iou0 + iou1) / 2)  # authors: classes present in GT
    assert s.miou_mmseg == pytest.approx((iou0 + iou1 + 0.0) / 3)  # MMSeg: union > 0
    assert s.pixel_acc == pytest.approx(8 / 12)
    assert s.mean_acc == pytest.approx((5 / 7 + 3 / 5) / 2)
    assert s.acc[2] is None and s.pixels == 12


def test_scores_equal_on_full_support_and_undefined_classes_are_none():
    hist = np.array([[4, 0, 0], [1, 2, 0], [0, 0, 0]])  # class 2 neither in GT nor predicted
    s = scores(hist)
    assert s.iou[2] is None and s.miou == s.miou_mmseg == pytest.approx((4 / 5 + 2 / 3) / 2)


def test_scores_of_empty_matrix_have_no_nan():
    s = scores(np.zeros((3, 3), np.int64))
    assert s.miou is None and s.miou_mmseg is None and s.pixel_acc is None and s.mean_acc is None
    assert s.iou == (None, None, None)


def test_scores_rejects_bad_matrix():
    with pytest.raises(ValueError, match="square"):
        scores(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="counts"):
        scores(np.array([[1, -1], [0, 1]]))


def test_split_metric_is_one_matrix_not_a_mean_of_images():
    # Two images: the split's mIoU is from the summed matrix, not the mean of per-image mIoUs.
    gt1, pred1 = np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0])
    gt2, pred2 = np.array([1, 1]), np.array([1, 1])
    total = confusion_matrix(gt1, pred1, 2) + confusion_matrix(gt2, pred2, 2)
    np.testing.assert_array_equal(total, [[3, 0], [1, 2]])
    assert scores(total).miou == pytest.approx((3 / 4 + 2 / 3) / 2)


# --- Hungarian matching ----------------------------------------------------------------------


def brute_force_match(gt: np.ndarray, pred: np.ndarray, c: int):
    """Best one-to-one class → segment assignment by enumerating permutations."""
    valid = (gt >= 0) & (gt < c)
    g, p = gt[valid], pred[valid]
    segments = max(c, int(p.max()) + 1 if p.size else 0)
    hist = loop_confusion(g, p, max(c, segments))[:c, :segments]
    best, best_cols = -1, None
    for cols in itertools.permutations(range(segments), c):
        total = sum(hist[r, k] for r, k in enumerate(cols))
        if total > best:
            best, best_cols = total, cols
    tp = np.array([hist[r, k] for r, k in enumerate(best_cols)])
    fp = np.array([hist[:, k].sum() for k in best_cols]) - tp
    fn = hist.sum(1) - tp
    return tp, fp, fn, best


def test_hungarian_by_hand_relabelled_segments():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[7, 7, 3], [3, 3, 0]])  # segments named arbitrarily
    tp, fp, fn, total = hungarian_match(gt, pred, 3)
    # best: class 0 ↔ segment 7 (2 px), class 1 ↔ segment 3 (2 px), class 2 ↔ a leftover segment
    np.testing.assert_array_equal(tp, [2, 2, 0])
    np.testing.assert_array_equal(fn, [0, 0, 1])
    assert total == 5
    assert fp[0] == 0 and fp[1] == 1  # segment 3 also covers the class-2 pixel
    meter = hungarian_scores([(gt, pred)], 3)
    assert meter.acc == pytest.approx(4 / 5)
    assert meter.miou == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)


def test_hungarian_perfect_partition_scores_one():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 4, (12, 12))
    perm = np.array([9, 2, 5, 0])  # a renaming of the classes
    meter = hungarian_scores([(gt, perm[gt])], 4)
    assert meter.acc == 1.0 and meter.miou == 1.0


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), c=st.integers(1, 3), segments=st.integers(1, 5))
def test_hungarian_matches_brute_force(seed, c, segments):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, c, (6, 7))
    gt[rng.random(gt.shape) < 0.2] = 255
    pred = rng.integers(0, segments, (6, 7))
    tp, fp, fn, total = hungarian_match(gt, pred, c)
    btp, bfp, bfn, best = brute_force_match(gt, pred, c)
    assert tp.sum() == best  # the optimum is unique in value (assignments may tie)
    assert total == int(((gt >= 0) & (gt < c)).sum())
    np.testing.assert_array_equal(tp + fn, btp + bfn)  # per-class GT pixel counts
    assert (tp + fp).sum() <= total


def test_hungarian_accumulates_over_images():
    a = (np.array([[0, 1]]), np.array([[5, 6]]))
    b = (np.array([[1, 1, 0]]), np.array([[0, 0, 0]]))
    meter = HungarianScores(2)
    for gt, pred in (a, b):
        meter.update(gt, pred)
    # image a: perfect (tp 1, 1); image b: class 1 ↔ segment 0 (2 px, fp 1), class 0 unmatched
    np.testing.assert_array_equal(meter.tp, [1, 3])
    np.testing.assert_array_equal(meter.fn, [1, 0])
    np.testing.assert_array_equal(meter.fp, [0, 1])
    assert meter.acc == pytest.approx(4 / 5) and meter.images == 2
    assert meter.miou == pytest.approx((1 / 2 + 3 / 4) / 2)


def test_hungarian_undefined_class_is_skipped_not_nan():
    meter = hungarian_scores([(np.array([0, 0]), np.array([0, 0]))], 3)
    # classes 1 and 2 are absent and take the empty leftover segments: TP + FP + FN = 0
    assert meter.iou == (1.0, None, None) and meter.miou == 1.0
    with pytest.raises(ValueError, match="segment ids"):
        hungarian_match(np.array([0]), np.array([-1]), 2)


def test_confusion_matrix_fast_path_equals_the_loop():
    """Issue 21 §4: uint8 labels take the unmasked uint16 path; it must count exactly what the
    loop counts, ignore 255 (and any gt ≥ n), accept any prediction under an ignored pixel, and
    still refuse a prediction ≥ n where the ground truth is scored."""
    rng = np.random.default_rng(3)
    for n in (2, 21, 60, 255):
        gt = rng.integers(0, n, (37, 53)).astype(np.uint8)
        gt[rng.random(gt.shape) < 0.1] = 255
        if n < 255:
            gt[0, :5] = n  # out of range: ignored like 255
        pred = rng.integers(0, n, gt.shape).astype(np.uint8)
        pred[gt >= n] = 250  # anything under ignored pixels
        np.testing.assert_array_equal(confusion_matrix(gt, pred, n), loop_confusion(gt, pred, n))
        np.testing.assert_array_equal(
            confusion_matrix(gt.astype(np.int32), np.minimum(pred, n - 1).astype(np.int64), n),
            loop_confusion(gt, np.minimum(pred, n - 1), n),
        )
    gt = np.array([[0, 1]], np.uint8)
    with pytest.raises(ValueError, match=r"predictions must be in \[0, 2\)"):
        confusion_matrix(gt, np.array([[0, 2]], np.uint8), 2)
    import torch

    t = confusion_matrix(torch.from_numpy(gt), torch.tensor([[1, 1]], dtype=torch.uint8), 2)
    assert isinstance(t, torch.Tensor) and t.tolist() == [[0, 1], [0, 1]]


def test_mmseg_miou_by_hand():
    from iseg.evaluate import mmseg_miou

    # classes 0, 1, 2: GT rows, prediction columns
    hist = np.array([[4, 1, 0], [2, 3, 0], [0, 0, 0]])
    # IoU0 = 4 / (5 + 6 − 4) = 4/7, IoU1 = 3 / (5 + 4 − 3) = 1/2, class 2: no union (left out)
    assert mmseg_miou(hist) == pytest.approx((4 / 7 + 1 / 2) / 2)
    # background ignored: only GT row 1, prediction of background counts in its union only
    assert mmseg_miou(hist, ignore_background=True) == pytest.approx(3 / (5 + 3 - 3))
