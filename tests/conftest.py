"""Shared fixtures: a tiny random ISegPipeline in SD's block layout (in memory, and saved once
per session as the folder the CLI and the demo load), a tiny saved CLIP tagger, and test images."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

# Without a GPU, define the Triton kernels for Triton's CPU interpreter so that one run tests
# both backends (tests pick one with ISEG_OPS_BACKEND). Triton fixes the mode when iseg_ops
# is imported, so this comes before any import of it.
if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread for the whole suite: the tiny models' ops take microseconds, so more
# threads only add overhead, and OpenMP threads spinning while another process holds the cores
# made tests up to 10× slower on a shared 2-core machine.
torch.set_num_threads(1)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from iseg import ISegPipeline  # noqa: E402
from iseg.testing import tiny_clip_components, tiny_components  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizer")


@pytest.fixture(scope="session")
def components(tokenizer_dir):
    return tiny_components(seed=0, tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory) -> Path:
    """The tiny pipeline (``tiny_components(seed=0)``) saved with ``save_pretrained``: the
    folder that ``--model`` and the demo load. Read-only for tests (copy it to change it)."""
    root = tmp_path_factory.mktemp("saved-model")
    (root / "tokenizer-src").mkdir()
    ISegPipeline(**tiny_components(seed=0, tokenizer_dir=root / "tokenizer-src")).save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="session")
def saved_tagger(tmp_path_factory) -> Path:
    """A tiny CLIP (``tiny_clip_components(seed=0)``) saved as a ``--tagger-model`` folder."""
    root = tmp_path_factory.mktemp("saved-tagger")
    (root / "tokenizer-src").mkdir()
    clip = tiny_clip_components(seed=0, tokenizer_dir=root / "tokenizer-src")
    clip["model"].save_pretrained(root / "clip")
    clip["tokenizer"].save_pretrained(root / "clip")
    return root / "clip"


@pytest.fixture
def pipe(components, monkeypatch):
    # The reference backend unless a test asks for the kernels.
    monkeypatch.setenv("ISEG_OPS_BACKEND", "torch")
    pipeline = ISegPipeline(**components)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def make_image(seed: int, size: tuple[int, int] = (96, 120), mode: str = "RGB") -> Image.Image:
    """A structured image (two coloured blobs on noise) of ``size`` (H, W)."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    img = rng.integers(0, 60, size=(h, w, 3)).astype(np.float64)
    for cy, cx, colour in ((h * 0.3, w * 0.3, (220, 40, 40)), (h * 0.7, w * 0.65, (40, 40, 220))):
        blob = np.exp(-(((yy - cy) / (h / 6)) ** 2 + ((xx - cx) / (w / 6)) ** 2))
        img += blob[..., None] * np.array(colour)
    rgb = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return rgb if mode == "RGB" else rgb.convert(mode)


@pytest.fixture
def image():
    return make_image(0)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
