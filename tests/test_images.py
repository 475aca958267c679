"""``iseg.images``: reading files (EXIF, frames, alpha, wide modes) and the pixel batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from iseg.images import load_image, to_rgb, to_tensor_batch


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int64)


# --- load_image -------------------------------------------------------------------------------

# Orientation tag → how the stored array becomes the viewed one (EXIF 2.3, in numpy terms).
ORIENTATIONS = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: a.transpose(1, 0, 2)[:, ::-1],  # rotate 90° clockwise
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: a.transpose(1, 0, 2)[::-1],  # rotate 90° counter-clockwise
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied_on_load(orientation, tmp_path):
    stored = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.png"  # lossless, so pixels compare exactly
    Image.fromarray(stored).save(path, exif=exif)
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert np.array_equal(np.asarray(loaded), ORIENTATIONS[orientation](stored))


def test_in_memory_images_keep_their_orientation():
    """An in-memory image is taken as it is (documented): PIL keeps the EXIF bytes through
    transpose, so applying the tag there would turn an already turned image again."""
    exif = Image.Exif()
    exif[0x0112] = 6
    image = Image.new("RGB", (7, 5))
    image.info["exif"] = exif.tobytes()
    assert image.getexif()[0x0112] == 6
    assert to_tensor_batch(image, 8)[1] == [(5, 7)]


def test_animated_image_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 4), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as check:
        assert check.n_frames == 2
    assert load_image(path).getpixel((0, 0)) == (255, 0, 0)
    apng = tmp_path / "anim.png"
    frames[1].save(apng, save_all=True, append_images=[frames[0]], duration=50)
    with Image.open(apng) as check:
        assert check.n_frames == 2
    assert load_image(apng).getpixel((0, 0)) == (0, 0, 255)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_alpha_is_composited_on_white(mode):
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., :3] = 100  # grey 100 everywhere
    rgba[..., 3] = [[0, 255, 128], [0, 0, 255]]  # transparent, opaque, half
    image = Image.fromarray(rgba, "RGBA")
    if mode == "LA":
        image = image.convert("LA")
    if mode == "PA":
        image = image.convert("PA")
    assert image.mode == mode
    out = pixels(to_rgb(image))
    expected_alpha = rgba[..., 3].astype(np.int64)
    # result = a·100 + (1 - a)·255, with PIL's integer rounding: within 1
    expected = (expected_alpha * 100 + (255 - expected_alpha) * 255 + 127) // 255
    assert np.abs(out - expected[..., None]).max() <= 1
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [100, 100, 100]


def test_palette_transparency_is_white():
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    assert pixels(to_rgb(image)).tolist() == [[[255, 255, 255], [200, 10, 10]]]


@pytest.mark.parametrize(
    "mode, dtype, values",
    [
        ("I;16", np.uint16, [[1000, 1500], [2000, 3000]]),
        ("I", np.int32, [[-70000, 0], [70000, 130000]]),
        ("F", np.float32, [[0.5, 0.75], [1.0, 1.5]]),
    ],
)
def test_wide_modes_are_rescaled_by_their_range(mode, dtype, values, tmp_path):
    array = np.array(values, dtype=dtype)
    image = Image.fromarray(array)
    assert image.mode == mode
    v = array.astype(np.float64)
    expected = np.rint((v - v.min()) / (v.max() - v.min()) * 255).astype(np.int64)
    assert pixels(to_rgb(image)).tolist() == np.repeat(expected[..., None], 3, -1).tolist()
    path = tmp_path / "wide.tif"
    image.save(path)
    assert pixels(load_image(path)).tolist() == np.repeat(expected[..., None], 3, -1).tolist()


def test_constant_wide_image_is_black_and_nan_is_refused():
    assert pixels(to_rgb(Image.fromarray(np.full((2, 2), 7, np.uint16)))).max() == 0
    with pytest.raises(ValueError, match="NaN or Inf"):
        to_rgb(Image.fromarray(np.array([[0.0, np.nan]], np.float32)))


def test_truncated_file_fails_on_load(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:300])
    with Image.open(path):  # the header alone is fine
        pass
    with pytest.raises(OSError, match="truncated"):
        load_image(path)


# --- to_tensor_batch --------------------------------------------------------------------------


def test_antialias_false_is_the_authors_resize():
    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    batch, sizes = to_tensor_batch(Image.fromarray(array), 32, antialias=False)
    expected = F.interpolate(
        torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255.0, size=(32, 32),
        mode="bilinear", align_corners=False, antialias=False,
    )  # fmt: skip
    assert sizes == [(37, 53)] and batch.dtype == torch.float32
    assert torch.equal(batch, expected)
    # Differs from the default (antialiased) resize when shrinking.
    default, _ = to_tensor_batch(Image.fromarray(array), 32)
    assert default.dtype == torch.uint8
    assert not torch.allclose(default.float() / 255, expected, atol=1 / 255)
    # A tensor input with antialias=False: the same interpolation.
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255.0
    assert torch.equal(to_tensor_batch(tensor, 32, antialias=False)[0], expected)


@pytest.mark.parametrize(
    "image, error, match",
    [
        (torch.full((1, 3, 4, 4), 1.5), ValueError, r"in \[0, 1\], got \[1.5, 1.5\]"),
        (torch.full((3, 4, 4), -0.1), ValueError, r"in \[0, 1\]"),
        (torch.tensor(float("nan")).expand(1, 3, 2, 2), ValueError, "^image contains NaN$"),
        (torch.zeros(0, 3, 4, 4), ValueError, "empty batch"),
        (torch.zeros(1, 3, 0, 0), ValueError, r"empty image \(0×0\)"),
        (torch.zeros(1, 4, 4, 4), ValueError, r"\[B, 3, H, W\]"),
        (torch.zeros(1, 3, 4, 4, dtype=torch.uint8), TypeError, "floating point"),
        (torch.zeros(1, 3, 4, 4, device="meta"), ValueError, "meta"),
        (Image.new("RGB", (0, 0)), ValueError, r"image\[0\]: an empty image"),
        ([], TypeError, "empty list"),
        ([Image.new("RGB", (2, 2)), "x.png"], TypeError, r"image\[1\] must be a PIL image"),
        ("x.png", TypeError, "image must be"),
    ],
)  # fmt: skip
def test_bad_images_are_clear_errors(image, error, match):
    with pytest.raises(error, match=match):
        to_tensor_batch(image, 8)


def test_nan_with_out_of_range_values_says_nan():
    image = torch.full((1, 3, 2, 2), 2.0)
    image[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="^image contains NaN$"):
        to_tensor_batch(image, 8)


def test_pil_modes_share_load_image_handling():
    """A PIL image in memory gets the same conversion as a file (alpha on white, wide modes)."""
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_tensor_batch(rgba, 4)[0].unique().tolist() == [255]  # white, not black
    wide = Image.fromarray(np.array([[0, 65535], [0, 65535]], np.uint16))
    batch, _ = to_tensor_batch(wide, 2)
    assert batch[0, 0].tolist() == [[0, 255], [0, 255]]
