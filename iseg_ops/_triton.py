"""``triton`` and ``triton.language`` when installed, else inert stand-ins.

The stand-ins let the kernel modules be imported (their ``@triton.jit`` functions are then
never launched: the dispatch rule sends every call to the reference).
"""

from __future__ import annotations

from types import SimpleNamespace

try:
    import triton
    import triton.language as tl
except ImportError:  # iseg_ops still works, on the PyTorch reference
    triton = SimpleNamespace(jit=lambda fn: fn, cdiv=lambda a, b: -(-a // b))
    tl = SimpleNamespace(constexpr=object)

__all__ = ["triton", "tl"]
