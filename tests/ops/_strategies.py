"""Hypothesis strategies for valid iseg_ops inputs, extremes included."""

from __future__ import annotations

import torch
from _oracle import F64, generator
from hypothesis import strategies as st

# 0 is uniform attention, 1e4 gives exact one-hot rows (softmax underflows to 0 elsewhere).
SCALES = (0.0, 0.5, 2.0, 4.0, 30.0, 1e4)
# lam = 0 is the plain column-max/row renormalisation; 5.0 empties whole rows via the clamp.
LAMS = st.one_of(st.sampled_from([0.0, 1e-3, 0.01, 0.0434, 0.5, 5.0]), st.floats(0.0, 5.0))


@st.composite
def attention(draw, max_hw: int = 24, max_batch: int = 2) -> torch.Tensor:
    """A float64 ``[batch, HW, HW]`` row-stochastic, non-negative matrix: softmax of scaled
    noise, with some rows replaced by one-hot or uniform rows and optionally an all-zero column
    (a key no query attends to)."""
    hw = draw(st.integers(1, max_hw), label="hw")
    batch = draw(st.integers(1, max_batch), label="batch")
    scale = draw(st.sampled_from(SCALES), label="scale")
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    g = generator(seed)
    s = torch.softmax(torch.randn(batch, hw, hw, generator=g, dtype=F64) * scale, dim=-1)
    one_hot = torch.rand(batch, hw, generator=g, dtype=F64) < draw(
        st.sampled_from([0.0, 0.5, 1.0]), label="one-hot fraction"
    )
    targets = torch.randint(0, hw, (batch, hw), generator=g)
    s = torch.where(one_hot[..., None], torch.nn.functional.one_hot(targets, hw).to(F64), s)
    uniform = torch.rand(batch, hw, generator=g, dtype=F64) < draw(
        st.sampled_from([0.0, 0.1, 1.0]), label="uniform fraction"
    )
    s = torch.where(uniform[..., None], torch.full_like(s, 1.0 / hw), s)
    if hw > 1 and draw(st.booleans(), label="zero column"):
        col = int(torch.randint(0, hw, (), generator=g))
        s[..., col] = 0.0
        empty = s.sum(-1, keepdim=True) == 0  # a one-hot row on that column: move it
        s = torch.where(empty, torch.full_like(s, 1.0 / (hw - 1)), s)
        s[..., col] = 0.0
        s = s / s.sum(-1, keepdim=True)
    return s / s.sum(-1, keepdim=True)


@st.composite
def cross_maps(draw, batch: int, hw: int, max_k: int = 5) -> torch.Tensor:
    """A float64 ``[batch, HW, K]`` of initial maps, possibly with constant or all-zero
    columns (which must come out as zeros)."""
    k = draw(st.integers(1, max_k), label="k")
    seed = draw(st.integers(0, 2**31 - 1), label="cross seed")
    g = generator(seed)
    c = torch.rand(batch, hw, k, generator=g, dtype=F64)
    kinds = draw(
        st.lists(st.sampled_from(["random", "constant", "zero", "one-hot", "negative"]),
                 min_size=k, max_size=k),
        label="column kinds",
    )
    for j, kind in enumerate(kinds):
        if kind == "constant":
            c[..., j] = 0.37
        elif kind == "zero":
            c[..., j] = 0.0
        elif kind == "one-hot":
            c[..., j] = 0.0
            c[:, int(torch.randint(0, hw, (), generator=g)), j] = 1.0
        elif kind == "negative":  # the refinement is affine-invariant in C₀: any sign works
            c[..., j] = -3.0 * c[..., j]
    return c
