"""Fixes for Triton versions in the supported range (3.6–3.9) whose CPU interpreter breaks on
current NumPy. Applied once, when :mod:`iseg_ops` is imported, and only under the interpreter.

* Triton 3.6 turns a scalar kernel argument into a tensor whose ``__index__`` is
  ``int(ndarray of shape (1,))``, which NumPy ≥ 2.4 refuses ("only 0-dimensional arrays can be
  converted to Python scalars"), so every ``for n in range(0, HW, BLOCK)`` over a runtime bound
  fails; Triton 3.7 squeezes the array first, as done here.
"""

from __future__ import annotations

from ._triton import INTERPRETED


def _squeezed_index(self) -> int:
    return int(self.handle.data.squeeze())


def patch_interpreter() -> None:
    """Give Triton 3.6's interpreted tensors 3.7's ``__index__`` (no-op elsewhere)."""
    if not INTERPRETED:
        return
    try:
        import triton
        from triton.runtime import interpreter
    except ImportError:
        return
    major_minor = tuple(int(part) for part in triton.__version__.split(".")[:2])
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if major_minor != (3, 6) or original is None or getattr(original, "iseg_patched", False):
        return

    def patch_lang_tensor(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _squeezed_index)

    patch_lang_tensor.iseg_patched = True
    interpreter._patch_lang_tensor = patch_lang_tensor
