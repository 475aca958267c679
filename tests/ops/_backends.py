"""Backend plumbing for the iseg_ops tests: is triton there, are the kernels interpreted, and the
NaN poison for the outputs that kernels allocate with ``torch.empty``."""

from __future__ import annotations

import importlib
import importlib.util
import types
from dataclasses import dataclass

import torch

KERNEL_MODULES = ("iseg_ops.ent_self", "iseg_ops.refine", "iseg_ops.head_mean_attention")
TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def kernels_interpreted() -> bool:
    """Whether the iseg_ops kernels were defined for Triton's CPU interpreter."""
    if not TRITON_IMPORTABLE:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    kernel = importlib.import_module("iseg_ops.ent_self")._ent_self_kernel
    return isinstance(kernel, InterpretedFunction)


class PoisonedTorch(types.ModuleType):
    """Stands in for ``torch`` inside the kernel modules: ``empty`` returns NaN-filled floating
    tensors, so an output element that a kernel forgets to write fails the comparison."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.poisoned = 0

    def __getattr__(self, name):
        return getattr(torch, name)

    def empty(self, *args, **kwargs):
        out = torch.empty(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
            self.poisoned += 1
        return out


def poison_outputs(monkeypatch) -> PoisonedTorch:
    """For one test, the kernel modules allocate through :class:`PoisonedTorch`."""
    poisoned = PoisonedTorch()
    for name in KERNEL_MODULES:
        monkeypatch.setattr(importlib.import_module(name), "torch", poisoned)
    return poisoned


@dataclass
class Backend:
    name: str  # "torch" or "triton"
    device: str  # where the test's tensors must live for this backend
    interpreted: bool = False
    poison: PoisonedTorch | None = None  # the poisoned torch.empty, on the triton backend
