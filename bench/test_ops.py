"""Speed of the fused ops against their PyTorch references, side by side in one run.

On a GPU: ``ent_self`` and ``refine`` (N = 10) on one 64×64-latent attention (HW = 4096), K ∈
{1, 8, 43} maps (43: a regions call), fp16, bf16 and fp32, providers ``reference``
(``iseg_ops.reference`` on CUDA tensors: what a plain PyTorch port does) and ``triton``
(``iseg_ops`` with ``ISEG_OPS_BACKEND=triton``, argument validation included). Record with

    pytest bench/test_ops.py --benchmark-json bench/results/<gpu-name>-ops.json

Without a GPU, the reference runs at a small size (HW = 1024, K = 8, fp32) and the CUDA cases
are skipped. Each benchmark's ``extra_info``: op, provider, dtype, hw, k, iters, lam, ``gbps``
(bytes of S × iterations / median time: S is read at least once per iteration, so this is the
bandwidth a one-pass implementation would need at this speed), ``roofline_fraction`` (gbps over
the GPU's DRAM bandwidth from its clock and bus width, when torch reports them), gpu, torch and
triton versions.
"""

from __future__ import annotations

import importlib
import importlib.util
import platform

import pytest
import torch

import iseg_ops
from iseg_ops import reference

CUDA = torch.cuda.is_available()
TRITON = importlib.util.find_spec("triton") is not None
ITERS = 10
LAM = 0.01
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
NO_CUDA = pytest.mark.skip(reason="CUDA case: no GPU here (the CPU run benchmarks the reference)")


def _kernels_interpreted() -> bool:
    """Whether the kernels were defined for Triton's CPU interpreter (whatever they are named)."""
    return TRITON and importlib.import_module("iseg_ops").interpreting()


def _cases():
    """(op, provider, dtype, hw, k) with the marks that skip what this machine cannot run."""
    for op in ("ent_self", "refine"):
        for dtype in DTYPES:
            for k in (1, 8, 43) if op == "refine" else (None,):
                for provider in ("reference", "triton"):
                    name = f"{op}-{provider}-{dtype}-hw4096" + (f"-k{k}" if k else "")
                    yield pytest.param(op, provider, dtype, 4096, k, id=name,
                                       marks=[] if CUDA else [NO_CUDA])
    # The CPU smoke size: one case per op, reference only.
    for op, k in (("ent_self", None), ("refine", 8)):
        yield pytest.param(
            op, "reference", "fp32", 1024, k, id=f"{op}-reference-fp32-hw1024-cpu",
            marks=[pytest.mark.skip(reason="CPU case: the GPU runs HW = 4096")] if CUDA else [],
        )


def _peak_bandwidth() -> float | None:
    """DRAM bytes/s from the clock (kHz, double data rate) and the bus width (bits)."""
    props = torch.cuda.get_device_properties(0)
    clock, bus = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    return 2 * clock * 1e3 * bus / 8 if clock and bus else None


@pytest.mark.parametrize(("op", "provider", "dtype", "hw", "k"), list(_cases()))
def test_ops(benchmark, monkeypatch, op, provider, dtype, hw, k):
    device = "cuda" if CUDA else "cpu"
    if provider == "triton":
        if not TRITON:
            pytest.skip("triton is not installed")
        if _kernels_interpreted():
            pytest.skip("TRITON_INTERPRET=1: the interpreter is not worth timing")
        monkeypatch.setenv("ISEG_OPS_BACKEND", "triton")
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(1, hw, hw, generator=gen, device=device) * 4.0
    attn = torch.softmax(logits, dim=-1).to(DTYPES[dtype])
    del logits
    cross = torch.rand(1, hw, k or 1, generator=gen, device=device).to(DTYPES[dtype])

    if op == "ent_self":
        fn = reference.ent_self if provider == "reference" else iseg_ops.ent_self
        args, passes = (attn, LAM), 1
    else:
        fn = reference.refine if provider == "reference" else iseg_ops.refine
        args, passes = (attn, cross, ITERS, LAM), ITERS

    def run():
        out = fn(*args)
        if CUDA:
            torch.cuda.synchronize()
        return out

    benchmark.pedantic(run, rounds=20 if CUDA else 3, iterations=1, warmup_rounds=2 if CUDA else 1)

    seconds = benchmark.stats.stats.median
    gbps = attn.numel() * attn.element_size() * passes / seconds / 1e9
    peak = _peak_bandwidth() if CUDA else None
    triton_version = None
    if TRITON:
        import triton

        triton_version = triton.__version__
    benchmark.extra_info.update(
        op=op,
        provider=provider,
        dtype=dtype,
        hw=hw,
        k=k,
        iters=ITERS if op == "refine" else None,
        lam=LAM,
        batch=1,
        gbps=gbps,
        roofline_fraction=gbps * 1e9 / peak if peak else None,
        gpu=torch.cuda.get_device_name() if CUDA else f"cpu ({platform.processor() or 'unknown'})",
        torch=torch.__version__,
        triton=triton_version,
    )
