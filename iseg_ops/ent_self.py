"""Ent-Self (METHOD §2): entropy-reduced self-attention, as Triton kernels.

``P = rownorm(clamp(T + lam * (1 + ln T), 0[, t_max]))`` with ``T = S / colmax(S)``. Two
kernels, both shared with :mod:`iseg_ops.refine`: the column pass (one read of S: the
reciprocal column maxima) and the transform (the Eq. 7 numerators and their row weights).
:func:`ent_self` writes ``P``; ``refine`` writes the numerators once (fp16 for fp16/bf16 input)
and multiplies by them every iteration.

The numerators are stored divided by ``1 + lam`` (``T0 / (1 + lam) + lam / (1 + lam) + …``; the
division folds into the constants, so it costs nothing): they then lie in [0, 1] for any
``lam`` and cannot overflow fp16, and the row weights absorb the scale exactly.

Log accuracy: compiled kernels take ``ln T`` as ``ln 2 · lg2.approx(T)`` (one MUFU.LG2; the PTX
ISA bounds its absolute error by 2^-22.6 in log2, i.e. 1.1e-7 in ln T), so a numerator moves by
at most ``lam · 1.1e-7``. Emulated in float64 with that error at its worst signs
(``tests/ops/test_ent_self.py::test_fast_log_error_bound``): P moves by ≤ 5.5e-8 of its row
maximum at the recipes' lam (≤ 0.0869) and ≤ 6.3e-7 at lam = 5, and refine's [0, 1] output by
≤ 2.5e-7, against fp16's rounding of 4.9e-4 and the fp32 tolerance of 1e-5. The interpreter
(and ROCm) use the precise log.
"""

from __future__ import annotations

import math

import torch

from . import reference
from ._dispatch import check_t_max, use_triton, validate_ent_self
from ._triton import autotune_enabled, log2, loop_bound, pick_config, tl, triton

LAUNCHED_KERNELS = ("_col_max_kernel", "_ent_self_kernel")  # what the launchers here launch


# One program: BLOCK_N key columns of one matrix, all HW query rows (one read of that part of S).
# Writes inv[k] = 1 / (scale[k] · max_q S[q, k]) (0 for a column with no positive entry) and,
# when SUBNORMAL, scale[k] = 2^100 for a maximum below 2^-100 (else 1), so that S · scale · inv
# never divides by a subnormal. fp16 storage cannot hold such values: SUBNORMAL is off for it.
@triton.jit
def _col_max_kernel(
    s_ptr,
    inv_ptr,
    scale_ptr,
    HW,
    stride_sb,
    stride_sq,
    stride_sk,
    SUBNORMAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < HW
    rows = tl.arange(0, BLOCK_M)
    ptrs = s_ptr + pid_b * stride_sb + rows[:, None] * stride_sq + cols[None, :] * stride_sk
    best = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # 0: "no positive entry"
    for m in range(0, loop_bound(HW), BLOCK_M):
        mask = ((rows[:, None] + m) < HW) & col_ok[None, :]
        best = tl.maximum(best, tl.load(ptrs, mask=mask, other=0.0).to(tl.float32))
        ptrs += BLOCK_M * stride_sq
    col_max = tl.max(best, axis=0)
    has_max = col_max > 0
    if SUBNORMAL:
        scale = tl.where(col_max < 7.888609052210118e-31, 1.2676506002282294e30, 1.0)  # 2^∓100
        tl.store(scale_ptr + pid_b * HW + cols, scale, mask=col_ok)
        col_max = col_max * scale
    inv = tl.where(has_max, 1.0 / tl.where(has_max, col_max, 1.0), 0.0)
    tl.store(inv_ptr + pid_b * HW + cols, inv, mask=col_ok)


@triton.jit
def _numerators(n, s_start, inv_start, scale_start, cols, row_ok, HW, stride_sk, c0, c1, c2,
                t_max, SUBNORMAL: tl.constexpr, EVEN: tl.constexpr):
    """``(T, T0, mask)`` of the tile of S at columns ``n + cols`` of the rows ``s_start`` (with
    ``row_ok``): ``T0 = S / colmax`` and ``T`` = Eq. 7 divided by ``1 + lam`` (``c0 = 1/(1+lam)``,
    ``c1 = lam/(1+lam)``, ``c2 = lam·ln2/(1+lam)``), clamped to ``[0, t_max / (1 + lam)]``.
    ``ln(max(T0, FLT_MIN))`` needs no select: for ``T0 ≤ 0`` the clamp at 0 gives 0 as METHOD §2
    does (and ``c2 = 0`` when lam = 0). Zeros outside the matrix."""
    col_ok = (cols + n) < HW
    mask = row_ok[:, None] & col_ok[None, :]
    s_ptrs = s_start + (cols[None, :] + n) * stride_sk
    if EVEN:
        s = tl.load(s_ptrs).to(tl.float32)
        inv = tl.load(inv_start + n)
        if SUBNORMAL:
            s = s * tl.load(scale_start + n)[None, :]
    else:
        s = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32)
        inv = tl.load(inv_start + n, mask=col_ok, other=0.0)
        if SUBNORMAL:
            s = s * tl.load(scale_start + n, mask=col_ok, other=1.0)[None, :]
    t0 = s * inv[None, :]
    t = t0 * c0 + c1 + c2 * log2(tl.maximum(t0, 1.1754943508222875e-38))  # FLT_MIN: normal
    return tl.minimum(tl.maximum(t, 0.0), t_max), t0, mask


