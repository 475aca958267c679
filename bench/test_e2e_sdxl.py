"""End-to-end speed and memory of iseg on SDXL (CUDA only).

The real SDXL-base architecture (UNet 2.57B, VAE, CLIP-L and OpenCLIP-bigG text encoders:
:func:`iseg.testing.sdxl_base_components`, random weights, fp16, built on the GPU), the
``sdxl`` recipe at 1024² (64×64 self-attention, as SD 2.1 at 512²), K = 3 classes, batch 1
and 4; regions (``sdxl-interactive``) at batch 1. The VAE encodes in fp32 (its config says
``force_upcast``, as SDXL's). Record with

    pytest bench/test_e2e_sdxl.py --benchmark-json bench/results/<gpu-name>-e2e-sdxl.json

Each benchmark's ``extra_info``: task, batch, s_per_image, peak_mem_gb, gpu, the seconds per
image of each stage (text, vae, unet, ops, post) from one instrumented call, and the VAE's
dtype. Without a GPU every case is skipped: the CPU tests of SDXL are tests/test_sdxl.py.
"""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from iseg import ISegPipeline, Point
from iseg.testing import sdxl_base_components

CUDA = torch.cuda.is_available()
CLASSES = ["cat", "dog", "potted plant"]
pytestmark = pytest.mark.skipif(
    not CUDA, reason="SDXL-base's architecture (2.57B-parameter UNet) is benchmarked on a GPU only"
)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    components = sdxl_base_components(torch.float16, tmp_path_factory.mktemp("tokenizer"), device="cuda")
    pipe = ISegPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(batch: int, size: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(batch)]


@pytest.mark.parametrize(
    "task, batch", [("text", 1), ("text", 4), ("regions", 1)]
)  # fmt: skip
def test_e2e_sdxl(benchmark, sdxl, task, batch):
    pipe = sdxl
    images = _images(batch, pipe.default_resolution)

    def run():
        generators = [torch.Generator().manual_seed(i) for i in range(batch)]
        if task == "text":
            out = pipe(images, CLASSES, generator=generators)
        else:
            out = pipe.segment_regions(images[0], [Point(512, 512), Point(100, 900)], generator=generators[0])
        torch.cuda.synchronize()
        return out

    out = run()  # warm-up; the VAE moves to fp32 here
    assert all(torch.isfinite(h).all() for h in out.heatmaps)
    run()
    with pipe.stage_timer.recording() as seconds:
        run()
    stages = {stage: s / batch for stage, s in seconds.items()}
    torch.cuda.reset_peak_memory_stats()
    run()
    peak = torch.cuda.max_memory_allocated() / 1e9

    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(
        task=task,
        recipe="sdxl" if task == "text" else "sdxl-interactive",
        batch=batch,
        s_per_image=benchmark.stats.stats.median / batch,
        peak_mem_gb=peak,
        gpu=torch.cuda.get_device_name(),
        model="sdxl-base (random weights, fp16; VAE encoder fp32)",
        vae_dtype=str(pipe.vae.dtype),
        resolution=pipe.default_resolution,
        classes=len(CLASSES),
        stages=stages,
        torch=torch.__version__,
        diffusers=diffusers.__version__,
    )
