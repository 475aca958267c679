"""Ent-Self's upper clamp ``t_max`` (the interactive recipe clamps T to [0, 1], METHOD §5): both
backends against a float64 oracle and the reference, a hand-computed 3×3 case, hypothesis
properties, and validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _compare import DTYPE_IDS, DTYPES, TOLERANCES, assert_close, tolerance
from _oracle import F64, clamp_emptied, local_attn, minmax64, rand_cross, softmax_attn
from _strategies import LAMS, attention, cross_maps
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import iseg_ops
from iseg_ops import reference


def ent_self64(attn: torch.Tensor, lam: float, t_max: float) -> torch.Tensor:
    """METHOD §2 with T clamped to [0, t_max] after Eq. 7, in float64 (written independently of
    iseg_ops): the fallback to lam = 0 for a row that the clamp at 0 empties is unchanged."""
    s = attn.to(F64)
    col_max = s.max(dim=-2, keepdim=True).values
    t0 = torch.where(col_max > 0, s / torch.where(col_max > 0, col_max, 1.0), 0.0)
    positive = t0 > 0
    log_t0 = torch.log(torch.where(positive, t0, 1.0))
    t = torch.where(positive, t0 + lam * (1.0 + log_t0), 0.0).clamp(0.0, t_max)
    rows, rows0 = t.sum(-1, keepdim=True), t0.sum(-1, keepdim=True)
    p = t / torch.where(rows > 0, rows, 1.0)
    p0 = t0 / torch.where(rows0 > 0, rows0, 1.0)
    return torch.where(rows > 0, p, p0)


def refine64(attn, cross, iters, lam, t_max):
    """METHOD §3 literally (per-iteration sum normalisation) with the clamped P, float64."""
    p = ent_self64(attn, lam, t_max)

    def normalise(c):
        c = c - c.min(dim=-2, keepdim=True).values
        total = c.sum(dim=-2, keepdim=True)
        return torch.where(total > 0, c / torch.where(total > 0, total, 1.0), 0.0)

    c = normalise(cross.to(F64))
    for _ in range(iters):
        c = normalise(p @ c)
    return minmax64(c)


def relative_span(attn, cross, iters, lam, t_max):
    """Per column of Pᴺ C₀: (max − min) / max|·|; small values make min-max ill-conditioned."""
    p = ent_self64(attn, lam, t_max)
    c = cross.to(F64)
    for _ in range(iters):
        c = p @ c
    span = c.max(dim=-2).values - c.min(dim=-2).values
    return span / c.abs().max(dim=-2).values.clamp_min(1e-300)


# ----------------------------------------------------------------------------------------------
# Kernels vs oracle and reference

ENT_SELF_CASES = {
    # 12×12, HW not a power of two; the interactive recipe's values.
    "1x144x144-lam0.0434-t1": ((1, 144, 144), 0.0434294, 1.0),
    # batch > 1, a clamp below many entries of T.
    "3x64x64-lam0.1-t0.3": ((3, 64, 64), 0.1, 0.3),
    # unbatched; t_max above 1 + lam: no effect.
    "100x100-lam0.01-t2": ((100, 100), 0.01, 2.0),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(ENT_SELF_CASES))
def test_ent_self_t_max_matches_oracle_and_reference(backend, case, dtype):
    shape, lam, t_max = ENT_SELF_CASES[case]
    attn = softmax_attn(shape, seed=len(shape), dtype=dtype, device=backend.device)
    out = iseg_ops.ent_self(attn, lam, t_max=t_max)
    assert out.shape == attn.shape and out.dtype == dtype and out.device == attn.device
    assert_close(out, ent_self64(attn, lam, t_max), **tolerance(dtype), msg=f"{case} vs float64")
    if backend.name == "triton":
        expected = reference.ent_self(attn.cpu(), lam, t_max)
        assert_close(out, expected, **tolerance(dtype), msg=f"{case} vs reference")


REFINE_CASES = {
    # The interactive recipe on 12×12 local attention, one one-hot column and two random ones.
    "local-12x12-N4-t1": (lambda dt, dev: local_attn(1, 12, dtype=dt, device=dev), 3, 4,
                          0.0434294, 1.0),
    # batch 2, K = 20 (KP = 32: the normalise kernel between products), a low clamp.
    "2x64x64-K20-t0.5": (lambda dt, dev: softmax_attn((2, 64, 64), seed=5, dtype=dt, device=dev),
                         20, 2, 0.1, 0.5),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(REFINE_CASES))
def test_refine_t_max_matches_oracle_and_reference(backend, case, dtype):
    make_attn, k, iters, lam, t_max = REFINE_CASES[case]
    attn = make_attn(dtype, backend.device)
    hw = attn.shape[-1]
    cross = rand_cross((attn.shape[0], hw, k), dtype=dtype, device=backend.device)
    cross[:, :, 0] = 0
    cross[:, hw // 3, 0] = 1  # a click: one-hot initial map
    assert relative_span(attn, cross, iters, lam, t_max).min() > 1e-2  # well conditioned
    out = iseg_ops.refine(attn, cross, iters=iters, lam=lam, t_max=t_max)
    assert out.shape == cross.shape and out.dtype == dtype
    expected = refine64(attn, cross, iters, lam, t_max)
    assert_close(out, expected, **tolerance(dtype), msg=f"{case} vs float64")
    if backend.name == "triton":
        expected = reference.refine(attn.cpu(), cross.cpu(), iters, lam, t_max)
        assert_close(out, expected, **tolerance(dtype), msg=f"{case} vs reference")


# ----------------------------------------------------------------------------------------------
# By hand

# Column maxima are all 0.5, so T0 = S / 0.5 = [[1, 1, 0], [0.5, 1, 0.5], [0, 1, 1]].
HAND_S = torch.tensor([[0.5, 0.5, 0.0], [0.25, 0.5, 0.25], [0.0, 0.5, 0.5]])
LAM = 0.1
# Eq. 7 at T0 = 0.5: 0.5 + 0.1 (1 + ln 0.5) = 0.5 + 0.1 · 0.30685282 = 0.53068528.
A = 0.5 + LAM * (1.0 - math.log(2.0))
# At T0 = 1: 1 + lam = 1.1.


def test_hand_3x3_t_max_1(backend):
    # t_max = 1: every 1.1 becomes 1. Row 0: [1, 1, 0] / 2; row 1: [a, 1, a] / (1 + 2a).
    expected = torch.tensor(
        [[0.5, 0.5, 0.0], [A / (1 + 2 * A), 1 / (1 + 2 * A), A / (1 + 2 * A)], [0.0, 0.5, 0.5]],
        dtype=F64,
    )
    s = HAND_S.to(backend.device)
    assert_close(iseg_ops.ent_self(s, LAM, t_max=1.0), expected, atol=1e-6, rtol=1e-6)
    # Without t_max row 1 is [a, 1.1, a] / (1.1 + 2a): the clamp changes the result.
    unclamped = torch.tensor([A, 1.1, A], dtype=F64) / (1.1 + 2 * A)
    assert_close(iseg_ops.ent_self(s, LAM)[1], unclamped, atol=1e-6, rtol=1e-6)
    assert abs(float(unclamped[1]) - float(expected[1, 1])) > 1e-2


def test_hand_3x3_t_max_below_every_entry(backend):
    # t_max = 0.52 < a < 1.1: every positive T becomes 0.52, so each row is uniform on its
    # support: rows 0 and 2 as before, row 1 = [1, 1, 1] / 3.
    expected = torch.tensor([[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.0, 0.5, 0.5]], dtype=F64)
    out = iseg_ops.ent_self(HAND_S.to(backend.device), LAM, t_max=0.52)
    assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_hand_3x3_refine_one_click(backend):
    # C₀ = one-hot at pixel 0 (sum-normalised: unchanged). One iteration with the t_max = 1 P:
    # P C = [0.5, a / (1 + 2a), 0]; min 0; min-max: [1, 2a / (1 + 2a), 0].
    s = HAND_S.to(backend.device)
    cross = torch.tensor([[1.0], [0.0], [0.0]], device=backend.device)
    expected = torch.tensor([[1.0], [2 * A / (1 + 2 * A)], [0.0]], dtype=F64)
    out = iseg_ops.refine(s, cross, iters=1, lam=LAM, t_max=1.0)
    assert_close(out, expected, atol=1e-6, rtol=1e-6)
    # Unclamped: P C = [0.5, a / (1.1 + 2a), 0] → [1, 2a / (1.1 + 2a), 0].
    out = iseg_ops.refine(s, cross, iters=1, lam=LAM)
    assert_close(out, torch.tensor([[1.0], [2 * A / (1.1 + 2 * A)], [0.0]], dtype=F64),
                 atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("lam", [0.5, 5.0])
def test_clamp_emptied_row_still_falls_back(backend, lam):
    # The clamp at 0 empties row 0 (see _oracle.clamp_emptied); t_max does not change that
    # fallback (T0 itself), and on the other rows T = 1 + lam is clamped to 1.
    n = 16
    attn = clamp_emptied(n).float().to(backend.device)
    out = iseg_ops.ent_self(attn, lam, t_max=1.0)
    expected = torch.eye(n, dtype=F64)
    expected[0] = torch.tensor([2.0, 2.0] + [1.0] * (n - 2), dtype=F64) / (n + 2)
    expected[1, :2] = 0.5
    assert_close(out, expected, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Hypothesis properties

PROPERTY = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
T_MAXES = st.one_of(st.sampled_from([1.0, 0.5, 1e-3, 2.0]), st.floats(1e-3, 3.0))


def _check_ent_self(attn64, lam, t_max, dtype, device):
    attn = attn64.to(device=device, dtype=dtype)
    p = iseg_ops.ent_self(attn, lam, t_max=t_max).cpu()
    p64 = p.to(F64)
    assert torch.isfinite(p64).all() and (p64 >= 0).all() and (p64 <= 1).all()
    rows = p64.sum(-1)
    assert_close(rows, torch.ones_like(rows), atol=2 * TOLERANCES[dtype][0], rtol=0,
                 msg="row sums")
    assert_close(p, ent_self64(attn.cpu(), lam, t_max), **tolerance(dtype), msg="vs float64")


@settings(max_examples=120, **PROPERTY)
@given(attn=attention(max_hw=24), lam=LAMS, t_max=T_MAXES, dtype=st.sampled_from(DTYPES))
def test_reference_ent_self_properties(attn, lam, t_max, dtype):
    _check_ent_self(attn, lam, t_max, dtype, "cpu")


@settings(max_examples=20, **PROPERTY)
@given(attn=attention(max_hw=32), lam=LAMS, t_max=T_MAXES, dtype=st.sampled_from(DTYPES))
def test_triton_ent_self_properties(triton_backend, attn, lam, t_max, dtype):
    _check_ent_self(attn, lam, t_max, dtype, triton_backend.device)


def _check_no_op_above_1_plus_lam(attn64, cross64, lam, extra, device):
    # T0 ≤ 1 and T0 + lam (1 + ln T0) ≤ 1 + lam on (0, 1]: a clamp above 1 + lam changes
    # nothing, bit for bit (0.1 % above it, a margin for fp32 rounding of T).
    attn, cross = attn64.float().to(device), cross64.float().to(device)
    t_max = (1.0 + lam) * 1.001 + extra
    assert torch.equal(iseg_ops.ent_self(attn, lam, t_max=t_max), iseg_ops.ent_self(attn, lam))
    assert torch.equal(iseg_ops.refine(attn, cross, 2, lam, t_max=t_max),
                       iseg_ops.refine(attn, cross, 2, lam))


@st.composite
def attn_and_cross(draw, max_hw):
    attn = draw(attention(max_hw=max_hw))
    return attn, draw(cross_maps(attn.shape[0], attn.shape[-1]))


@settings(max_examples=60, **PROPERTY)
@given(inputs=attn_and_cross(24), lam=LAMS, extra=st.floats(0.0, 10.0))
def test_reference_t_max_above_1_plus_lam_is_a_no_op(inputs, lam, extra):
    _check_no_op_above_1_plus_lam(*inputs, lam, extra, "cpu")


@settings(max_examples=6, **PROPERTY)
@given(inputs=attn_and_cross(32), lam=LAMS, extra=st.floats(0.0, 10.0))
def test_triton_t_max_above_1_plus_lam_is_a_no_op(triton_backend, inputs, lam, extra):
    _check_no_op_above_1_plus_lam(*inputs, lam, extra, triton_backend.device)


def _check_fused_equals_precomputed(attn64, cross64, lam, t_max, iters, device):
    attn, cross = attn64.float().to(device), cross64.float().to(device)
    fused = iseg_ops.refine(attn, cross, iters, lam, t_max=t_max)
    assert torch.isfinite(fused).all() and ((fused >= 0) & (fused <= 1)).all()
    separate = iseg_ops.refine(iseg_ops.ent_self(attn, lam, t_max=t_max), cross, iters, None)
    # The oracle gets the fp32 inputs (an fp32 cast can flush tiny entries of S to 0).
    attn_cpu, cross_cpu = attn.cpu(), cross.cpu()
    span = relative_span(attn_cpu, cross_cpu, iters, lam, t_max)
    good = span >= 1e-2
    assert_close(fused.transpose(-1, -2)[good], separate.transpose(-1, -2)[good],
                 atol=1e-4, rtol=1e-4, msg="refine(S, lam, t_max) vs refine(ent_self(...))")
    expected = refine64(attn_cpu, cross_cpu, iters, lam, t_max)
    # The min-max output's error grows as the column's relative span shrinks: atol widened by
    # 1/√span (at most 10×), as in test_refine's properties (hypothesis found 2.1e-4 in fp32
    # at lam = 3.3, t_max = 0.001, N = 1).
    if good.any():
        assert_close(fused.transpose(-1, -2)[good], expected.transpose(-1, -2)[good],
                     atol=1e-4 / float(span[good].min()) ** 0.5, rtol=1e-4, msg="vs float64")


@settings(max_examples=60, **PROPERTY)
@given(inputs=attn_and_cross(24), lam=LAMS, t_max=T_MAXES, iters=st.integers(1, 6))
def test_reference_fused_t_max_equals_precomputed(inputs, lam, t_max, iters):
    _check_fused_equals_precomputed(*inputs, lam, t_max, iters, "cpu")


@settings(max_examples=10, **PROPERTY)
@given(inputs=attn_and_cross(32), lam=LAMS, t_max=T_MAXES, iters=st.integers(1, 3))
def test_triton_fused_t_max_equals_precomputed(triton_backend, inputs, lam, t_max, iters):
    _check_fused_equals_precomputed(*inputs, lam, t_max, iters, triton_backend.device)


# ----------------------------------------------------------------------------------------------
# Validation

S = torch.softmax(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)), -1)
C = torch.rand(16, 2, generator=torch.Generator().manual_seed(1))
BAD_T_MAX = [
    pytest.param(0.0, ValueError, id="zero"),
    pytest.param(-1.0, ValueError, id="negative"),
    pytest.param(float("inf"), ValueError, id="inf"),
    pytest.param(float("nan"), ValueError, id="nan"),
    pytest.param(1e39, ValueError, id="beyond-float32"),
    pytest.param(np.bool_(True), TypeError, id="numpy-bool"),
    pytest.param(True, TypeError, id="bool"),
    pytest.param("1", TypeError, id="str"),
    pytest.param(torch.tensor(1.0), TypeError, id="tensor"),
]


@pytest.mark.parametrize(("t_max", "error"), BAD_T_MAX)
def test_bad_t_max(t_max, error, monkeypatch):
    def started(*args, **kwargs):
        raise AssertionError("work started before validation")

    monkeypatch.setattr(reference, "ent_self", started)
    monkeypatch.setattr(reference, "refine", started)
    with pytest.raises(error, match=r"ent_self: t_max"):
        iseg_ops.ent_self(S, 0.01, t_max=t_max)
    with pytest.raises(error, match=r"refine: t_max"):
        iseg_ops.refine(S, C, 2, 0.01, t_max=t_max)


def test_t_max_needs_lam():
    with pytest.raises(ValueError, match=r"refine: t_max .*needs lam"):
        iseg_ops.refine(S, C, 2, None, t_max=1.0)
    with pytest.raises(TypeError, match=r"ent_self: lam"):  # lam's own check comes first
        iseg_ops.ent_self(S, None, t_max=1.0)


def test_int_and_numpy_t_max_are_accepted():
    assert torch.equal(iseg_ops.ent_self(S, 0.1, t_max=1), iseg_ops.ent_self(S, 0.1, t_max=1.0))
    assert torch.equal(iseg_ops.ent_self(S, 0.1, t_max=np.float32(0.5)),
                       iseg_ops.ent_self(S, 0.1, t_max=0.5))
    assert torch.equal(iseg_ops.refine(S, C, 2, 0.1, t_max=1), reference.refine(S, C, 2, 0.1, 1.0))
