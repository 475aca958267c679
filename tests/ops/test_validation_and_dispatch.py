"""Bad inputs raise the stated error before any work, with messages that name the function and
the argument; the backend rule (ISEG_OPS_BACKEND, TRITON_INTERPRET, CUDA); and iseg_ops works
without triton."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _backends import TRITON_IMPORTABLE, kernels_interpreted

import iseg_ops
from iseg_ops import _dispatch, reference


class WorkStarted(Exception):
    pass


@pytest.fixture
def no_work(monkeypatch):
    """Any dispatch, reference or kernel launcher call raises WorkStarted: an error raised
    instead proves that validation came first."""

    def started(*args, **kwargs):
        raise WorkStarted

    for name in ("ent_self", "refine", "minmax", "head_mean_attention"):
        monkeypatch.setattr(reference, name, started)
    for module, launcher in (
        ("iseg_ops.ent_self", "_ent_self_triton"),
        ("iseg_ops.refine", "_refine_triton"),
        ("iseg_ops.head_mean_attention", "_head_mean_attention_triton"),
    ):
        mod = importlib.import_module(module)
        monkeypatch.setattr(mod, "use_triton", started)
        monkeypatch.setattr(mod, launcher, started)


def attn(*shape):
    return torch.softmax(torch.randn(*shape), -1)


A = attn(2, 16, 16)
C = torch.rand(2, 16, 3)
NAN_A = A.clone()
NAN_A[1, 3, 4] = float("nan")
INF_C = C.clone()
INF_C[0, 0, 2] = float("inf")

ENT_SELF_ERRORS = [
    # (id, args, kwargs, error, match)
    ("int-attn", (torch.ones(4, 4, dtype=torch.int64),), {}, TypeError, r"ent_self: attn .*float"),
    ("bool-attn", (torch.ones(4, 4, dtype=torch.bool),), {}, TypeError, r"ent_self: attn"),
    ("list-attn", ([[1.0]],), {}, TypeError, r"ent_self: attn must be a torch.Tensor"),
    ("none-attn", (None,), {}, TypeError, r"ent_self: attn"),
    ("non-square", (attn(4, 5),), {}, ValueError, r"ent_self: attn must be a square"),
    ("1-dim", (torch.ones(4),), {}, ValueError, r"ent_self: attn must be a square"),
    ("HW=0", (torch.ones(0, 0),), {}, ValueError, r"ent_self: attn"),
    ("nan", (NAN_A,), {}, ValueError, r"ent_self: attn .*NaN"),
    ("inf", (A.masked_fill(A > 0.2, float("inf")),), {}, ValueError, r"ent_self: attn .*Inf"),
    ("lam<0", (A,), {"lam": -0.01}, ValueError, r"ent_self: lam"),
    ("lam-nan", (A,), {"lam": float("nan")}, ValueError, r"ent_self: lam"),
    ("lam-inf", (A,), {"lam": float("inf")}, ValueError, r"ent_self: lam"),
    ("lam-str", (A,), {"lam": "0.01"}, TypeError, r"ent_self: lam"),
    ("lam-none", (A,), {"lam": None}, TypeError, r"ent_self: lam"),
]


@pytest.mark.parametrize(("args", "kwargs", "error", "match"),
                         [pytest.param(*c[1:], id=c[0]) for c in ENT_SELF_ERRORS])
def test_ent_self_rejects(no_work, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        iseg_ops.ent_self(*args, **kwargs)


REFINE_ERRORS = [
    ("int-attn", (A.long(), C), {}, TypeError, r"refine: attn .*floating"),
    ("int-cross", (A, C.int()), {}, TypeError, r"refine: cross .*floating"),
    ("list-cross", (A, [[0.0]]), {}, TypeError, r"refine: cross must be a torch.Tensor"),
    ("non-square", (attn(2, 16, 15), C), {}, ValueError, r"refine: attn must be a square"),
    ("cross-rows", (A, torch.rand(2, 15, 3)), {}, ValueError,
     r"refine: cross has 15 rows but attn is 16×16"),
    ("batch-mismatch", (A, torch.rand(3, 16, 3)), {}, ValueError, r"refine: cross .*leading dims"),
    ("leading-dims", (A, torch.rand(16, 3)), {}, ValueError, r"refine: cross .*leading dims"),
    ("4d-vs-3d", (attn(2, 2, 16, 16), torch.rand(2, 3, 16, 3)), {}, ValueError,
     r"refine: cross .*leading dims"),
    ("K=0", (A, torch.rand(2, 16, 0)), {}, ValueError, r"refine: cross .*K ≥ 1"),
    ("nan-attn", (NAN_A, C), {}, ValueError, r"refine: attn .*NaN or Inf"),
    ("inf-cross", (A, INF_C), {}, ValueError, r"refine: cross .*NaN or Inf"),
    ("nan-cross-iters-0", (A, INF_C * 0), {"iters": 0}, ValueError, r"refine: cross .*NaN"),
    ("iters<0", (A, C), {"iters": -1}, ValueError, r"refine: iters"),
    ("iters-float", (A, C), {"iters": 2.0}, TypeError, r"refine: iters must be an int"),
    ("iters-bool", (A, C), {"iters": True}, TypeError, r"refine: iters must be an int"),
    ("iters-tensor", (A, C), {"iters": torch.tensor(2)}, TypeError, r"refine: iters"),
    ("lam<0", (A, C), {"lam": -1e-3}, ValueError, r"refine: lam"),
    ("lam-str", (A, C), {"lam": "x"}, TypeError, r"refine: lam"),
]


@pytest.mark.parametrize(("args", "kwargs", "error", "match"),
                         [pytest.param(*c[1:], id=c[0]) for c in REFINE_ERRORS])
def test_refine_rejects(no_work, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        iseg_ops.refine(*args, **kwargs)


Q = torch.randn(1, 2, 8, 16)
NAN_K = Q.clone()
NAN_K[0, 1, 2, 3] = float("nan")

HEAD_MEAN_ERRORS = [
    ("int-query", (Q.long(), Q), {}, TypeError, r"head_mean_attention: query .*floating"),
    ("list-key", (Q, [[1.0]]), {}, TypeError, r"head_mean_attention: key must be a torch.Tensor"),
    ("dtype-mismatch", (Q, Q.half()), {}, TypeError, r"head_mean_attention: query is .* but key"),
    ("2-dim", (Q[0, 0], Q[0, 0]), {}, ValueError, r"head_mean_attention: query and key"),
    ("dims-differ", (Q, Q[0]), {}, ValueError, r"head_mean_attention: query and key"),
    ("heads-differ", (Q, Q[:, :1]), {}, ValueError, r"head_mean_attention: query .* key"),
    ("D-differs", (Q, Q[..., :8]), {}, ValueError, r"head_mean_attention: query .* key"),
    ("empty", (Q[:, :, :0], Q), {}, ValueError, r"head_mean_attention: empty"),
    ("nan-key", (Q, NAN_K), {}, ValueError, r"head_mean_attention: key .*NaN"),
    ("scale-0", (Q, Q), {"scale": 0.0}, ValueError, r"head_mean_attention: scale"),
    ("scale<0", (Q, Q), {"scale": -1.0}, ValueError, r"head_mean_attention: scale"),
]


@pytest.mark.parametrize(("args", "kwargs", "error", "match"),
                         [pytest.param(*c[1:], id=c[0]) for c in HEAD_MEAN_ERRORS])
def test_head_mean_attention_rejects(no_work, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        iseg_ops.head_mean_attention(*args, **kwargs)


def test_head_mean_attention_rejects_non_number_scale(no_work):
    # A non-number is a TypeError, as for lam and iters; refused before any work.
    with pytest.raises(TypeError, match=r"head_mean_attention: scale"):
        iseg_ops.head_mean_attention(Q, Q, scale="0.1")


def test_valid_input_reaches_dispatch(no_work):
    # The no_work fixture really intercepts: a valid call gets past validation into it.
    with pytest.raises(WorkStarted):
        iseg_ops.ent_self(A)
    with pytest.raises(WorkStarted):
        iseg_ops.refine(A, C)
    with pytest.raises(WorkStarted):
        iseg_ops.head_mean_attention(Q, Q)


# ----------------------------------------------------------------------------------------------
# The backend rule


@pytest.mark.parametrize("op", ["ent_self", "refine", "head_mean_attention"])
def test_bogus_backend_is_a_value_error(monkeypatch, op):
    monkeypatch.setenv("ISEG_OPS_BACKEND", "bogus")
    args = {"ent_self": (A,), "refine": (A, C), "head_mean_attention": (Q, Q)}[op]
    with pytest.raises(ValueError, match=rf"{op}: ISEG_OPS_BACKEND must be one of .*'bogus'"):
        getattr(iseg_ops, op)(*args)


def test_backend_values(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setenv("ISEG_OPS_BACKEND", "torch")
    assert _dispatch.use_triton("f", cpu) is False
    # On CPU, Triton runs exactly when the kernels were defined for the interpreter
    # (TRITON_INTERPRET=1 at import); this session's conftest decides which.
    interpreted = kernels_interpreted()
    for value in ("auto", "", " AUTO "):
        monkeypatch.setenv("ISEG_OPS_BACKEND", value)
        assert _dispatch.use_triton("f", cpu) is interpreted, repr(value)
    monkeypatch.delenv("ISEG_OPS_BACKEND")
    assert _dispatch.use_triton("f", cpu) is interpreted
    if interpreted:
        monkeypatch.setenv("ISEG_OPS_BACKEND", " Triton ")
        assert _dispatch.use_triton("f", cpu) is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_use_triton_and_devices_must_match(monkeypatch):
    monkeypatch.delenv("ISEG_OPS_BACKEND")
    assert _dispatch.use_triton("f", torch.zeros(1, device="cuda")) is TRITON_IMPORTABLE
    with pytest.raises(ValueError, match=r"refine: attn is on cuda.* but cross is on cpu"):
        iseg_ops.refine(A.cuda(), C)


def _run(*parts: str, **env_overrides) -> subprocess.CompletedProcess:
    """Runs the dedented ``parts`` as one script in a fresh interpreter."""
    code = "".join(textwrap.dedent(part) for part in parts)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ISEG_OPS_BACKEND")}
    root = str(Path(__file__).resolve().parents[2])  # iseg_ops importable even if not installed
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env.update(env_overrides)
    proc = subprocess.run([sys.executable, "-c", code], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


CHECK_REFERENCE_RESULTS = """
    import torch
    from iseg_ops import reference
    attn = torch.softmax(torch.randn(2, 20, 20), -1)
    cross = torch.rand(2, 20, 3)
    q = torch.randn(1, 2, 12, 8)
    assert torch.equal(iseg_ops.ent_self(attn), reference.ent_self(attn, 0.01))
    assert torch.equal(iseg_ops.refine(attn, cross, iters=3), reference.refine(attn, cross, 3))
    assert torch.equal(iseg_ops.head_mean_attention(q, q), reference.head_mean_attention(q, q))
