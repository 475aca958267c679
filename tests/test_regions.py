"""Regions and given masks (METHOD §5): the text-free capture, initial maps from hand-built grids,
the authors' per-cell line averaging, and refine_masks, recomputed independently."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import iseg_ops
from iseg import Box, Line, Mask, Point
from iseg.capture import CrossAttentionCapture
from iseg_ops import reference

from .conftest import generator, make_image
from .test_pipeline import SELF_LAYER, head_probs, record_projections

LAM = 0.1 / math.log(10)  # the interactive recipe: ent 0.1
H, W, G = 96, 120, 16  # image size, self-attention grid of the tiny model


def one_hot(*cells):
    c = torch.zeros(G * G, len(cells), dtype=torch.float64)
    for j, (r, col) in enumerate(cells):
        c[r * G + col, j] = 1.0
    return c


def demo_refine(attn, columns, iters=50):
    """The authors' demo in float64: per-iteration normalised refinement with T ≤ 1, then each
    column divided by its max."""
    refined = reference.refine(attn.double(), columns[None], iters, LAM, t_max=1.0)[0]
    return refined / refined.amax(0, keepdim=True)


def upsample(maps):
    """``[HW, R]`` → ``[R, H, W]`` bilinear, no min-max."""
    return F.interpolate(maps.T.reshape(1, -1, G, G), size=(H, W), mode="bilinear", align_corners=False)[0]


def test_text_free_capture_runs_only_what_it_needs(pipe, image):
    unet = pipe.unet
    seen, handles = record_projections(unet, [SELF_LAYER])
    states, processors = [], []

    def spy(module, args, kwargs):
        states.append(kwargs["encoder_hidden_states"].clone())
        processors.append(module.processor)

    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            handles.append(module.register_forward_pre_hook(spy, with_kwargs=True))
    after = [unet.conv_out, unet.up_blocks[3].attentions[2], unet.get_submodule(SELF_LAYER.replace("attn1", "attn2"))]
    ran = []
    handles += [m.register_forward_pre_hook(lambda m, a: ran.append(m)) for m in after]
    cap = pipe.capture(image, generator=generator())
    for h in handles:
        h.remove()

    assert cap.cross_attention is None and cap.grid == (G, G) and cap.sizes == [(H, W)]
    assert ran == []  # nothing after the self-attention layer ran
    assert not any(isinstance(p, CrossAttentionCapture) for p in processors)  # no cross capture
    # The prompt " " with BOS × γ (γ = 1.6): every attn2 sees it.
    ids = pipe.tokenizer(" ", padding="max_length", max_length=77, return_tensors="pt").input_ids
    plain = pipe.text_encoder(ids)[0]
    expected = plain.clone()
    expected[:, 0] *= 1.6
    torch.testing.assert_close(states[0], expected)
    # The self-attention: the mean over all heads.
    heads = unet.get_submodule(SELF_LAYER).heads
    probs = head_probs(seen[(SELF_LAYER, "to_q")][0], seen[(SELF_LAYER, "to_k")][0], heads).mean(1)
    torch.testing.assert_close(cap.self_attention.double(), probs, atol=1e-6, rtol=1e-5)


def test_regions_recomputed_from_hand_built_grids(pipe, image, monkeypatch):
    calls = []
    real_refine = iseg_ops.refine

    def counting(attn, cross, **kwargs):
        calls.append(cross.shape[-1])
        return real_refine(attn, cross, **kwargs)

    monkeypatch.setattr(iseg_ops, "refine", counting)
    regions = [
        Point(60, 30),  # cell (30·16 // 96, 60·16 // 120) = (5, 8)
        Box(15, 12, 45, 36),  # rows 2..5, cols 2..5 (end exclusive: ⌊36·16/96⌋ = 6, ⌊45·16/120⌋ = 6)
        Line([(0, 90), (119, 90)]),  # row 15, every column: 16 cells
    ]
    # 3 iterations: on a random tiny model, 50 make every map converge to one stationary map.
    out = pipe.segment_regions(image, regions, iters=3, generator=generator())
    assert calls == [1 + 1 + 16]  # one refine call, every cell map a column
    cap = pipe.capture(image, generator=generator())

    box = torch.zeros(G, G, dtype=torch.float64)
    box[2:6, 2:6] = 1
    columns = torch.cat([one_hot((5, 8)), box.reshape(-1, 1), one_hot(*[(15, c) for c in range(G)])], 1)
    refined = demo_refine(cap.self_attention, columns, iters=3)
    line = refined[:, 2:].mean(1)  # each cell's map divided by its max, then averaged
    maps = torch.stack([refined[:, 0], refined[:, 1], line / line.max()], dim=1)
    heat = upsample(maps)

    assert out.heatmaps.shape == (1, 3, H, W) and out.masks.dtype == torch.bool
    torch.testing.assert_close(out.heatmaps[0].double(), heat, atol=1e-4, rtol=0)
    # Masks: heat > 0.5 (a tie is out); labels: the best region over the threshold.
    close = (heat - 0.5).abs() < 1e-3  # pixels too close to the threshold to judge
    assert torch.equal(out.masks[0][~close], (heat > 0.5)[~close])
    top2 = heat.topk(2, dim=0).values
    best, index = heat.max(0)
    expected = torch.where(best > 0.5, index + 1, 0)
    sure = ((best - 0.5).abs() > 1e-3) & (top2[0] - top2[1] > 1e-3)  # no near-tie to judge
    assert sure.float().mean() > 0.9
    assert torch.equal(out.labels[0][sure], expected[sure])
    assert out.labels.dtype == torch.int64 and set(out.labels.unique().tolist()) <= {0, 1, 2, 3}


def test_multi_point_region_and_mask(pipe, image):
    mask = np.zeros((H, W), dtype=bool)
    mask[:12, :15] = True  # exactly cell (0, 0) and half of cell (0, 1)... see below
    mask[:6, 15:] = False
    regions = [Point([(1, 1), (2, 2), (119, 95)]), Mask(mask)]
    out = pipe.segment_regions(image, regions, iters=5, generator=generator())
    cap = pipe.capture(image, generator=generator(), recipe="interactive")
    # Several points: one map per distinct cell ((0, 0) twice, (15, 15)), averaged.
    cells = one_hot((0, 0), (15, 15))
    # The mask covers cell (0, 0) = rows 0..5, cols 0..7.5 fully, and cell (0, 1) rows 0..5,
    # cols 7.5..15 fully: each cell is 6 × 7.5 pixels.
    area = torch.zeros(G * G, 1, dtype=torch.float64)
    area[0, 0] = area[1, 0] = 1.0
    area[G, 0] = area[G + 1, 0] = 1.0  # rows 6..11 too
    refined = demo_refine(cap.self_attention, torch.cat([cells, area], 1), iters=5)
    points = refined[:, :2].mean(1)
    maps = torch.stack([points / points.max(), refined[:, 2]], 1)
    torch.testing.assert_close(out.heatmaps[0].double(), upsample(maps), atol=1e-4, rtol=0)


def test_batch_of_images_takes_a_region_list_each(pipe):
    images = [make_image(1), make_image(2, (64, 64))]
    out = pipe.segment_regions(images, [[Point(5, 5)], [Box(0, 0, 30, 30), Point(60, 60)]], generator=[generator(), generator()])
    assert [tuple(h.shape) for h in out.heatmaps] == [(1, 96, 120), (2, 64, 64)]
    single = pipe.segment_regions(images[1], [Box(0, 0, 30, 30), Point(60, 60)], generator=generator())
    torch.testing.assert_close(out.heatmaps[1], single.heatmaps[0], atol=1e-4, rtol=0)


def test_refine_masks_keeps_ids_and_ignore(pipe, image):
    label_map = torch.zeros(H, W, dtype=torch.long)
    label_map[:48, :60] = 7  # exactly the cells rows 0..7, cols 0..7
    label_map[60:, 75:] = 3  # rows 10..15, cols 10..15
    label_map[:6, 105:] = 255  # one whole ignored cell (0, 14..15)
    out = pipe.refine_masks(image, label_map, generator=generator())
    cap = pipe.capture(image, generator=generator())

    grid = torch.zeros(2, G, G, dtype=torch.float64)
    grid[0, 10:, 10:] = 1  # id 3 first (ascending)
    grid[1, :8, :8] = 1
    refined = reference.refine(cap.self_attention.double(), grid.reshape(2, -1).T[None], 50, LAM, t_max=1.0)
    up = F.interpolate(refined.transpose(1, 2).reshape(1, 2, G, G), size=(H, W), mode="bilinear", align_corners=False)
    lo, hi = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
    heat = (up - lo) / (hi - lo)
    torch.testing.assert_close(out.heatmaps.double(), heat, atol=1e-4, rtol=0)
    best, index = heat[0].max(0)
    expected = torch.tensor([0, 3, 7])[torch.where((1 - best) ** 2 >= best, 0, index + 1)]
    expected[label_map == 255] = 255
    sure = ((1 - best) ** 2 - best).abs() > 1e-3
    assert torch.equal(out.labels[0][sure], expected[sure])
    assert torch.equal(out.labels[0][label_map == 255], torch.full((36,), 255)) or (out.labels[0][label_map == 255] == 255).all()
    assert set(out.labels.unique().tolist()) <= {0, 3, 7, 255}

    only_background = pipe.refine_masks(image, torch.where(label_map == 255, 255, 0))
    assert only_background.heatmaps.shape == (1, 0, H, W)
    assert set(only_background.labels.unique().tolist()) == {0, 255}


@pytest.mark.parametrize(
    "regions, match",
    [
        ([Point(500, 10)], r"regions\[0\]"),
        ([Point(5, 5), Box(30, 10, 20, 40)], r"regions\[1\]"),
        ([Line([(1, 1)])], r"regions\[0\]"),
        ([Mask(np.ones((10, 10), dtype=bool))], r"regions\[0\]"),
        ([], "region"),
        ([Point(float("nan"), 3)], r"regions\[0\]"),
    ],
)
def test_bad_regions_fail_before_the_model_runs(pipe, image, regions, match):
    def forbidden(*args, **kw):
        raise AssertionError("a model ran")

    handles = [m.register_forward_pre_hook(forbidden) for m in (pipe.vae, pipe.text_encoder, pipe.unet.conv_in)]
    with pytest.raises((ValueError, TypeError), match=match):
        pipe.segment_regions(image, regions)
    with pytest.raises(ValueError, match="label_map"):
        pipe.refine_masks(image, torch.zeros(10, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="300"):
        pipe.refine_masks(image, torch.full((H, W), 300))
    for h in handles:
        h.remove()
