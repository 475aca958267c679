"""Unsupervised segmentation: DiffSeg (Tian et al., CVPR 2024) in PyTorch, refined by iSeg.

DiffSeg as ``shared/docs/UNSUPERVISED.md`` §1 states it from its official code, and iSeg on top
(§3, the paper's Table 3; our design, since the authors released none). The steps are pure
functions of tensors (and the UNet, for the one aggregating call);
:meth:`iseg.ISegPipeline.segment_unsupervised` runs them in this order, with the settings of
:class:`iseg.recipes.DiffSegSettings`:

1. The full image, resized to the working resolution without antialias, → VAE → latent mean ×
   scaling factor; **no noise**; one UNet call at **t = 300** with the empty prompt.
2. Every ``attn1`` layer's head-mean self-attention (:func:`iseg_ops.head_mean_attention`; the
   per-head probabilities are never materialised) feeds a running fp32 sum
   (:class:`SelfAttentionAggregate`): per resolution the layer mean, the key side bilinearly
   upsampled to the latent grid and renormalised, the query side repeated, weighted by
   ``r / Σr`` (0.5333, 0.2667, 0.1333, 0.0667 on SD at 512 px) → ``A`` ``[B, HW, HW]``,
   row-stochastic. The full-resolution layers are added straight into ``A`` (their rows already
   sum to 1; upsampling by 1 and renormalising is the identity), so ``A`` and one layer's
   head-mean are the only ``HW × HW`` tensors alive.
3. Merging (:func:`merge_maps`): 16×16 anchors, pass 0 = the mean of the maps within KL
   distance τ of each anchor (:func:`iseg_ops.symmetric_kl`, two GEMMs), passes 1–2 greedy
   on the M×M distance matrix (float64).
4. Labels: the merged maps upsampled bilinearly to the image size, argmax (ties → the first).
5. iSeg: ``refine(A, C₀)`` with ``C₀`` = the merged maps as columns (or their one-hot argmax
   on the latent grid), Ent-Self λ and N iterations; the refined maps are upsampled and argmaxed
   the same way, so segment ids stay DiffSeg's merged-map order. ``iters=None`` skips it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

import iseg_ops
from iseg_ops.kl import fp16_distances

from .capture import attend, attention_factors, installed, project_heads
from .recipes import DiffSegSettings

# Elements of upsampled fp32 maps held at once when labelling (64 MiB; bounds the memory for
# large images).
_LABEL_CHUNK_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------- 1. aggregation


class SelfAttentionAggregate:
    """Running fp32 sums of the head-mean self-attention per resolution (UNSUPERVISED §1).

    ``add`` takes one layer's head-mean ``[B, L, L]``; the full-resolution layers go straight
    into the result, the lower ones into small ``[B, L, L]`` sums. ``result`` finishes ``A``.
    """

    def __init__(self, grid: tuple[int, int]):
        self.grid = grid
        self.full: torch.Tensor | None = None  # [B, HW, HW], the sum of the full-res layers
        self.low: dict[int, torch.Tensor] = {}  # factor → [B, L, L] sums
        self.counts: dict[int, int] = {}

    def factor(self, tokens: int) -> int:
        h, w = self.grid
        f = round(math.sqrt(h * w / tokens))
        if f < 1 or h % f or w % f or (h // f) * (w // f) != tokens:
            raise ValueError(
                f"diffseg: a self-attention layer has {tokens} tokens, which is no integer "
                f"downsampling of the {h}×{w} latent grid"
            )
        return f

    def add(self, probs: torch.Tensor) -> None:
        f = self.factor(probs.shape[-1])
        self.counts[f] = self.counts.get(f, 0) + 1
        if f == 1:
            if self.full is None:
                self.full = probs if probs.dtype == torch.float32 else probs.float()
            else:
                self.full.add_(probs)
        elif f in self.low:
            self.low[f].add_(probs)
        else:
            self.low[f] = probs.float()

    def result(self, keep_full_resolution: bool = False):
        """``A = Σ_r w_r · repeat_q(renorm(upsample_k(mean_layers A_r)))``, ``[B, HW, HW]``
        (computed in place in the full-resolution sum). With ``keep_full_resolution``, returns
        ``(A, A_full)``: also the mean of the full-resolution layers alone (a second
        ``HW × HW`` tensor, copied before the lower resolutions are added)."""
        if self.full is None:
            raise RuntimeError("diffseg: no self-attention layer ran at the latent resolution")
        h, w = self.grid
        inv = {f: 1.0 / f for f in self.counts}  # r = side / f, so w_r ∝ 1 / f
        total = sum(inv.values())
        full_only = self.full / self.counts[1] if keep_full_resolution else None
        a = self.full.mul_(inv[1] / total / self.counts[1])
        batch = a.shape[0]
        for f, sums in sorted(self.low.items()):
            rh, rw = h // f, w // f
            maps = (sums / self.counts[f]).reshape(batch * rh * rw, 1, rh, rw)
            up = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)
            up = up.reshape(batch, rh * rw, h * w)
            up = up / up.sum(-1, keepdim=True)  # each map sums to 1 over the keys again
            # query side: the map of low-res query (i, j) serves its f×f block of full-res queries
            a.view(batch, rh, f, rw, f, h * w).add_(
                up.view(batch, rh, 1, rw, 1, h * w), alpha=inv[f] / total
            )
        self.full, self.low = None, {}
        return (a, full_only) if keep_full_resolution else a


class SelfAttentionAggregation:
    """Attention processor for an ``attn1`` layer: adds its head-mean probabilities to a
    :class:`SelfAttentionAggregate` and returns the layer's output computed with SDPA."""

    def __init__(self, aggregate: SelfAttentionAggregate, name: str):
        self.aggregate, self.name = aggregate, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):  # fmt: skip
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"diffseg: {self.name} is not a plain self-attention call")
        if attn.spatial_norm is not None or attn.group_norm is not None or attn.residual_connection:
            raise ValueError(f"diffseg: {self.name} is not a transformer-block attention layer")
        q, k, v = project_heads(attn, hidden_states, None)
        self.aggregate.add(iseg_ops.head_mean_attention(q, k, attn.scale))
        return attend(attn, q, k, v)


