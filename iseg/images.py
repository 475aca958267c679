"""Images in: reading files and turning PIL images or tensors into the model's pixel batch.

Every image, read from a file or given in memory, goes through the same conversion to RGB
(:func:`to_rgb`):

* Files: EXIF orientation is applied (``ImageOps.exif_transpose``) by :func:`load_image`, so
  a phone photo is segmented the way viewers show it, and masks line up with that view.
  In-memory PIL images are taken as they are (no EXIF transpose): PIL keeps the EXIF bytes
  through ``rotate``/``transpose``, so applying the tag there would turn an image the user
  already turned a second time. For a photo opened with ``Image.open``, pass
  ``load_image(path)`` or ``ImageOps.exif_transpose(img)``.
* Animated images (GIF, APNG, WebP, multi-page TIFF): :func:`load_image` reads the first
  frame; an in-memory image is used at the frame it is at.
* Transparency (RGBA, LA, PA, a palette or grey image with a transparent colour) is
  composited on white.
* 16-bit and 32-bit integer and float grey images (``I;16*``, ``I``, ``F``) are rescaled to
  8 bits by their range: ``(v - min) / (max - min) · 255`` (a constant image becomes black).
  A float image with NaN or Inf is refused.
* Any other mode (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, …) goes through PIL's
  ``convert("RGB")``.
* Large images: PIL's ``DecompressionBombWarning`` (an image between its limit and twice it)
  is silenced for an image that is read (it says nothing a user can act on); beyond twice the
  limit PIL raises ``DecompressionBombError``, which is reported.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


@contextlib.contextmanager
def accept_large_images() -> Iterator[None]:
    """PIL's ``DecompressionBombWarning`` silenced inside (the error beyond twice the limit is
    not)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Read and fully decode the image at ``path`` (its first frame) as RGB (see the module
    docstring for orientation, transparency and wide modes).

    Raises:
        OSError: missing, unreadable, truncated or corrupt file (PIL's errors are OSErrors).
        ValueError: a float image with NaN or Inf; a mode PIL cannot convert to RGB.
        PIL.Image.DecompressionBombError: larger than PIL's limit.
    """
    with accept_large_images(), Image.open(path) as image:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        image.load()  # the full decode: truncated or corrupt data fails here
        return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as an RGB image: transparency on white, 16/32-bit and float grey rescaled by
    their range (module docstring). EXIF orientation is not applied here."""
    if image.mode in WIDE_MODES:
        return _rescale_wide(image)
    has_alpha = image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or (
        "transparency" in image.info and image.mode in ("P", "L", "RGB", "1")
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _rescale_wide(image: Image.Image) -> Image.Image:
    values = np.asarray(image)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise ValueError(f"image: a {image.mode} image with NaN or Inf values")
    values = values.astype(np.float64)
    if values.size == 0:
        return Image.new("RGB", image.size)
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def _check_tensor(image: torch.Tensor) -> torch.Tensor:
    if not image.is_floating_point():
        raise TypeError(
            f"image: a tensor image must be floating point in [0, 1], got {image.dtype}"
        )
    batch = image.unsqueeze(0) if image.dim() == 3 else image
    if batch.dim() != 4 or batch.shape[1] != 3:
        raise ValueError(f"image: a tensor image must be [B, 3, H, W], got {tuple(image.shape)}")
    if batch.shape[0] == 0:
        raise ValueError("image: empty batch (B = 0)")
    if min(batch.shape[2:]) == 0:
        raise ValueError(f"image: an empty image ({batch.shape[2]}×{batch.shape[3]})")
    if batch.is_meta:
        raise ValueError("image: a meta tensor has no pixels")
    stats = torch.stack(
        [batch.isnan().any().float(), batch.amin().float(), batch.amax().float()]
    ).tolist()  # one device-to-host read
    if stats[0]:
        raise ValueError("image contains NaN")
    if stats[1] < 0 or stats[2] > 1:
        raise ValueError(
            f"image: tensor values must be in [0, 1], got [{stats[1]:g}, {stats[2]:g}] "
            "(divide 8-bit pixels by 255)"
        )
    return batch


def to_tensor_batch(
    image: object, resolution: int, antialias: bool = True
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """A PIL image, a list of them, or a float tensor ``[B, 3, H, W]`` / ``[3, H, W]`` in
    [0, 1] → ``[B, 3, R, R]`` pixels at ``resolution`` R and each input's ``(H, W)``.

    ``antialias=True`` (default): PIL images are resized by PIL (bilinear, antialiased when
    shrinking) and returned as uint8 (a quarter of the bytes to upload); tensors by
    ``F.interpolate(bilinear, antialias=True)``, float. ``antialias=False``: exactly the
    authors' resize: each image → float ``[0, 1]`` tensor, ``F.interpolate(bilinear,
    align_corners=False, antialias=False)``; float output. :func:`iseg.masks.to_model_range`
    maps either to [-1, 1]. The batch is on the input tensor's device, else the CPU.

    PIL images go through :func:`to_rgb` (alpha on white, wide modes; no EXIF transpose, see
    the module docstring).

    Raises:
        TypeError: not an image, a non-empty list of PIL images or a float tensor.
        ValueError: an empty tensor batch, a 0×0 image, a tensor outside [0, 1], a tensor with
            NaN ("image contains NaN"), a wrong tensor shape.
    """
    if isinstance(image, torch.Tensor):
        batch = _check_tensor(image)
        sizes = [tuple(batch.shape[2:])] * batch.shape[0]
        out = F.interpolate(
            batch.float(), size=(resolution, resolution), mode="bilinear",
            align_corners=False, antialias=antialias,
        )  # fmt: skip
        return out, sizes
    images = [image] if isinstance(image, Image.Image) else image
    if not isinstance(images, (list, tuple)):
        raise TypeError(
            "image must be a PIL image, a list of PIL images or a float tensor "
            f"[B, 3, H, W] in [0, 1], got {type(image).__name__}"
        )
    if not images:  # a TypeError, as for any other non-image
        raise TypeError("image must be a PIL image or a non-empty list of them, got an empty list")
    rgbs, sizes = [], []
    for i, img in enumerate(images):
        if not isinstance(img, Image.Image):
            raise TypeError(f"image[{i}] must be a PIL image, got {type(img).__name__}")
        if img.width == 0 or img.height == 0:
            raise ValueError(f"image[{i}]: an empty image ({img.height}×{img.width})")
        rgb = to_rgb(img)
        sizes.append((rgb.height, rgb.width))
        rgbs.append(rgb)
    if antialias:
        arrays = [np.asarray(rgb.resize((resolution, resolution), Image.BILINEAR)) for rgb in rgbs]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2), sizes
    resized = [
        F.interpolate(
            torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None].float() / 255.0,
            size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=False,
        )  # fmt: skip
        for rgb in rgbs
    ]
    return torch.cat(resized), sizes
