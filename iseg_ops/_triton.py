"""``triton`` and ``triton.language`` when installed, else inert stand-ins; the fast log; the
GPU-only autotuner of the launchers.

The stand-ins let the kernel modules be imported (their ``@triton.jit`` functions are then
never launched: the dispatch rule sends every call to the reference).

Tested with Triton 3.6.0, 3.7.1, 3.8.0 and 3.9.0 (interpreter: the whole ``tests/ops`` suite;
compiled: sm_90 and sm_86 cubins).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from types import SimpleNamespace

import torch

# Triton decides between its CPU interpreter and GPU compilation when a kernel is defined
# (@triton.jit), so the mode is read once, here, as the kernel modules are imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton
    import triton.language as tl
except ImportError:  # iseg_ops still works, on the PyTorch reference
    triton = SimpleNamespace(jit=lambda fn: fn, cdiv=lambda a, b: -(-a // b))
    tl = SimpleNamespace(constexpr=lambda value=None: value)  # annotations and constants
    _HAVE_TRITON = False
else:
    _HAVE_TRITON = True

# The hardware log2 (MUFU.LG2) only where the kernels are compiled for NVIDIA; the interpreter
# (and ROCm, where PTX inline assembly does not exist) use Triton's precise log2.
FAST_LOG = _HAVE_TRITON and not INTERPRETED and torch.version.hip is None

if FAST_LOG:

    @triton.jit
    def log2(x):
        """``log2(x)`` for normal positive fp32 ``x`` by ``lg2.approx.ftz.f32`` (one MUFU.LG2;
        PTX ISA: maximum absolute error 2^-22.6 over the whole range). Triton 3.6–3.9 compile
        ``tl.log``/``tl.log2`` to a ~26-instruction precise polynomial, and libdevice's
        ``fast_logf`` is this instruction followed by a multiply by ln 2, which the caller folds
        into its own constant instead."""
        return tl.inline_asm_elementwise(
            "lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )

else:

    @triton.jit
    def log2(x):
        """``log2(x)`` (the interpreter's NumPy log2, exact to fp32 rounding)."""
        return tl.log2(x)


if INTERPRETED:

    def loop_bound(n):
        """``n`` as a Python int for ``range()`` in an interpreted kernel. Triton 3.6's
        interpreter passes scalar arguments as 1-element arrays and converts them with
        ``int(array)``, which NumPy ≥ 2.4 rejects (Triton 3.7 squeezes first)."""
        return int(n.handle.data.reshape(-1)[0]) if hasattr(n, "handle") else n

else:

    @triton.jit
    def loop_bound(n):
        """``n`` unchanged (see the interpreter's version)."""
        return n


# --------------------------------------------------------------------------------------------
# Autotuning (GPU only)

_TUNED: dict[tuple, object] = {}


def autotune_enabled(*tensors: torch.Tensor) -> bool:
    """Whether a launcher may time its configurations now: compiled kernels on CUDA tensors,
    not inside CUDA-graph capture (timing synchronises, which capture forbids) and not turned
    off with ``ISEG_OPS_AUTOTUNE=0``."""
    if INTERPRETED or not all(t.is_cuda for t in tensors):
        return False
    if os.environ.get("ISEG_OPS_AUTOTUNE", "1").strip() == "0":
        return False
    return not torch.cuda.is_current_stream_capturing()


def shared_memory_limit(device: torch.device) -> int:
    """Shared memory one block may use on ``device`` (opt-in maximum; sm_86: 101,376 B)."""
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 101376))


def pick_config(
    key: tuple,
    configs: Sequence[object],
    default: object,
    launch: Callable[[object], None],
    enabled: bool,
) -> object:
    """The configuration for ``key``: the fastest of ``configs`` timed once with ``launch`` (which
    must write only scratch outputs) when ``enabled``, then cached; ``default`` otherwise, and
    for a key never timed (e.g. inside graph capture). A configuration that fails to launch
    (out of shared memory or registers) is skipped."""
    if key in _TUNED:
        return _TUNED[key]
    if not enabled:
        return default
    import triton.testing

    best, best_ms = default, float("inf")
    for config in configs:
        try:
            ms = triton.testing.do_bench(lambda config=config: launch(config), warmup=5, rep=20)
        except Exception:  # noqa: BLE001 (OutOfResources, a failed compile: not a candidate here)
            continue
        if ms < best_ms:
            best, best_ms = config, ms
    _TUNED[key] = best
    return best


__all__ = [
    "FAST_LOG", "INTERPRETED", "autotune_enabled", "log2", "loop_bound", "pick_config", "tl",
    "triton",
]  # fmt: skip
