"""Input conversion, heatmaps and labels (METHOD §4) on hand-computed cases."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from iseg import masks
from iseg.images import to_tensor_batch


def test_pil_and_tensor_inputs_map_to_the_same_model_range():
    rgb = torch.tensor([0, 255, 51], dtype=torch.uint8)
    pil = Image.new("RGB", (8, 8), tuple(rgb.tolist()))
    pixels, sizes = to_tensor_batch(pil, 8)  # no resize: R equals the size
    assert pixels.dtype == torch.uint8 and sizes == [(8, 8)]
    expected = torch.tensor([-1.0, 1.0, 51 / 127.5 - 1.0])[None, :, None, None].expand(1, 3, 8, 8)
    torch.testing.assert_close(masks.to_model_range(pixels, torch.float32), expected)
    tensor = (rgb.float() / 255)[None, :, None, None].expand(1, 3, 8, 8)
    from_tensor, tensor_sizes = to_tensor_batch(tensor, 8)
    assert tensor_sizes == [(8, 8)]
    torch.testing.assert_close(masks.to_model_range(from_tensor, torch.float32), expected)


def test_any_pil_mode_is_converted_to_rgb():
    for mode in ("RGBA", "L", "P", "1", "CMYK"):
        pixels, sizes = to_tensor_batch(Image.new(mode, (5, 3)), 16)
        assert pixels.shape == (1, 3, 16, 16) and sizes == [(3, 5)]


def test_labels_with_background_score():
    # Three pixels, two classes. Background score (1 - max)²:
    #   heats (0.9, 0.2): bg 0.01 → class 1;  (0.3, 0.4): bg 0.36 < 0.4 → class 2;
    #   (0.1, 0.2): bg 0.64 > 0.2 → background.
    heat = torch.tensor([[0.9, 0.3, 0.1], [0.2, 0.4, 0.2]])[None, :, None, :]  # [1, 2, 1, 3]
    assert masks.labels(heat).tolist() == [[[1, 2, 0]]]


def test_labels_with_threshold():
    heat = torch.tensor([[0.9, 0.3, 0.1], [0.2, 0.44, 0.2]])[None, :, None, :]
    assert masks.labels(heat, background_threshold=0.45).tolist() == [[[1, 0, 0]]]
    assert masks.labels(heat, background_threshold=0.15).tolist() == [[[1, 2, 2]]]


def test_heatmaps_are_upsampled_then_min_max_normalised():
    refined = torch.tensor([[[0.0, 1.0], [2.0, 1.0], [4.0, 1.0], [6.0, 1.0]]])  # [1, HW=4, K=2]
    heat = masks.heatmaps(refined, (2, 2), (4, 4))
    assert heat.shape == (1, 2, 4, 4)
    assert heat[0, 0].min() == 0 and heat[0, 0].max() == 1
    assert torch.equal(heat[0, 1], torch.zeros(4, 4))  # a constant map gives zeros, not NaN
    # Bilinear (align_corners=False) keeps the corners: 0 top-left, 6 bottom-right → 0 and 1.
    assert heat[0, 0, 0, 0] == 0 and heat[0, 0, -1, -1] == 1


@pytest.mark.parametrize(
    "label, colour", [(0, (0, 0, 0)), (1, (128, 0, 0)), (2, (0, 128, 0)), (15, (192, 128, 128))]
)
def test_voc_palette(label, colour):
    assert tuple(masks.palette()[3 * label : 3 * label + 3]) == colour


def test_label_image_and_overlay():
    label = torch.tensor([[0, 1], [2, 0]])
    img = masks.label_image(label)
    assert img.mode == "P" and [img.getpixel((x, y)) for y in range(2) for x in range(2)] == [0, 1, 2, 0]
    base = Image.new("RGB", (2, 2), (10, 20, 30))
    over = masks.overlay(base, label)
    assert over.getpixel((0, 0)) == (10, 20, 30)  # background untouched
    assert over.getpixel((1, 0)) != (10, 20, 30)
