"""The one-call GPU check of issue 17 (``../shared/gpu/run.sh`` runs it first, under 5 minutes).

    python3 bench/gpu_check.py --out DIR          # on a GPU
    python3 bench/gpu_check.py --out DIR --smoke  # on CPU: tiny shapes, Triton's interpreter

In one run, on one card:

1. **Correctness** of every op on the Triton backend against float64 (the independent oracles
   of ``tests/ops/_oracle.py``, or the reference run on float64 inputs where no oracle exists),
   at the test suite's tolerances.
2. **refine, new vs reference**: ``iseg_ops.refine`` (Triton, value checks off as in the
   pipeline) and ``iseg_ops.reference.refine`` on the same CUDA tensors over B ∈ {1, 8},
   K ∈ {1, 3, 8, 43}, N ∈ {1, 10, 50}, fp16 and bf16 (CUDA events, warm-up, median).
3. **The iteration kernel**: its time per iteration is ``(t(N=50) − t(N=10)) / 40`` of the same
   call (whatever kernels an iteration launches), its GB/s the bytes of the fp16/bf16 matrix it
   streams per iteration over that time, against the card's HBM peak and a cuBLAS ``torch.bmm``
   of the same shape ``[B, HW, HW] × [B, HW, KP]`` (KP = max(16, next power of two of K)).
4. **CUDA-graph replay** of refine at batch 1 (B1 K8 N10 fp16) against eager.
5. **End to end** (``bench/e2e_check.py``: the VAE variants, ``authors``, ``iseg``,
   ``iseg-compiled``) when that module exists.

Writes ``<gpu>-check.json`` into ``--out`` (the e2e section writes its own ``<gpu>-e2e-check.json``)
and ends with each goal of issue 17 as ``met`` / ``not met`` with its number. Exit status 1 when
a correctness check fails or a section crashes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HBM_PEAK_GBPS = {"h200": 4800.0, "h100": 3350.0, "a100": 2039.0, "rtx-3090": 936.0}


@dataclass(frozen=True)
class Shapes:
    """What one run measures: the GPU shapes, or tiny ones for ``--smoke``."""

    hw: int
    batches: tuple[int, ...]
    ks: tuple[int, ...]
    iters: tuple[int, ...]  # the last two give the per-iteration time
    dtypes: tuple[str, ...]
    headline: tuple[int, int, int]  # (B, K, N) of the main goal
    regions: tuple[int, int, int]  # (B, K, N) of a regions call
    roofline: tuple[int, int]  # (B, K) of the bandwidth goal
    oracle_side: int  # local attention of side² pixels for the N = 10 oracle case
    check_dtypes: tuple[str, ...]
    seconds_per_case: float  # timed calls: as many as fit, at least min_reps, after warmup
    warmup: int = 2
    min_reps: int = 3


GPU_SHAPES = Shapes(4096, (1, 8), (1, 3, 8, 43), (1, 10, 50), ("fp16", "bf16"), (1, 8, 10),
                    (1, 43, 50), (8, 8), 32, ("fp32", "fp16", "bf16"), 0.15)
SMOKE_SHAPES = Shapes(32, (1, 2), (3,), (1, 2), ("fp16", "bf16"), (1, 3, 1), (1, 3, 2), (2, 3), 4,
                      ("fp16",), 0.0, warmup=0, min_reps=1)


@dataclass
class Check:
    """Everything measured, as it is written to the JSON."""

    smoke: bool
    environment: dict = field(default_factory=dict)
    correctness: list = field(default_factory=list)
    refine: list = field(default_factory=list)
    iteration: list = field(default_factory=list)
    ops: list = field(default_factory=list)
    graph: dict = field(default_factory=dict)
    e2e: list = field(default_factory=list)
    goals: list = field(default_factory=list)
    errors: list = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Timing


def timer(cuda: bool, shapes: Shapes) -> Callable[[Callable[[], object]], float]:
    """A function that times ``fn`` and returns its median in ms: warm-up calls (compile,
    autotune), then as many calls as fit in ``shapes.seconds_per_case`` (``min_reps`` to 25),
    each between CUDA events on a GPU (``perf_counter`` on CPU)."""
    import torch

    def median_ms(fn: Callable[[], object]) -> float:
        for _ in range(shapes.warmup):
            fn()
        times = [_once(fn)]
        fit = int(shapes.seconds_per_case * 1e3 / max(times[0], 1e-3))
        reps = max(shapes.min_reps, min(25, fit))
        times += [_once(fn) for _ in range(reps - 1)]
        return statistics.median(times)

    def _once(fn) -> float:
        if not cuda:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    return median_ms


def hbm_peak_gbps() -> float | None:
    """DRAM GB/s from the memory clock (kHz, double data rate) and bus width when torch reports
    them, else from the card's name."""
    import torch

    props = torch.cuda.get_device_properties(0)
    clock, bus = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    if clock and bus:
        return 2 * clock * 1e3 * bus / 8 / 1e9
    name = gpu_name()
    return next((peak for key, peak in HBM_PEAK_GBPS.items() if key in name), None)


