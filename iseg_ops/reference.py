"""Plain-PyTorch references for the ops, with the same signatures as the fused versions.

Everything is computed in fp32 (the result is cast back to the input's dtype) and follows
``shared/docs/METHOD.md`` §2–3 literally, including the per-iteration normalisation of the
refinement. These functions do not validate their arguments: the public ops do that once.
Imports no triton.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _ent_self_fp32(attn: torch.Tensor, lam: float, t_max: float | None = None) -> torch.Tensor:
    s = attn.float()
    col_max = s.amax(dim=-2, keepdim=True)  # max over the queries q, per key k
    t0 = torch.where(col_max > 0, s / col_max, 0.0)
    positive = t0 > 0
    # Eq. 7 (natural log) where T > 0, then clamp at 0 (and at t_max when given: the
    # interactive recipe clamps T to [0, 1]).
    t = torch.where(positive, t0 + lam * (1.0 + torch.log(t0.clamp_min(1e-38))), 0.0)
    t = t.clamp_min(0.0) if t_max is None else t.clamp(0.0, t_max)
    row_sum = t.sum(dim=-1, keepdim=True)
    row_sum0 = t0.sum(dim=-1, keepdim=True)
    # A row whose every entry the clamp removed falls back to lam = 0 (T0 itself).
    p = torch.where(row_sum > 0, t / row_sum.clamp_min(1e-38), t0 / row_sum0.clamp_min(1e-38))
    return torch.where((row_sum > 0) | (row_sum0 > 0), p, 0.0)


def ent_self(attn: torch.Tensor, lam: float = 0.01, t_max: float | None = None) -> torch.Tensor:
    """Reference Ent-Self (METHOD §2). Same contract as :func:`iseg_ops.ent_self`."""
    return _ent_self_fp32(attn, lam, t_max).to(attn.dtype)


FLAT = 1e-5
"""A column whose spread (max − min) is at most ``FLAT`` times its magnitude is constant: its
variation is rounding noise (a blocked matrix product sums rows in different orders), which
normalisation would blow up to [0, 1]. Such a column becomes 0, like an exactly constant one."""


def is_flat(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Whether columns with minimum ``lo`` and maximum ``hi`` are constant (see :data:`FLAT`)."""
    return (hi - lo) <= FLAT * torch.maximum(lo.abs(), hi.abs())


def _sum_normalise(c: torch.Tensor) -> torch.Tensor:
    """Per column: ``(C - min_hw C) / sum_hw(C - min_hw C)``; a constant column becomes 0."""
    lo, hi = c.amin(dim=-2, keepdim=True), c.amax(dim=-2, keepdim=True)
    c = c - lo
    total = c.sum(dim=-2, keepdim=True)
    return torch.where((total > 0) & ~is_flat(lo, hi), c / total.clamp_min(1e-38), 0.0)


def minmax(c: torch.Tensor) -> torch.Tensor:
    """Per column of ``[..., HW, K]``: ``(C - min) / (max - min)``; a constant column (within
    :data:`FLAT`) becomes 0."""
    lo, hi = c.amin(dim=-2, keepdim=True), c.amax(dim=-2, keepdim=True)
    span = hi - lo
    return torch.where((span > 0) & ~is_flat(lo, hi), (c - lo) / span.clamp_min(1e-38), 0.0)


def refine(
    attn: torch.Tensor,
    cross: torch.Tensor,
    iters: int = 10,
    lam: float | None = 0.01,
    t_max: float | None = None,
) -> torch.Tensor:
    """Reference iterative refinement (METHOD §3, Algorithm 1). Same contract as
    :func:`iseg_ops.refine`: per-iteration normalisation, fp32 inside, output in ``cross.dtype``."""
    p = _ent_self_fp32(attn, lam, t_max) if lam is not None else attn.float()
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


def symmetric_kl(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Reference symmetric KL (DiffSeg's distance), elementwise: ``D[m, q] = ½ Σ_n (x − y)(ln x
    − ln y)`` with the limits at exact zeros (both 0 → 0, one 0 → +∞). Same contract as
    :func:`iseg_ops.symmetric_kl`; materialises ``[M, N]`` per row of ``y`` (slow, exact)."""
    dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    x, y = x.to(dtype), y.to(dtype)
    out = torch.empty(*x.shape[:-1], y.shape[-2], dtype=dtype, device=x.device)
    lx = torch.log(x)
    for q in range(y.shape[-2]):
        yq = y[..., q : q + 1, :]  # [..., 1, N]
        term = (x - yq) * (lx - torch.log(yq))
        term = torch.where((x == 0) & (yq == 0), 0.0, term)
        out[..., q] = 0.5 * term.sum(-1)
    return out


def kl_cluster(
    x: torch.Tensor, grid: tuple[int, int], num_clusters: int = 32, rounds: int = 20
) -> torch.Tensor:
    """Reference cross-attention clustering (METHOD §6), one matrix at a time with explicit
    prototype lists. Same contract as :func:`iseg_ops.kl_cluster`."""
    import math

    h, w = grid
    root = math.sqrt(num_clusters)
    rows = range(0, h, max(1, int(h // root)))
    cols = range(0, w, max(1, int(w // root)))
    anchors = [r * w + c for r in rows for c in cols]
    flat = x.reshape(-1, h * w, x.shape[-1]).float()
    out = torch.empty_like(flat)
    for b in range(flat.shape[0]):
        feats = torch.where(flat[b] == 0, 1e-6, flat[b])
        pixels = (feats.half() + 1e-5).float()
        prototypes = [feats[a] for a in anchors]
        means = feats  # rounds = 0: every pixel keeps its own features
        for _ in range(rounds):
            protos = torch.stack([(p.half() + 1e-5).float() for p in prototypes])
            d = torch.stack(
                [((pr - pixels) * (torch.log(pr) - torch.log(pixels))).sum(-1) for pr in protos]
            )  # [K, HW]
            assign = d.argmin(0)
            kept = [k for k in range(len(prototypes)) if (assign == k).any()]
            prototypes = [feats[assign == k].mean(0) for k in kept]
            remap = torch.full((len(protos),), -1, dtype=torch.long, device=x.device)
            remap[kept] = torch.arange(len(kept), device=x.device)
            assign = remap[assign]
            means = torch.stack(prototypes)[assign]
        out[b] = means
    return out.reshape(x.shape).to(x.dtype)
