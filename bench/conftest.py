"""Shared benchmark fixtures."""

from __future__ import annotations

import pytest
import torch

from iseg import ISegPipeline
from iseg.testing import sd21_base_components, tiny_components


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """On a GPU the real SD 2.1-base architecture (random fp16 weights) on CUDA, else the tiny
    model on CPU."""
    tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
    if torch.cuda.is_available():
        components = sd21_base_components(torch.float16, tokenizer_dir=tokenizer_dir)
        pipeline = ISegPipeline(**components).to("cuda")
    else:
        pipeline = ISegPipeline(**tiny_components(tokenizer_dir=tokenizer_dir))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