def gpu_name() -> str:
    """The device's name as ``../shared/gpu/run.sh`` writes it into file names (``cpu``)."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


# ----------------------------------------------------------------------------------------------
# 1. Correctness against float64


def _oracles():
    sys.path.insert(0, str(ROOT / "tests" / "ops"))
    import _compare
    import _oracle

    return _oracle, _compare


def _error_check(check: Check, name: str, out, expected, atol: float, rtol: float) -> None:
    import torch

    out64, exp64 = out.double().cpu(), expected.double().cpu()
    excess = (out64 - exp64).abs() - (atol + rtol * exp64.abs())
    finite = bool(torch.isfinite(out64).all())
    ok = finite and bool((excess <= 0).all())
    worst = float((out64 - exp64).abs().max()) if finite else math.inf
    check.correctness.append({"case": name, "ok": ok, "max_abs_error": worst,
                              "atol": atol, "rtol": rtol})
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: max |error| {worst:.3g} "
          f"(atol {atol:g}, rtol {rtol:g})", flush=True)


def correctness(check: Check, shapes: Shapes, device: str) -> None:
    """Each op on the Triton backend against float64."""
    import torch

    import iseg_ops
    from iseg_ops import reference

    oracle, compare = _oracles()
    side = shapes.oracle_side
    for dt in shapes.check_dtypes:
        dtype = DTYPES[dt]
        atol, rtol = compare.TOLERANCES[dtype]
        attn = oracle.local_attn(1, side, dtype=dtype, device=device)
        cross = oracle.rand_cross((1, side * side, 3), dtype=dtype, device=device)
        _error_check(check, f"refine {dt} local {side}x{side} K3 N10",
                     iseg_ops.refine(attn, cross, 10), oracle.refine64(attn, cross, 10, 0.01),
                     atol, rtol)
        _error_check(check, f"refine {dt} naive N2", iseg_ops.refine(attn, cross, 2, None),
                     oracle.refine64(attn, cross, 2, None), atol, rtol)
        _error_check(check, f"refine {dt} t_max=1 N3 (reference in float64)",
                     iseg_ops.refine(attn, cross, 3, 0.01, t_max=1.0),
                     reference.refine(attn.double(), cross.double(), 3, 0.01, 1.0), atol, rtol)
        soft = oracle.softmax_attn((2, shapes.hw, shapes.hw), dtype=dtype, device=device)
        wide = oracle.rand_cross((2, shapes.hw, 43), dtype=dtype, device=device)
        _error_check(check, f"refine {dt} B2 HW{shapes.hw} K43 N1",
                     iseg_ops.refine(soft, wide, 1), oracle.refine64(soft, wide, 1, 0.01),
                     atol, rtol)
        _error_check(check, f"ent_self {dt} B2 HW{shapes.hw}", iseg_ops.ent_self(soft, 0.01),
                     oracle.ent_self64(soft, 0.01), atol, rtol)
        q, k = (torch.randn(1, 5, shapes.hw, 64, device=device).mul(1.5).to(dtype)
                for _ in range(2))
        _error_check(check, f"head_mean_attention {dt} 5 heads HW{shapes.hw} D64",
                     iseg_ops.head_mean_attention(q, k), oracle.head_mean64(q, k), atol, rtol)
    _kl_correctness(check, shapes, device)


def _kl_correctness(check: Check, shapes: Shapes, device: str) -> None:
    import torch

    import iseg_ops
    from iseg_ops import reference

    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.softmax(torch.randn(64, 77, generator=gen, device=device) * 3, -1)
    y = torch.softmax(torch.randn(48, 77, generator=gen, device=device) * 3, -1)
    _error_check(check, "symmetric_kl fp32 (reference in float64)", iseg_ops.symmetric_kl(x, y),
                 reference.symmetric_kl(x.double(), y.double()), 1e-5, 1e-4)
    side = math.isqrt(shapes.hw) // 2
    feats = torch.softmax(torch.randn(1, side * side, 77, generator=gen, device=device) * 3, -1)
    _error_check(check, f"kl_cluster fp32 {side}x{side} (reference)",
                 iseg_ops.kl_cluster(feats, (side, side), rounds=5),
                 reference.kl_cluster(feats, (side, side), rounds=5), 1e-5, 1e-4)


# ----------------------------------------------------------------------------------------------
# 2-4. Speed


DTYPES: dict = {}


def _inputs(batch: int, hw: int, dtype, device: str, seed: int = 0):
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(batch, hw, hw, generator=gen, device=device).mul_(4.0)
    return torch.softmax(logits, dim=-1).to(dtype)


def refine_sweep(check: Check, shapes: Shapes, device: str, median_ms) -> None:
    """new (Triton) vs reference over the sweep; one line per case."""
    import torch

    import iseg_ops
    from iseg_ops import reference

    for dt in shapes.dtypes:
        for batch in shapes.batches:
            attn = _inputs(batch, shapes.hw, DTYPES[dt], device)
            for k in shapes.ks:
                cross = torch.rand(batch, shapes.hw, k, device=device).to(DTYPES[dt])
                for n in shapes.iters:
                    new = median_ms(partial(iseg_ops.refine, attn, cross, n))
                    ref = median_ms(partial(reference.refine, attn, cross, n, 0.01))
                    row = {"dtype": dt, "batch": batch, "k": k, "iters": n, "hw": shapes.hw,
                           "new_ms": new, "reference_ms": ref, "speedup": ref / new}
                    check.refine.append(row)
                    print(f"  refine {dt} B{batch} K{k} N{n}: new {new:.3f} ms, reference "
                          f"{ref:.3f} ms ({ref / new:.2f}×)", flush=True)
            del attn


def _row(check: Check, **match) -> dict | None:
    return next((r for r in check.refine if all(r[k] == v for k, v in match.items())), None)


def iteration_roofline(check: Check, shapes: Shapes, device: str, median_ms) -> None:
    """Per-iteration time of refine from the sweep, its GB/s, and cuBLAS bmm of that shape."""
    import torch

    cuda = device == "cuda"
    peak = hbm_peak_gbps() if cuda else None
    lo, hi = shapes.iters[-2], shapes.iters[-1]
    for dt in shapes.dtypes:
        for batch in shapes.batches:
            for k in shapes.ks:
                slow, fast = _row(check, dtype=dt, batch=batch, k=k, iters=hi), _row(
                    check, dtype=dt, batch=batch, k=k, iters=lo)
                if slow is None or fast is None:
                    continue
                iteration_ms = (slow["new_ms"] - fast["new_ms"]) / (hi - lo)
                kp = max(16, 1 << (k - 1).bit_length())
                t = _inputs(batch, shapes.hw, DTYPES[dt], device, seed=1)
                x = torch.rand(batch, shapes.hw, kp, device=device).to(DTYPES[dt])
                bmm_ms = median_ms(partial(torch.bmm, t, x))
                nbytes = t.numel() * t.element_size() + 2 * x.numel() * x.element_size()
                row = {"dtype": dt, "batch": batch, "k": k, "kp": kp, "iteration_ms": iteration_ms,
                       "bmm_ms": bmm_ms, "iteration_gbps": nbytes / max(iteration_ms, 1e-6) / 1e6,
                       "bmm_gbps": nbytes / bmm_ms / 1e6, "hbm_peak_gbps": peak}
                row["fraction_of_peak"] = row["iteration_gbps"] / peak if peak else None
                row["vs_bmm"] = iteration_ms / bmm_ms
                check.iteration.append(row)
                print(f"  iteration {dt} B{batch} K{k}: {iteration_ms:.4f} ms "
                      f"({row['iteration_gbps']:.0f} GB/s"
                      + (f", {row['fraction_of_peak']:.0%} of HBM" if peak else "")
                      + f"); bmm [.., {shapes.hw}, {kp}] {bmm_ms:.4f} ms "
                      f"({row['bmm_gbps']:.0f} GB/s): {row['vs_bmm']:.2f}× cuBLAS", flush=True)
                del t


def other_ops(check: Check, shapes: Shapes, device: str, median_ms) -> None:
    """ent_self and head_mean_attention, Triton vs reference, batch 1 fp16."""
    import torch

    import iseg_ops
    from iseg_ops import reference

    dtype = DTYPES["fp16"]
    attn = _inputs(1, shapes.hw, dtype, device)
    q, k = (torch.randn(1, 5, shapes.hw, 64, device=device).to(dtype) for _ in range(2))
    cases = {
        "ent_self": (lambda: iseg_ops.ent_self(attn), lambda: reference.ent_self(attn)),
        "head_mean_attention": (lambda: iseg_ops.head_mean_attention(q, k),
                                lambda: reference.head_mean_attention(q, k, 0.125)),
    }
    for op, (new, ref) in cases.items():
        row = {"op": op, "dtype": "fp16", "hw": shapes.hw, "new_ms": median_ms(new),
               "reference_ms": median_ms(ref)}
        check.ops.append(row)
        print(f"  {op} fp16 B1 HW{shapes.hw}: new {row['new_ms']:.3f} ms, reference "
              f"{row['reference_ms']:.3f} ms", flush=True)


def graph_replay(check: Check, shapes: Shapes, device: str, median_ms) -> None:
    """refine at batch 1 captured once in a CUDA graph and replayed, against eager."""
    import torch

    import iseg_ops

    batch, k, n = shapes.headline
    if device != "cuda":
        check.graph = {"skipped": "needs CUDA"}
        print("  CUDA graph: skipped (needs CUDA)")
        return
    attn = _inputs(batch, shapes.hw, DTYPES["fp16"], device)
    cross = torch.rand(batch, shapes.hw, k, device=device).to(DTYPES["fp16"])
    eager = median_ms(lambda: iseg_ops.refine(attn, cross, n))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # compile and autotune outside the capture
            iseg_ops.refine(attn, cross, n)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = iseg_ops.refine(attn, cross, n)
    graph.replay()
    torch.cuda.synchronize()
    same = float((out.float() - iseg_ops.refine(attn, cross, n).float()).abs().max())
    replay = median_ms(graph.replay)
    check.graph = {"batch": batch, "k": k, "iters": n, "eager_ms": eager, "replay_ms": replay,
                   "max_abs_difference_vs_eager": same}
    print(f"  CUDA graph B{batch} K{k} N{n} fp16: replay {replay:.3f} ms, eager {eager:.3f} ms;"
          f" max |replay - eager| {same:.2g}", flush=True)


# ----------------------------------------------------------------------------------------------
# 5. End to end, and the goals


def end_to_end(check: Check, out_dir: Path, smoke: bool, budget_s: float,
               path: Path = Path(__file__).with_name("e2e_check.py")) -> None:
    """``bench/e2e_check.run`` (owned by the end-to-end benchmarks) when it exists."""
    if not path.exists():
        print("e2e: not available")
        check.e2e = [{"skipped": "bench/e2e_check.py not available"}]
        return
    spec = importlib.util.spec_from_file_location("e2e_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["e2e_check"] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)

    def report(name: str, value: float | None, goal_met: bool | None, unit: str) -> None:
        check.e2e.append({"name": name, "value": value, "goal_met": goal_met, "unit": unit})
        print(f"  {name}: {'-' if value is None else f'{value:.4g}'} {unit}", flush=True)

    module.run(out_dir, report, smoke=smoke, budget_s=budget_s)


def _baseline_ms(gpu: str) -> float | None:
    """Today's fused refine B1 K8 N10 fp16 on this card, from ``bench/results/<gpu>-ops.json``
    (the issue's "today's time"; the old kernel is gone from the tree)."""
    path = ROOT / "bench" / "results" / f"{gpu}-ops.json"
    if not path.exists():
        return None
    runs = json.loads(path.read_text())["benchmarks"]
    hit = [b for b in runs if b["name"].endswith("[refine-triton-fp16-hw4096-k8]")]
    return hit[0]["stats"]["median"] * 1e3 if hit else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _at_most(value: float | None, limit: float | None) -> bool | None:
    """Whether ``value ≤ limit``; None (not measured) when either is missing."""
    return None if value is None or limit is None else value <= limit


def _ops_goals(check: Check, shapes: Shapes, gpu: str) -> list[tuple]:
    """(name, value, met, unit) of issue 17's six ops goals."""
    b, k, n = shapes.headline
    head = _row(check, dtype="fp16", batch=b, k=k, iters=n) or {}
    head_bf16 = _row(check, dtype="bf16", batch=b, k=k, iters=n) or {}
    regions = _row(check, dtype="fp16", batch=shapes.regions[0], k=shapes.regions[1],
                   iters=shapes.regions[2]) or {}
    iteration = next((r for r in check.iteration if r["dtype"] == "fp16"
                      and (r["batch"], r["k"]) == shapes.roofline), {})
    baseline, new, ref = _baseline_ms(gpu), head.get("new_ms"), head.get("reference_ms")
    fraction, vs_bmm = iteration.get("fraction_of_peak"), iteration.get("vs_bmm")
    bf16_ratio = _ratio(head_bf16.get("new_ms"), new)
    today = f"{baseline:.3f} ms" if baseline else "no recorded time for this card"
    roofline = "B{} K{} fp16 iteration".format(*shapes.roofline)
    return [
        (f"refine B{b} K{k} N{n} fp16 ≤ 1/8 of today's fused kernel ({today})", new,
         _at_most(new, baseline and baseline / 8), "ms"),
        (f"refine B{b} K{k} N{n} fp16 ≤ 1/4 of the reference ({ref or 0:.3f} ms)", new,
         _at_most(new, ref and ref / 4), "ms"),
        ("refine B{} K{} N{} fp16 ≤ 1.5 ms".format(*shapes.regions), regions.get("new_ms"),
         _at_most(regions.get("new_ms"), 1.5), "ms"),
        (f"{roofline} ≥ 75 % of HBM bandwidth", fraction,
         None if fraction is None else fraction >= 0.75, "of peak"),
        (f"{roofline} ≤ 1.1× cuBLAS bmm", vs_bmm, _at_most(vs_bmm, 1.1), "× bmm"),
        (f"bf16 ≤ 1.1× fp16 (refine B{b} K{k} N{n})", bf16_ratio, _at_most(bf16_ratio, 1.1),
         "× fp16"),
    ]


def goals(check: Check, shapes: Shapes, gpu: str) -> None:
    """Issue 17's goals, numbered as listed there, each with its number and met / not met /
    not measured (a smoke run measures none)."""
    rows = _ops_goals(check, shapes, gpu)
    rows += [(e["name"], e["value"], e["goal_met"], e["unit"]) for e in check.e2e
             if e.get("goal_met") is not None]
    print(f"\nGoals of issue 17 ({gpu}{', smoke run: not a measurement' if check.smoke else ''}):")
    for number, (name, value, met, unit) in enumerate(rows, 1):
        met = None if check.smoke or value is None else met
        verdict = {True: "met", False: "not met", None: "not measured"}[met]
        shown = "-" if value is None else f"{value:.4g} {unit}"
        check.goals.append({"goal": number, "name": name, "value": value, "unit": unit,
                            "met": met})
        print(f"  goal {number}: {name}: {shown}: {verdict}")
    if len(rows) == 6:
        print("  goals 7-9 (end to end): not measured (see the e2e section)")


# ----------------------------------------------------------------------------------------------


def _environment(device: str) -> dict:
    import torch

    env = {"gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "torch": torch.__version__, "python": platform.python_version(),
           "interpreted": os.environ.get("TRITON_INTERPRET") == "1"}
    with contextlib.suppress(ImportError):
        import triton

        env["triton"] = triton.__version__
    if device == "cuda":
        env["hbm_peak_gbps"] = hbm_peak_gbps()
    return env


def _section(check: Check, name: str, fn, *args) -> None:
    print(f"\n== {name}", flush=True)
    start = time.time()
    try:
        fn(check, *args)
    except Exception:
        check.errors.append({"section": name, "traceback": traceback.format_exc()})
        print(f"  {name} crashed:\n{traceback.format_exc()}", flush=True)
    print(f"  ({time.time() - start:.1f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON results")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on CPU under Triton's interpreter (checks the script)")
    parser.add_argument("--no-e2e", action="store_true", help="leave out the end-to-end section")
    parser.add_argument("--budget", type=float, default=290.0, help="seconds for the whole run")
    args = parser.parse_args(argv)
    start = time.time()
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu":  # before iseg_ops is imported: Triton fixes the mode at @triton.jit
        os.environ.setdefault("TRITON_INTERPRET", "1")
        torch.set_num_threads(1)
    os.environ["ISEG_OPS_BACKEND"] = "triton"
    sys.path.insert(0, str(ROOT))
    from iseg_ops import value_checks

    DTYPES.update(fp16=torch.float16, bf16=torch.bfloat16, fp32=torch.float32)
    shapes = SMOKE_SHAPES if args.smoke else GPU_SHAPES
    check = Check(smoke=args.smoke, environment=_environment(device))
    gpu = gpu_name() if device == "cuda" else "cpu"
    print(f"gpu_check on {check.environment['gpu']}: {check.environment}", flush=True)
    median_ms = timer(device == "cuda", shapes)
    with torch.no_grad(), value_checks(False):
        _section(check, "correctness against float64", correctness, shapes, device)
        _section(check, "refine: new vs reference", refine_sweep, shapes, device, median_ms)
        _section(check, "iteration kernel vs HBM and cuBLAS", iteration_roofline, shapes, device,
                 median_ms)
        _section(check, "ent_self, head_mean_attention", other_ops, shapes, device, median_ms)
        _section(check, "CUDA graph replay", graph_replay, shapes, device, median_ms)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.no_e2e:
        left = args.budget - (time.time() - start) - 20
        _section(check, "end to end", end_to_end, args.out, args.smoke, max(left, 30.0))
    goals(check, shapes, gpu)
    path = args.out / f"{gpu}-check.json"
    path.write_text(json.dumps(check.__dict__, indent=1, default=str))
    failed = [c["case"] for c in check.correctness if not c["ok"]]
    print(f"\nwrote {path} in {time.time() - start:.0f} s; correctness failures: {len(failed)}; "
          f"crashed sections: {len(check.errors)}")
    return 1 if failed or check.errors else 0


if __name__ == "__main__":
    sys.exit(main())
