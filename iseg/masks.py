"""Images in, masks out: input conversion, heatmaps, labels (METHOD §4) and their PNGs."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from iseg_ops.reference import minmax


def to_tensor_batch(image: object, resolution: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Convert a PIL image, a list of them, or a float tensor ``[B, 3, H, W]`` / ``[3, H, W]``
    in [0, 1] to ``[B, 3, R, R]`` pixels (bilinear resize to ``resolution`` R): uint8 for PIL
    input (a quarter of the bytes to upload), float in [0, 1] for tensor input;
    :func:`to_model_range` maps either to [-1, 1] on the device.

    Returns the batch (on the input tensor's device, else CPU) and each input's ``(H, W)``.
    Any PIL mode (RGBA, grayscale, palette, …) is converted to RGB.
    """
    if isinstance(image, torch.Tensor):
        if not image.is_floating_point():
            raise TypeError(f"image: a tensor image must be floating point in [0, 1], got {image.dtype}")
        batch = image.unsqueeze(0) if image.dim() == 3 else image
        if batch.dim() != 4 or batch.shape[1] != 3 or min(batch.shape[2:]) == 0:
            raise ValueError(f"image: a tensor image must be [B, 3, H, W], got {tuple(image.shape)}")
        sizes = [tuple(batch.shape[2:])] * batch.shape[0]
        batch = F.interpolate(
            batch.float(), size=(resolution, resolution), mode="bilinear",
            align_corners=False, antialias=True,
        )  # fmt: skip
        return batch, sizes
    images = [image] if isinstance(image, Image.Image) else image
    if not isinstance(images, (list, tuple)) or not images:
        raise TypeError(
            "image must be a PIL image, a non-empty list of PIL images or a float tensor "
            f"[B, 3, H, W], got {type(image).__name__}"
        )
    arrays, sizes = [], []
    for i, img in enumerate(images):
        if not isinstance(img, Image.Image):
            raise TypeError(f"image[{i}] must be a PIL image, got {type(img).__name__}")
        sizes.append((img.height, img.width))
        rgb = img.convert("RGB").resize((resolution, resolution), Image.BILINEAR)
        arrays.append(np.asarray(rgb))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2), sizes


def to_model_range(pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Pixels from :func:`to_tensor_batch` (uint8, or float in [0, 1]) → ``dtype`` in [-1, 1]."""
    if pixels.dtype == torch.uint8:
        return (pixels.to(torch.float32) / 127.5 - 1.0).to(dtype)
    return (pixels * 2.0 - 1.0).to(dtype)


def heatmaps(refined: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Refined maps ``[B, HW, K]`` on a ``grid`` (h, w) → ``[B, K, H, W]`` heatmaps at ``size``:
    bilinear upsampling (align_corners=False), then per-class min-max to [0, 1]."""
    maps = refined.float().transpose(1, 2).reshape(refined.shape[0], -1, *grid)
    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
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

