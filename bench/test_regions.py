"""Speed of ``segment_regions``: a 40-cell line and 3 boxes cost one capture and ONE ``refine``
call with 43 columns (METHOD §5, issue 8), not 43 calls.

On a GPU: the real SD 2.1-base architecture (random weights, fp16), 512×512 image, 64×64 grid,
the ``interactive`` recipe (50 iterations, λ = 0.0434294, T ≤ 1). Record with

    pytest bench/test_regions.py --benchmark-json bench/results/<gpu-name>-regions.json

Without a GPU the tiny model runs on CPU (its 16×16 grid still holds a 40-cell line); the CUDA
shapes are skipped. ``test_segment_regions`` records the per-stage seconds and checks (a
structural check, not a timing one) that exactly one refine call with 43 columns ran;
``test_refine_columns`` compares that one call with the 43 separate calls it replaces, on the
captured self-attention.
"""

from __future__ import annotations

import platform

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import iseg_ops
from iseg import Box, Line
from iseg.seeds import region_maps

CUDA = torch.cuda.is_available()
LINE_CELLS, BOXES = 40, 3


@pytest.fixture(scope="module")
def scene(pipe):
    """The image, its regions (a serpentine line through the centres of the first 40 cells in
    boustrophedon order, so it crosses exactly those cells, and 3 boxes) and one text-free
    capture of it."""
    side = pipe.default_resolution
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    cap = pipe.capture(image, recipe="interactive", generator=torch.Generator().manual_seed(0))
    gh, gw = cap.grid
    cell_h, cell_w = side / gh, side / gw
    centres = []
    for k in range(LINE_CELLS):
        row, col = divmod(k, gw)
        col = col if row % 2 == 0 else gw - 1 - col
        centres.append(((col + 0.5) * cell_w, (row + 0.5) * cell_h))
    regions = [
        Line(centres),
        Box(0, side / 2, side / 4, side),
        Box(side / 2, side / 2, side, side),
        Box(side / 4, side / 4, 3 * side / 4, 3 * side / 4),
    ]
    columns, groups = region_maps(regions, (side, side), cap.grid)
    assert columns.shape[1] == LINE_CELLS + BOXES and len(groups[0]) == LINE_CELLS
    return image, regions, cap


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _info(benchmark, pipe, cap, **extra):
    benchmark.extra_info.update(
        gpu=torch.cuda.get_device_name() if CUDA else f"cpu ({platform.processor() or 'unknown'})",
        model="sd21-base (random weights, fp16)" if CUDA else "tiny (random weights, fp32)",
        resolution=pipe.default_resolution,
        grid=list(cap.grid),
        columns=LINE_CELLS + BOXES,
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        **extra,
    )


def test_segment_regions(benchmark, pipe, scene, monkeypatch):
    image, regions, cap = scene

    def run():
        out = pipe.segment_regions(image, regions, generator=torch.Generator().manual_seed(0))
        _sync()
        return out

    # One refine call with all 43 columns (spied on during one call; the refine still runs).
    calls = []
    refine = iseg_ops.refine

    def spy(attn, cross, *args, **kwargs):
        calls.append(tuple(cross.shape))
        return refine(attn, cross, *args, **kwargs)

    monkeypatch.setattr(iseg_ops, "refine", spy)
    out = run()
    monkeypatch.setattr(iseg_ops, "refine", refine)
    assert calls == [(1, cap.grid[0] * cap.grid[1], LINE_CELLS + BOXES)], calls
    assert out.heatmaps.shape[1] == len(regions)

    with pipe.stage_timer.recording() as seconds:
        run()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    run()
    peak = torch.cuda.max_memory_allocated() / 1e9 if CUDA else None
    benchmark.pedantic(run, rounds=10 if CUDA else 2, iterations=1, warmup_rounds=1)
    _info(benchmark, pipe, cap, regions=len(regions), refine_calls=len(calls),
          s_per_image=benchmark.stats.stats.median, peak_mem_gb=peak, stages=dict(seconds))


@pytest.mark.parametrize("provider", ["one_call", "per_column_calls"])
def test_refine_columns(benchmark, pipe, scene, provider):
    """The refine step alone: all 43 columns in one call vs one call per column."""
    image, regions, cap = scene
    recipe = pipe.resolve_recipe("interactive")
    columns, _ = region_maps(regions, (pipe.default_resolution,) * 2, cap.grid)
    attn = cap.self_attention
    cross = columns[None].to(device=attn.device, dtype=attn.dtype)
    options = dict(iters=recipe.iters, lam=recipe.lam, t_max=recipe.t_max)

    def run():
        if provider == "one_call":
            out = iseg_ops.refine(attn, cross, **options)
        else:
            out = torch.cat(
                [iseg_ops.refine(attn, cross[..., j : j + 1], **options)
                 for j in range(cross.shape[-1])], dim=-1,
            )  # fmt: skip
        _sync()
        return out

    # Same result either way (columns are refined independently).
    torch.testing.assert_close(run().float(), iseg_ops.refine(attn, cross, **options).float(),
                               atol=2e-3, rtol=0)  # fmt: skip
    benchmark.pedantic(run, rounds=10 if CUDA else 3, iterations=1, warmup_rounds=1)
    _info(benchmark, pipe, cap, provider=provider, dtype=str(attn.dtype),
          backend="triton" if attn.is_cuda else "reference", iters=recipe.iters)
