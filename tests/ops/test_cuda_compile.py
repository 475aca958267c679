"""Every Triton kernel compiles for NVIDIA sm_90 (H100/H200) and sm_86 (RTX 3090, the paper's
GPU) without a GPU, for each dtype and constexpr branch and for the block sizes that the host
launchers choose on realistic shapes, and fits the target's shared memory per block (a kernel
that does not fit compiles fine but fails at launch with OutOfResources).

The compilation runs in two subprocesses (one per target, in parallel) with TRITON_INTERPRET
unset: this session's kernels are defined for the interpreter and cannot be compiled.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed"),
]

ARCHS = {90: "sm_90 (H100/H200)", 86: "sm_86 (RTX 3090)"}
# Shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin), which Triton
# checks at launch.
SHARED_LIMIT = {90: 232448, 86: 101376}
HW = 4096  # 64×64 latents of a 512×512 image on SD 2.1-base


@dataclass(frozen=True)
class Workload:
    id: str
    op: str
    dtype: str
    batch: int = 1
    hw: int = HW
    k: int = 1
    lam: float | None = 0.01
    heads: int = 0
    length: int = 0
    d: int = 0


def _refine_workloads(dtype: str) -> list[Workload]:
    return [
        # One interaction map, batch 1 (the demo): BLOCK_M 16, BLOCK_K 16, BLOCK_N 128.
        Workload(f"refine-{dtype}-B1-K1", "refine", dtype, k=1),
        # VOC: 20 classes + background: BLOCK_K 32.
        Workload(f"refine-{dtype}-B1-K21", "refine", dtype, k=21),
        # COCO: 80 classes + background: BLOCK_K 128, BLOCK_N 64.
        Workload(f"refine-{dtype}-B1-K81", "refine", dtype, k=81),
        # A batch of 4 images: BLOCK_M 32.
        Workload(f"refine-{dtype}-B4-K8", "refine", dtype, batch=4, k=8),
        # A batch of 8 with 40 maps: BLOCK_M 64, BLOCK_K 64, BLOCK_N 64.
        Workload(f"refine-{dtype}-B8-K40", "refine", dtype, batch=8, k=40),
        # lam=None: the naive product (APPLY_ENT_SELF False).
        Workload(f"refine-{dtype}-B1-K1-naive", "refine", dtype, k=1, lam=None),
    ]


BF16_REFINE = ("refine-bf16-B1-K21", "refine-bf16-B1-K1-naive")  # same tiles as fp16

WORKLOADS = [
    *_refine_workloads("fp16"),
    *(w for w in _refine_workloads("bf16") if w.id in BF16_REFINE),
    *_refine_workloads("fp32"),
    *(Workload(f"ent_self-{dtype}", "ent_self", dtype) for dtype in ("fp16", "bf16", "fp32")),
    # SD 2.1's captured layer: 5 heads, D = 64 (BLOCK_D 64).
    *(
        Workload(f"head_mean-{dt}-H5-D64", "head_mean_attention", dt, heads=5, length=HW, d=64)
        for dt in ("fp16", "bf16", "fp32")
    ),
    # SD 1.x at 32×32: 8 heads, D = 80 (BLOCK_D 128).
    *(
        Workload(f"head_mean-{dt}-H8-D80", "head_mean_attention", dt, heads=8, length=1024, d=80)
        for dt in ("fp16", "fp32")
    ),
]



@pytest.fixture(scope="module")
def compiled() -> dict[int, dict]:
    script = Path(__file__).with_name("_compile_kernels.py")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ISEG_OPS_BACKEND")}
    root = str(Path(__file__).resolve().parents[2])  # iseg_ops importable even if not installed
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    payload = json.dumps([asdict(w) for w in WORKLOADS])
    procs = {
        arch: subprocess.Popen(
            [sys.executable, str(script), str(arch), payload],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=script.parent,
        )
        for arch in ARCHS
    }
    out = {}
    for arch, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        if proc.returncode != 0:
            pytest.fail(f"compiling for sm_{arch} crashed:\n{stderr[-4000:]}")
        out[arch] = json.loads(stdout.strip().splitlines()[-1])
    return out


def _results(compiled, arch: int) -> dict[str, list[dict]]:
    if "skip" in compiled[arch]:
        pytest.skip(compiled[arch]["skip"])
    return compiled[arch]["results"]


def _params():
    for arch in ARCHS:
        for w in WORKLOADS:
            yield pytest.param(arch, w, id=f"sm{arch}-{w.id}")


@pytest.mark.parametrize(("arch", "workload"), list(_params()))
def test_kernels_compile_and_fit_in_shared_memory(compiled, arch, workload):
    entries = _results(compiled, arch)[workload.id]
    assert entries, f"{workload.id}: the launcher launched no kernel"
    for entry in entries:
        assert entry["error"] is None, (
            f"{entry['kernel']} {entry['constexprs']} does not compile for {ARCHS[arch]}:\n"
            f"{entry['error']}"
        )
        assert entry["shared"] <= SHARED_LIMIT[arch], (
            f"{entry['kernel']} {entry['constexprs']} needs {entry['shared']} B of shared memory;"
            f" {ARCHS[arch]} allows {SHARED_LIMIT[arch]} B per block"
        )


@pytest.mark.parametrize("arch", list(ARCHS))
def test_workloads_cover_every_branch_and_block_size(compiled, arch):
    """Guards the workload list: if a launcher's choices change, the list must follow."""
    seen: dict[tuple[str, str], set] = {}
    for entries in _results(compiled, arch).values():
        for entry in entries:
            for name, value in entry["constexprs"].items():
                seen.setdefault((entry["kernel"], name), set()).add(value)
    expected = {
        ("_refine_step_kernel", "APPLY_ENT_SELF"): {True, False},
        ("_refine_step_kernel", "HALF_DOT"): {True, False},
        ("_refine_step_kernel", "BLOCK_M"): {16, 32, 64},
        ("_refine_step_kernel", "BLOCK_K"): {16, 32, 64, 128},
        ("_refine_step_kernel", "BLOCK_N"): {64, 128},
        ("_row_lse_kernel", "HALF_DOT"): {True, False},
        ("_head_mean_kernel", "HALF_DOT"): {True, False},
        ("_head_mean_kernel", "BLOCK_D"): {64, 128},
    }
    for key, values in expected.items():
        assert values <= seen.get(key, set()), f"{key}: covered {seen.get(key)}, want {values}"
    kernels = {kernel for kernel, _ in seen}
    assert {"_col_max_kernel", "_ent_self_kernel"} <= kernels
