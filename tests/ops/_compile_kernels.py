"""Compile the iseg_ops Triton kernels for an NVIDIA target without a GPU (run as a script).

Usage: ``python _compile_kernels.py ARCH WORKLOADS_JSON``, e.g. ARCH 90 (H100/H200) or 86
(RTX 3090). For each workload it runs the op's host launcher (``_<op>_triton`` in
``iseg_ops.<op>``) on ``meta`` tensors with every Triton kernel of every ``iseg_ops`` module
replaced by a recorder, so the kernels, grids, block sizes and constexpr branches are the ones
the launcher really chooses for that shape. Then it compiles every recorded launch through
Triton's own launch path (``warmup``: the binder a real launch uses, divisibility by 16, strides
of 1 as constants; an autotuned kernel compiles each config its pruner keeps) against a stand-in
driver that reports the target GPU, down to a cubin (``ptxas`` ships inside triton), and reads
the cubin with the bundled ``cuobjdump -res-usage`` (registers, stack, local memory) and
``nvdisasm -c`` (the hottest loop). Prints the result as JSON.

Runs in a fresh process with ``TRITON_INTERPRET`` unset: interpreted kernels cannot be compiled.
Skips (``{"skip": ...}``) only when a CUDA tool is absent; anything else that goes wrong is
reported as an error, so a Triton version the harness does not handle fails the tests.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
NAMES = {dtype: name for name, dtype in DTYPES.items()} | {torch.int32: "int32", torch.int64: "int64"}
# What triton.runtime.driver.active.utils.get_device_properties reports on each target.
DEVICE_PROPERTIES = {
    90: {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
         "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000,
         "mem_bus_width": 5120},
    86: {"max_shared_mem": 101376, "multiprocessor_count": 82, "max_num_regs": 65536,
         "warpSize": 32, "sm_clock_rate": 1695000, "mem_clock_rate": 9751000,
         "mem_bus_width": 384},
}
TOOLS = ("ptxas", "cuobjdump", "nvdisasm")


class Recorder:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, name: str, kernel):
        self.name, self.kernel = name, kernel
        self.launches: list[tuple[object, tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


class TargetDriver:
    """The parts of Triton's active driver that compiling (``warmup``) and autotune pruning
    read, answering for ``arch`` instead of the (absent) GPU."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        props = DEVICE_PROPERTIES[arch]
        self.utils = SimpleNamespace(get_device_properties=lambda device: dict(props))

    def is_active(self) -> bool:
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")


def tool_paths() -> dict[str, str] | str:
    """Paths of the bundled CUDA tools, or why one cannot be found."""
    from triton import knobs

    paths = {}
    for tool in TOOLS:
        try:
            paths[tool] = getattr(knobs.nvidia, tool).path
        except RuntimeError as exc:  # not bundled, not on TRITON_<TOOL>_PATH
            return f"{tool} not found ({exc})"
    return paths


def kernel_slots() -> list[tuple[object, str, object]]:
    """Every module-level Triton kernel (``@triton.jit``, autotuned or heuristics-wrapped) in
    every ``iseg_ops`` module, as (module, attribute, kernel). Helpers called from kernels are
    included; they are never launched, so they record nothing."""
    from triton.runtime.jit import KernelInterface

    return [(module, name, value) for module in _modules()
            for name, value in vars(module).items() if isinstance(value, KernelInterface)]


def _modules() -> list:
    package = importlib.import_module("iseg_ops")
    return [importlib.import_module(f"iseg_ops.{info.name}")
            for info in pkgutil.iter_modules(package.__path__)]


