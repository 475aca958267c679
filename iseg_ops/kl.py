"""Symmetric KL distance between distributions and the KL clustering of the authors' recipes.

``symmetric_kl`` is DiffSeg's merging distance (UNSUPERVISED.md §1, §4) and ``kl_cluster`` the
cross-attention clustering of iSeg's released recipes (METHOD §6). Both are pure functions in
plain PyTorch: their work is a few GEMMs (cuBLAS does them at peak), so no Triton kernel is
needed; :mod:`iseg_ops.reference` holds the elementwise definitions they are tested against.

Distance (no epsilon), for two non-negative vectors ``x, y`` of length ``N``::

    D(x, y) = ½ Σ x (ln x − ln y) − ½ Σ y (ln x − ln y) = ½ Σ (x − y)(ln x − ln y)
            = ½ [h(x) + h(y) − x·ln y − ln x·y],        h(x) = Σ x ln x

The last form is what :func:`symmetric_kl` computes: the two cross terms of a whole block are
one GEMM ``[X, ln X] · [ln Y, Y]ᵀ`` (inner dimension ``2N``) plus the entropy vectors.

**Exact zeros** follow the limits of the elementwise form: ``0 · ln 0 = 0``, so a position where
both vectors are 0 adds nothing, and a position where exactly one of them is 0 adds ``+∞``
(``(x − y)(ln x − ln y) → +∞``). ``D`` is therefore ``+∞`` whenever the supports differ, and
finite otherwise; it is never NaN. DiffSeg (TensorFlow, no epsilon) gets NaN for any zero in
either vector, and ``NaN < τ`` is false: where exactly one is zero both give "no match", where
both are zero DiffSeg's NaN also refuses the match while we compare the remaining positions.
In the GEMM form, ``ln 0`` is replaced by 0 (the product with the other vector's 0 or with the
support mismatch is handled exactly) and the support mismatch is counted with one extra GEMM of
0/1 indicators, only when a zero is present.
"""

from __future__ import annotations

import math

import torch

from ._dispatch import check_float

# Rows of ``y`` processed per GEMM block: bounds the temporaries ``[rows, 2N]`` to ~32 MiB (fp32),
# so a 4096×4096 ``y`` never needs a second full-size copy of its logarithm.
_BLOCK_ELEMENTS = 1 << 23

# The authors' clustering constants (METHOD §6).
CLUSTER_ZERO_FILL = 1e-6
CLUSTER_DISTANCE_EPS = 1e-5


def _check_distributions(fn: str, **tensors: torch.Tensor) -> dict[str, bool]:
    """Finite and non-negative, from one min/max reduction per tensor (no temporaries the size
    of the input) and a single device-to-host read. Returns whether each tensor has an exact
    zero (its minimum is 0)."""
    stats = torch.stack(
        [torch.stack(torch.aminmax(t)).double() for t in tensors.values()]
    ).tolist()
    zeros = {}
    for (name, t), (low, high) in zip(tensors.items(), stats):
        shape = "×".join(map(str, t.shape))
        if math.isnan(low) or math.isnan(high) or math.isinf(low) or math.isinf(high):
            raise ValueError(f"{fn}: {name} ({shape}) contains NaN or Inf")
        if low < 0:
            raise ValueError(f"{fn}: {name} ({shape}) has negative entries; distributions are ≥ 0")
        zeros[name] = low == 0
    return zeros


def _log0(t: torch.Tensor) -> torch.Tensor:
    """``ln t`` with ``ln 0`` replaced by 0 (the terms it multiplies are handled separately)."""
    return torch.where(t > 0, torch.log(t), torch.zeros((), dtype=t.dtype, device=t.device))


