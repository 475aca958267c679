"""The authors' configuration (classic attention, full forward, fp32 reference refinement)
and ours agree on the same weights and noise (issue: output must not change)."""

from __future__ import annotations

import pytest
import torch

from iseg.baseline import AuthorsBaseline

from .conftest import generator, make_image

CLASSES = ["cat", "dog", "potted plant"]


@pytest.mark.parametrize("sdpa_elsewhere", [False, True], ids=["authors", "sdpa_capture"])
def test_baseline_and_iseg_heatmaps_agree(pipe, sdpa_elsewhere):
    images = [make_image(1), make_image(2)]
    baseline = AuthorsBaseline(pipe, sdpa_elsewhere=sdpa_elsewhere)
    before = dict(pipe.unet.attn_processors)
    heat, labels = baseline(images, CLASSES, generator=[generator(1), generator(2)])
    assert pipe.unet.attn_processors == before  # the baseline restores the processors too
    ours = pipe(images, CLASSES, generator=[generator(1), generator(2)])
    assert heat.shape == ours.heatmaps.shape == (2, 3, 96, 120)
    assert (heat - ours.heatmaps).abs().max() < 1e-2
    assert (labels == ours.labels).float().mean() > 0.99


def test_baseline_uses_the_head_subset(pipe):
    image = make_image(3)
    heat, _ = AuthorsBaseline(pipe)(image, CLASSES, generator=generator(), self_attention_heads=(0,))
    ours = pipe(image, CLASSES, generator=generator(), self_attention_heads=(0,))
    other = pipe(image, CLASSES, generator=generator(), self_attention_heads=(1,))
    assert (heat - ours.heatmaps).abs().max() < 1e-2
    assert (heat - other.heatmaps).abs().max() > 1e-2  # the subset matters on this model


def test_stage_timer_records_every_stage(pipe):
    image = make_image(4)
    for runner in (pipe, AuthorsBaseline(pipe)):
        with runner.stage_timer.recording() as seconds:
            runner(image, CLASSES, generator=generator())
        assert set(seconds) == {"text", "vae", "unet", "ops", "post"}
        assert all(s > 0 for s in seconds.values())
    assert runner.stage_timer.seconds is None  # off again after recording
