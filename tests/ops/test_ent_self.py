"""ent_self on both backends against the float64 oracle of METHOD §2 and the reference, plus
hypothesis properties (row-stochastic, [0, 1], equivariance, degenerate columns, NaN-free)."""

from __future__ import annotations

import math

import pytest
import torch
from _compare import DTYPE_IDS, DTYPES, TOLERANCES, assert_close, tolerance
from _oracle import (
    F64,
    clamp_emptied,
    ent_self64,
    local_attn,
    mT_attn,
    softmax_attn,
    strided_attn,
    subnormal_column,
    transposed_back,
)
from _strategies import LAMS, attention
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import iseg_ops
from iseg_ops import reference

# Each case builds an attention [..., HW, HW] in the requested dtype on the requested device.
CASES = {
    # 12×12: HW not a power of two, so the last row block (16) and column tile (128) are partial.
    "1x144x144": lambda dt, dev: softmax_attn((1, 144, 144), dtype=dt, device=dev),
    # batch > 1: each matrix has its own column maxima.
    "3x64x64": lambda dt, dev: softmax_attn((3, 64, 64), seed=1, dtype=dt, device=dev),
    # Unbatched [HW, HW] (10×10).
    "100x100": lambda dt, dev: softmax_attn((100, 100), seed=2, dtype=dt, device=dev),
    # A >3-dim leading shape [2, 2, HW, HW] (6×6).
    "2x2x36x36": lambda dt, dev: softmax_attn((2, 2, 36, 36), seed=3, dtype=dt, device=dev),
    # Column-major strides (transposed, then transposed back as a view).
    "transposed-back": lambda dt, dev: transposed_back(
        softmax_attn((2, 80, 80), seed=4, dtype=dt, device=dev)
    ),
    # big[:, ::2, ::2], renormalised in place: row and column strides ≠ (HW, 1).
    "strided-slice": lambda dt, dev: strided_attn(1, 72, seed=5, dtype=dt, device=dev),
    # .mT of a contiguous tensor whose columns sum to 1.
    "mT": lambda dt, dev: mT_attn((2, 48, 48), seed=6, dtype=dt, device=dev),
    # 16×16: HW a multiple of every tile (EVEN: the unmasked loads and stores).
    "1x256x256": lambda dt, dev: softmax_attn((1, 256, 256), seed=8, dtype=dt, device=dev),
    # 24×24: the column pass walks 4½ blocks of 128 rows, the transform 4½ tiles of 128 columns
    # (larger than the other interpreter cases for that reason: ~1 s each).
    "1x576x576": lambda dt, dev: softmax_attn((1, 576, 576), seed=7, dtype=dt, device=dev),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_ent_self_matches_oracle_and_reference(backend, case, dtype):
    attn = CASES[case](dtype, backend.device)
    out = iseg_ops.ent_self(attn, lam=0.01)
    assert out.shape == attn.shape and out.dtype == dtype and out.device == attn.device
    assert_close(out, ent_self64(attn, 0.01), **tolerance(dtype), msg=f"{case} vs float64")
    if backend.name == "triton":
        expected = reference.ent_self(attn.cpu(), 0.01)
        assert_close(out, expected, **tolerance(dtype), msg=f"{case} vs reference")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lam", [0.5, 5.0])
def test_clamp_emptied_row_falls_back_to_lam_0(backend, lam, dtype):
    n = 16
    attn = clamp_emptied(n).to(device=backend.device, dtype=dtype)
    # Batched with an ordinary matrix: the fallback is per row of its own matrix.
    attn = torch.stack([attn, softmax_attn((n, n), dtype=dtype, device=backend.device)])
    out = iseg_ops.ent_self(attn, lam=lam)
    # By hand: T0 of row 0 is (1/n)/0.5 = 2/n on columns 0, 1 and (1/n)/1 = 1/n elsewhere.
    row0 = torch.tensor([2.0, 2.0] + [1.0] * (n - 2), dtype=F64) / (n + 2)
    expected = torch.eye(n, dtype=F64)
    expected[0] = row0
    expected[1, :2] = 0.5  # T = 1 + lam on both columns
    assert_close(out[0], expected, **tolerance(dtype), msg="clamp-emptied row")
    assert_close(out[1], ent_self64(attn[1], lam), **tolerance(dtype), msg="ordinary matrix")


def test_clamp_does_not_empty_the_uniform_row_at_small_lam(backend):
    attn = clamp_emptied(16).float().to(backend.device)
    out = iseg_ops.ent_self(attn, lam=0.01)
    # T = 0.125 → 0.125 + 0.01·(1 + ln 0.125); T = 0.0625 → 0.0625 + 0.01·(1 + ln 0.0625).
    a = 0.125 + 0.01 * (1 + torch.log(torch.tensor(0.125, dtype=F64)))
    b = 0.0625 + 0.01 * (1 + torch.log(torch.tensor(0.0625, dtype=F64)))
    row0 = torch.cat([a.repeat(2), b.repeat(14)]) / (2 * a + 14 * b)
    assert_close(out[0], row0, atol=1e-6, rtol=1e-5)


def test_subnormal_column_maximum(backend):
    attn = subnormal_column().to(backend.device)
    expected = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=F64)
    assert_close(iseg_ops.ent_self(attn, lam=0.0), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_degenerate_matrices(backend, dtype):
    n = 20
    dev = backend.device
    # Uniform attention: T = 1 everywhere, so P is uniform for any lam.
    uniform = torch.full((n, n), 1.0 / n, dtype=dtype, device=dev)
    assert_close(iseg_ops.ent_self(uniform, 0.01), torch.full((n, n), 1.0 / n, dtype=F64),
                 **tolerance(dtype))
    # A permutation matrix is a fixed point: T = S, Eq. 7 maps 1 to 1 + lam, rows renormalise.
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    perm = torch.eye(n, dtype=dtype, device=dev)[order]
    assert torch.equal(iseg_ops.ent_self(perm, 5.0).cpu(), perm.cpu())
    # HW = 1: the only entry is 1.
    one = torch.ones(1, 1, dtype=dtype, device=dev)
    assert torch.equal(iseg_ops.ent_self(one).cpu(), torch.ones(1, 1, dtype=dtype))


def _check_properties(attn64: torch.Tensor, lam: float, dtype: torch.dtype, device: str) -> None:
    attn = attn64.to(device=device, dtype=dtype)
    p = iseg_ops.ent_self(attn, lam).cpu()
    p64 = p.to(F64)
    assert p.dtype == dtype and p.shape == attn.shape
    assert torch.isfinite(p64).all(), "NaN or Inf in P"
    assert (p64 >= 0).all() and (p64 <= 1).all(), "P outside [0, 1]"
    atol = TOLERANCES[dtype][0]
    row_sums = p64.sum(-1)
    assert_close(row_sums, torch.ones_like(row_sums), atol=atol * 2, rtol=0, msg="row sums")
    zero_cols = (attn.cpu() == 0).all(dim=-2)  # [B, HW]: keys no query attends to
    assert (p64.transpose(-1, -2)[zero_cols] == 0).all(), "an all-zero column of S is nonzero in P"
    assert_close(p, ent_self64(attn.cpu(), lam), **tolerance(dtype), msg="vs float64")


PROPERTY = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@settings(max_examples=150, **PROPERTY)
@given(attn=attention(max_hw=24), lam=LAMS, dtype=st.sampled_from(DTYPES))
def test_reference_properties(attn, lam, dtype):
    p = reference.ent_self(attn.to(dtype), lam)
    assert torch.isfinite(p).all()
    _check_properties(attn, lam, dtype, "cpu")  # the public op on the (default) reference path


@settings(max_examples=30, **PROPERTY)
@given(attn=attention(max_hw=40), lam=LAMS, dtype=st.sampled_from(DTYPES))
def test_triton_properties(triton_backend, attn, lam, dtype):
    _check_properties(attn, lam, dtype, triton_backend.device)


def _equivariance(attn64: torch.Tensor, lam: float, seed: int, device: str) -> None:
    hw = attn64.shape[-1]
    perm = torch.randperm(hw, generator=torch.Generator().manual_seed(seed))
    attn = attn64.float().to(device)
    permuted = attn[..., perm, :][..., :, perm]
    p = iseg_ops.ent_self(attn, lam)
    # Relabelling the pixels relabels the rows and columns of P.
    assert_close(iseg_ops.ent_self(permuted, lam), p[..., perm, :][..., :, perm],
                 **tolerance(torch.float32), msg="ent_self(Π S Πᵀ) vs Π P Πᵀ")


@settings(max_examples=60, **PROPERTY)
@given(attn=attention(max_hw=24), lam=LAMS, seed=st.integers(0, 2**31 - 1))
def test_reference_permutation_equivariance(attn, lam, seed):
    _equivariance(attn, lam, seed, "cpu")


@settings(max_examples=12, **PROPERTY)
@given(attn=attention(max_hw=40), lam=LAMS, seed=st.integers(0, 2**31 - 1))
def test_triton_permutation_equivariance(triton_backend, attn, lam, seed):
    _equivariance(attn, lam, seed, triton_backend.device)


# ----------------------------------------------------------------------------------------------
# The hardware log of the compiled kernels

LG2_APPROX_ERROR = 2.0**-22.6  # PTX ISA: lg2.approx.f32's maximum absolute error (in log2)


def _ent_self_log_error(attn: torch.Tensor, lam: float, error: torch.Tensor) -> torch.Tensor:
    """METHOD §2 in float64 with ``ln T`` replaced by ``ln T + error`` (T > 0); a row that the
    clamp empties is NaN (left out of the comparison)."""
    s = attn.to(F64)
    col_max = s.amax(-2, keepdim=True)
    t0 = torch.where(col_max > 0, s / torch.where(col_max > 0, col_max, 1.0), 0.0)
    positive = t0 > 0
    log_t0 = torch.log(torch.where(positive, t0, 1.0)) + error
    t = torch.where(positive, t0 + lam * (1.0 + log_t0), 0.0).clamp(min=0.0)
    return t / t.sum(-1, keepdim=True)


@pytest.mark.parametrize("lam", [0.0065144, 0.01, 0.0434294, 0.0868589, 0.5, 5.0])
def test_fast_log_error_bound(lam):
    """The bound stated in iseg_ops.ent_self's docstring: lg2.approx's worst error, with every
    sign pattern we try, moves P by ≤ 1e-6 of its row maximum (≤ 1e-7 at the recipes' lam), far
    below fp16's rounding (4.9e-4) and within the fp32 tolerance."""
    ln_error = LG2_APPROX_ERROR * math.log(2.0)
    limit = 1e-7 if lam < 0.1 else 1e-6
    for attn in (softmax_attn((1, 144, 144)), local_attn(1, 12), softmax_attn((1, 576, 576), seed=3)):
        exact = _ent_self_log_error(attn, lam, torch.zeros(()))
        g = torch.Generator().manual_seed(0)
        random_signs = torch.randint(0, 2, attn.shape, generator=g).to(F64) * 2 - 1
        for error in (torch.tensor(ln_error), torch.tensor(-ln_error), ln_error * random_signs):
            moved = _ent_self_log_error(attn, lam, error)
            change = ((moved - exact).abs() / exact.amax(-1, keepdim=True)).nan_to_num(0.0).max()
            assert change <= limit, f"lam={lam}: P moved by {float(change):.3g} of its row max"
