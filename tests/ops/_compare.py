"""Tolerances and the comparison helper shared by the iseg_ops tests."""

from __future__ import annotations

import torch

# One tolerance table per storage dtype: (atol, rtol) for a result compared, in float64, with
# an fp32/float64 computation from the same input. Every op accumulates in fp32, so the error
# is dominated by the final rounding to the storage dtype (fp16: 2^-11 relative, bf16: 2^-8)
# plus, on the Triton path, the fp16 operands of tl.dot in head_mean_attention and refine
# (fp16 numerators T and normalised maps X for fp16/bf16 input; fp32 input keeps fp32
# operands); refine's min-max output in [0, 1] then carries that error as an absolute one.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 4e-3),  # unit roundoff 2^-11 ≈ 4.9e-4
    torch.bfloat16: (8e-3, 1.6e-2),  # unit roundoff 2^-8 ≈ 3.9e-3
}

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = ("fp32", "fp16", "bf16")


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """``dict(atol=..., rtol=...)`` for results stored in ``dtype``."""
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    atol: float,
    rtol: float,
    msg: str = "",
) -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` elementwise (in float64).

    Shapes must match exactly; NaN anywhere in ``actual`` (e.g. an output element a kernel never
    wrote, which the tests poison with NaN) counts as a mismatch. On failure the message says
    how many elements differ, the max absolute and relative errors and the first bad index.
    """
    prefix = f"{msg}: " if msg else ""
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(
            f"{prefix}shape mismatch: actual {tuple(actual.shape)}, "
            f"expected {tuple(expected.shape)}"
        )
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    err = (a - e).abs()
    bad = ~(err <= atol + rtol * e.abs())  # NaN compares False, so it is bad
    bad |= torch.isnan(a) != torch.isnan(e)
    count = int(bad.sum())
    if count == 0:
        return
    finite = torch.isfinite(err)
    max_abs = float(err[finite].max()) if finite.any() else float("nan")
    rel = err / e.abs().clamp_min(torch.finfo(torch.float64).tiny)
    max_rel = float(rel[finite].max()) if finite.any() else float("nan")
    first = tuple(int(i) for i in bad.nonzero()[0])
    raise AssertionError(
        f"{prefix}{count} of {bad.numel()} elements differ "
        f"(atol={atol:g}, rtol={rtol:g}); max abs error {max_abs:.3e}, max rel error "
        f"{max_rel:.3e}, NaN in actual: {int(torch.isnan(a).sum())}; first bad index {first}: "
        f"actual {float(a[first]):.8g}, expected {float(e[first]):.8g}"
    )
