"""What the refine and ent_self launchers launch, read on ``meta`` tensors with the kernels
replaced by recorders: the number of kernel launches per call (KERNELS.md §2.4: at most N + 6
for K ≤ 16 and 2N + 6 above), which variant each iteration uses, that no torch op other than
allocations and views runs (set-up and finish are kernels, and nothing reads a value back to
the host: a meta tensor has none), chunking of large batches, and the GPU-only autotuner."""

from __future__ import annotations

import importlib
from collections import Counter

import pytest
import torch
from _backends import TRITON_IMPORTABLE
from _compare import assert_close, tolerance
from _oracle import rand_cross, refine64, softmax_attn
from torch.utils._python_dispatch import TorchDispatchMode

pytestmark = pytest.mark.skipif(not TRITON_IMPORTABLE, reason="triton is not installed")

HW = 4096  # 64×64 latents (SD 2.1-base at 512×512); on meta tensors nothing is computed


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` is recorded."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.name, grid, kwargs))


@pytest.fixture
def launches(monkeypatch) -> list:
    """Every kernel of ent_self.py and refine.py replaced by a recorder writing to one list."""
    log: list = []
    for module in ("iseg_ops.ent_self", "iseg_ops.refine"):
        mod = importlib.import_module(module)
        for name in mod.LAUNCHED_KERNELS:
            monkeypatch.setattr(mod, name, Recorder(name, log))
    return log


def _refine_meta(batch, k, iters, lam, dtype=torch.float16, t_max=None):
    refine = importlib.import_module("iseg_ops.refine")
    meta = dict(device="meta", dtype=dtype)
    attn, cross = torch.empty(batch, HW, HW, **meta), torch.empty(batch, HW, k, **meta)
    return refine._refine_triton(attn, cross, iters, lam, t_max)


@pytest.mark.parametrize("lam", [0.01, None])
@pytest.mark.parametrize("iters", [1, 2, 10, 50])
@pytest.mark.parametrize("k", [1, 8, 16, 17, 43])
def test_launches_per_call(launches, k, iters, lam):
    out = _refine_meta(1, k, iters, lam)
    assert out.shape == (1, HW, k) and out.dtype == torch.float16
    names = Counter(name for name, _, _ in launches)
    transform = 0 if lam is None else 2  # column maxima, numerators
    if k <= 16:  # the normalisation is the product's prologue
        assert len(launches) == transform + iters + 2 <= iters + 6
        assert "_refine_normalise_kernel" not in names
    else:
        assert len(launches) == transform + 2 * iters + 2 <= 2 * iters + 6
        assert names["_refine_normalise_kernel"] == iters
    assert names["_refine_gemv_kernel"] == iters
    assert names["_refine_init_kernel"] == names["_refine_finish_kernel"] == 1
    order = [name for name, _, _ in launches]
    assert order[0] == ("_refine_init_kernel" if lam is None else "_col_max_kernel")
    assert order[-1] == "_refine_finish_kernel"
    gemv = [kw for name, _, kw in launches if name == "_refine_gemv_kernel"]
    assert all(kw["PROLOGUE"] == (k <= 16) and kw["HAS_W"] == (lam is not None) for kw in gemv)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_product_operands(launches, dtype):
    """fp16 numerators for fp16/bf16 input (fp16 tensor-core products), fp32 for fp32 input (so
    fp32 keeps its accuracy); KP = max(16, next power of two of K)."""
    _refine_meta(2, 43, 1, 0.01, dtype=dtype)
    (gemv,) = [kw for name, _, kw in launches if name == "_refine_gemv_kernel"]
    assert gemv["KP"] == 64 and gemv["DOT_FP32"] == (dtype == torch.float32)
    (transform,) = [kw for name, _, kw in launches if name == "_ent_self_kernel"]
    assert transform["WRITE_P"] is False


@pytest.mark.parametrize("batch", [1, 5])
def test_naive_bf16_product_multiplies_fp16(launches, monkeypatch, batch):
    """lam=None on bf16 attn: one pass rounds S to an fp16 T first (so the product's loop
    converts nothing), chunked like the numerators; fp16 attn is multiplied as given."""
    refine = importlib.import_module("iseg_ops.refine")
    monkeypatch.setattr(refine, "CHUNK_BYTES", 2 * HW * HW * 2)  # two fp16 T per chunk
    _refine_meta(batch, 8, 3, None, dtype=torch.bfloat16)
    chunk = ["_to_fp16_kernel", "_refine_init_kernel", *["_refine_gemv_kernel"] * 3,
             "_refine_finish_kernel"]  # fmt: skip
    assert [name for name, _, _ in launches] == chunk * -(-batch // 2)
    assert [grid[2] for name, grid, _ in launches if name == "_to_fp16_kernel"] == (
        [1] if batch == 1 else [2, 2, 1])
    launches.clear()
    _refine_meta(batch, 8, 3, None, dtype=torch.float16)
    assert "_to_fp16_kernel" not in {name for name, _, _ in launches}
    assert sum(name == "_refine_init_kernel" for name, _, _ in launches) == 1  # no chunks


def test_ent_self_launches(launches):
    ent_self = importlib.import_module("iseg_ops.ent_self")
    out = ent_self._ent_self_triton(torch.empty(2, HW, HW, device="meta", dtype=torch.bfloat16),
                                    0.01)  # fmt: skip
    assert out.shape == (2, HW, HW) and out.dtype == torch.bfloat16
    assert [name for name, _, _ in launches] == ["_col_max_kernel", "_ent_self_kernel"]
    assert launches[1][2]["WRITE_P"] is True


ALLOCATIONS_AND_VIEWS = {
    "empty.memory_format", "empty_strided.default", "empty_like.default", "view.default",
    "_unsafe_view.default", "reshape.default", "slice.Tensor", "select.int", "as_strided.default",
    "alias.default", "detach.default",
}  # fmt: skip


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(f"{func.__name__}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("k", "lam", "t_max"), [(8, 0.01, None), (43, 0.0434, 1.0), (3, None, None)])
def test_no_torch_compute_and_no_host_read(launches, k, lam, t_max):
    """Only allocations and views: set-up (stats, padding) and finish (min-max, cast) are
    kernels. On meta tensors a host read (``.item()``, ``.tolist()``) would raise, so the call
    completing also shows that the launcher never synchronises."""
    with OpLog() as log:
        _refine_meta(3, k, 4, lam, t_max=t_max)
    assert log.ops <= ALLOCATIONS_AND_VIEWS, f"torch ops beyond allocation: {log.ops - ALLOCATIONS_AND_VIEWS}"


def test_large_batches_run_in_chunks(launches, monkeypatch):
    refine = importlib.import_module("iseg_ops.refine")
    monkeypatch.setattr(refine, "CHUNK_BYTES", 2 * HW * HW * 2)  # two fp16 images per chunk
    _refine_meta(5, 8, 3, 0.01)
    batches = [grid[1] for name, grid, _ in launches if name == "_refine_init_kernel"]
    assert batches == [2, 2, 1]
    assert len(launches) == 3 * (2 + 3 + 2)  # each chunk: N + 4 launches


def test_chunked_batch_matches_oracle(triton_backend, monkeypatch):
    refine = importlib.import_module("iseg_ops.refine")
    monkeypatch.setattr(refine, "CHUNK_BYTES", 2 * 48 * 48 * 4)  # fp32: two matrices per chunk
    attn = softmax_attn((5, 48, 48), seed=11, device=triton_backend.device)
    cross = rand_cross((5, 48, 3), device=triton_backend.device)
    out = refine.refine(attn, cross, iters=2)
    assert_close(out, refine64(attn, cross, 2, 0.01), **tolerance(torch.float32))


# ----------------------------------------------------------------------------------------------
# The autotuner (timing itself needs a GPU: here do_bench is replaced by a fake clock)


@pytest.fixture
def tuner(monkeypatch):
    import triton.testing

    tuning = importlib.import_module("iseg_ops._triton")
    monkeypatch.setattr(tuning, "_TUNED", {})
    times = {"a": 3.0, "b": 1.0, "c": 2.0}
    timed: list = []

    def fake_bench(fn, **kwargs):
        fn()
        return times[timed[-1]]

    def launch(config):
        timed.append(config)
        if config == "broken":
            raise RuntimeError("out of resources")

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    return tuning, launch, timed


def test_tuner_picks_the_fastest_and_caches(tuner):
    tuning, launch, timed = tuner
    assert tuning.pick_config("key", ["a", "broken", "b", "c"], "a", launch, True) == "b"
    assert timed == ["a", "broken", "b", "c"]
    assert tuning.pick_config("key", ["a", "b", "c"], "a", launch, True) == "b"
    assert len(timed) == 4, "a tuned key is not timed again"


def test_tuner_off_gives_the_default_without_timing(tuner):
    tuning, launch, timed = tuner
    assert tuning.pick_config("key", ["a", "b"], "c", launch, False) == "c"
    assert timed == [] and tuning._TUNED == {}, "an untimed key must stay untuned"


def test_autotuning_is_off_for_cpu_and_meta_tensors(monkeypatch):
    tuning = importlib.import_module("iseg_ops._triton")
    assert not tuning.autotune_enabled(torch.empty(2), torch.empty(2, device="meta"))
    if torch.cuda.is_available() and not tuning.INTERPRETED:
        cuda = torch.empty(2, device="cuda")
        assert tuning.autotune_enabled(cuda)
        monkeypatch.setenv("ISEG_OPS_AUTOTUNE", "0")
        assert not tuning.autotune_enabled(cuda)
        monkeypatch.delenv("ISEG_OPS_AUTOTUNE")
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        assert not tuning.autotune_enabled(cuda), "no timing inside CUDA-graph capture"


@pytest.mark.parametrize("op", ["refine", "ent_self"])
def test_ops_trace_whole_under_torch_compile(triton_backend, op):
    """The launchers are custom ops: ``torch.compile(fullgraph=True)`` traces a caller without a
    graph break (value checks off, as in the pipeline) and the fake implementation gives the
    real output's shape, dtype and strides (aot_eager runs it)."""
    import iseg_ops
    from iseg_ops._dispatch import value_checks

    attn = softmax_attn((2, 40, 40), seed=12, device=triton_backend.device).mT  # any strides
    cross = rand_cross((2, 40, 3), device=triton_backend.device)

    def call(attn, cross):
        if op == "refine":
            return iseg_ops.refine(attn, cross, iters=2, lam=0.01) * 2
        return iseg_ops.ent_self(attn, 0.01, t_max=1.0) * 2

    with value_checks(False):
        expected = call(attn, cross)
        compiled = torch.compile(call, fullgraph=True, backend="aot_eager")(attn, cross)
    assert compiled.shape == expected.shape and compiled.stride() == expected.stride()
    assert torch.equal(compiled, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("k", [8, 43])
def test_refine_replays_in_a_cuda_graph(k):
    """No host synchronisation, no autotuning and no allocation outside the graph's pool while
    capturing: a captured call replays to the eager result (tuned or default tiles alike)."""
    import iseg_ops
    from iseg_ops._dispatch import value_checks

    attn = softmax_attn((1, 1024, 1024), seed=13, device="cuda", dtype=torch.float16)
    cross = rand_cross((1, 1024, k), device="cuda", dtype=torch.float16)
    with value_checks(False):
        eager = iseg_ops.refine(attn, cross, iters=10)  # compiles (and tunes) outside capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            iseg_ops.refine(attn, cross, iters=10)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = iseg_ops.refine(attn, cross, iters=10)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
