"""The reference (and both backends) against cases computed by hand, step by step as METHOD §2–3
say, with plain Python arithmetic on literals: no tensor code produces an expected value here."""

from __future__ import annotations

import math

import pytest
import torch
from _compare import assert_close

import iseg_ops
from iseg_ops import reference

# Rows sum to 1. Column maxima 0.5, 0.68, 0.6 come from three different rows, and S[1][0] is so
# small that Eq. 7 makes it negative, so the clamp is exercised.
S = [
    [0.50, 0.30, 0.20],
    [0.02, 0.68, 0.30],
    [0.20, 0.20, 0.60],
]
LAM = 0.1  # large enough that Eq. 7 visibly changes every entry


def ent_self_by_hand(s: list[list[float]], lam: float) -> list[list[float]]:
    n = len(s)
    col_max = [max(s[q][k] for q in range(n)) for k in range(n)]
    assert col_max == [0.50, 0.68, 0.60]
    t = [[s[q][k] / col_max[k] for k in range(n)] for q in range(n)]
    # Eq. 7 where T > 0 (every entry here), natural log, then clamp at 0.
    t = [[x + lam * (1.0 + math.log(x)) if x > 0 else 0.0 for x in row] for row in t]
    t = [[max(x, 0.0) for x in row] for row in t]
    return [[x / sum(row) for x in row] for row in t]


def test_ent_self_hand_case_intermediate_values():
    # The hand computation itself, spelled out for the entry the clamp removes and a regular one.
    t10 = 0.02 / 0.50  # = 0.04
    assert t10 + LAM * (1 + math.log(t10)) == pytest.approx(0.04 + 0.1 * (1 - 3.2188758), abs=1e-7)
    assert t10 + LAM * (1 + math.log(t10)) < 0  # → clamped to 0
    t01 = 0.30 / 0.68
    expected = 0.4411765 + 0.1 * (1 - 0.8183103)  # 0.30/0.68, ln(0.30/0.68) = -0.8183103
    assert t01 + LAM * (1 + math.log(t01)) == pytest.approx(expected, abs=1e-6)
    p = ent_self_by_hand(S, LAM)
    assert p[1][0] == 0.0
    # Row 1 after the clamp: T = [0, 1 + 0.1, 0.5 + 0.1·(1 + ln 0.5)] = [0, 1.1, 0.5306853].
    assert p[1][1] == pytest.approx(1.1 / (1.1 + 0.5306853), rel=1e-6)


@pytest.mark.parametrize("lam", [LAM, 0.0], ids=["lam=0.1", "lam=0"])
def test_reference_ent_self_3x3_by_hand(lam):
    expected = torch.tensor(ent_self_by_hand(S, lam), dtype=torch.float64)
    actual = reference.ent_self(torch.tensor(S, dtype=torch.float32), lam)
    assert actual.dtype == torch.float32
    assert_close(actual, expected, atol=1e-7, rtol=1e-6)


def test_ent_self_lam_0_is_not_the_identity():
    # lam = 0 still rescales by the column maxima and renormalises the rows (METHOD §2).
    p = ent_self_by_hand(S, 0.0)
    row0 = [1.0, 0.30 / 0.68, 0.20 / 0.60]
    assert p[0][1] == pytest.approx(row0[1] / sum(row0))
    assert abs(p[0][1] - S[0][1]) > 0.01
    actual = reference.ent_self(torch.tensor(S, dtype=torch.float32), 0.0)
    assert float(actual[0, 1]) == pytest.approx(row0[1] / sum(row0), rel=1e-6)


def test_public_ent_self_3x3_by_hand(backend):
    expected = torch.tensor(ent_self_by_hand(S, LAM), dtype=torch.float64)
    attn = torch.tensor(S, dtype=torch.float32, device=backend.device)
    assert_close(iseg_ops.ent_self(attn, LAM), expected, atol=1e-6, rtol=1e-5)


def _normalise(c: list[float]) -> list[float]:
    lo = min(c)
    total = sum(x - lo for x in c)
    return [(x - lo) / total if total > 0 else 0.0 for x in c]


def _minmax(c: list[float]) -> list[float]:
    lo, hi = min(c), max(c)
    return [(x - lo) / (hi - lo) if hi > lo else 0.0 for x in c]


