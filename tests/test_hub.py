"""``iseg.hub``: the dtype keyword of the installed diffusers' ``from_pretrained``."""

from __future__ import annotations

import importlib.metadata
import warnings

import pytest
import torch

from iseg import ISegPipeline
from iseg.hub import dtype_keyword


@pytest.mark.parametrize(
    ("version", "keyword"),
    [("0.39.1", "torch_dtype"), ("0.40.0", "dtype"), ("0.42.1", "dtype"), ("1.0.0.dev0", "dtype"),
     ("0.30.0", "torch_dtype"), ("unknown", "torch_dtype")],
)  # fmt: skip
def test_dtype_keyword_by_version(monkeypatch, version, keyword):
    # diffusers 0.40 added `dtype` to DiffusionPipeline.from_pretrained (0.39 pops only torch_dtype)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version)
    assert dtype_keyword() == keyword


def test_dtype_keyword_loads_without_future_warning(saved_model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = ISegPipeline.from_pretrained(saved_model, **{dtype_keyword(): torch.float16})
    assert pipe.unet.dtype == torch.float16
    assert [w for w in caught if issubclass(w.category, FutureWarning)] == []
