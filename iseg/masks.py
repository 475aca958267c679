"""Images in, masks out: input conversion, heatmaps, labels (METHOD §4) and their PNGs."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from iseg_ops.reference import minmax


def to_model_range(pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Pixels from :func:`to_tensor_batch` (uint8, or float in [0, 1]) → ``dtype`` in [-1, 1]."""
    if pixels.dtype == torch.uint8:
        return (pixels.to(torch.float32) / 127.5 - 1.0).to(dtype)
    return (pixels * 2.0 - 1.0).to(dtype)


def upsample(maps: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Maps ``[B, HW, K]`` on a ``grid`` (h, w) → ``[B, K, H, W]`` at ``size`` by bilinear
    upsampling (align_corners=False), fp32."""
    maps = maps.float().transpose(1, 2).reshape(maps.shape[0], -1, *grid)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def heatmaps(refined: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Refined maps ``[B, HW, K]`` on a ``grid`` (h, w) → ``[B, K, H, W]`` heatmaps at ``size``:
    bilinear upsampling (align_corners=False), then per-class min-max to [0, 1].

    Memory: ``4·B·K·H·W`` bytes (1.5 GB for 8 classes on a 12 MP photo); :func:`labels_chunked`
    gives the labels without them."""
    maps = upsample(refined, grid, size)
    flat = maps.flatten(2).transpose(1, 2)  # [B, HW, K] for minmax over the pixels
    return minmax(flat).transpose(1, 2).reshape(maps.shape)


def labels(heat: torch.Tensor, background_threshold: float | None = None) -> torch.Tensor:
    """``[B, K, H, W]`` heatmaps → ``[B, H, W]`` int64 labels, 0 = background, k = class k.

    Without a threshold the background score is ``(1 - max_k heat_k)²`` and the label is the
    argmax over ``[background, heat_1..K]``; with ``τ`` a pixel whose best heat is below ``τ``
    is background.
    """
    best, index = heat.max(dim=1)
    if background_threshold is None:
        background = (1.0 - best) ** 2
        return torch.where(background >= best, 0, index + 1).long()  # ties go to background, as argmax
    return torch.where(best < background_threshold, 0, index + 1).long()


def _interpolation_matrix(n_in: int, n_out: int, device) -> torch.Tensor:
    """``[n_out, n_in]`` weights of 1-D linear interpolation (align_corners=False), so that
    bilinear upsampling of a ``[h, w]`` map is ``Wy @ map @ Wxᵀ``."""
    eye = torch.eye(n_in, device=device).reshape(1, n_in, n_in, 1)
    return F.interpolate(eye, size=(n_out, 1), mode="bilinear", align_corners=False)[0, :, :, 0].T


def labels_chunked(
    refined: torch.Tensor,
    grid: tuple[int, int],
    size: tuple[int, int],
    background_threshold: float | None = None,
    chunk_bytes: int = 64 * 2**20,
) -> torch.Tensor:
    """The labels of :func:`labels` ``(heatmaps(refined[None], grid, size))`` for one image,
    ``refined`` ``[HW, K]`` → ``[H, W]`` int64, without the full-size float heatmaps: bilinear
    upsampling is separable (``Wy @ map @ Wxᵀ``), so rows are made in chunks of at most
    ``chunk_bytes`` of fp32, once for the per-class minimum and maximum and once for the labels.
    Peak extra memory: one chunk plus the int64 labels (8·H·W bytes)."""
    height, width = size
    k = refined.shape[-1]
    maps = refined.float().transpose(0, 1).reshape(k, *grid)  # [K, h, w]
    wy = _interpolation_matrix(grid[0], height, maps.device)  # [H, h]
    cols = torch.einsum("khw,Ww->khW", maps, _interpolation_matrix(grid[1], width, maps.device))
    rows = max(1, chunk_bytes // (4 * k * width))
    lo = torch.full((k,), float("inf"), device=maps.device)
    hi = torch.full((k,), float("-inf"), device=maps.device)
    for start in range(0, height, rows):
        chunk = torch.einsum("Hh,khW->kHW", wy[start : start + rows], cols)
        lo = torch.minimum(lo, chunk.amin(dim=(1, 2)))
        hi = torch.maximum(hi, chunk.amax(dim=(1, 2)))
    span = hi - lo
    out = torch.empty(height, width, dtype=torch.long, device=maps.device)
    for start in range(0, height, rows):
        chunk = torch.einsum("Hh,khW->kHW", wy[start : start + rows], cols)
        heat = torch.where(span[:, None, None] > 0, (chunk - lo[:, None, None]) / span.clamp_min(1e-38)[:, None, None], 0.0)
        out[start : start + rows] = labels(heat[None], background_threshold)[0]
    return out


def region_labels(heat: torch.Tensor, threshold: float) -> torch.Tensor:
    """Region heatmaps ``[R, H, W]`` → ``[H, W]`` int64: 0 where no region's heat is above
    ``threshold``, else r = the region (1-based) with the highest heat."""
    best, index = heat.max(dim=0)
    return torch.where(best > threshold, index + 1, 0).long()


def palette(n: int = 256) -> list[int]:
    """The PASCAL VOC colour palette (flattened RGB triples) for ``n`` labels."""
    colours = []
    for label in range(n):
        r = g = b = 0
        c = label
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        colours += [r, g, b]
    return colours


def label_image(label: torch.Tensor) -> Image.Image:
    """``[H, W]`` labels → a palette ('P' mode) PNG-ready image with VOC colours."""
    if int(label.max()) > 255:
        raise ValueError(f"label_image: at most 255 classes fit a palette image, got {int(label.max())}")
    img = Image.fromarray(label.to(torch.uint8).cpu().numpy(), mode="P")
    img.putpalette(palette())
    return img


def overlay(image: Image.Image, label: torch.Tensor, alpha: float = 0.5) -> Image.Image:
    """The image with its labels' colours blended in (background left as it is)."""
    base = image.convert("RGB")
    colours = label_image(label).convert("RGB")
    mask = Image.fromarray(((label.cpu().numpy() > 0) * int(255 * alpha)).astype(np.uint8))
    return Image.composite(colours, base, mask)

