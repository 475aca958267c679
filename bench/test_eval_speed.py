"""Scoring speed of ``iseg eval``: the confusion matrix of 500 VOC-sized label pairs.

Providers side by side (issue 21 §4: scoring at least as fast as a plain numpy ``bincount`` of
the decoded arrays):

* ``plain-bincount``: the usual FCN-style count, ``mask = gt < n``,
  ``bincount(n · gt[mask].astype(int) + pred[mask], minlength=n²)``;
* ``confusion_matrix``: :func:`iseg.evaluate.confusion_matrix` (no mask, ``gt · n + pred`` in
  uint16, one ``bincount``);
* ``hungarian``: :func:`iseg.evaluate.hungarian_match` on the same pairs (27 classes; the
  unsupervised tasks' per-image cost, assignment included).

Pairs: 500 × (375 × 500) uint8, 21 classes with a 255 border, as VOC's decoded PNGs. Record with

    pytest bench/test_eval_speed.py --benchmark-json bench/results/<machine>-eval-speed.json
"""

from __future__ import annotations

import platform

import numpy as np
import pytest

from iseg.evaluate import confusion_matrix, hungarian_match

N = 21
PAIRS = 500
SHAPE = (375, 500)


@pytest.fixture(scope="module")
def pairs():
    rng = np.random.default_rng(0)
    out = []
    for _ in range(PAIRS):
        gt = rng.integers(0, N, SHAPE, dtype=np.uint8)
        gt[:3] = 255
        pred = np.where(rng.random(SHAPE) < 0.7, gt % N, rng.integers(0, N, SHAPE)).astype(np.uint8)
        out.append((gt, pred))
    return out


def plain_bincount(gt, pred, n):
    mask = gt < n
    return np.bincount(n * gt[mask].astype(int) + pred[mask], minlength=n * n).reshape(n, n)


@pytest.mark.parametrize("provider", ["plain-bincount", "confusion_matrix", "hungarian"])
def test_scoring_speed(benchmark, pairs, provider):
    def run():
        if provider == "hungarian":
            return [hungarian_match(gt, pred, 27) for gt, pred in pairs]
        fn = plain_bincount if provider == "plain-bincount" else confusion_matrix
        total = np.zeros((N, N), np.int64)
        for gt, pred in pairs:
            total += fn(gt, pred, N)
        return total

    out = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    if provider == "confusion_matrix":  # the same matrices as the plain count
        for gt, pred in pairs[:10]:
            np.testing.assert_array_equal(confusion_matrix(gt, pred, N), plain_bincount(gt, pred, N))
    assert out is not None
    benchmark.extra_info.update(
        provider=provider,
        pairs=PAIRS,
        shape=f"{SHAPE[0]}x{SHAPE[1]} uint8",
        s_per_pair=benchmark.stats.stats.median / PAIRS,
        machine=f"cpu ({platform.processor() or 'unknown'})",
        numpy=np.__version__,
    )
