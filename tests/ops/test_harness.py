"""The test harness itself: the comparison helper's message, and that the NaN poison and the
backend fixture really reach the kernels (otherwise the comparisons could pass vacuously)."""

from __future__ import annotations

import importlib

import pytest
import torch
from _compare import assert_close
from _oracle import softmax_attn

import iseg_ops
from iseg_ops import reference


def test_assert_close_message_counts_errors_and_names_the_first_bad_index():
    expected = torch.zeros(2, 3)
    actual = expected.clone()
    actual[0, 2] = 0.5
    actual[1, 1] = float("nan")
    with pytest.raises(AssertionError) as info:
        assert_close(actual, expected, atol=1e-3, rtol=0.0, msg="case")
    text = str(info.value)
    assert text.startswith("case: 2 of 6 elements differ")
    assert "max abs error 5.000e-01" in text
    assert "NaN in actual: 1" in text
    assert "first bad index (0, 2)" in text


def test_assert_close_accepts_within_tolerance_and_rejects_shape_mismatch():
    assert_close(torch.tensor([1.0, 2.0]), torch.tensor([1.0005, 2.0]), atol=1e-3, rtol=0.0)
    with pytest.raises(AssertionError, match="shape mismatch"):
        assert_close(torch.zeros(3), torch.zeros(1, 3), atol=1.0, rtol=1.0)


class _NoLaunch:
    """A kernel stand-in whose launches do nothing: every output stays as allocated."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def test_poison_exposes_an_output_that_no_kernel_writes(triton_backend, monkeypatch):
    module = importlib.import_module("iseg_ops.ent_self")
    monkeypatch.setattr(module, "_ent_self_kernel", _NoLaunch())
    attn = softmax_attn((1, 20, 20), device=triton_backend.device)
    out = iseg_ops.ent_self(attn)
    assert triton_backend.poison.poisoned >= 1
    assert torch.isnan(out).all()


def test_poison_exposes_head_mean_output_that_no_kernel_writes(triton_backend, monkeypatch):
    module = importlib.import_module("iseg_ops.head_mean_attention")
    monkeypatch.setattr(module, "_head_mean_kernel", _NoLaunch())
    q = torch.randn(1, 2, 8, 16, device=triton_backend.device)
    assert torch.isnan(iseg_ops.head_mean_attention(q, q)).all()


def test_triton_backend_runs_the_kernels(triton_backend, monkeypatch):
    # The backend fixture must route to Triton, not to the reference.
    def fail(*args, **kwargs):
        raise AssertionError("the reference ran on the triton backend")

    monkeypatch.setattr(reference, "ent_self", fail)
    monkeypatch.setattr(reference, "refine", fail)
    monkeypatch.setattr(reference, "head_mean_attention", fail)
    attn = softmax_attn((1, 20, 20), device=triton_backend.device)
    iseg_ops.ent_self(attn)
    iseg_ops.refine(attn, torch.rand(1, 20, 2, device=triton_backend.device), iters=1)
    q = torch.randn(1, 2, 8, 16, device=triton_backend.device)
    iseg_ops.head_mean_attention(q, q)
    assert triton_backend.poison.poisoned >= 3  # P, Y buffers, head-mean output (and lse)
