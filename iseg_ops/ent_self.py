"""Ent-Self (METHOD §2): entropy-reduced self-attention, as a fused Triton kernel.

``P = rownorm(clamp(T + lam * (1 + ln T), 0[, t_max]))`` with ``T = S / colmax(S)``. Also holds the
column-maximum pass and the per-tile transform that :mod:`iseg_ops.refine` fuses into its
product, so the transform is written once.
"""

from __future__ import annotations

import torch

from . import reference
from ._dispatch import check_t_max, use_triton, validate_ent_self
from ._triton import tl, triton


# One program: the maximum over ROWS_PER_PROGRAM queries of BLOCK_N key columns of one matrix;
# it reads that part of S once and folds its result into col_max with an atomic max.
@triton.jit
def _col_max_kernel(
    s_ptr,
    col_max_ptr,
    HW,
    stride_sb,
    stride_sq,
    stride_sk,
    ROWS_PER_PROGRAM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < HW
    s_base = s_ptr + pid_b * stride_sb + cols[None, :].to(tl.int64) * stride_sk
    # col_max starts at 0: a column whose entries are all ≤ 0 keeps 0 ("no positive entry").
    best = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid_r * ROWS_PER_PROGRAM
    for m in range(0, ROWS_PER_PROGRAM, BLOCK_M):
        rows = row_start + m + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < HW) & col_ok[None, :]
        s = tl.load(s_base + rows[:, None].to(tl.int64) * stride_sq, mask=mask, other=0.0)
        best = tl.maximum(best, tl.max(s.to(tl.float32), axis=0))
    tl.atomic_max(col_max_ptr + pid_b * HW + cols, best, mask=col_ok)


@triton.jit
def _ent_self_tile(s, col_max, lam, t_max):
    """Ent-Self numerators of a [BLOCK_M, BLOCK_N] tile of S (fp32) for columns with maxima
    ``col_max`` [BLOCK_N]. Returns ``(T, T0)``: Eq. 7 clamped to [0, t_max] (``t_max = inf``
    when no upper clamp is asked), and ``S / colmax`` (the lam = 0 transform, which rows that
    the clamp empties fall back to)."""
    has_max = col_max > 0
    # 1/colmax overflows for a subnormal colmax: scale such columns by 2^100 (exact) first.
    scale = tl.where(col_max < 7.888609052210118e-31, 1.2676506002282294e30, 1.0)  # 2^-100, 2^100
    rcp = tl.where(has_max, 1.0 / tl.where(has_max, col_max * scale, 1.0), 0.0)
    t0 = (s * scale[None, :]) * rcp[None, :]
    positive = t0 > 0
    t = tl.where(positive, t0 + lam * (1.0 + tl.log(tl.where(positive, t0, 1.0))), 0.0)
    return tl.minimum(tl.maximum(t, 0.0), t_max), t0


@triton.jit
def _row_weights(row_sum, row_sum0):
    """Per-row multipliers ``(w, w0)`` so that ``P = w * T + w0 * T0`` (METHOD §2 with the
    fallback to T0 for a row whose every entry was clamped away)."""
    has_sum = row_sum > 0
    w = tl.where(has_sum, 1.0 / tl.where(has_sum, row_sum, 1.0), 0.0)
    use0 = (row_sum <= 0) & (row_sum0 > 0)
    w0 = tl.where(use0, 1.0 / tl.where(use0, row_sum0, 1.0), 0.0)
    return w, w0


@triton.jit
def _load_ent_self_tile(s_rows, col_max_row, cols, row_ok, HW, stride_sk, lam, t_max):
    """Load the tile of S at rows ``s_rows`` and columns ``cols`` and return ``(T, T0, mask)``
    of :func:`_ent_self_tile` (zeros outside the matrix)."""
    col_ok = cols < HW
    mask = row_ok[:, None] & col_ok[None, :]
    s = tl.load(s_rows + cols[None, :].to(tl.int64) * stride_sk, mask=mask, other=0.0)
    col_max = tl.load(col_max_row + cols, mask=col_ok, other=0.0)
    t, t0 = _ent_self_tile(s.to(tl.float32), col_max, lam, t_max)
    return t, t0, mask


