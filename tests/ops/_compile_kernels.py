"""Compile the iseg_ops Triton kernels for an NVIDIA target without a GPU (run as a script).

Usage: ``python _compile_kernels.py ARCH WORKLOADS_JSON``, e.g. ARCH 90 (H100/H200) or 86
(RTX 3090). For each workload it runs the op's host launcher on ``meta`` tensors with the
kernels replaced by recorders, so the block sizes and constexpr branches are the ones the
launcher really chooses for that shape; then it compiles every recorded launch with Triton's
own argument specialisation (the binder a real launch uses: divisibility by 16, strides of 1
as constants) down to a cubin (ptxas ships inside triton) and prints, as JSON, each kernel's
constexprs, its shared memory and any compile error.

Runs in a fresh process with ``TRITON_INTERPRET`` unset: interpreted kernels cannot be compiled.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
import traceback

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def record(workload: dict) -> list[tuple[object, tuple, dict]]:
    """The kernel launches that the op's launcher makes for ``workload`` (on meta tensors)."""
    ent = importlib.import_module("iseg_ops.ent_self")
    ref = importlib.import_module("iseg_ops.refine")
    hma = importlib.import_module("iseg_ops.head_mean_attention")
    slots = [
        (ent, "_col_max_kernel"),
        (ent, "_ent_self_kernel"),
        (ref, "_refine_step_kernel"),
        (hma, "_row_lse_kernel"),
        (hma, "_head_mean_kernel"),
    ]
    originals = {(m, n): getattr(m, n) for m, n in slots}
    recorders = {(m, n): Recorder(k) for (m, n), k in originals.items()}
    for (module, name), rec in recorders.items():
        setattr(module, name, rec)
    try:
        dtype = DTYPES[workload["dtype"]]
        meta = dict(device="meta", dtype=dtype)
        op = workload["op"]
        if op == "refine":
            b, hw, k = workload["batch"], workload["hw"], workload["k"]
            attn = torch.empty(b, hw, hw, **meta)
            ref._refine_triton(attn, torch.empty(b, hw, k, **meta), 1, workload["lam"])
        elif op == "ent_self":
            b, hw = workload["batch"], workload["hw"]
            ent._ent_self_triton(torch.empty(b, hw, hw, **meta), 0.01)
        elif op == "head_mean_attention":
            shape = [workload[name] for name in ("batch", "heads", "length", "d")]
            q, k = torch.empty(*shape, **meta), torch.empty(*shape, **meta)
            hma._head_mean_attention_triton(q, k, shape[-1] ** -0.5)
        else:
            raise ValueError(op)
    finally:
        for (module, name), kernel in originals.items():
            setattr(module, name, kernel)
    return [(rec.kernel, a, kw) for rec in recorders.values() for a, kw in rec.launches]


def compile_launch(kernel, args, kwargs, target):
    import triton
    from triton import knobs
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(
        kwargs,
        debug=False,
        instrumentation_mode=knobs.compilation.instrumentation_mode,
        fpsan_homomorphic_casts=knobs.compilation.fpsan_homomorphic_casts,
    )
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound, specialization, options
    )
    src = ASTSource(kernel, signature, constexprs, attrs)
    compiled = triton.compile(src, target=target, options=options.__dict__)
    names = [p.name for p in kernel.params]
    named = {names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
    return compiled, named


def main(arch: int, workloads: list[dict]) -> dict:
    try:
        from triton.backends.compiler import GPUTarget

        target = GPUTarget("cuda", arch, 32)
        kernel, args, kwargs = record({"op": "ent_self", "dtype": "fp16", "batch": 1, "hw": 16})[0]
        compile_launch(kernel, args, kwargs, target)
    except Exception as exc:  # no NVIDIA backend, no ptxas, or triton internals changed
        return {"skip": f"cannot compile for sm_{arch}: {type(exc).__name__}: {exc}"}

    seen: dict[str, dict] = {}
    results: dict[str, list[dict]] = {}
    for workload in workloads:
        entries = []
        for kernel, args, kwargs in record(workload):
            described = [str(a.dtype) if torch.is_tensor(a) else a for a in args]
            key = repr((kernel.fn.__name__, described, sorted(kwargs.items())))
            if key not in seen:
                start = time.time()
                try:
                    compiled, constexprs = compile_launch(kernel, args, kwargs, target)
                    seen[key] = {"shared": compiled.metadata.shared, "error": None,
                                 "constexprs": {k: v for k, v in constexprs.items()
                                                if k.isupper()}}
                except Exception:
                    seen[key] = {"shared": None, "error": traceback.format_exc(limit=3),
                                 "constexprs": dict(kwargs)}
                seen[key]["seconds"] = round(time.time() - start, 2)
            entries.append({"kernel": kernel.fn.__name__, **seen[key]})
        results[workload["id"]] = entries
    return {"results": results}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), json.loads(sys.argv[2]))))