def _symmetric_kl(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, has_zeros: bool):
    """The GEMM form on validated inputs: ``[..., M, N] × [..., Q, N] → [..., M, Q]``."""
    x = x.to(dtype)
    lx = _log0(x)
    hx = (x * lx).sum(-1)  # [..., M]
    xs = torch.cat([x, lx], dim=-1)  # [..., M, 2N]
    zx = (x == 0).to(dtype) if has_zeros else None
    n = x.shape[-1]
    rows = max(1, _BLOCK_ELEMENTS // (2 * n))
    blocks = []
    for start in range(0, y.shape[-2], rows):
        yb = y[..., start : start + rows, :].to(dtype)
        ly = _log0(yb)
        hy = (yb * ly).sum(-1)  # [..., Qb]
        cross = xs @ torch.cat([ly, yb], dim=-1).transpose(-1, -2)  # x·ln y + ln x·y
        d = (hx.unsqueeze(-1) + hy.unsqueeze(-2) - cross).mul_(0.5).clamp_min_(0.0)
        if has_zeros:
            zy = (yb == 0).to(dtype)
            # positions where exactly one of the two is zero: |Zx| + |Zy| − 2 Zx·Zy
            mismatch = zx.sum(-1).unsqueeze(-1) + zy.sum(-1).unsqueeze(-2) - 2 * (zx @ zy.transpose(-1, -2))
            d = d.masked_fill_(mismatch > 0.5, math.inf)
        blocks.append(d)
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-1)


