"""``triton`` and ``triton.language`` when installed, else inert stand-ins.

The stand-ins let the kernel modules be imported (their ``@triton.jit`` functions are then
never launched: the dispatch rule sends every call to the reference).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

# Triton decides between its CPU interpreter and GPU compilation when a kernel is defined
# (@triton.jit), so the mode is read once, here, as the kernel modules are imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton
    import triton.language as tl
except ImportError:  # iseg_ops still works, on the PyTorch reference
    triton = SimpleNamespace(jit=lambda fn: fn, cdiv=lambda a, b: -(-a // b))
    tl = SimpleNamespace(constexpr=lambda value=None: value)  # annotations and constants

__all__ = ["INTERPRETED", "triton", "tl"]
