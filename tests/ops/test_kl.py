"""symmetric_kl and kl_cluster against hand-computed cases, the elementwise float64 definition
written out here, the references, and properties (symmetry, partition, equivariance, zeros)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import iseg_ops
from iseg_ops import kl as kl_module
from iseg_ops import reference

F64 = torch.float64


def elementwise64(x, y):
    """½ Σ (x − y)(ln x − ln y) in float64 with the limits at zeros, by broadcasting [M, Q, N]."""
    x, y = x.double().unsqueeze(-2), y.double().unsqueeze(-3)
    both = (x == 0) & (y == 0)
    one = (x == 0) ^ (y == 0)
    term = torch.where(both | one, 0.0, (x - y) * (torch.log(x) - torch.log(y)))
    d = 0.5 * term.sum(-1)
    return torch.where(one.any(-1), math.inf, d)


def dirichlet(*shape, seed=0, concentration=1.0):
    g = torch.Generator().manual_seed(seed)
    t = torch.empty(*shape, dtype=F64).exponential_(generator=g) ** (1 / concentration)
    return t / t.sum(-1, keepdim=True)


def test_hand_computed_distance():
    x = torch.tensor([[0.5, 0.5]], dtype=F64)
    y = torch.tensor([[0.25, 0.75], [0.5, 0.5]], dtype=F64)
    # ½[(0.25)(ln 0.5 − ln 0.25) + (−0.25)(ln 0.5 − ln 0.75)] = ⅛ (ln 2 + ln 1.5) = ⅛ ln 3
    expected = torch.tensor([[math.log(3) / 8, 0.0]], dtype=F64)
    torch.testing.assert_close(iseg_ops.symmetric_kl(x, y), expected, atol=1e-15, rtol=0)
    torch.testing.assert_close(reference.symmetric_kl(x, y), expected, atol=1e-15, rtol=0)


# (x shape, y shape): each chosen for a reason.
SHAPES = [
    ((3, 17), (5, 17)),  # small, N not a power of two
    ((2, 4, 33), (2, 7, 33)),  # leading batch dim
    ((16, 256), (256, 256)),  # DiffSeg's pass 0 on a 16×16 grid: 16 anchors against all maps
    ((1, 1), (4, 1)),  # N = 1: every distribution is [1]
]


@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("concentration", [1.0, 0.2], ids=["flat", "peaked"])
def test_matches_float64_elementwise(shapes, concentration):
    x = dirichlet(*shapes[0], seed=1, concentration=concentration)
    y = dirichlet(*shapes[1], seed=2, concentration=concentration)
    expected = elementwise64(x, y)
    out = iseg_ops.symmetric_kl(x, y)
    assert out.dtype == F64 and out.shape == expected.shape
    err = (out - expected).abs().max().item()
    assert err <= 1e-9, f"max abs error {err:.3g} vs the elementwise float64 definition"
    torch.testing.assert_close(reference.symmetric_kl(x, y), expected, atol=1e-12, rtol=0)


def test_blocks_of_y_rows(monkeypatch):
    # Force ~3 rows per block: the blocked GEMM must equal one block.
    monkeypatch.setattr(kl_module, "_BLOCK_ELEMENTS", 2 * 3 * 40)
    x, y = dirichlet(6, 40, seed=3), dirichlet(11, 40, seed=4)
    err = (iseg_ops.symmetric_kl(x, y) - elementwise64(x, y)).abs().max().item()
    assert err <= 1e-9


def test_float32_close_to_float64():
    x, y = dirichlet(8, 1024, seed=5), dirichlet(300, 1024, seed=6)
    out = iseg_ops.symmetric_kl(x.float(), y.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), elementwise64(x, y), atol=2e-4, rtol=1e-4)
    # fp16 inputs: promoted to fp32; values that underflowed to 0 in fp16 give +inf (supports differ)
    xh, yh = x.half(), y.half()
    half = iseg_ops.symmetric_kl(xh, yh)
    assert half.dtype == torch.float32
    assert torch.equal(torch.isinf(half), torch.isinf(elementwise64(xh, yh)))


def test_exact_zeros_follow_the_limits():
    x = torch.tensor([[0.5, 0.5, 0.0]], dtype=F64)
    y = torch.tensor(
        [
            [0.5, 0.5, 0.0],  # same support and values: 0 (DiffSeg: NaN)
            [0.25, 0.75, 0.0],  # both zero at n = 2: only n = 0, 1 count → ⅛ ln 3
            [0.5, 0.25, 0.25],  # y > 0 where x = 0: +∞
            [1.0, 0.0, 0.0],  # x > 0 where y = 0: +∞
        ],
        dtype=F64,
    )
    expected = torch.tensor([[0.0, math.log(3) / 8, math.inf, math.inf]], dtype=F64)
    for fn in (iseg_ops.symmetric_kl, reference.symmetric_kl):
        out = fn(x, y)
        assert not out.isnan().any()
        torch.testing.assert_close(out, expected, atol=1e-15, rtol=0)
    # a threshold test (DiffSeg's merging) never matches a differing support
    assert (iseg_ops.symmetric_kl(x, y) < 1.1).tolist() == [[True, True, False, False]]
    # float32 path, and against the broadcast definition with many zeros
    xs = dirichlet(7, 50, seed=7, concentration=0.3)
    ys = dirichlet(9, 50, seed=8, concentration=0.3)
    xs[xs < 0.01] = 0
    ys[ys < 0.01] = 0
    ys[3] = xs[2]  # one pair with equal supports
    expected = elementwise64(xs, ys)
    assert torch.isfinite(expected).any() and torch.isinf(expected).any()
    out = iseg_ops.symmetric_kl(xs, ys)
    assert torch.equal(torch.isinf(out), torch.isinf(expected))
    fin = torch.isfinite(expected)
    assert (out[fin] - expected[fin]).abs().max() <= 1e-9
    out32 = iseg_ops.symmetric_kl(xs.float(), ys.float())
    assert torch.equal(torch.isinf(out32), torch.isinf(expected))


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 6), q=st.integers(1, 6), n=st.integers(1, 30), seed=st.integers(0, 999))
def test_properties(m, q, n, seed):
    x, y = dirichlet(m, n, seed=seed), dirichlet(q, n, seed=seed + 1)
    d = iseg_ops.symmetric_kl(x, y)
    assert (d >= 0).all() and not d.isnan().any()
    torch.testing.assert_close(iseg_ops.symmetric_kl(y, x), d.T, atol=1e-12, rtol=0)  # symmetric
    assert iseg_ops.symmetric_kl(x, x).diagonal().abs().max() <= 1e-12  # D(x, x) = 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(iseg_ops.symmetric_kl(x[:, perm], y[:, perm]), d, atol=1e-12, rtol=0)


def test_bad_inputs():
    x = dirichlet(2, 5)
    with pytest.raises(ValueError, match="negative"):
        iseg_ops.symmetric_kl(x - 0.5, x)
    with pytest.raises(ValueError, match="NaN"):
        iseg_ops.symmetric_kl(x, torch.full_like(x, math.nan))
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., M, N\]"):
        iseg_ops.symmetric_kl(x, dirichlet(2, 6))
    with pytest.raises(TypeError, match="y must be a floating-point"):
        iseg_ops.symmetric_kl(x, torch.ones(2, 5, dtype=torch.long))


# ------------------------------------------------------------------------------ kl_cluster


def test_anchors_are_the_authors_grid():
    rows = [0, 11, 22, 33, 44, 55]
    expected = [r * 64 + c for r in rows for c in rows]
    assert kl_module.cluster_anchors((64, 64), 32).tolist() == expected
    assert kl_module.cluster_anchors((1, 4), 4).tolist() == [0, 2]  # step max(1, 1 // 2) = 1 in rows


def test_cluster_hand_computed():
    # grid 1×4, 4 clusters: anchors at pixels 0 and 2; two obvious groups.
    x = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.2, 0.8]])
    expected = torch.tensor([[0.85, 0.15], [0.85, 0.15], [0.15, 0.85], [0.15, 0.85]])
    for fn in (iseg_ops.kl_cluster, reference.kl_cluster):
        torch.testing.assert_close(fn(x, (1, 4), num_clusters=4, rounds=20), expected)


def test_cluster_empty_cluster_dropped_and_zero_fill():
    # Identical anchors tie: every pixel goes to the first, the second cluster empties and is
    # dropped; one cluster whose mean is the mean of all pixels.
    x = torch.tensor([[0.5, 0.5], [0.6, 0.4], [0.5, 0.5], [0.4, 0.6]])
    torch.testing.assert_close(iseg_ops.kl_cluster(x, (1, 4), 4, 3), torch.full((4, 2), 0.5))
    # Exact zeros become 1e-6 before anything else (so they appear in the means).
    z = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    out = iseg_ops.kl_cluster(z, (1, 2), num_clusters=1)
    torch.testing.assert_close(out, torch.tensor([[1e-6, 1.0], [1e-6, 1.0]]), atol=0, rtol=1e-6)


def blobs(grid, channels, seed, zeros=False):
    """Features with spatial structure (a few regions) and noise; optionally with exact zeros."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    centres = torch.rand(5, channels, generator=g) ** 3
    region = (torch.arange(h).view(-1, 1) * 5 // h + torch.arange(w).view(1, -1) * 3 // w) % 5
    x = centres[region.flatten()] + 0.05 * torch.rand(h * w, channels, generator=g)
    if zeros:
        x[torch.rand(h * w, channels, generator=g) < 0.3] = 0
    return x / x.sum(-1, keepdim=True)


def check_partition(x, out):
    """Pixels with equal outputs form the clusters; each pixel's output is its group's mean."""
    feats = torch.where(x == 0, 1e-6, x)
    groups = torch.unique(out, dim=0, return_inverse=True)[1]
    n = int(groups.max()) + 1
    sums = torch.zeros(n, x.shape[-1]).index_add_(0, groups, feats)
    counts = torch.zeros(n).index_add_(0, groups, torch.ones(len(groups)))
    torch.testing.assert_close(out, (sums / counts[:, None])[groups])
    return groups


@pytest.mark.parametrize(
    "grid, zeros",
    [((16, 16), False), ((12, 20), True)],  # square; non-square (steps 2 and 3) with exact zeros
    ids=["16x16-dense", "12x20-zeros"],
)
def test_cluster_matches_reference_and_partitions(grid, zeros):
    x = blobs(grid, 12, seed=grid[1], zeros=zeros)
    out = iseg_ops.kl_cluster(x, grid, arithmetic="fp32")
    assert not out.isnan().any()
    torch.testing.assert_close(out, reference.kl_cluster(x, grid))  # the reference is the fp32 form
    groups = check_partition(x, out)
    assert 1 < groups.unique().numel() <= kl_module.cluster_anchors(grid, 32).numel()


def test_cluster_batch_and_rounds0():
    x = torch.stack([blobs((8, 8), 6, seed=s) for s in range(3)])
    out = iseg_ops.kl_cluster(x, (8, 8), num_clusters=9)
    for b in range(3):
        torch.testing.assert_close(out[b], iseg_ops.kl_cluster(x[b], (8, 8), num_clusters=9))
    torch.testing.assert_close(iseg_ops.kl_cluster(x, (8, 8), rounds=0), x)
    assert iseg_ops.kl_cluster(x.half(), (8, 8)).dtype == torch.float16


def test_cluster_permutation_equivariance():
    grid = (16, 16)
    x = blobs(grid, 10, seed=3)
    out = iseg_ops.kl_cluster(x, grid)
    # channels: the distance is a sum over channels
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(iseg_ops.kl_cluster(x[:, perm], grid), out[:, perm])
    # pixels: any permutation that keeps the anchor pixels in place
    anchors = kl_module.cluster_anchors(grid, 32)
    others = torch.tensor([p for p in range(256) if p not in set(anchors.tolist())])
    pix = torch.arange(256)
    pix[others] = others[torch.randperm(len(others), generator=torch.Generator().manual_seed(1))]
    torch.testing.assert_close(iseg_ops.kl_cluster(x[pix], grid), out[pix])


def test_cluster_bad_inputs():
    x = torch.rand(16, 3)
    with pytest.raises(ValueError, match="HW = 4×5 = 20"):
        iseg_ops.kl_cluster(x, (4, 5))
    with pytest.raises(ValueError, match="grid must be"):
        iseg_ops.kl_cluster(x, (0, 16))
    with pytest.raises(ValueError, match="rounds must be ≥ 0"):
        iseg_ops.kl_cluster(x, (4, 4), rounds=-1)
    with pytest.raises(TypeError, match="num_clusters must be an int"):
        iseg_ops.kl_cluster(x, (4, 4), num_clusters=3.5)
    with pytest.raises(ValueError, match="negative"):
        iseg_ops.kl_cluster(x - 1, (4, 4))


# --------------------------------------------------- the authors' fp16 arithmetic (issue 21 §1)


def authors_kl_cluster(x, grid, num_clusters=32, rounds=20):
    """The authors' DFC-KL restated op by op for one image ``[HW, L]`` (not the code under
    test): fp16 inputs + 1e-5 in fp16, ln in fp16, q = ln a − ln p in fp16, fp16 products,
    each sum over L an fp16 reduction, ½·first − ½·second in fp16, ``torch.min`` over the
    prototypes (first wins), empty clusters dropped, means of the fp32 features."""
    h, w = grid
    step_h = max(1, int(h // math.sqrt(num_clusters)))
    step_w = max(1, int(w // math.sqrt(num_clusters)))
    feats = torch.where(x == 0, torch.tensor(1e-6), x).float()
    prototypes = [feats[r * w + c] for r in range(0, h, step_h) for c in range(0, w, step_w)]
    b = feats.half() + 1e-5  # [HW, L]
    assign = None
    for _ in range(rounds):
        a = torch.stack(prototypes).half() + 1e-5  # [K, L]
        q = torch.log(a)[:, None, :] - torch.log(b)[None, :, :]  # [K, HW, L] fp16
        first = torch.sum(a[:, None, :] * q, dim=-1)
        second = torch.sum(b[None, :, :] * q, dim=-1)
        distance = 0.5 * first - 0.5 * second
        assert distance.dtype == torch.float16
        assign = torch.min(distance, dim=0).indices
        prototypes = [feats[assign == k].double().mean(0).float() for k in range(len(prototypes)) if (assign == k).any()]
        kept = sorted(set(assign.tolist()))
        assign = torch.tensor([kept.index(k) for k in assign.tolist()])
    return assign


def near_ties(grid, channels, seed):
    """Features whose fp16 distances tie often: a few coarse levels plus noise far below fp16's
    resolution, normalised like attention (rows sum to about 1)."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    levels = torch.randint(1, 4, (h * w, channels), generator=g).float()
    x = levels + 1e-3 * torch.rand(h * w, channels, generator=g)
    x[torch.rand(h * w, channels, generator=g) < 0.2] = 0
    return x / x.sum(-1, keepdim=True)


def same_partition(a, b):
    """Two label vectors describe the same partition (a bijection between their ids)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


NEAR_TIE_CASES = [
    ((16, 16), 77, 0),  # 77 positions as in SD's prompt, 36 anchors
    ((16, 16), 77, 1),
    ((12, 20), 40, 2),  # non-square, steps 2 and 3
    ((24, 24), 77, 3),  # 36 anchors with step 4
]


@pytest.mark.parametrize("grid, channels, seed", NEAR_TIE_CASES, ids=lambda v: str(v))
def test_fp16_partition_equals_the_authors(grid, channels, seed):
    x = near_ties(grid, channels, seed)
    expected = authors_kl_cluster(x, grid)
    out = iseg_ops.kl_cluster(x, grid)  # the default: the authors' fp16 arithmetic
    groups = check_partition(x, out)
    assert same_partition(groups, expected), "the fp16 partition differs from the authors'"


def test_fp32_formulation_breaks_the_ties_differently():
    """The test above fails with the fp32 matrix-product form: on these inputs it gives another
    partition than the authors' arithmetic (so the default matters)."""
    differ = 0
    for grid, channels, seed in NEAR_TIE_CASES:
        x = near_ties(grid, channels, seed)
        groups = check_partition(x, iseg_ops.kl_cluster(x, grid, arithmetic="fp32"))
        differ += not same_partition(groups, authors_kl_cluster(x, grid))
    assert differ >= 1


def test_fp16_batched_equals_one_image(monkeypatch):
    x = torch.stack([near_ties((16, 16), 77, s) for s in range(3)])
    one = [iseg_ops.kl_cluster(x[b], (16, 16)) for b in range(3)]
    monkeypatch.setattr(kl_module, "_FP16_BLOCK_ELEMENTS", 36 * 77 * 50)  # several pixel blocks
    out = iseg_ops.kl_cluster(x, (16, 16))
    for b in range(3):
        assert torch.equal(out[b], one[b])


def test_fp16_refuses_rows_beyond_its_range():
    x = torch.full((16, 3), 1000.0)
    with pytest.raises(ValueError, match="arithmetic='fp32'"):
        iseg_ops.kl_cluster(x, (4, 4))
    assert iseg_ops.kl_cluster(x, (4, 4), arithmetic="fp32").isfinite().all()
    with pytest.raises(ValueError, match="arithmetic must be one of fp16, fp32"):
        iseg_ops.kl_cluster(torch.rand(16, 3), (4, 4), arithmetic="bf16")