def symmetric_kl(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise symmetric KL distance between the rows of ``x`` and the rows of ``y``.

    ``D[m, q] = ½ Σ_n (x[m, n] − y[q, n]) (ln x[m, n] − ln y[q, n])`` (DiffSeg's distance, no
    epsilon), computed as ``½ [h(x) + h(y) − X·(ln Y)ᵀ − (ln X)·Yᵀ]`` with one GEMM per block of
    ``y``'s rows. Exact zeros: ``D = +∞`` where the supports of the two rows differ, otherwise
    the positions where both are 0 are skipped (the limit ``0 · ln 0 = 0``); never NaN (see the
    module docstring for DiffSeg's behaviour).

    Args:
        x (Tensor): ``[..., M, N]`` non-negative rows (e.g. DiffSeg's anchor maps).
        y (Tensor): ``[..., Q, N]`` non-negative rows, same leading dims.

    Returns:
        Tensor: ``[..., M, Q]``, ≥ 0, in float64 when either input is float64, else float32
        (fp16/bf16 inputs are promoted). Rows need not sum to 1 (the formula is used as is).

    Example:
        >>> a = torch.softmax(torch.randn(3, 10), -1); b = torch.softmax(torch.randn(5, 10), -1)
        >>> symmetric_kl(a, b).shape
        torch.Size([3, 5])
    """
    fn = "symmetric_kl"
    check_float(fn, "x", x)
    check_float(fn, "y", y)
    if x.dim() < 2 or y.dim() != x.dim() or x.shape[:-2] != y.shape[:-2] or x.shape[-1] != y.shape[-1]:
        raise ValueError(
            f"{fn}: x must be [..., M, N] and y [..., Q, N] with the same leading dims and N, "
            f"got x {tuple(x.shape)} and y {tuple(y.shape)}"
        )
    if x.shape[-1] == 0:
        raise ValueError(f"{fn}: the distributions are empty (N = 0): x {tuple(x.shape)}")
    if x.device != y.device:
        raise ValueError(f"{fn}: x is on {x.device} but y is on {y.device}")
    if x.numel() == 0 or y.numel() == 0:
        dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
        return torch.empty(*x.shape[:-1], y.shape[-2], dtype=dtype, device=x.device)
    zeros = _check_distributions(fn, x=x, y=y)
    dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    return _symmetric_kl(x, y, dtype, zeros["x"] or zeros["y"])


def cluster_anchors(grid: tuple[int, int], num_clusters: int) -> torch.Tensor:
    """Flat indices of the authors' initial prototypes on a ``grid`` (h, w): rows
    ``range(0, h, step_h)`` × columns ``range(0, w, step_w)``, row-major, with
    ``step = max(1, int(side // √num_clusters))`` (64×64, 32 clusters → rows and columns
    0, 11, …, 55: 36 anchors; the ``max`` only matters for grids smaller than √num_clusters)."""
    h, w = grid
    root = math.sqrt(num_clusters)
    rows = range(0, h, max(1, int(h // root)))
    cols = range(0, w, max(1, int(w // root)))
    return torch.tensor([r * w + c for r in rows for c in cols], dtype=torch.long)


def _fp16_eps(t: torch.Tensor) -> torch.Tensor:
    """The authors' distance inputs: the vector in fp16 plus 1e-5 (added in fp16)."""
    return t.to(torch.float16) + CLUSTER_DISTANCE_EPS


CLUSTER_ARITHMETICS = ("fp16", "fp32")
# fp16 mode: every entry and row sum of the features below this keeps each half of the distance
# (≤ row sum × max |ln a − ln p| ≈ 22.6 × row sum) under fp16's largest value, 65504.
_FP16_ROW_SUM_LIMIT = 2048.0
# Elements of one [B, K, P, L] fp16 block of the distance (64 MiB of fp16).
_FP16_BLOCK_ELEMENTS = 1 << 25


def fp16_distances(protos: torch.Tensor, pixels: torch.Tensor, log_pixels: torch.Tensor) -> torch.Tensor:
    """The symmetric KL op by op in fp16 (the authors' ``kl_dis``, DiffSeg's first pass):
    ``[B, K, L]`` prototypes and ``[B, HW, L]`` pixels with their log (all fp16) →
    ``[B, K, HW]`` fp16 distances (NaN where a zero meets ``ln 0``; not a public op).

    ``q = ln a − ln p``; ``½ Σ a·q − ½ Σ p·q``, each product in fp16, each sum over the ``L``
    positions a torch fp16 reduction (fp32 accumulation, fp16 result), the halves scaled and
    subtracted in fp16. Blocks of pixels bound the ``[B, K, P, L]`` temporaries; a block only
    splits the pixels, never a sum."""
    batch, k, length = protos.shape
    log_protos = torch.log(protos)[:, :, None]  # [B, K, 1, L]
    protos = protos[:, :, None]
    rows = max(1, _FP16_BLOCK_ELEMENTS // max(1, batch * k * length))
    blocks = []
    for start in range(0, pixels.shape[1], rows):
        p = pixels[:, None, start : start + rows]  # [B, 1, P, L]
        quotient = log_protos - log_pixels[:, None, start : start + rows]  # fp16
        first = (protos * quotient).sum(-1)  # fp16 products, fp32-accumulated sum → fp16
        second = (p * quotient).sum(-1)
        blocks.append(0.5 * first - 0.5 * second)  # [B, K, P] fp16
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-1)


def _distances_fp32(protos: torch.Tensor, pixel_side: torch.Tensor, entropy_pixels: torch.Tensor):
    """The matrix-product form in fp32 (without the common ½): ``[B, K, HW]``."""
    protos = protos.float()
    log_protos = torch.log(protos)
    entropy_protos = (protos * log_protos).sum(-1)  # [B, K]
    cross = torch.cat([protos, log_protos], dim=-1) @ pixel_side
    return entropy_protos.unsqueeze(-1) + entropy_pixels.unsqueeze(-2) - cross


def _check_cluster_args(fn: str, x, grid, num_clusters, rounds, arithmetic) -> None:
    check_float(fn, "x", x)
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in grid)
    ):
        raise ValueError(f"{fn}: grid must be (h, w) with positive ints, got {grid!r}")
    for name, value, low in (("num_clusters", num_clusters, 1), ("rounds", rounds, 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}")
        if value < low:
            raise ValueError(f"{fn}: {name} must be ≥ {low}, got {value}")
    if arithmetic not in CLUSTER_ARITHMETICS:
        raise ValueError(f"{fn}: arithmetic must be one of {', '.join(CLUSTER_ARITHMETICS)}, got {arithmetic!r}")
    h, w = grid
    if x.dim() < 2 or x.shape[-2] != h * w or x.shape[-1] == 0:
        raise ValueError(
            f"{fn}: x must be [..., HW, L] with HW = {h}×{w} = {h * w} and L ≥ 1, "
            f"got {tuple(x.shape)}"
        )


def kl_cluster(
    x: torch.Tensor,
    grid: tuple[int, int],
    num_clusters: int = 32,
    rounds: int = 20,
    *,
    arithmetic: str = "fp16",
) -> torch.Tensor:
    """The authors' cross-attention clustering (METHOD §6): every pixel's vector replaced by
    the mean vector of its KL-nearest cluster.

    1. Features: ``x`` with exact zeros replaced by 1e-6 (fp32).
    2. Initial prototypes: the features of the :func:`cluster_anchors` pixels (36 on 64×64).
    3. ``rounds`` times: every pixel goes to its nearest prototype under the symmetric KL
       distance; ties go to the lowest prototype index (``torch.min``). Each non-empty
       cluster's prototype becomes the mean of its pixels' features (summed in float64,
       rounded to fp32); empty clusters are dropped.
    4. Output: every pixel gets its final cluster's mean (so pixels of one cluster are equal).

    The distance, by ``arithmetic``:

    * ``"fp16"`` (default; the authors' ``kl_dis`` and the recipes' setting): both vectors cast
      to fp16 and 1e-5 added in fp16; ``ln`` of each in fp16; ``q = ln a − ln p`` in fp16; the
      products ``a·q`` and ``p·q`` in fp16; each sum over the ``L`` positions reduced with fp32
      accumulation to an fp16 result; the halves scaled by ½ and subtracted in fp16. Many
      distances tie at fp16 resolution; the first prototype wins, as in the authors' code, so
      the partition is theirs on the same input (on a GPU, up to the rare case where a
      different fp32 summation order rounds one sum to the neighbouring fp16 value).
    * ``"fp32"``: the same fp16-plus-1e-5 inputs, expanded into a matrix product in fp32
      (``h(a) + h(p) − a·ln p − ln a·p``): faster, but it breaks the fp16 ties differently.

    Args:
        x (Tensor): ``[..., HW, L]`` non-negative features (the fused cross-attention of all
            ``L`` = 77 text positions at the self-attention grid), HW = h·w row-major. For
            ``"fp16"``, every row must sum to less than 2048 (fp16's range).
        grid (tuple[int, int]): ``(h, w)`` of the pixel grid.
        num_clusters (int): the authors' requested cluster count (32); sets the anchor step.
        rounds (int): assignment/update rounds (20); 0 returns each pixel's own features.
        arithmetic (str): ``"fp16"`` (the authors') or ``"fp32"`` (matrix products).

    Returns:
        Tensor: ``[..., HW, L]`` in ``x.dtype``, each row the mean of its cluster's features.

    Example:
        >>> x = torch.rand(2, 64 * 64, 77)
        >>> kl_cluster(x, (64, 64)).shape
        torch.Size([2, 4096, 77])
    """
    fn = "kl_cluster"
    _check_cluster_args(fn, x, grid, num_clusters, rounds, arithmetic)
    if x.numel() == 0:
        return x.clone()
    _check_distributions(fn, x=x)
    h, w = grid
    features = x.reshape(-1, h * w, x.shape[-1]).float()
    features = torch.where(features == 0, CLUSTER_ZERO_FILL, features)  # [B, HW, L]
    if arithmetic == "fp16":
        largest = float(features.sum(-1).max())
        if largest >= _FP16_ROW_SUM_LIMIT:
            raise ValueError(
                f"{fn}: a row of x sums to {largest:g}, too large for the authors' fp16 distance "
                f"(< {_FP16_ROW_SUM_LIMIT:g}); use arithmetic='fp32'"
            )
    anchors = cluster_anchors(grid, num_clusters).to(x.device)
    prototypes = features[:, anchors]  # [B, K, L]
    alive = torch.ones(prototypes.shape[:2], dtype=torch.bool, device=x.device)  # [B, K]
    pixels = _fp16_eps(features)
    if arithmetic == "fp16":
        log_pixels = torch.log(pixels)
    else:
        pixels = pixels.float()
        lp = torch.log(pixels)
        entropy_pixels = (pixels * lp).sum(-1)  # [B, HW]
        pixel_side = torch.cat([lp, pixels], dim=-1).transpose(1, 2)  # [B, 2L, HW]
    means = features
    features64 = features.double()
    for _ in range(rounds):
        protos = _fp16_eps(prototypes)
        if arithmetic == "fp16":
            d = fp16_distances(protos, pixels, log_pixels)
        else:
            d = _distances_fp32(protos, pixel_side, entropy_pixels)  # ½ does not change argmin
        d = d.masked_fill(~alive.unsqueeze(-1), math.inf)  # [B, K, HW]
        assign = d.argmin(dim=1)  # [B, HW], the first minimum on ties
        onehot = torch.nn.functional.one_hot(assign, prototypes.shape[1]).double()
        counts = onehot.sum(1)  # [B, K]
        sums = onehot.transpose(1, 2) @ features64  # [B, K, L]
        alive = counts > 0
        prototypes = torch.where(alive.unsqueeze(-1), sums / counts.clamp_min(1).unsqueeze(-1), 0.0).float()
        means = torch.gather(prototypes, 1, assign.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
    return means.reshape(x.shape).to(x.dtype)