def _call_launcher(workload: dict) -> None:
    dtype = DTYPES[workload["dtype"]]
    meta = dict(device="meta", dtype=dtype)
    op = workload["op"]
    module = importlib.import_module(f"iseg_ops.{op}")
    launcher = getattr(module, f"_{op}_triton")
    b, hw = workload["batch"], workload["hw"]
    if op == "refine":
        attn, cross = torch.empty(b, hw, hw, **meta), torch.empty(b, hw, workload["k"], **meta)
        launcher(attn, cross, workload["iters"], workload["lam"], workload["t_max"])
    elif op == "ent_self":
        launcher(torch.empty(b, hw, hw, **meta), workload["lam"], workload["t_max"])
    elif op == "head_mean_attention":
        shape = (b, workload["heads"], workload["length"], workload["d"])
        launcher(torch.empty(*shape, **meta), torch.empty(*shape, **meta), shape[-1] ** -0.5)
    else:
        raise ValueError(f"unknown op {op!r}")


def _every_config(pick_config):
    """Stands in for the launchers' GPU autotuner (``iseg_ops._triton.pick_config(key, configs,
    default, launch, enabled)``): launches every candidate config (so each gets recorded and
    compiled, as on a GPU any of them may be chosen), then returns the default as the
    untimed path does."""

    def pick_every(key, configs, default, launch, enabled):
        for config in configs:
            launch(config)
        return default

    pick_every.original = pick_config
    return pick_every


def _patch(replacements: dict[int, object]) -> list[tuple[object, str, object]]:
    """Replace every ``iseg_ops`` module attribute whose value is a key of ``replacements`` (by
    identity); returns what to restore."""
    patched = []
    for module in _modules():
        for name, value in list(vars(module).items()):
            if id(value) in replacements:
                patched.append((module, name, value))
                setattr(module, name, replacements[id(value)])
    return patched


def record(workload: dict) -> list[tuple[str, object, object, tuple, dict]]:
    """The kernel launches that the op's launcher makes for ``workload`` (on meta tensors), as
    (kernel name, kernel, grid, args, kwargs), grouped by kernel, every autotune candidate
    included."""
    recorders: dict[int, Recorder] = {}
    for _, name, kernel in kernel_slots():
        recorders.setdefault(id(kernel), Recorder(name, kernel))
    replacements: dict[int, object] = dict(recorders)
    tuner = getattr(importlib.import_module("iseg_ops._triton"), "pick_config", None)
    if tuner is not None:
        replacements[id(tuner)] = _every_config(tuner)
    patched = _patch(replacements)
    try:
        _call_launcher(workload)
    finally:
        for module, name, value in patched:
            setattr(module, name, value)
    return [(rec.name, rec.kernel, g, a, kw) for rec in recorders.values()
            for g, a, kw in rec.launches]


def hottest_loop(sass: str) -> int:
    """Instructions in the longest backward branch of ``nvdisasm -c`` output (0: no loop).

    Each instruction line reads ``/*0a40*/  @P0 BRA `(.L_x_2) ;``; a label line ``.L_x_2:``
    names the address of the next instruction.
    """
    labels: dict[str, int] = {}
    instructions: list[tuple[int, str]] = []
    pending: list[str] = []
    for line in sass.splitlines():
        if m := re.match(r"\s*(\.L\w+):", line):
            pending.append(m.group(1))
        elif m := re.match(r"\s*/\*([0-9a-f]+)\*/\s+(.*)", line):
            address = int(m.group(1), 16)
            for label in pending:
                labels[label] = address
            pending = []
            instructions.append((address, m.group(2)))
    longest = 0
    for address, text in instructions:
        m = re.search(r"\bBRA(?:\.\w+)*\s+`?\((\.L\w+)\)", text)
        if m and labels.get(m.group(1), address + 1) <= address:
            start = labels[m.group(1)]
            longest = max(longest, sum(start <= a <= address for a, _ in instructions))
    return longest


