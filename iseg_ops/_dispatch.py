"""One rule for choosing the Triton kernels or the PyTorch reference, and argument validation.

Backend rule: Triton when ``triton`` imports and (the tensors are on CUDA, or
``TRITON_INTERPRET=1``); otherwise the reference. ``ISEG_OPS_BACKEND=auto|triton|torch``
overrides (read at each call; any other value is a ``ValueError``); ``triton`` on CPU requires
``TRITON_INTERPRET=1``, which must be set before ``iseg_ops`` is imported.

Two cases always run the reference, whatever the backend asked for:

* **autograd**: when grad mode is on and any input tensor requires grad, the reference runs
  (plain PyTorch ops, so ``.backward()`` works); the Triton kernels have no backward, and a
  kernel's output would silently cut the graph.
* **meta tensors**: shapes, dtypes and devices are validated as usual, the value checks (NaN,
  Inf) are skipped (a meta tensor has no values) and the reference computes the output's
  shape and dtype (useful for tracing; no values are produced).
"""

from __future__ import annotations

import contextlib
import importlib.util
import numbers
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "torch")
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
try:
    from numpy import bool_ as np_bool
except ImportError:  # numpy is optional here
    np_bool = bool


_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether ``import triton`` would succeed (checked once, at import, without importing it;
    a constant, so ``torch.compile`` can trace the dispatch)."""
    return _TRITON_AVAILABLE


def interpreting() -> bool:
    """Whether the kernels were defined for Triton's CPU interpreter: ``TRITON_INTERPRET=1``
    when :mod:`iseg_ops` was imported (Triton fixes the mode at ``@triton.jit``)."""
    from ._triton import INTERPRETED

    return INTERPRETED


def backend(fn: str = "iseg_ops") -> str:
    """``ISEG_OPS_BACKEND`` normalised (``auto`` when unset or empty).

    Raises:
        ValueError: any value other than auto, triton or torch, naming ``fn``.
    """
    value = os.environ.get("ISEG_OPS_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        hint = " (CUDA tensors use the Triton kernels with 'auto')" if value == "cuda" else ""
        raise ValueError(
            f"{fn}: ISEG_OPS_BACKEND must be one of {', '.join(BACKENDS)}, got {value!r}{hint}"
        )
    return value


def needs_reference(*tensors: torch.Tensor) -> bool:
    """Whether the reference must run whatever the backend: autograd is recording a tensor
    that requires grad, or a tensor is on the meta device (module docstring)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return True
    return any(t.is_meta for t in tensors)


def use_triton(fn: str, *tensors: torch.Tensor) -> bool:
    """Whether ``fn`` runs its Triton kernel on ``tensors`` (else the PyTorch reference).
    Autograd and meta tensors always get the reference (module docstring)."""
    backend_ = backend(fn)
    if backend_ == "torch" or needs_reference(*tensors):
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend_ == "triton":
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


_VALUE_CHECKS = True


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Switch the NaN/Inf checks of the ops (their only host synchronisation) on or off for
    the ``with`` block. Off inside :class:`iseg.ISegPipeline`, which checks its outputs once
    at the end instead, so that a whole call runs without a device-to-host read and a
    compiled capture step has no graph break. Direct users of the ops keep the checks."""
    global _VALUE_CHECKS
    previous, _VALUE_CHECKS = _VALUE_CHECKS, enabled
    try:
        yield
    finally:
        _VALUE_CHECKS = previous


def check_finite(fn: str, **tensors: torch.Tensor) -> None:
    """``ValueError`` naming the first of ``tensors`` that holds NaN or Inf. One reduction per
    tensor and a single device-to-host read (on CUDA: one synchronisation, before any kernel).
    Skipped inside ``value_checks(False)`` and for meta tensors (no values)."""
    if not _VALUE_CHECKS or any(t.is_meta for t in tensors.values()):
        return
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
    if isinstance(lam, (bool, np_bool)) or not isinstance(lam, numbers.Real):
        expected = "a float or None" if allow_none else "a float"
        raise TypeError(f"{fn}: lam must be {expected}, got {type(lam).__name__}")
    if not lam >= 0 or lam == float("inf"):
        raise ValueError(f"{fn}: lam must be a finite number ≥ 0, got {lam}")
    if float(lam) > FLOAT32_MAX:  # the kernels and fp32 math would see Inf
        raise ValueError(
            f"{fn}: lam must be ≤ {FLOAT32_MAX:.4g} (float32's range), got {float(lam):g}"
        )


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


def check_t_max(fn: str, t_max: object, lam: object) -> None:
    """``t_max`` (Ent-Self's upper clamp of ``T``) must be ``None`` or a finite number > 0, and
    needs Ent-Self (``lam`` not ``None``)."""
    if t_max is None:
        return
    if isinstance(t_max, (bool, np_bool)) or not isinstance(t_max, numbers.Real):
        raise TypeError(f"{fn}: t_max must be a float or None, got {type(t_max).__name__}")
    if not 0 < t_max <= FLOAT32_MAX:  # the kernels take it as float32
        raise ValueError(
            f"{fn}: t_max must be a finite number > 0 (≤ float32's max) or None, got {t_max}"
        )
    if lam is None:
        raise ValueError(
            f"{fn}: t_max clamps Ent-Self's T, so it needs lam (got lam=None with t_max={t_max})"
        )