"""


@pytest.mark.skipif(not TRITON_IMPORTABLE, reason="triton not installed")
def test_cpu_without_interpreter_uses_the_reference():
    """The auto rule on CPU without TRITON_INTERPRET (a fresh process): the reference; asking
    for triton is a RuntimeError naming the op; setting TRITON_INTERPRET only after the import
    does not switch to kernels that were compiled for a GPU (it used to crash)."""
    _run(
        """
        import os
        import torch
        import iseg_ops
        from iseg_ops import _dispatch
        cpu = torch.zeros(1)
        assert _dispatch.use_triton("f", cpu) is False
        """,
        CHECK_REFERENCE_RESULTS,
        """
        os.environ["TRITON_INTERPRET"] = "1"  # too late: kernels are defined at import
        assert _dispatch.use_triton("f", cpu) is False
        assert torch.equal(iseg_ops.ent_self(attn), reference.ent_self(attn, 0.01))
        os.environ["ISEG_OPS_BACKEND"] = "triton"
        try:
            iseg_ops.ent_self(attn)
        except RuntimeError as exc:
            expected = "ent_self: ISEG_OPS_BACKEND=triton needs CUDA tensors or TRITON_INTERPRET=1"
            assert expected in str(exc), exc
        else:
            raise AssertionError("ISEG_OPS_BACKEND=triton on CPU did not raise")
        """
    )


def test_import_and_ops_without_triton():
    """``import iseg_ops`` and every op work when triton cannot be imported (the reference
    runs, even with TRITON_INTERPRET=1), and ISEG_OPS_BACKEND=triton says triton is missing."""
    proc = _run(
        """
        import importlib.util, os, sys
        sys.modules["triton"] = None  # `import triton` now raises ImportError
        _find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a, **k: (
            None if name.split(".")[0] == "triton" else _find_spec(name, *a, **k))
        import torch
        import iseg_ops
        from iseg_ops import _dispatch
        assert sys.modules["triton"] is None
        assert not _dispatch.triton_available()
        assert _dispatch.use_triton("f", torch.zeros(1)) is False
        """,
        CHECK_REFERENCE_RESULTS,
        """
        os.environ["ISEG_OPS_BACKEND"] = "triton"
        try:
            iseg_ops.refine(attn, cross)
        except RuntimeError as exc:
            assert "refine: ISEG_OPS_BACKEND=triton but triton is not installed" in str(exc), exc
        else:
            raise AssertionError("ISEG_OPS_BACKEND=triton without triton did not raise")
        print("ok")
        """,
        TRITON_INTERPRET="1",
    )
    assert proc.stdout.strip().endswith("ok")


# ----------------------------------------------------------------------------------------------
# Autograd, meta tensors, lam's float32 range, NumPy scalars, a bad backend value


def _op_inputs(op: str, grad: bool):
    torch.manual_seed(0)
    a = attn(2, 16, 16).requires_grad_(grad)
    c = torch.rand(2, 16, 3).requires_grad_(grad)
    q = torch.randn(1, 2, 8, 4).requires_grad_(grad)
    k = torch.randn(1, 2, 8, 4).requires_grad_(grad)
    return {"ent_self": (a,), "refine": (a, c), "head_mean_attention": (q, k)}[op]


@pytest.mark.skipif(not kernels_interpreted(), reason="needs the kernels on Triton's interpreter")
@pytest.mark.parametrize("op", ["ent_self", "refine", "head_mean_attention"])
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_grad_requests_run_the_reference_and_backward_works(monkeypatch, op, backend):
    """With inputs that require grad, even ISEG_OPS_BACKEND=triton runs the reference, so the
    output is part of the graph and .backward() gives the reference's gradients; without grad
    (or under no_grad) the kernels run."""
    monkeypatch.setenv("ISEG_OPS_BACKEND", backend)
    inputs = _op_inputs(op, grad=True)
    assert _dispatch.use_triton(op, *inputs) is False
    out = getattr(iseg_ops, op)(*inputs)
    assert out.requires_grad and out.grad_fn is not None
    weights = torch.rand(out.shape)
    (out * weights).sum().backward()
    grads = [t.grad.clone() for t in inputs]
    assert all(g.abs().sum() > 0 for g in grads[:1])  # a real gradient reaches the first input

    expected_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    (getattr(reference, op)(*expected_inputs) * weights).sum().backward()
    for grad, expected in zip(grads, expected_inputs):
        torch.testing.assert_close(grad, expected.grad)

    with torch.no_grad():
        assert _dispatch.use_triton(op, *inputs) is True  # no graph to keep: the kernel
    assert _dispatch.use_triton(op, *_op_inputs(op, grad=False)) is True


@pytest.mark.parametrize("op", ["ent_self", "refine", "head_mean_attention"])
def test_meta_tensors_give_shapes_without_value_checks(monkeypatch, op):
    """Meta tensors: shapes are validated, the value checks skipped, and the reference gives
    the output's shape and dtype (documented in iseg_ops._dispatch)."""
    monkeypatch.setenv("ISEG_OPS_BACKEND", "auto")
    inputs = [t.detach().to("meta") for t in _op_inputs(op, grad=False)]
    assert _dispatch.use_triton(op, *inputs) is False
    out = getattr(iseg_ops, op)(*inputs)
    expected = getattr(reference, op)(*[t.detach() for t in _op_inputs(op, grad=False)])
    assert out.is_meta and out.shape == expected.shape and out.dtype == expected.dtype
    with pytest.raises(ValueError, match=r"refine: cross has 15 rows"):
        iseg_ops.refine(torch.empty(16, 16, device="meta"), torch.empty(15, 3, device="meta"))


