"""Iterative refinement (METHOD §3) with Ent-Self fused into the product, as Triton kernels.

Folding property (METHOD §3): ``P`` is row-stochastic, so the per-iteration shift and positive
scale of ``C`` commute with ``P`` and ``result = minmax(Pᴺ C₀)``. The kernel therefore
normalises each iteration's input by its min-max (any positive affine normalisation gives the
same result) and never writes ``P``: one pass over ``S`` finds the column maxima, then each
iteration reads ``S`` once, builds ``T`` on the fly, multiplies it by all K columns of ``C``
and divides by the row sums of ``T`` at the end of the row. The column min/max that the next
iteration normalises by are folded in with atomics, so no extra pass is needed between
iterations.
"""

from __future__ import annotations

import torch

from . import reference
from ._dispatch import check_t_max, use_triton, validate_refine
from ._triton import tl, triton
from .ent_self import _ent_self_tile, _row_weights, col_max

_FLAT = tl.constexpr(reference.FLAT)  # see reference.FLAT


# One program: BLOCK_M rows of Y = P @ normalise(C) for all K columns of one matrix (K padded to
# BLOCK_K). It reads its BLOCK_M rows of S once and all of C (from L2), writes BLOCK_M rows of Y
# and folds their per-column min/max into y_stats with atomics.
@triton.jit
def _refine_step_kernel(
    s_ptr,
    col_max_ptr,
    c_ptr,
    c_stats_ptr,
    y_ptr,
    y_stats_ptr,
    HW,
    K,
    lam,
    t_max,
    stride_sb,
    stride_sq,
    stride_sk,
    stride_cb,
    stride_cq,
    stride_ck,
    APPLY_ENT_SELF: tl.constexpr,
    HALF_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < HW
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K

    # This iteration's input is (C - lo) / (hi - lo) per column; a constant column becomes 0.
    lo = tl.load(c_stats_ptr + pid_b * 2 * K + ks, mask=k_ok, other=0.0)
    hi = tl.load(c_stats_ptr + pid_b * 2 * K + K + ks, mask=k_ok, other=0.0)
    span = hi - lo
    # constant within FLAT (rounding noise) counts as constant, as in the reference
    has_span = span > _FLAT * tl.maximum(tl.abs(lo), tl.abs(hi))
    inv_span = tl.where(has_span, 1.0 / tl.where(has_span, span, 1.0), 0.0)
    shift = -lo * inv_span

    s_rows = s_ptr + pid_b * stride_sb + rows[:, None].to(tl.int64) * stride_sq
    c_base = c_ptr + pid_b * stride_cb + ks[None, :].to(tl.int64) * stride_ck
    col_max_row = col_max_ptr + pid_b * HW

    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_sum0 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n in range(0, HW, BLOCK_N):
        cols = n + tl.arange(0, BLOCK_N)
        col_ok = cols < HW
        s = tl.load(
            s_rows + cols[None, :].to(tl.int64) * stride_sk,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        c_mask = col_ok[:, None] & k_ok[None, :]
        c = tl.load(c_base + cols[:, None].to(tl.int64) * stride_cq, mask=c_mask, other=0.0)
        c = tl.where(c_mask, c.to(tl.float32) * inv_span[None, :] + shift[None, :], 0.0)
        if HALF_DOT:
            c_dot = c.to(tl.float16)
        else:
            c_dot = c
        if APPLY_ENT_SELF:
            col_max = tl.load(col_max_row + cols, mask=col_ok, other=0.0)
            t, t0 = _ent_self_tile(s, col_max, lam, t_max)
            row_sum += tl.sum(t, axis=1)
            row_sum0 += tl.sum(t0, axis=1)
            if HALF_DOT:
                acc = tl.dot(t.to(tl.float16), c_dot, acc)
                acc0 = tl.dot(t0.to(tl.float16), c_dot, acc0)
            else:
                acc = tl.dot(t, c_dot, acc, input_precision="ieee")
                acc0 = tl.dot(t0, c_dot, acc0, input_precision="ieee")
        else:
            if HALF_DOT:
                acc = tl.dot(s.to(tl.float16), c_dot, acc)
            else:
                acc = tl.dot(s, c_dot, acc, input_precision="ieee")

    if APPLY_ENT_SELF:
        w, w0 = _row_weights(row_sum, row_sum0)
        y = acc * w[:, None] + acc0 * w0[:, None]
    else:
        y = acc
    out_ok = row_ok[:, None] & k_ok[None, :]
    tl.store(y_ptr + pid_b * HW * K + rows[:, None].to(tl.int64) * K + ks[None, :], y, mask=out_ok)
    y_lo = tl.min(tl.where(out_ok, y, float("inf")), axis=0)
    y_hi = tl.max(tl.where(out_ok, y, float("-inf")), axis=0)
    tl.atomic_min(y_stats_ptr + pid_b * 2 * K + ks, y_lo, mask=k_ok)
    tl.atomic_max(y_stats_ptr + pid_b * 2 * K + K + ks, y_hi, mask=k_ok)


def _block_m(batch: int, hw: int) -> int:
    """Rows per program: the largest of 64/32/16 that still gives ≥ 2 programs per SM on a
    132-SM GPU (the product is memory-bound: every SM must be streaming S)."""
    for block_m in (64, 32):
        if batch * triton.cdiv(hw, block_m) >= 264:
            return block_m
    return 16


def _refine_triton(
    attn: torch.Tensor,
    cross: torch.Tensor,
    iters: int,
    lam: float | None,
    t_max: float | None = None,
) -> torch.Tensor:
    hw, k = attn.shape[-1], cross.shape[-1]
    s = attn.reshape(-1, hw, hw)
    c = cross.reshape(-1, hw, k)
    batch = s.shape[0]
    device = s.device

    # stats[i] holds the per-column (min, max) of iteration i's input; stats[0] is C₀'s.
    stats = torch.empty(iters + 1, batch, 2, k, device=device, dtype=torch.float32)
    stats[0, :, 0] = c.amin(dim=1).float()
    stats[0, :, 1] = c.amax(dim=1).float()
    stats[1:, :, 0] = float("inf")
    stats[1:, :, 1] = float("-inf")
    col_maxima = col_max(s) if lam is not None else stats  # unused without Ent-Self
    buffers = [torch.empty(batch, hw, k, device=device, dtype=torch.float32) for _ in range(2)]

    block_k = max(16, triton.next_power_of_2(k))
    block_m = _block_m(batch, hw)
    block_n = 128 if block_k <= 32 else 64
    half_dot = s.dtype in (torch.float16, torch.bfloat16)
    grid = (triton.cdiv(hw, block_m), batch)
    src = c
    for i in range(iters):
        y = buffers[i % 2]
        _refine_step_kernel[grid](
            s,
            col_maxima,
            src,
            stats[i],
            y,
            stats[i + 1],
            hw,
            k,
            0.0 if lam is None else lam,
            float("inf") if t_max is None else t_max,
            *s.stride(),
            *src.stride(),
            APPLY_ENT_SELF=lam is not None,
            HALF_DOT=half_dot,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            num_stages=3 if half_dot else 2,  # fp32 tiles: 2 stages fit sm_86's shared memory
        )
        src = y
    lo, hi = stats[iters, :, 0, None, :], stats[iters, :, 1, None, :]
    span = hi - lo
    has_span = (span > 0) & ~reference.is_flat(lo, hi)
    out = torch.where(has_span, (src - lo) / torch.where(has_span, span, 1.0), 0.0)
    return out.to(cross.dtype).reshape(cross.shape)


def refine(
    attn: torch.Tensor,
    cross: torch.Tensor,
    iters: int = 10,
    lam: float | None = 0.01,
    t_max: float | None = None,
) -> torch.Tensor:
    """Iterative refinement of initial maps by (entropy-reduced) self-attention (iSeg Eq. 4).

    Args:
        attn (Tensor): ``[..., HW, HW]`` self-attention whose rows sum to 1 (any strides).
        cross (Tensor): ``[..., HW, K]`` initial maps ``C₀`` (e.g. fused cross-attention).
        iters (int): refinement iterations N (default 10; 0 returns the min-max of ``cross``).
        lam (float | None): Ent-Self strength, applied to ``attn`` inside the fused product
            (``P`` is never written). ``None`` uses ``attn`` as given (naive iteration, or a
            precomputed :func:`ent_self` output).
        t_max (float | None): upper clamp of Ent-Self's ``T`` (finite, > 0; see
            :func:`iseg_ops.ent_self`): ``T`` clamped to ``[0, t_max]``, 1 in the interactive
            recipe. Needs ``lam``; ``None`` (default) clamps only at 0.

    Returns:
        Tensor: ``[..., HW, K]`` in ``cross.dtype``, each column min-max normalised to [0, 1]
        (``minmax(Pᴺ C₀)``); a constant column gives zeros. fp32 accumulation throughout.

    Example:
        >>> attn = torch.softmax(torch.randn(144, 144), -1)
        >>> refine(attn, torch.rand(144, 3)).shape
        torch.Size([144, 3])
    """
    validate_refine(attn, cross, iters, lam)
    check_t_max("refine", t_max, lam)
    lam = None if lam is None else float(lam)
    t_max = None if t_max is None else float(t_max)
    if iters == 0:
        return reference.minmax(cross.float()).to(cross.dtype)
    if not use_triton("refine", attn, cross):
        return reference.refine(attn, cross, iters, lam, t_max)
    return _refine_triton(attn, cross, iters, lam, t_max)