def inspect_cubin(cubin: bytes, tools: dict[str, str]) -> dict:
    """Registers, stack, local and static shared memory (``cuobjdump -res-usage``) and the
    hottest loop's instruction count (``nvdisasm -c``) of a single-kernel cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "kernel.cubin")
        path.write_bytes(cubin)
        usage = subprocess.run([tools["cuobjdump"], "-res-usage", str(path)],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tools["nvdisasm"], "-c", str(path)],
                              capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", usage.split("Function", 1)[-1]))
    if "REG" not in fields:
        raise RuntimeError(f"cuobjdump -res-usage gave no register count:\n{usage}")
    return {"registers": int(fields["REG"]), "stack": int(fields.get("STACK", 0)),
            "local": int(fields.get("LOCAL", 0)), "loop_instructions": hottest_loop(sass)}


def _configs(kernel, args: tuple, kwargs: dict) -> list[tuple[object, dict]]:
    """(the JIT function to warm up, the launch options) for each config a launch compiles:
    one for a plain kernel, each config the pruner keeps for an autotuned one."""
    from triton.runtime.autotuner import Autotuner

    if not isinstance(kernel, Autotuner):
        return [(kernel, {})]
    kernel.nargs = dict(zip(kernel.arg_names, args))
    return [(kernel.fn, config.all_kwargs()) for config in kernel.prune_configs(kwargs)]


def _params(kernel) -> list:
    while not hasattr(kernel, "params"):  # Autotuner / Heuristics wrap the JITFunction
        kernel = kernel.fn
    return kernel.params


def _launch_values(kernel, args: tuple, kwargs: dict, grid) -> tuple[dict, list]:
    """The constexprs and launch options of one launch, and its grid, evaluated."""
    params = _params(kernel)
    bound = {**dict(zip((p.name for p in params), args)), **kwargs}
    constexprs = {p.name: bound[p.name] for p in params if p.is_constexpr and p.name in bound}
    constexprs.update({k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")})
    grid = grid(bound) if callable(grid) else grid
    return constexprs, [int(g) for g in grid]


def compile_launch(kernel, args: tuple, kwargs: dict, grid, tools) -> list[dict]:
    """Compile one recorded launch (each autotune config) and describe each cubin."""
    out = []
    for fn, config in _configs(kernel, args, kwargs):
        options = {**kwargs, **config}
        constexprs, grid_ = _launch_values(kernel, args, options, grid)
        start = time.time()
        entry = {"constexprs": constexprs, "grid": grid_, "error": None}
        try:
            compiled = fn.warmup(*args, grid=grid_, **options)
            compiled = compiled.result() if hasattr(compiled, "result") else compiled
            entry["num_warps"] = compiled.metadata.num_warps
            entry["num_stages"] = compiled.metadata.num_stages
            entry["shared"] = compiled.metadata.shared
            entry.update(inspect_cubin(compiled.asm["cubin"], tools))
        except Exception:
            entry["error"] = traceback.format_exc(limit=4)
        entry["seconds"] = round(time.time() - start, 2)
        out.append(entry)
    return out


def _describe(args: tuple, kwargs: dict, grid) -> str:
    described = [f"{a.dtype}{tuple(a.stride())}" if torch.is_tensor(a) else a for a in args]
    return repr((described, sorted(kwargs.items()), grid if not callable(grid) else None))


def main(arch: int, workloads: list[dict]) -> dict:
    import triton
    from triton.runtime import driver

    tools = tool_paths()
    if isinstance(tools, str):  # the only reason to skip: the CUDA tools are not there
        return {"skip": f"cannot compile for sm_{arch}: {tools}"}
    driver.set_active(TargetDriver(arch))
    seen: dict[str, list[dict]] = {}
    results: dict[str, dict] = {}
    for workload in workloads:
        try:
            launches = record(workload)
        except Exception:
            results[workload["id"]] = {"error": traceback.format_exc(limit=6), "launches": []}
            continue
        entries = []
        for name, kernel, grid, args, kwargs in launches:
            key = repr((name, _describe(args, kwargs, grid)))
            if key not in seen:
                seen[key] = compile_launch(kernel, args, kwargs, grid, tools)
            dtype = next((NAMES[a.dtype] for a in args if torch.is_tensor(a)), "-")
            entries += [{"kernel": name, "dtype": dtype, **entry} for entry in seen[key]]
        results[workload["id"]] = {"error": None, "launches": entries}
    kernels = sorted({name for _, name, _ in kernel_slots()})
    return {"triton": triton.__version__, "kernels": kernels, "results": results}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), json.loads(sys.argv[2]))))
