"""Float64 oracles written from ``shared/docs/METHOD.md`` §2–3, and realistic test inputs.

These are independent of ``iseg_ops`` (including ``iseg_ops.reference``): the tests compare
both backends with them, so no expected value comes from the code under test.
"""

from __future__ import annotations

import torch

F64 = torch.float64


def ent_self64(attn: torch.Tensor, lam: float) -> torch.Tensor:
    """METHOD §2 in float64, with the documented fallback to lam = 0 for a row that the clamp
    empties (and an all-zero row for a row of S / colmax that is already all zero)."""
    s = attn.to(F64)
    col_max = s.max(dim=-2, keepdim=True).values  # over the queries q, per key k
    safe_max = torch.where(col_max > 0, col_max, torch.ones_like(col_max))
    t0 = torch.where(col_max > 0, s / safe_max, torch.zeros_like(s))
    positive = t0 > 0
    log_t0 = torch.log(torch.where(positive, t0, torch.ones_like(t0)))
    t = torch.where(positive, t0 + lam * (1.0 + log_t0), torch.zeros_like(t0)).clamp(min=0.0)
    rows = t.sum(-1, keepdim=True)
    rows0 = t0.sum(-1, keepdim=True)
    p = t / torch.where(rows > 0, rows, torch.ones_like(rows))
    p0 = t0 / torch.where(rows0 > 0, rows0, torch.ones_like(rows0))
    return torch.where(rows > 0, p, p0)


def minmax64(c: torch.Tensor) -> torch.Tensor:
    """Per column of ``[..., HW, K]``: (C - min) / (max - min); a constant column gives 0."""
    c = c.to(F64)
    lo = c.min(dim=-2, keepdim=True).values
    span = c.max(dim=-2, keepdim=True).values - lo
    return torch.where(span > 0, (c - lo) / torch.where(span > 0, span, 1.0), 0.0)


def refine64(attn: torch.Tensor, cross: torch.Tensor, iters: int, lam: float | None):
    """METHOD §3 literally (per-iteration sum normalisation), float64."""
    p = attn.to(F64) if lam is None else ent_self64(attn, lam)

    def normalise(c: torch.Tensor) -> torch.Tensor:
        c = c - c.min(dim=-2, keepdim=True).values
        total = c.sum(dim=-2, keepdim=True)
        return torch.where(total > 0, c / torch.where(total > 0, total, 1.0), 0.0)

    c = normalise(cross.to(F64))
    for _ in range(iters):
        c = normalise(p @ c)
    return minmax64(c)


def folded64(attn: torch.Tensor, cross: torch.Tensor, iters: int, lam: float | None):
    """The folding property's right-hand side: ``minmax(Pᴺ C₀)`` in float64, no in-loop
    normalisation."""
    p = attn.to(F64) if lam is None else ent_self64(attn, lam)
    c = cross.to(F64)
    for _ in range(iters):
        c = p @ c
    return minmax64(c)


def relative_span(attn: torch.Tensor, cross: torch.Tensor, iters: int, lam: float | None):
    """Per column of ``Pᴺ C₀``: (max - min) / max|·| in float64. The min-max output divides by
    the span, so its error is about (relative error of Pᴺ C₀) / this: a column that the
    iterations have almost flattened is ill-conditioned whatever the implementation."""
    p = attn.to(F64) if lam is None else ent_self64(attn, lam)
    c = cross.to(F64)
    for _ in range(iters):
        c = p @ c
    span = c.max(dim=-2).values - c.min(dim=-2).values
    return span / c.abs().max(dim=-2).values.clamp_min(1e-300)


def head_mean64(query: torch.Tensor, key: torch.Tensor, scale: float | None = None):
    """``softmax(Q Kᵀ · scale)`` per head, mean over the heads, in float64."""
    q, k = query.to(F64), key.to(F64)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1).mean(dim=-3)


# ----------------------------------------------------------------------------------------------
# Inputs


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def softmax_attn(shape, scale: float = 4.0, seed: int = 0, dtype=torch.float32, device="cpu"):
    """Realistic attention probabilities ``softmax(randn · scale)`` over the last dim.

    scale = 4 concentrates each row on a few keys, like SD's self-attention; a random dense
    matrix mixes fast, so comparisons after many iterations use :func:`local_attn` instead.
    """
    logits = torch.randn(*shape, generator=generator(seed), dtype=F64) * scale
    return torch.softmax(logits, dim=-1).to(device=device, dtype=dtype)


def local_attn(batch: int, side: int, width: float = 1.5, seed: int = 0, dtype=torch.float32,
               device="cpu"):
    """``[batch, side², side²]`` attention that decays with the distance between pixels of a
    side×side grid (plus noise), like SD's self-attention: it mixes slowly, so ``Pᴺ C₀`` stays
    well conditioned for N = 10."""
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], -1).to(F64)
    dist2 = torch.cdist(pos, pos).square()
    noise = torch.randn(batch, side * side, side * side, generator=generator(seed), dtype=F64)
    logits = -dist2 / (2 * width**2) + 0.5 * noise
    return torch.softmax(logits, dim=-1).to(device=device, dtype=dtype)


def rand_cross(shape, seed: int = 1, dtype=torch.float32, device="cpu"):
    """Initial maps C₀: positive, like normalised cross-attention."""
    return torch.rand(*shape, generator=generator(seed), dtype=F64).to(device=device, dtype=dtype)


def transposed_back(x: torch.Tensor) -> torch.Tensor:
    """The same values with column-major strides in the last two dims (a transposed copy,
    transposed back as a view): non-contiguous, but dense."""
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


def strided_attn(batch: int, hw: int, seed: int = 0, dtype=torch.float32, device="cpu"):
    """``big[:, ::2, ::2]`` of a ``[batch, 2·HW, 2·HW]`` attention, renormalised in place so that
    it is row-stochastic again while staying a strided view (strides 4·HW and 2)."""
    big = softmax_attn((batch, 2 * hw, 2 * hw), seed=seed, dtype=dtype, device=device)
    view = big[:, ::2, ::2]
    view.div_(view.sum(dim=-1, keepdim=True))
    assert not view.is_contiguous()
    return view


def mT_attn(shape, scale: float = 4.0, seed: int = 0, dtype=torch.float32, device="cpu"):
    """``.mT`` of a contiguous tensor whose *columns* sum to 1: a row-stochastic view."""
    logits = torch.randn(*shape, generator=generator(seed), dtype=F64) * scale
    view = torch.softmax(logits, dim=-2).to(device=device, dtype=dtype).mT
    assert not view.is_contiguous()
    return view


def clamp_emptied(n: int = 16) -> torch.Tensor:
    """Row 0 uniform; row 1 splits between columns 0 and 1; rows 2.. are one-hot on their own
    column. Every column's maximum (≥ 0.5) lies in another row than 0, so row 0's T is at most
    2/n and, for lam > (2/n) / (ln(n/2) - 1) (0.116 at n = 16), Eq. 7 makes all of row 0
    negative: the clamp empties it and the documented fallback (lam = 0) applies."""
    s = torch.zeros(n, n, dtype=F64)
    s[0] = 1.0 / n
    s[1, 0] = s[1, 1] = 0.5
    for i in range(2, n):
        s[i, i] = 1.0
    return s


def subnormal_column() -> torch.Tensor:
    """Rows sum to 1 (in fp32) and column 0's maximum, 1e-40, is subnormal in fp32/bf16.
    METHOD §2: T = S / colmax is exactly 1 at that entry, so with lam = 0 row 0 of P is
    [1, 1, 0] / 2."""
    return torch.tensor([[1e-40, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])