@pytest.mark.parametrize("op", ["ent_self", "refine"])
def test_lam_beyond_float32_is_a_value_error(no_work, op):
    args = (A,) if op == "ent_self" else (A, C)
    with pytest.raises(ValueError, match=rf"{op}: lam must be ≤ 3.403e\+38 \(float32's range\), got 1e\+39"):
        getattr(iseg_ops, op)(*args, lam=1e39)
    with pytest.raises(WorkStarted):  # the largest float32 itself is fine
        getattr(iseg_ops, op)(*args, lam=float(torch.finfo(torch.float32).max))


def test_numpy_scalars_for_lam(no_work):
    np = pytest.importorskip("numpy")
    for lam in (np.float32(0.01), np.float64(0.01), np.int64(0)):
        with pytest.raises(WorkStarted):
            iseg_ops.ent_self(A, lam=lam)
    with pytest.raises(TypeError, match="ent_self: lam must be a float"):
        iseg_ops.ent_self(A, lam=np.bool_(True))


def test_numpy_lam_gives_the_same_result(monkeypatch):
    np = pytest.importorskip("numpy")
    monkeypatch.setenv("ISEG_OPS_BACKEND", "torch")
    assert torch.equal(iseg_ops.ent_self(A, lam=np.float32(0.5)), iseg_ops.ent_self(A, lam=0.5))


def test_backend_cuda_is_a_clear_value_error(monkeypatch):
    monkeypatch.setenv("ISEG_OPS_BACKEND", "cuda")
    message = (
        "refine: ISEG_OPS_BACKEND must be one of auto, triton, torch, got 'cuda' "
        "(CUDA tensors use the Triton kernels with 'auto')"
    )
    with pytest.raises(ValueError) as info:
        iseg_ops.refine(A, C)
    assert str(info.value) == message
    with pytest.raises(ValueError, match="^iseg_ops: ISEG_OPS_BACKEND must be one of"):
        _dispatch.backend()