def self_attention_layers(unet) -> dict[str, Attention]:
    """Every transformer-block self-attention (``…attn1``) layer of ``unet``, by name."""
    layers = {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, Attention) and name.endswith("attn1")
    }
    if not layers:
        raise ValueError("diffseg: the UNet has no self-attention (attn1) layers")
    return layers


@torch.no_grad()
def aggregate_self_attention(
    unet, latents: torch.Tensor, timestep: int, context: torch.Tensor, keep_full_resolution: bool = False,
    added_cond_kwargs: dict | None = None,
):  # fmt: skip
    """One UNet call on ``latents`` at ``timestep`` with text ``context`` (and, for SDXL, its
    ``added_cond_kwargs``); returns the aggregated self-attention ``A`` ``[B, HW, HW]`` fp32 on
    the UNet's finest attention grid (the latent grid on SD; half of it on SDXL, which has no
    attention at the latent resolution), and with ``keep_full_resolution`` the mean of that
    grid's layers too: ``(A, A_full)``. The aggregation processors are installed on the
    ``attn1`` layers for this call only and the previous ones always restored."""
    finest = attention_factors(unet)[0]
    aggregate = SelfAttentionAggregate(tuple(side // finest for side in latents.shape[-2:]))
    processors = {module: SelfAttentionAggregation(aggregate, name) for name, module in self_attention_layers(unet).items()}
    with installed(unet, processors):
        t = torch.full((latents.shape[0],), timestep, device=latents.device, dtype=torch.long)
        unet(latents, t, encoder_hidden_states=context, added_cond_kwargs=added_cond_kwargs, return_dict=False)
    return aggregate.result(keep_full_resolution)


# --------------------------------------------------------------------------- 2. merging


def anchor_indices(grid: tuple[int, int], anchor_grid: int) -> torch.Tensor:
    """DiffSeg's sampling grid: ``anchor_grid`` points per side, evenly spaced by
    ``(side − 1) // (n − 1)`` and centred (rows and columns 1, 5, …, 61 for 16 on 64);
    flat row-major indices ``[n²]``. One point sits at the centre ``(side − 1) // 2``."""
    def points(side: int) -> list[int]:
        if anchor_grid == 1:
            return [(side - 1) // 2]
        step = (side - 1) // (anchor_grid - 1)
        start = (side - 1 - step * (anchor_grid - 1)) // 2
        return [start + i * step for i in range(anchor_grid)]

    h, w = grid
    return torch.tensor([r * w + c for r in points(h) for c in points(w)], dtype=torch.long)


def greedy_groups(close: np.ndarray) -> list[np.ndarray]:
    """DiffSeg's merging pass on a boolean ``[M, M]`` matrix ``close[i, j] = D(i, j) < τ``: in
    order, each map not yet matched is marked and takes every ``j`` close to it (matched or
    not), which are marked too. Returns the groups (index arrays), in order. ``D(i, i) = 0``,
    so each group holds its leader."""
    matched = np.zeros(close.shape[0], dtype=bool)
    groups = []
    for i in range(close.shape[0]):
        if matched[i]:
            continue
        members = np.flatnonzero(close[i] | (np.arange(close.shape[0]) == i))
        matched[members] = True
        groups.append(members)
    return groups


# fp16's smallest subnormal is 2**-24 ≈ 5.96e-8: anything below half of it rounds to 0.
FP16_UNDERFLOW = 2.0**-25


def _close_fp16(anchors: torch.Tensor, attention: torch.Tensor, kl_threshold: float) -> torch.Tensor:
    """Google's first-pass test ``KL(anchor, A[q]) < τ`` as DiffSeg's TensorFlow code computes
    it: both sides cast to fp16 (values below 2.98e-8 become 0), ``ln`` in fp16 (``ln 0 = −∞``),
    the products and sums as :mod:`iseg_ops.kl`'s fp16 distance (fp16 products, fp32-accumulated
    sums rounded to fp16, halves combined in fp16), compared with τ rounded to fp16. A zero on
    either side makes the distance NaN, and ``NaN < τ`` is false: such pairs never match."""
    x, y = anchors.to(torch.float16), attention.to(torch.float16)
    d = fp16_distances(x[None], y[None], torch.log(y)[None])[0]  # [n², HW] fp16
    return d < torch.tensor(kl_threshold, dtype=torch.float16)


def _merge(attention, grid, kl_threshold, anchor_grid, first_pass):
    """:func:`merge_maps` and the number of anchors dropped because they matched nothing
    (only with ``first_pass="fp16"``)."""
    index = anchor_indices(grid, anchor_grid).to(attention.device)
    anchors = attention[index]  # [n², HW]
    # pass 0: each anchor's map becomes the mean of the maps close to it
    if first_pass == "fp16":
        close = _close_fp16(anchors, attention, kl_threshold)
    else:  # fp32 GEMMs; D(a, a) = 0 < τ
        close = iseg_ops.symmetric_kl(anchors, attention) < kl_threshold  # [n², HW]
        close[torch.arange(len(index), device=index.device), index] = True
    # An anchor that matches nothing (fp16: it holds an underflowed value) gets Google's 0/0
    # map, which no later comparison matches and the next pass drops: drop it here.
    matched = close.any(-1)
    dropped = int((~matched).sum())
    if dropped == len(index):
        raise ValueError(
            f"diffseg: all {dropped} anchors hold values that underflow in fp16 (first_pass='fp16', "
            "Google's arithmetic); no segment is left — use first_pass='fp32'"
        )
    weights = close[matched].to(attention.dtype)
    maps = (weights / weights.sum(-1, keepdim=True)) @ attention
    # passes 1 and 2 (float64): greedy on the M×M matrix, fixed within a pass
    maps = maps.double()
    for _ in range(2):
        close = (iseg_ops.symmetric_kl(maps, maps) < kl_threshold).cpu().numpy()
        groups = greedy_groups(close)
        select = torch.zeros(len(groups), maps.shape[0], dtype=maps.dtype)
        for g, members in enumerate(groups):
            select[g, torch.from_numpy(members)] = 1.0 / len(members)
        maps = select.to(maps.device) @ maps
    return maps.float(), dropped


def merge_maps(
    attention: torch.Tensor,
    grid: tuple[int, int],
    kl_threshold: float,
    anchor_grid: int = DiffSegSettings.anchor_grid,
    first_pass: str = DiffSegSettings.first_pass,
) -> torch.Tensor:
    """DiffSeg's three KL merging passes for one image (UNSUPERVISED §1).

    Args:
        attention (Tensor): ``[HW, HW]`` aggregated self-attention, rows sum to 1.
        grid (tuple[int, int]): ``(h, w)`` with ``h · w = HW``.
        kl_threshold (float): τ (> 0).
        anchor_grid (int): anchors per side (16).
        first_pass (str): the arithmetic of pass 0: ``"fp32"`` (two GEMMs; exact zeros follow
            the limits of :func:`iseg_ops.symmetric_kl`) or ``"fp16"``, Google's: fp16 inputs
            and τ, a value below 2.98e-8 becomes 0 and its distance NaN, never close; an anchor
            that then matches nothing is dropped (Google's 0/0 map, dropped by its next pass).

    Returns:
        Tensor: ``[M, HW]`` float32 merged maps, each summing to 1, in merge order.
    """
    return _merge(attention, grid, kl_threshold, anchor_grid, first_pass)[0]


# --------------------------------------------------------------------------- 3. labels


def label_maps(maps: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """``[M, HW]`` maps on ``grid`` → ``[H, W]`` int64 argmax after bilinear upsampling
    (align_corners=False) to ``size``; ties go to the lower index. Upsampled in chunks of maps
    with a running maximum, so memory stays bounded for large images."""
    m = maps.shape[0]
    maps = maps.float().reshape(1, m, *grid)
    chunk = max(1, _LABEL_CHUNK_ELEMENTS // (size[0] * size[1]))
    best = labels = None
    for start in range(0, m, chunk):
        up = F.interpolate(maps[:, start : start + chunk], size=size, mode="bilinear", align_corners=False)[0]
        value, index = up.max(dim=0)  # first maximum within the chunk
        if best is None:
            best, labels = value, index
        else:
            better = value > best  # strict: earlier chunks win ties
            best = torch.where(better, value, best)
            labels = torch.where(better, index + start, labels)
    return labels.long()


# --------------------------------------------------------------------------- 4. refinement


def initial_maps(maps: torch.Tensor, init: str) -> torch.Tensor:
    """iSeg's ``C₀`` ``[HW, M]`` from the merged maps ``[M, HW]``: the maps as columns
    (``init="maps"``) or their one-hot argmax on the grid (``"onehot"``)."""
    if init == "onehot":
        return F.one_hot(maps.argmax(0), maps.shape[0]).float()
    return maps.T