def test_refine_naive_one_and_two_iterations_by_hand():
    # lam=None: P = S as given. C₀ has a one-hot column and a constant column.
    c0 = [1.0, 0.0, 0.0]
    c = _normalise(c0)  # min 0, sum 1 → unchanged
    assert c == [1.0, 0.0, 0.0]
    # Iteration 1: y = S c, written out.
    y1 = [
        0.50 * 1.0 + 0.30 * 0.0 + 0.20 * 0.0,  # 0.50
        0.02 * 1.0 + 0.68 * 0.0 + 0.30 * 0.0,  # 0.02
        0.20 * 1.0 + 0.20 * 0.0 + 0.60 * 0.0,  # 0.20
    ]
    one_iter = _minmax(_normalise(y1))
    assert one_iter == pytest.approx([1.0, 0.0, 0.18 / 0.48])  # (y - 0.02) / (0.50 - 0.02)
    # Iteration 2: normalise y1 (min 0.02, sum of (y - 0.02) = 0.48 + 0 + 0.18 = 0.66), multiply.
    c1 = [0.48 / 0.66, 0.0, 0.18 / 0.66]
    assert _normalise(y1) == pytest.approx(c1)
    y2 = [
        0.50 * c1[0] + 0.30 * c1[1] + 0.20 * c1[2],
        0.02 * c1[0] + 0.68 * c1[1] + 0.30 * c1[2],
        0.20 * c1[0] + 0.20 * c1[1] + 0.60 * c1[2],
    ]
    two_iter = _minmax(y2)

    attn = torch.tensor(S)
    cross = torch.tensor([[1.0, 0.7], [0.0, 0.7], [0.0, 0.7]])  # column 1 is constant
    for iters, expected_col in ((1, one_iter), (2, two_iter)):
        expected = torch.tensor([[v, 0.0] for v in expected_col], dtype=torch.float64)
        assert_close(reference.refine(attn, cross, iters, None), expected, atol=1e-6, rtol=1e-5)


def test_refine_with_ent_self_one_iteration_by_hand():
    p = ent_self_by_hand(S, LAM)
    c0 = [0.2, 0.9, 0.4]
    c = _normalise(c0)  # [0, 0.7, 0.2] / 0.9
    assert c == pytest.approx([0.0, 0.7 / 0.9, 0.2 / 0.9])
    y = [p[i][0] * c[0] + p[i][1] * c[1] + p[i][2] * c[2] for i in range(3)]
    expected = torch.tensor(_minmax(y), dtype=torch.float64)[:, None]
    actual = reference.refine(torch.tensor(S), torch.tensor(c0)[:, None], 1, LAM)
    assert_close(actual, expected, atol=1e-6, rtol=1e-5)


def test_public_refine_by_hand(backend):
    p = ent_self_by_hand(S, LAM)
    c0 = [0.2, 0.9, 0.4]
    c = _normalise(c0)
    y1 = [sum(p[i][j] * c[j] for j in range(3)) for i in range(3)]
    c = _normalise(y1)
    y2 = [sum(p[i][j] * c[j] for j in range(3)) for i in range(3)]
    expected = torch.tensor([[v] for v in _minmax(y2)], dtype=torch.float64)
    attn = torch.tensor(S, device=backend.device)
    cross = torch.tensor(c0, device=backend.device)[:, None]
    assert_close(iseg_ops.refine(attn, cross, iters=2, lam=LAM), expected, atol=1e-6, rtol=1e-5)


# Two heads, Lq = Lk = 2, D = 2; default scale 1/√2.
Q = [[[1.0, 0.0], [0.0, 2.0]], [[0.5, -1.0], [1.0, 1.0]]]
K = [[[1.0, 1.0], [-1.0, 0.5]], [[0.0, 1.0], [2.0, 0.0]]]


def head_mean_by_hand(q, k, scale):
    out = [[0.0, 0.0], [0.0, 0.0]]
    for h in range(2):
        for i in range(2):
            logits = [scale * (q[h][i][0] * k[h][j][0] + q[h][i][1] * k[h][j][1]) for j in range(2)]
            e = [math.exp(x) for x in logits]
            for j in range(2):
                out[i][j] += e[j] / (e[0] + e[1]) / 2
    return out


def test_head_mean_hand_case_first_entry():
    # Head 0, query 0: logits (1·1 + 0·1)/√2 and (1·(-1) + 0·0.5)/√2 = a and -a.
    a = 1 / math.sqrt(2)
    h0 = math.exp(a) / (math.exp(a) + math.exp(-a))
    # Head 1, query 0: logits (0.5·0 - 1·1)/√2 and (0.5·2 - 1·0)/√2 = -a and a.
    h1 = math.exp(-a) / (math.exp(-a) + math.exp(a))
    assert head_mean_by_hand(Q, K, a)[0][0] == pytest.approx((h0 + h1) / 2)
    assert (h0 + h1) / 2 == pytest.approx(0.5)  # the two heads disagree symmetrically


@pytest.mark.parametrize("scale", [None, 0.3])
def test_reference_head_mean_2x2_by_hand(scale):
    expected = torch.tensor(
        head_mean_by_hand(Q, K, 2**-0.5 if scale is None else scale), dtype=torch.float64
    )
    actual = reference.head_mean_attention(torch.tensor(Q), torch.tensor(K), scale)
    assert_close(actual, expected, atol=1e-7, rtol=1e-6)


def test_public_head_mean_2x2_by_hand(backend):
    expected = torch.tensor(head_mean_by_hand(Q, K, 2**-0.5), dtype=torch.float64)
    q = torch.tensor(Q, device=backend.device)
    k = torch.tensor(K, device=backend.device)
    assert_close(iseg_ops.head_mean_attention(q, k), expected, atol=1e-6, rtol=1e-5)
