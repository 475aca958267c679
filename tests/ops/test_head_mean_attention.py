"""head_mean_attention on both backends against softmax(Q Kᵀ · scale).mean(heads) computed
directly in float64, and against the reference."""

from __future__ import annotations

import math

import pytest
import torch
from _compare import DTYPE_IDS, DTYPES, TOLERANCES, assert_close, tolerance
from _oracle import F64, generator, head_mean64, transposed_back
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import iseg_ops
from iseg_ops import reference


def qk(shape_q, lk, seed, dtype, device, magnitude=1.5):
    """Queries and keys whose logits q·k/√D have a spread like SD's (a few units)."""
    g = generator(seed)
    q = torch.randn(*shape_q, generator=g, dtype=F64) * magnitude
    k = torch.randn(*shape_q[:-2], lk, shape_q[-1], generator=g, dtype=F64) * magnitude
    return q.to(device=device, dtype=dtype), k.to(device=device, dtype=dtype)


def _head_subset(dt, dev):
    q, k = qk((1, 5, 80, 40), 80, 4, dt, dev)
    return q[:, :2], k[:, :2]  # heads 0 and 1 only, as the authors' VOC/COCO scripts: strided


def _transposed_key(dt, dev):
    q, k = qk((2, 3, 64, 32), 96, 5, dt, dev)
    return q, transposed_back(k)  # key with stride 1 along L, not along D


# Each case returns (query, key, scale); builders take (dtype, device).
CASES = {
    # SD 2.1's layout: 5 heads, D = 64, 12×12 pixels (not a multiple of the 64-row tiles).
    "1x5x144x64": lambda dt, dev: (*qk((1, 5, 144, 64), 144, 0, dt, dev), None),
    # D = 40 (SD 1.x; not a power of two: BLOCK_D 64 masks 24), Lq = 100 ≠ Lk = 72, batch 2.
    "2x3x100x40-Lk72": lambda dt, dev: (*qk((2, 3, 100, 40), 72, 1, dt, dev), None),
    # Unbatched [heads, L, D] with an explicit scale.
    "4x50x24-scale0.3": lambda dt, dev: (*qk((4, 50, 24), 50, 2, dt, dev), 0.3),
    # Two leading dims [2, 2, heads, L, D].
    "2x2x2x30x16": lambda dt, dev: (*qk((2, 2, 2, 30, 16), 30, 3, dt, dev), None),
    # A head subset q[:, :2] (non-contiguous view).
    "head-subset": lambda dt, dev: (*_head_subset(dt, dev), None),
    # A key with transposed strides.
    "transposed-key": lambda dt, dev: (*_transposed_key(dt, dev), None),
    # One key: every probability is 1.
    "Lk1": lambda dt, dev: (*qk((1, 2, 7, 8), 1, 6, dt, dev), None),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_head_mean_matches_softmax_mean_and_reference(backend, case, dtype):
    q, k, scale = CASES[case](dtype, backend.device)
    out = iseg_ops.head_mean_attention(q, k, scale)
    assert out.shape == (*q.shape[:-3], q.shape[-2], k.shape[-2])
    assert out.dtype == dtype and out.device == q.device
    assert_close(out, head_mean64(q, k, scale), **tolerance(dtype), msg=f"{case} vs float64")
    row_sums = out.to(F64).sum(-1)
    assert_close(row_sums, torch.ones_like(row_sums), atol=2 * TOLERANCES[dtype][0], rtol=0,
                 msg="row sums")
    if backend.name == "triton":
        expected = reference.head_mean_attention(q.cpu(), k.cpu(), scale)
        assert_close(out, expected, **tolerance(dtype), msg=f"{case} vs reference")


def test_one_head_is_plain_softmax(backend):
    q, k = qk((1, 1, 40, 16), 40, 7, torch.float32, backend.device)
    expected = torch.softmax((q.double() @ k.double().mT) * 0.25, -1)[:, 0]
    assert_close(iseg_ops.head_mean_attention(q, k, 0.25), expected, atol=1e-6, rtol=1e-5)


def test_large_logits_do_not_overflow(backend):
    # Logits up to ~±1000: a softmax without max-subtraction would give Inf/NaN.
    q, k = qk((1, 2, 20, 8), 20, 8, torch.float32, backend.device, magnitude=12.0)
    out = iseg_ops.head_mean_attention(q, k)
    assert torch.isfinite(out).all()
    assert_close(out, head_mean64(q, k), atol=1e-5, rtol=1e-4)


PROPERTY = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def qk_inputs(draw, max_len: int):
    heads = draw(st.integers(1, 4), label="heads")
    lq = draw(st.integers(1, max_len), label="Lq")
    lk = draw(st.integers(1, max_len), label="Lk")
    d = draw(st.integers(1, 48), label="D")
    magnitude = draw(st.sampled_from([0.0, 0.5, 2.0, 6.0]), label="magnitude")
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    scale = draw(st.one_of(st.none(), st.floats(0.01, 4.0)), label="scale")
    dtype = draw(st.sampled_from(DTYPES), label="dtype")
    q, k = qk((draw(st.integers(1, 2)), heads, lq, d), lk, seed, dtype, "cpu", magnitude)
    return q, k, scale


def _check(q, k, scale, device):
    out = iseg_ops.head_mean_attention(q.to(device), k.to(device), scale).cpu()
    out64 = out.to(F64)
    assert torch.isfinite(out64).all() and (out64 >= 0).all() and (out64 <= 1).all()
    # With logits in the hundreds (magnitude 6) fp32 itself limits the accuracy: a D-term fp32
    # dot product is off by up to D·2⁻²⁴·Σ|q||k| (a relative error of about twice that in each
    # probability), and exp2(logit - lse) is off by about ulp(lse) (on every row sum).
    q64, k64 = q.to(F64), k.to(F64)
    scale64 = q.shape[-1] ** -0.5 if scale is None else scale
    abs_logits = float((q64.abs() @ k64.abs().transpose(-1, -2)).max()) * scale64
    logit_error = q.shape[-1] * 2**-24 * abs_logits
    atol, rtol = TOLERANCES[q.dtype]
    row_atol = 2 * atol + 2**-22 * max(1.0, abs_logits * math.log2(math.e))
    row_sums = out64.sum(-1)
    assert_close(row_sums, torch.ones_like(row_sums), atol=row_atol, rtol=0, msg="row sums")
    assert_close(out, head_mean64(q, k, scale), atol=atol, rtol=rtol + 2 * logit_error,
                 msg="vs float64")


@settings(max_examples=100, **PROPERTY)
@given(inputs=qk_inputs(max_len=40))
def test_reference_properties(inputs):
    _check(*inputs, "cpu")


@settings(max_examples=25, **PROPERTY)
@given(inputs=qk_inputs(max_len=70))
def test_triton_properties(triton_backend, inputs):
    _check(*inputs, triton_backend.device)
