"""Plain-PyTorch references for the ops, with the same signatures as the fused versions.

Everything is computed in fp32 (the result is cast back to the input's dtype) and follows
``shared/docs/METHOD.md`` §2–3 literally, including the per-iteration normalisation of the
refinement. These functions do not validate their arguments: the public ops do that once.
Imports no triton.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _ent_self_fp32(attn: torch.Tensor, lam: float) -> torch.Tensor:
    s = attn.float()
    col_max = s.amax(dim=-2, keepdim=True)  # max over the queries q, per key k
    t0 = torch.where(col_max > 0, s / col_max, 0.0)
    positive = t0 > 0
    # Eq. 7 (natural log) where T > 0, then clamp at 0.
    t = torch.where(positive, t0 + lam * (1.0 + torch.log(t0.clamp_min(1e-38))), 0.0)
    t = t.clamp_min(0.0)
    row_sum = t.sum(dim=-1, keepdim=True)
    row_sum0 = t0.sum(dim=-1, keepdim=True)
    # A row whose every entry the clamp removed falls back to lam = 0 (T0 itself).
    p = torch.where(row_sum > 0, t / row_sum.clamp_min(1e-38), t0 / row_sum0.clamp_min(1e-38))
    return torch.where((row_sum > 0) | (row_sum0 > 0), p, 0.0)


def ent_self(attn: torch.Tensor, lam: float = 0.01) -> torch.Tensor:
    """Reference Ent-Self (METHOD §2). Same contract as :func:`iseg_ops.ent_self`."""
    return _ent_self_fp32(attn, lam).to(attn.dtype)


def _sum_normalise(c: torch.Tensor) -> torch.Tensor:
    """Per column: ``(C - min_hw C) / sum_hw(C - min_hw C)``; a constant column becomes 0."""
    c = c - c.amin(dim=-2, keepdim=True)
    total = c.sum(dim=-2, keepdim=True)
    return torch.where(total > 0, c / total.clamp_min(1e-38), 0.0)


def minmax(c: torch.Tensor) -> torch.Tensor:
    """Per column of ``[..., HW, K]``: ``(C - min) / (max - min)``; a constant column becomes 0."""
    lo = c.amin(dim=-2, keepdim=True)
    span = c.amax(dim=-2, keepdim=True) - lo
    return torch.where(span > 0, (c - lo) / span.clamp_min(1e-38), 0.0)


def refine(
    attn: torch.Tensor, cross: torch.Tensor, iters: int = 10, lam: float | None = 0.01
) -> torch.Tensor:
    """Reference iterative refinement (METHOD §3, Algorithm 1). Same contract as
    :func:`iseg_ops.refine`: per-iteration normalisation, fp32 inside, output in ``cross.dtype``."""
    p = _ent_self_fp32(attn, lam) if lam is not None else attn.float()
    c = _sum_normalise(cross.float())
    for _ in range(iters):
        c = _sum_normalise(p @ c)
    return minmax(c).to(cross.dtype)


def head_mean_attention(
    query: torch.Tensor, key: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Reference head-mean attention probabilities. Same contract as
    :func:`iseg_ops.head_mean_attention`; one head's probabilities at a time in fp32."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    out = torch.zeros(
        *query.shape[:-3], query.shape[-2], key.shape[-2], device=query.device, dtype=torch.float32
    )
    heads = query.shape[-3]
    for h in range(heads):
        logits = query[..., h, :, :].float() @ key[..., h, :, :].float().transpose(-1, -2)
        out += F.softmax(logits * scale, dim=-1)
    return (out / heads).to(query.dtype)
