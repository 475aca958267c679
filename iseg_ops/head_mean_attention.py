"""Head-mean attention probabilities ``mean_h softmax(Q_h K_hᵀ · scale)``, fused in Triton.

The captured self-attention of iSeg (METHOD §1) is the mean over heads of the attention
probabilities. Materialising every head's probabilities costs ``heads × HW²`` elements
(168 MB in fp16 for SD 2.1 at 512²); these kernels write only the ``HW²`` mean: one pass
computes each row's log-sum-exp per head (like a flash-attention forward without ``V``), the
second recomputes the logits tile by tile and sums ``exp(logit - lse)`` over the heads.
"""

from __future__ import annotations

import torch

from . import reference
from ._dispatch import check_finite, check_float, interpreting, use_triton
from ._triton import loop_bound, tl, triton

_LOG2E = 1.4426950408889634


@triton.jit
def _logits_tile(q_ptrs, k_base, cols, col_ok, row_ok, d_ok, stride_kl, qk_scale, HALF_DOT):
    """``Q_h[rows] K_h[cols]ᵀ · scale · log2(e)`` as a [BLOCK_M, BLOCK_N] fp32 tile."""
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k = tl.load(
        k_base + cols[:, None].to(tl.int64) * stride_kl,
        mask=col_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if HALF_DOT:
        logits = tl.dot(q, tl.trans(k))
    else:
        logits = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    return logits * qk_scale


# One program: BLOCK_M query rows of one head; one pass over that head's keys (online max and
# sum of exponentials). Writes the rows' log2-sum-exp2 of the scaled logits.
@triton.jit
def _row_lse_kernel(
    q_ptr,
    k_ptr,
    lse_ptr,
    H,
    LQ,
    LK,
    D,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_kd,
    HALF_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b, h = pid_bh // H, pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < LQ
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < D
    q_ptrs = (
        q_ptr
        + b * stride_qb
        + h * stride_qh
        + rows[:, None].to(tl.int64) * stride_ql
        + ds[None, :] * stride_qd
    )
    k_base = k_ptr + b * stride_kb + h * stride_kh + ds[None, :] * stride_kd
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n in range(0, loop_bound(LK), BLOCK_N):
        cols = n + tl.arange(0, BLOCK_N)
        col_ok = cols < LK
        logits = _logits_tile(
            q_ptrs, k_base, cols, col_ok, row_ok, d_ok, stride_kl, qk_scale, HALF_DOT
        )
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        total = total * tl.exp2(m - m_new) + tl.sum(tl.exp2(logits - m_new[:, None]), axis=1)
        m = m_new
    tl.store(lse_ptr + pid_bh * LQ + rows, m + tl.log2(total), mask=row_ok)


# One program: a [BLOCK_M, BLOCK_N] tile of the output for one batch element; for each head it
# recomputes the logits and adds exp2(logit - lse). Writes the tile once, divided by H.
@triton.jit
def _head_mean_kernel(
    q_ptr,
    k_ptr,
    lse_ptr,
    out_ptr,
    H,
    LQ,
    LK,
    D,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_kd,
    stride_ob,
    stride_oq,
    stride_ok,
    HALF_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < LQ
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < LK
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < D
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for h in range(loop_bound(H)):
        q_ptrs = (
            q_ptr
            + b * stride_qb
            + h * stride_qh
            + rows[:, None].to(tl.int64) * stride_ql
            + ds[None, :] * stride_qd
        )
        k_base = k_ptr + b * stride_kb + h * stride_kh + ds[None, :] * stride_kd
        logits = _logits_tile(
            q_ptrs, k_base, cols, col_ok, row_ok, d_ok, stride_kl, qk_scale, HALF_DOT
        )
        lse = tl.load(lse_ptr + (b * H + h) * LQ + rows, mask=row_ok, other=0.0)
        acc += tl.exp2(logits - lse[:, None])
    out_ptrs = (
        out_ptr
        + b * stride_ob
        + rows[:, None].to(tl.int64) * stride_oq
        + cols[None, :].to(tl.int64) * stride_ok
    )
    tl.store(
        out_ptrs,
        (acc / H).to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def _tiling(half_dot: bool) -> tuple[int, int, dict]:
    """(BLOCK_M, BLOCK_N, launch options) that keep both kernels within 128 registers and
    without local memory on sm_86 and sm_90 (tests/ops/test_cuda_compile.py): fp16/bf16
    64×64 tiles over 8 warps (4 warps need 142 registers); fp32 32×32 tiles over 4 warps (its
    dot runs on FMA units with both operands in registers: 64×64 spilled at 255) and 2 pipeline
    stages (D ≤ 128 within sm_86's shared memory)."""
    if half_dot:
        return 64, 64, {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    return 32, 32, {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}


def _head_mean_attention_triton(query: torch.Tensor, key: torch.Tensor, scale: float):
    heads, lq, d = query.shape[-3:]
    lk = key.shape[-2]
    q = query.reshape(-1, heads, lq, d)
    k = key.reshape(-1, heads, lk, d)
    batch = q.shape[0]
    lse = torch.empty(batch * heads, lq, device=q.device, dtype=torch.float32)
    out = torch.empty(batch, lq, lk, device=q.device, dtype=q.dtype)
    # Triton's CPU interpreter multiplies bf16 tiles wrongly (numpy has no bf16), so there
    # bf16 is multiplied in fp32; on a GPU bf16 goes to the tensor cores like fp16.
    half_dot = q.dtype == torch.float16 or (q.dtype == torch.bfloat16 and not interpreting())
    bm, bn, tiling = _tiling(half_dot)
    common = dict(HALF_DOT=half_dot, BLOCK_D=max(16, triton.next_power_of_2(d)), **tiling)
    qk_scale = scale * _LOG2E
    _row_lse_kernel[(triton.cdiv(lq, bm), batch * heads)](
        q, k, lse, heads, lq, lk, d, qk_scale, *q.stride(), *k.stride(), **common,
    )  # fmt: skip
    grid = (triton.cdiv(lk, bn), triton.cdiv(lq, bm), batch)
    _head_mean_kernel[grid](
        q, k, lse, out, heads, lq, lk, d, qk_scale, *q.stride(), *k.stride(), *out.stride(),
        **common,
    )  # fmt: skip
    return out.reshape(*query.shape[:-3], lq, lk)


@torch.library.custom_op("iseg_ops::head_mean_attention_triton", mutates_args=())
def _head_mean_attention_op(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """The Triton launcher as a custom op: ``torch.compile`` (and CUDA graphs) treat it as one
    opaque call instead of tracing the launch code."""
    return _head_mean_attention_triton(query, key, scale)


@_head_mean_attention_op.register_fake
def _(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    return query.new_empty((*query.shape[:-3], query.shape[-2], key.shape[-2]))


def head_mean_attention(
    query: torch.Tensor, key: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Mean over heads of the attention probabilities, without materialising them per head.

    Args:
        query (Tensor): ``[..., heads, Lq, D]`` queries (fp32, fp16 or bf16; any strides, so a
            head subset ``q[:, heads]`` needs no copy).
        key (Tensor): ``[..., heads, Lk, D]`` keys, same dtype and leading dims.
        scale (float | None): logit scale (default ``D ** -0.5``, as in SDPA).

    Returns:
        Tensor: ``[..., Lq, Lk]`` in ``query.dtype``: ``mean_h softmax(Q_h K_hᵀ · scale)``, rows
        sum to 1. fp32 accumulation.

    Example:
        >>> q, k = torch.randn(1, 5, 256, 64), torch.randn(1, 5, 256, 64)
        >>> head_mean_attention(q, k).shape
        torch.Size([1, 256, 256])
    """
    fn = "head_mean_attention"
    check_float(fn, "query", query)
    check_float(fn, "key", key)
    if query.dim() < 3 or key.dim() != query.dim():
        raise ValueError(
            f"{fn}: query and key must be [..., heads, L, D] with the same number of dims, "
            f"got query {tuple(query.shape)} and key {tuple(key.shape)}"
        )
    if query.shape[:-2] != key.shape[:-2] or query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"{fn}: query {tuple(query.shape)} and key {tuple(key.shape)} must agree in the "
            f"leading dims, the heads and D"
        )
    if query.dtype != key.dtype:
        raise TypeError(f"{fn}: query is {query.dtype} but key is {key.dtype}")
    if min(query.shape[-3:]) == 0 or key.shape[-2] == 0:
        raise ValueError(f"{fn}: empty query {tuple(query.shape)} or key {tuple(key.shape)}")
    if scale is None:
        scale = query.shape[-1] ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{fn}: scale must be a float or None, got {type(scale).__name__}")
    elif not 0 < scale < float("inf"):
        raise ValueError(f"{fn}: scale must be a finite number > 0, got {scale!r}")
    check_finite(fn, query=query, key=key)
    if not use_triton(fn, query, key):
        return reference.head_mean_attention(query, key, float(scale))
    return _head_mean_attention_op(query, key, float(scale))
