"""refine on both backends against the float64 oracle of METHOD §3 and the reference, plus
hypothesis properties: ranges, the folding property, permutation equivariance, iters = 0,
degenerate columns, NaN-free output, and fused Ent-Self = precomputed Ent-Self."""

from __future__ import annotations

import importlib

import pytest
import torch
from _compare import DTYPE_IDS, DTYPES, TOLERANCES, assert_close, tolerance
from _oracle import (
    F64,
    clamp_emptied,
    folded64,
    local_attn,
    mT_attn,
    minmax64,
    rand_cross,
    refine64,
    relative_span,
    softmax_attn,
    strided_attn,
    subnormal_column,
    transposed_back,
)
from _strategies import LAMS, attention, cross_maps
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import iseg_ops
from iseg_ops import reference


def _strided_cross(batch, hw, k, dt, dev):
    big = rand_cross((batch, 2 * hw, 2 * k), seed=7, dtype=dt, device=dev)
    return big[:, ::2, ::2]  # non-unit strides in both dims


# Each case: (attn builder, cross builder, iters, lam); builders take (dtype, device).
# iters ≤ 3 keeps the interpreter fast (one kernel launch per iteration) except for the one
# N = 10 case, which uses slowly mixing local attention so that Pᴺ C₀ stays well conditioned.
CASES = {
    # 12×12: HW not a power of two (partial row block and column tile); K = 3 padded to 16.
    "1x144x144-K3": (
        lambda dt, dev: softmax_attn((1, 144, 144), dtype=dt, device=dev),
        lambda dt, dev: rand_cross((1, 144, 3), dtype=dt, device=dev),
        2, 0.01,
    ),
    # batch > 1 with K = 1 (one interaction map).
    "3x64x64-K1": (
        lambda dt, dev: softmax_attn((3, 64, 64), seed=1, dtype=dt, device=dev),
        lambda dt, dev: rand_cross((3, 64, 1), dtype=dt, device=dev),
        3, 0.01,
    ),
    # Unbatched [HW, HW] with K = 20 > 16: KP = 32 (12 padded columns), normalise kernel.
    "100x100-K20": (
        lambda dt, dev: softmax_attn((100, 100), seed=2, dtype=dt, device=dev),
        lambda dt, dev: rand_cross((100, 20), dtype=dt, device=dev),
        2, 0.01,
    ),
    # A >3-dim leading shape [2, 2, HW, HW] (6×6).
    "2x2x36x36-K5": (
        lambda dt, dev: softmax_attn((2, 2, 36, 36), seed=3, dtype=dt, device=dev),
        lambda dt, dev: rand_cross((2, 2, 36, 5), dtype=dt, device=dev),
        2, 0.01,
    ),
    # Column-major attn, and cross as .mT of a contiguous [B, K, HW].
    "transposed-back-mT-cross": (
        lambda dt, dev: transposed_back(softmax_attn((2, 80, 80), seed=4, dtype=dt, device=dev)),
        lambda dt, dev: rand_cross((2, 4, 80), dtype=dt, device=dev).mT,
        2, 0.01,
    ),
    # big[:, ::2, ::2] attn (renormalised in place) and a strided cross.
    "strided-slice": (
        lambda dt, dev: strided_attn(1, 72, seed=5, dtype=dt, device=dev),
        lambda dt, dev: _strided_cross(1, 72, 3, dt, dev),
        2, 0.01,
    ),
    # .mT attn with lam = None (the naive product, APPLY_ENT_SELF=False).
    "mT-naive": (
        lambda dt, dev: mT_attn((2, 48, 48), seed=6, dtype=dt, device=dev),
        lambda dt, dev: rand_cross((2, 48, 3), dtype=dt, device=dev),
        2, None,
    ),
    # 24×24: several row blocks in the column pass and column tiles in the product; N = 1.
    "1x576x576-K2": (
        lambda dt, dev: softmax_attn((1, 576, 576), seed=9, dtype=dt, device=dev),
        lambda dt, dev: rand_cross((1, 576, 2), dtype=dt, device=dev),
        1, 0.01,
    ),
    # 16×16: HW a multiple of every tile (EVEN: the unmasked loads and stores), K = 8.
    "1x256x256-K8": (
        lambda dt, dev: local_attn(1, 16, dtype=dt, device=dev),
        lambda dt, dev: rand_cross((1, 256, 8), dtype=dt, device=dev),
        2, 0.01,
    ),
    # The paper's N = 10 on 12×12 local attention.
    "local-12x12-N10": (
        lambda dt, dev: local_attn(1, 12, dtype=dt, device=dev),
        lambda dt, dev: rand_cross((1, 144, 3), dtype=dt, device=dev),
        10, 0.01,
    ),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_refine_matches_oracle_and_reference(backend, case, dtype):
    make_attn, make_cross, iters, lam = CASES[case]
    attn, cross = make_attn(dtype, backend.device), make_cross(dtype, backend.device)
    # Guard on the input, not the code: min-max of a nearly flat column is ill-conditioned.
    assert relative_span(attn, cross, iters, lam).min() > 1e-2
    out = iseg_ops.refine(attn, cross, iters=iters, lam=lam)
    assert out.shape == cross.shape and out.dtype == dtype and out.device == cross.device
    expected = refine64(attn, cross, iters, lam)
    assert_close(out, expected, **tolerance(dtype), msg=f"{case} vs float64")
    if backend.name == "triton":
        expected = reference.refine(attn.cpu(), cross.cpu(), iters, lam)
        assert_close(out, expected, **tolerance(dtype), msg=f"{case} vs reference")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fused_ent_self_equals_precomputed(backend, dtype):
    attn = softmax_attn((2, 100, 100), seed=8, dtype=dtype, device=backend.device)
    cross = rand_cross((2, 100, 4), dtype=dtype, device=backend.device)
    for lam in (0.0, 0.01, 5.0):
        fused = iseg_ops.refine(attn, cross, iters=2, lam=lam)
        separate = iseg_ops.refine(iseg_ops.ent_self(attn, lam), cross, iters=2, lam=None)
        # Both sides round to the storage dtype (the separate P is stored in it too).
        atol, rtol = TOLERANCES[dtype]
        assert_close(fused, separate, atol=2 * atol, rtol=2 * rtol, msg=f"lam={lam}")


@pytest.mark.parametrize(
    ("batch", "hw", "block_m"),
    [
        (2, 40, 32),  # 2 × ⌈40/64⌉ = 2 programs of 64 rows would be too few: BLOCK_M 32
        (64, 16, 64),  # 64 × ⌈16/64⌉ = 64 programs: BLOCK_M 64 (48 of 64 rows masked)
    ],
)
def test_large_batches_use_larger_row_blocks(backend, batch, hw, block_m):
    # The launcher picks BLOCK_M from the number of programs; the small cases above all get 32.
    refine_module = importlib.import_module("iseg_ops.refine")
    config = refine_module._gemv_default(batch, hw, False, lambda config: True)
    assert config[0] == block_m, (
        "the launcher's BLOCK_M rule changed: update this case so it still covers the block"
    )
    attn = softmax_attn((batch, hw, hw), seed=10, device=backend.device)
    cross = rand_cross((batch, hw, 2), device=backend.device)
    out = iseg_ops.refine(attn, cross, iters=1)
    assert_close(out, refine64(attn, cross, 1, 0.01), **tolerance(torch.float32))


def test_subnormal_column_maximum(backend):
    attn = subnormal_column().to(backend.device)
    cross = torch.tensor([[1.0], [0.0], [0.5]], device=backend.device)
    # By hand, lam = 0: P = [[.5, .5, 0], [0, 0, 1], [0, 1, 0]] and C = [1, 0, .5] / 1.5, so
    # P C = [1/3, 1/3, 0]: min-max [1, 1, 0].
    expected = torch.tensor([[1.0], [1.0], [0.0]], dtype=F64)
    assert_close(iseg_ops.refine(attn, cross, iters=1, lam=0.0), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("lam", [0.5, 5.0])
def test_clamp_emptied_row_falls_back_in_the_product(backend, lam):
    # Row 0 of clamp_emptied loses every entry to the clamp: its numerators are rewritten with
    # T0 and its own row weight (METHOD §2's fallback), here at HW = 128 (unmasked tiles) and
    # batched with an ordinary matrix, whose rows keep Eq. 7.
    n = 128
    emptied = clamp_emptied(n)
    attn = torch.stack([emptied, softmax_attn((n, n), dtype=F64)]).float().to(backend.device)
    cross = rand_cross((2, n, 3), device=backend.device)
    out = iseg_ops.refine(attn, cross, iters=1, lam=lam)
    assert_close(out, refine64(attn, cross, 1, lam), **tolerance(torch.float32))


def test_degenerate_columns_give_zeros(backend):
    dev = backend.device
    attn = softmax_attn((2, 50, 50), device=dev)
    cross = rand_cross((2, 50, 4), device=dev)
    cross[..., 1] = 0.0  # an all-zero column
    cross[..., 2] = 0.25  # a constant column
    for iters in (0, 1, 3):
        out = iseg_ops.refine(attn, cross, iters=iters)
        assert (out[..., 1:3] == 0).all(), f"iters={iters}"
        assert torch.isfinite(out).all()
        assert out[..., 0].amax(-1).eq(1).all() and out[..., 0].amin(-1).eq(0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_iters_0_is_minmax_of_cross(backend, dtype):
    attn = softmax_attn((1, 30, 30), dtype=dtype, device=backend.device)
    cross = rand_cross((1, 30, 3), dtype=dtype, device=backend.device) * 5 - 2
    out = iseg_ops.refine(attn, cross, iters=0)
    assert out.dtype == dtype
    assert_close(out, minmax64(cross), **tolerance(dtype))


# ----------------------------------------------------------------------------------------------
# Hypothesis properties

PROPERTY = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def refine_inputs(draw, max_hw: int, max_iters: int):
    attn = draw(attention(max_hw=max_hw))
    cross = draw(cross_maps(attn.shape[0], attn.shape[-1]))
    iters = draw(st.integers(0, max_iters), label="iters")
    lam = draw(st.one_of(st.none(), LAMS), label="lam")
    return attn, cross, iters, lam


def _check_properties(attn64, cross64, iters, lam, dtype, device):
    attn = attn64.to(device=device, dtype=dtype)
    cross = cross64.to(device=device, dtype=dtype)
    out = iseg_ops.refine(attn, cross, iters=iters, lam=lam).cpu()
    assert out.dtype == dtype and out.shape == cross.shape
    out64 = out.to(F64)
    assert torch.isfinite(out64).all(), "NaN or Inf in the output"
    assert (out64 >= 0).all() and (out64 <= 1).all(), "output outside [0, 1]"
    # Constant (incl. all-zero) columns of C₀ give zeros, for every iters and lam.
    cross_lp = cross.cpu().to(F64)
    constant = (cross_lp == cross_lp[..., :1, :]).all(dim=-2)  # [B, K]
    assert (out64.transpose(-1, -2)[constant] == 0).all(), "a constant column is nonzero"
    if iters == 0:
        assert_close(out, minmax64(cross_lp), **tolerance(dtype), msg="iters=0")
        return
    # Folding property: refine = minmax(Pᴺ C₀), with P computed in float64 from METHOD §2. It
    # holds because P is row-stochastic; with lam=None, P is attn as given, whose rows no
    # longer sum to exactly 1 once stored in fp16/bf16, so that case is compared with METHOD §3
    # literally (per-iteration shift by the column minimum) instead.
    # Compared on the columns where that is well conditioned (span ≥ 1 % of the magnitude):
    # the min-max output's error grows as the relative span shrinks (up to rel. error / span),
    # so the dtype's atol is widened by 1/√span (at most 10×), which the kernels' fp16 dot
    # operands (for fp16/bf16 input) and fp16/bf16 output rounding stay well within.
    span = relative_span(attn.cpu(), cross.cpu(), iters, lam)  # [B, K]
    good = span >= 1e-2
    if good.any():
        if lam is None:
            expected, what = refine64(attn.cpu(), cross.cpu(), iters, None), "METHOD §3"
        else:
            expected, what = folded64(attn.cpu(), cross.cpu(), iters, lam), "minmax(Pᴺ C₀)"
        atol, rtol = TOLERANCES[dtype]
        assert_close(
            out64.transpose(-1, -2)[good],
            expected.transpose(-1, -2)[good],
            atol=atol / float(span[good].min()) ** 0.5,
            rtol=rtol,
            msg=f"vs {what}",
        )


@settings(max_examples=150, **PROPERTY)
@given(inputs=refine_inputs(max_hw=24, max_iters=10), dtype=st.sampled_from(DTYPES))
def test_reference_properties(inputs, dtype):
    _check_properties(*inputs, dtype, "cpu")


@settings(max_examples=30, **PROPERTY)
@given(inputs=refine_inputs(max_hw=40, max_iters=3), dtype=st.sampled_from(DTYPES))
def test_triton_properties(triton_backend, inputs, dtype):
    _check_properties(*inputs, dtype, triton_backend.device)


def _equivariance(attn64, cross64, iters, lam, seed, device):
    hw = attn64.shape[-1]
    perm = torch.randperm(hw, generator=torch.Generator().manual_seed(seed))
    attn, cross = attn64.float().to(device), cross64.float().to(device)
    out = iseg_ops.refine(attn, cross, iters=iters, lam=lam)
    permuted = iseg_ops.refine(attn[..., perm, :][..., :, perm], cross[..., perm, :], iters, lam)
    # Only well-conditioned columns are determined to fp32 accuracy (see above).
    good = relative_span(attn64, cross64, iters, lam) >= 1e-2  # [B, K]
    assert_close(permuted.transpose(-1, -2)[good], out[..., perm, :].transpose(-1, -2)[good],
                 atol=1e-4, rtol=1e-4, msg="refine(Π S Πᵀ, Π C) vs Π refine(S, C)")
    assert torch.isfinite(permuted).all()


@settings(max_examples=60, **PROPERTY)
@given(inputs=refine_inputs(max_hw=24, max_iters=6), seed=st.integers(0, 2**31 - 1))
def test_reference_permutation_equivariance(inputs, seed):
    _equivariance(*inputs, seed, "cpu")


@settings(max_examples=12, **PROPERTY)
@given(inputs=refine_inputs(max_hw=40, max_iters=3), seed=st.integers(0, 2**31 - 1))
def test_triton_permutation_equivariance(triton_backend, inputs, seed):
    _equivariance(*inputs, seed, triton_backend.device)


def _fused_equals_precomputed(attn64, cross64, iters, lam, device):
    lam = 0.01 if lam is None else lam
    attn, cross = attn64.float().to(device), cross64.float().to(device)
    fused = iseg_ops.refine(attn, cross, iters=iters, lam=lam)
    separate = iseg_ops.refine(iseg_ops.ent_self(attn, lam), cross, iters=iters, lam=None)
    good = relative_span(attn64, cross64, iters, lam) >= 1e-2
    assert_close(fused.transpose(-1, -2)[good], separate.transpose(-1, -2)[good],
                 atol=1e-4, rtol=1e-4, msg="refine(S, lam) vs refine(ent_self(S, lam), None)")


@settings(max_examples=60, **PROPERTY)
@given(inputs=refine_inputs(max_hw=24, max_iters=6))
def test_reference_fused_ent_self_equals_precomputed(inputs):
    _fused_equals_precomputed(*inputs, "cpu")


@settings(max_examples=12, **PROPERTY)
@given(inputs=refine_inputs(max_hw=40, max_iters=3))
def test_triton_fused_ent_self_equals_precomputed(triton_backend, inputs):
    _fused_equals_precomputed(*inputs, triton_backend.device)


def test_extreme_inputs_stay_finite(backend):
    """One-hot rows, uniform rows, lam = 0 and lam = 5, and a clamp-emptied row."""
    dev = backend.device
    n = 16
    eye = torch.eye(n, device=dev)
    uniform = torch.full((n, n), 1.0 / n, device=dev)
    emptied = clamp_emptied(n).float().to(dev)  # lam = 5 empties row 0
    cross = rand_cross((n, 3), device=dev)
    for attn in (eye, uniform, emptied):
        for lam in (None, 0.0, 0.01, 5.0):
            out = iseg_ops.refine(attn, cross, iters=3, lam=lam)
            assert torch.isfinite(out).all(), f"lam={lam}"
            assert ((out >= 0) & (out <= 1)).all()
    # The identity P (a fixed point of Ent-Self) leaves the min-max of C₀ unchanged.
    same = iseg_ops.refine(eye, cross, iters=3, lam=5.0)
    assert_close(same, minmax64(cross), atol=1e-6, rtol=1e-5)
    # Every row of a uniform P is the same, so P C₀ has constant columns: zeros, not the
    # min-max of rounding noise (and not NaN).
    for lam in (None, 0.01):
        assert (iseg_ops.refine(uniform, cross, iters=1, lam=lam) == 0).all(), f"lam={lam}"
