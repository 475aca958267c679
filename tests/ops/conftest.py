"""Fixtures for the iseg_ops tests: backend selection by environment, and NaN-poisoned outputs.

The backend is chosen by ``ISEG_OPS_BACKEND`` at call time, so the ``backend`` fixture sets it
with ``monkeypatch.setenv`` for one test; every other test runs on the reference. Triton decides
at *definition* time (``@triton.jit``, when ``iseg_ops`` is imported) whether a kernel is
compiled or interpreted, so on a machine without a GPU ``tests/conftest.py`` sets
``TRITON_INTERPRET=1`` before anything imports ``iseg_ops``; the Triton backend then runs the
kernels in the interpreter on CPU tensors, and on a GPU machine it runs them on CUDA tensors.
"""

from __future__ import annotations

import pytest
import torch
from _backends import TRITON_IMPORTABLE, Backend, kernels_interpreted, poison_outputs


@pytest.fixture(autouse=True)
def _reference_by_default(monkeypatch):
    """Tests run on the reference unless they ask for a backend (the ``auto`` rule would pick
    the interpreter on CPU in this session, or CUDA kernels for CUDA tensors)."""
    monkeypatch.setenv("ISEG_OPS_BACKEND", "torch")


def _triton_backend(monkeypatch) -> Backend:
    if not TRITON_IMPORTABLE:
        pytest.skip("triton is not importable")
    monkeypatch.setenv("ISEG_OPS_BACKEND", "triton")
    if kernels_interpreted():
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # already set since import; for the record
        backend = Backend("triton", "cpu", interpreted=True)
    elif torch.cuda.is_available():
        backend = Backend("triton", "cuda")
    else:
        pytest.fail(
            "no CUDA device and the iseg_ops kernels are not defined for the interpreter: "
            "TRITON_INTERPRET=1 must be set before iseg_ops is imported (tests/conftest.py)"
        )
    backend.poison = poison_outputs(monkeypatch)
    return backend


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch) -> Backend:
    """Each op on the PyTorch reference (CPU) and on the Triton kernels (interpreted on CPU, or
    compiled on CUDA), selected through the environment as a user would."""
    if request.param == "torch":
        monkeypatch.setenv("ISEG_OPS_BACKEND", "torch")
        return Backend("torch", "cpu")
    return _triton_backend(monkeypatch)


@pytest.fixture
def triton_backend(monkeypatch) -> Backend:
    return _triton_backend(monkeypatch)


def pytest_terminal_summary(terminalreporter, config):
    """The static kernel budget (tests/ops/test_cuda_compile.py), when those tests ran."""
    lines = getattr(config, "iseg_kernel_budget", None)
    if lines:
        terminalreporter.section("kernel budget (worst launch per kernel and target)")
        for line in lines:
            terminalreporter.write_line(line)
