"""One rule for choosing the Triton kernels or the PyTorch reference, and argument validation.

Backend rule: Triton when ``triton`` imports and (the tensors are on CUDA, or
``TRITON_INTERPRET=1``); otherwise the reference. ``ISEG_OPS_BACKEND=auto|triton|torch``
overrides (read at each call); ``triton`` on CPU requires ``TRITON_INTERPRET=1``, which must be
set before ``iseg_ops`` is imported.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    """Whether ``import triton`` would succeed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether the kernels were defined for Triton's CPU interpreter: ``TRITON_INTERPRET=1``
    when :mod:`iseg_ops` was imported (Triton fixes the mode at ``@triton.jit``)."""
    from ._triton import INTERPRETED

    return INTERPRETED


def use_triton(fn: str, *tensors: torch.Tensor) -> bool:
    """Whether ``fn`` runs its Triton kernel on ``tensors`` (else the PyTorch reference)."""
    backend = os.environ.get("ISEG_OPS_BACKEND", "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(
            f"{fn}: ISEG_OPS_BACKEND must be one of {', '.join(BACKENDS)}, got {backend!r}"
        )
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{fn}: ISEG_OPS_BACKEND=triton but triton is not installed")
        if not (on_cuda or interpreting()):
            raise RuntimeError(
                f"{fn}: ISEG_OPS_BACKEND=triton needs CUDA tensors or TRITON_INTERPRET=1 "
                f"(tensors are on {tensors[0].device})"
            )
        return True
    return triton_available() and (on_cuda or interpreting())


def _shape(t: torch.Tensor) -> str:
    return "×".join(str(s) for s in t.shape) or "scalar"


def check_float(fn: str, name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")


def check_finite(fn: str, **tensors: torch.Tensor) -> None:
    """``ValueError`` naming the first of ``tensors`` that holds NaN or Inf. One reduction per
    tensor and a single device-to-host read (on CUDA: one synchronisation, before any kernel)."""
    flags = torch.stack([torch.isfinite(t).all() for t in tensors.values()]).tolist()
    for (name, t), finite in zip(tensors.items(), flags):
        if not finite:
            raise ValueError(f"{fn}: {name} ({_shape(t)}) contains NaN or Inf")


def check_attn(fn: str, attn: object) -> None:
    """``attn`` must be a floating ``[..., HW, HW]`` tensor with HW ≥ 1."""
    check_float(fn, "attn", attn)
    if attn.dim() < 2 or attn.shape[-1] != attn.shape[-2] or attn.shape[-1] == 0:
        raise ValueError(
            f"{fn}: attn must be a square [..., HW, HW] matrix with HW ≥ 1, got {_shape(attn)}"
        )


def check_lam(fn: str, lam: object, allow_none: bool) -> None:
    if lam is None and allow_none:
        return
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        expected = "a float or None" if allow_none else "a float"
        raise TypeError(f"{fn}: lam must be {expected}, got {type(lam).__name__}")
    if not lam >= 0 or lam == float("inf"):
        raise ValueError(f"{fn}: lam must be a finite number ≥ 0, got {lam}")


def validate_ent_self(attn: object, lam: object) -> None:
    check_attn("ent_self", attn)
    check_lam("ent_self", lam, allow_none=False)
    check_finite("ent_self", attn=attn)


def validate_refine(attn: object, cross: object, iters: object, lam: object) -> None:
    fn = "refine"
    check_attn(fn, attn)
    check_float(fn, "cross", cross)
    hw = attn.shape[-1]
    if cross.dim() != attn.dim() or cross.shape[:-2] != attn.shape[:-2]:
        raise ValueError(
            f"{fn}: cross must be [..., HW, K] with the same leading dims as attn [..., HW, HW], "
            f"got cross {_shape(cross)} with attn {_shape(attn)}"
        )
    if cross.shape[-2] != hw:
        raise ValueError(
            f"{fn}: cross has {cross.shape[-2]} rows but attn is {hw}×{hw} "
            f"(cross {_shape(cross)}, attn {_shape(attn)})"
        )
    if cross.shape[-1] == 0:
        raise ValueError(f"{fn}: cross must have at least one column (K ≥ 1), got {_shape(cross)}")
    if cross.device != attn.device:
        raise ValueError(f"{fn}: attn is on {attn.device} but cross is on {cross.device}")
    if isinstance(iters, bool) or not isinstance(iters, int):
        raise TypeError(f"{fn}: iters must be an int, got {type(iters).__name__}")
    if iters < 0:
        raise ValueError(f"{fn}: iters must be ≥ 0, got {iters}")
    check_lam(fn, lam, allow_none=True)
    check_finite(fn, attn=attn, cross=cross)