@triton.jit
def _store(ptrs, value, mask, EVEN: tl.constexpr):
    if EVEN:
        tl.store(ptrs, value)
    else:
        tl.store(ptrs, value, mask=mask)


# One program: BLOCK_M rows of one matrix. WRITE_P: two reads of those rows of S (the row sums,
# then P = T·w) and one write of P. Otherwise (refine): one read of S, one write of the
# numerators T in out's dtype and of the row weights w = 1 / Σ_k T (from the stored, rounded T);
# a row that the clamp empties is rewritten with T0 and its own weight (a second read of that
# block of rows only, when it happens).
@triton.jit
def _ent_self_kernel(
    s_ptr,
    inv_ptr,
    scale_ptr,
    out_ptr,
    w_ptr,
    HW,
    c0,
    c1,
    c2,
    t_max,
    stride_sb,
    stride_sq,
    stride_sk,
    stride_ob,
    stride_oq,
    stride_ok,
    WRITE_P: tl.constexpr,
    SUBNORMAL: tl.constexpr,
    EVEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < HW
    cols = tl.arange(0, BLOCK_N)
    s_start = s_ptr + pid_b * stride_sb + rows[:, None].to(tl.int64) * stride_sq
    o_start = out_ptr + pid_b * stride_ob + rows[:, None].to(tl.int64) * stride_oq
    inv_start = inv_ptr + pid_b * HW + cols
    scale_start = scale_ptr + pid_b * HW + cols
    args = (s_start, inv_start, scale_start, cols, HW, stride_sk, c0, c1, c2, t_max)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for n in range(0, loop_bound(HW), BLOCK_N):
        t, t0, mask = _numerators(n, *args[:4], row_ok, *args[4:], SUBNORMAL, EVEN)
        if WRITE_P:
            acc += t
            acc0 += t0
        else:
            t = t.to(out_ptr.dtype.element_ty)
            _store(o_start + (cols[None, :] + n) * stride_ok, t, mask, EVEN)
            acc += t.to(tl.float32)
    row_sum = tl.sum(acc, axis=1)
    w = tl.where(row_sum > 0, 1.0 / tl.where(row_sum > 0, row_sum, 1.0), 0.0)

    if WRITE_P:
        row_sum0 = tl.sum(acc0, axis=1)
        use0 = (row_sum <= 0) & (row_sum0 > 0)
        w0 = tl.where(use0, 1.0 / tl.where(use0, row_sum0, 1.0), 0.0)
        for n in range(0, loop_bound(HW), BLOCK_N):
            t, t0, mask = _numerators(n, *args[:4], row_ok, *args[4:], SUBNORMAL, EVEN)
            p = t * w[:, None] + t0 * w0[:, None]
            _store(o_start + (cols[None, :] + n) * stride_ok, p.to(out_ptr.dtype.element_ty),
                   mask, EVEN)
    else:
        empty = (row_sum <= 0) & row_ok
        if tl.max(empty.to(tl.int32), axis=0) > 0:  # some row lost every entry to the clamp
            acc0 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for n in range(0, loop_bound(HW), BLOCK_N):
                # masked loads: 0 outside the emptied rows
                _, t0, mask = _numerators(n, *args[:4], empty, *args[4:], SUBNORMAL, False)
                t0 = t0.to(out_ptr.dtype.element_ty)
                tl.store(o_start + (cols[None, :] + n) * stride_ok, t0, mask=mask)
                acc0 += t0.to(tl.float32)
            row_sum0 = tl.sum(acc0, axis=1)
            use0 = empty & (row_sum0 > 0)
            w = tl.where(use0, 1.0 / tl.where(use0, row_sum0, 1.0), w)
        tl.store(w_ptr + pid_b * HW + rows, w, mask=row_ok)


# --------------------------------------------------------------------------------------------
# Launchers

# (BLOCK_M, BLOCK_N, num_warps) of the transform: KERNELS.md §2.6. For bf16 input writing the
# numerators, the 8-warp tiles take 8 B of local memory (stack) on sm_86 with Triton 3.6 and
# 3.7 (tests/ops/test_cuda_compile.py): only the 4-warp ones are candidates.
TRANSFORM_CONFIGS = ((16, 128, 4), (8, 256, 4), (16, 256, 8), (32, 128, 8))
TRANSFORM_CONFIGS_BF16 = ((16, 128, 4), (8, 256, 4))
TRANSFORM_DEFAULT = (16, 128, 4)
COL_MAX_BLOCKS = (128, 32)  # (BLOCK_M, BLOCK_N): 32 columns (64 B of fp16) per row and program


def col_max(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reciprocal column maxima of ``s`` [B, HW, HW] over the queries: ``(inv, scale)``, both
    [B, HW] fp32, with ``S · scale · inv = S / colmax`` (``inv = 0`` for a column with no
    positive entry; ``scale`` is 2^100 for a subnormal maximum, else 1, and is only written
    for bf16/fp32 ``s``)."""
    batch, hw, _ = s.shape
    inv = torch.empty(batch, hw, device=s.device, dtype=torch.float32)
    subnormal = s.dtype != torch.float16
    scale = torch.empty(batch, hw, device=s.device, dtype=torch.float32) if subnormal else inv
    block_m, block_n = COL_MAX_BLOCKS
    _col_max_kernel[(triton.cdiv(hw, block_n), batch)](
        s, inv, scale, hw, *s.stride(),
        SUBNORMAL=subnormal, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip
    return inv, scale


def _constants(lam: float, t_max: float | None) -> tuple[float, float, float, float]:
    """``(c0, c1, c2, t_max / (1 + lam))`` of :func:`_numerators`."""
    norm = 1.0 + lam
    t_max = float("inf") if t_max is None else t_max / norm
    return 1.0 / norm, lam / norm, lam * math.log(2.0) / norm, t_max


def transform(
    s: torch.Tensor, lam: float, t_max: float | None, out: torch.Tensor, w: torch.Tensor | None
) -> None:
    """Run the transform on ``s`` [B, HW, HW]: ``P`` into ``out`` when ``w`` is None, else the
    numerators into ``out`` (any float dtype, any strides) and the row weights into ``w``
    [B, HW] fp32. Autotuned on a GPU (keyed on HW, dtypes and the mode)."""
    batch, hw, _ = s.shape
    inv, scale = col_max(s)
    args = (s, inv, scale, out, w if w is not None else inv, hw, *_constants(lam, t_max),
            *s.stride(), *out.stride())  # fmt: skip

    def launch(config, args=args):
        block_m, block_n, warps = config
        _ent_self_kernel[(triton.cdiv(hw, block_m), batch)](
            *args, WRITE_P=w is None, SUBNORMAL=s.dtype != torch.float16,
            EVEN=hw % block_m == 0 and hw % block_n == 0,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        )  # fmt: skip

    def scratch_launch(config):  # timing writes only copies of the outputs
        scratch = (torch.empty_like(out), inv if w is None else torch.empty_like(w))
        launch(config, args[:3] + scratch + args[5:])

    key = ("ent_self", hw, s.dtype, out.dtype, w is None)
    bf16_numerators = s.dtype == torch.bfloat16 and w is not None
    configs = TRANSFORM_CONFIGS_BF16 if bf16_numerators else TRANSFORM_CONFIGS
    launch(pick_config(key, configs, TRANSFORM_DEFAULT, scratch_launch, autotune_enabled(s)))


def _ent_self_triton(attn: torch.Tensor, lam: float, t_max: float | None = None) -> torch.Tensor:
    hw = attn.shape[-1]
    s = attn.reshape(-1, hw, hw)  # a view for [HW, HW] and [B, HW, HW], whatever the strides
    out = torch.empty(s.shape, device=s.device, dtype=s.dtype)
    transform(s, lam, t_max, out, None)
    return out.reshape(attn.shape)


@torch.library.custom_op("iseg_ops::ent_self_triton", mutates_args=())
def _ent_self_op(attn: torch.Tensor, lam: float, t_max: float | None) -> torch.Tensor:
    """The Triton launcher as a custom op (one opaque call for ``torch.compile``)."""
    return _ent_self_triton(attn, lam, t_max)


@_ent_self_op.register_fake
def _(attn, lam, t_max):
    return torch.empty_like(attn, memory_format=torch.contiguous_format)


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
    return _ent_self_op(attn, float(lam), t_max)