# One program: BLOCK_M rows of P. Two reads of those rows of S (row sums, then P) and one write.
@triton.jit
def _ent_self_kernel(
    s_ptr,
    col_max_ptr,
    p_ptr,
    HW,
    lam,
    t_max,
    stride_sb,
    stride_sq,
    stride_sk,
    stride_pb,
    stride_pq,
    stride_pk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < HW
    s_rows = s_ptr + pid_b * stride_sb + rows[:, None].to(tl.int64) * stride_sq
    p_rows = p_ptr + pid_b * stride_pb + rows[:, None].to(tl.int64) * stride_pq
    col_max_row = col_max_ptr + pid_b * HW

    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_sum0 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n in range(0, HW, BLOCK_N):
        cols = n + tl.arange(0, BLOCK_N)
        t, t0, _ = _load_ent_self_tile(
            s_rows, col_max_row, cols, row_ok, HW, stride_sk, lam, t_max
        )
        row_sum += tl.sum(t, axis=1)
        row_sum0 += tl.sum(t0, axis=1)

    w, w0 = _row_weights(row_sum, row_sum0)
    for n in range(0, HW, BLOCK_N):
        cols = n + tl.arange(0, BLOCK_N)
        t, t0, mask = _load_ent_self_tile(
            s_rows, col_max_row, cols, row_ok, HW, stride_sk, lam, t_max
        )
        p = t * w[:, None] + t0 * w0[:, None]
        tl.store(
            p_rows + cols[None, :].to(tl.int64) * stride_pk,
            p.to(p_ptr.dtype.element_ty),
            mask=mask,
        )


def col_max(s: torch.Tensor) -> torch.Tensor:
    """Column maxima over the queries of ``s`` [B, HW, HW], clamped below at 0: [B, HW] fp32."""
    batch, hw, _ = s.shape
    out = torch.zeros(batch, hw, device=s.device, dtype=torch.float32)
    block_n, block_m = 128, 32
    rows_per_program = 512
    grid = (triton.cdiv(hw, block_n), triton.cdiv(hw, rows_per_program), batch)
    _col_max_kernel[grid](
        s,
        out,
        hw,
        *s.stride(),
        ROWS_PER_PROGRAM=rows_per_program,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
    )
    return out


def _ent_self_triton(attn: torch.Tensor, lam: float, t_max: float | None = None) -> torch.Tensor:
    hw = attn.shape[-1]
    s = attn.reshape(-1, hw, hw)  # a view for [HW, HW] and [B, HW, HW], whatever the strides
    out = torch.empty(s.shape, device=s.device, dtype=s.dtype)
    block_m, block_n = 16, 128
    grid = (triton.cdiv(hw, block_m), s.shape[0])
    _ent_self_kernel[grid](
        s,
        col_max(s),
        out,
        hw,
        lam,
        float("inf") if t_max is None else t_max,
        *s.stride(),
        *out.stride(),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
    )
    return out.reshape(attn.shape)


def ent_self(attn: torch.Tensor, lam: float = 0.01, t_max: float | None = None) -> torch.Tensor:
    """Entropy-reduced self-attention (Ent-Self, iSeg Eq. 5–7; METHOD §2).

    Args:
        attn (Tensor): ``[..., HW, HW]`` self-attention whose rows sum to 1 (fp32, fp16 or bf16;
            any strides).
        lam (float): strength of the entropy reduction, natural log (default 0.01, the paper's
            best). ``lam = 0`` still applies the column-max and row normalisation.
        t_max (float | None): upper clamp of ``T`` after Eq. 7 (finite, > 0): ``T`` is clamped
            to ``[0, t_max]`` instead of ``[0, ∞)``. The interactive recipe (the authors' demo)
            uses ``t_max = 1``. ``None`` (default) clamps only at 0.

    Returns:
        Tensor: ``P``, same shape and dtype as ``attn``: non-negative and row-stochastic. A row
        whose every entry the clamp removes falls back to ``lam = 0``; no NaN for finite input.

    Example:
        >>> p = ent_self(torch.softmax(torch.randn(144, 144), -1))
        >>> torch.allclose(p.sum(-1), torch.ones(144))
        True
    """
    validate_ent_self(attn, lam)
    check_t_max("ent_self", t_max, lam)
    t_max = None if t_max is None else float(t_max)
    if not use_triton("ent_self", attn):
        return reference.ent_self(attn, float(lam), t_max)
    return _ent_self_triton(attn, float(lam), t_max)
