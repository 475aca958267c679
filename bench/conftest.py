"""Shared benchmark fixtures."""

from __future__ import annotations

import pytest
from e2e_check import bench_pipeline


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """On a GPU the real SD 2.1-base architecture (random fp16 weights) on CUDA, else the tiny
    model on CPU (:func:`e2e_check.bench_pipeline`)."""
    return bench_pipeline(tmp_path_factory.mktemp("tokenizer"))
