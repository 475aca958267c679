"""TagCLIP tagger speed per image: ViT-B/16 (random weights) on a 512×384 image.

The real ``openai/clip-vit-base-patch16`` architecture from
:func:`iseg.testing.clip_vit_b16_components` with random weights (the speed does not depend on
their values): one 769-token pass (24×32 patches + CLS, every layer's attention recorded) plus
one 197-token pass per re-identified class. Cases: the VOC preset (the number of crops depends
on the random scores and is recorded) and ``r_cwr = 0`` (every class re-identified: the worst
case, 20 crops). fp32 as the authors; bf16 too on a GPU. The class embeddings are filled with
random vectors first (encoding the 45 × 85 prompts is a one-off cost per vocabulary, timed
separately on the GPU). Record with

    pytest bench/test_tagger.py --benchmark-json bench/results/<gpu-name>-tagger.json

Without a GPU the fp32 cases run on CPU (the CUDA cases are skipped).
"""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image

from iseg.tagger import CLIPTagger, get_preset
from iseg.testing import clip_vit_b16_components

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SIZE = (512, 384)  # W × H: a 24×32 patch grid, N = 768


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    torch.manual_seed(0)
    return clip_vit_b16_components(tokenizer_dir=tmp_path_factory.mktemp("tokenizer"))


def _tagger(components, dtype):
    model = components["model"].to(DEVICE, dtype)
    tagger = CLIPTagger(model, components["tokenizer"])
    preset = get_preset("voc")
    names = preset.vocabulary + preset.background
    text = F.normalize(torch.randn(len(names), 512, generator=torch.Generator().manual_seed(1)), dim=-1)
    tagger._text_cache = dict(zip(names, text.to(DEVICE)))
    return tagger


def _image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8))


def _gpu_name():
    return torch.cuda.get_device_name() if CUDA else f"cpu ({platform.processor() or 'unknown'})"


@pytest.mark.parametrize("r_cwr", [None, 0.0], ids=["voc", "all-crops"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_tagger_per_image(benchmark, components, dtype, r_cwr):
    if dtype == "bf16" and not CUDA:
        pytest.skip("bf16 is a CUDA case (no GPU here)")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    tagger = _tagger(components, torch_dtype)
    image = _image()
    crops = []
    crop_scores = tagger._crop_scores

    def counting(pixels, refined, grid, windows, columns, text):
        crops.append(len(windows))
        return crop_scores(pixels, refined, grid, windows, columns, text)

    tagger._crop_scores = counting

    def run():
        result = tagger(image, preset="voc", r_cwr=r_cwr)
        if CUDA:
            torch.cuda.synchronize()
        return result

    run()  # warm-up
    crops.clear()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(run, rounds=10 if CUDA else 2, iterations=1, warmup_rounds=1 if CUDA else 0)
    rounds = benchmark.stats.stats.rounds + (1 if CUDA else 0)
    benchmark.extra_info.update(
        s_per_image=benchmark.stats.stats.median,
        crops_per_image=sum(crops) / max(rounds, 1),
        peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9 if CUDA else None,
        gpu=_gpu_name(),
        dtype=dtype,
        model="clip-vit-base-patch16 architecture (random weights)",
        image=f"{SIZE[0]}x{SIZE[1]}",
        tokens=1 + (SIZE[0] // 16) * (SIZE[1] // 16),
        torch=torch.__version__,
        transformers=transformers.__version__,
    )


def test_text_encoding_voc_preset(benchmark, components):
    if not CUDA:
        pytest.skip("a CUDA case (3,825 prompts through the text tower: minutes on CPU)")
    model = components["model"].to(DEVICE, torch.float32)
    tagger = CLIPTagger(model, components["tokenizer"])
    preset = get_preset("voc")
    names = preset.vocabulary + preset.background

    def run():
        tagger._text_cache.clear()
        out = tagger.text_embeddings(names)
        torch.cuda.synchronize()
        return out

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(
        s_per_vocabulary=benchmark.stats.stats.median, prompts=len(names) * 85, gpu=_gpu_name()
    )
