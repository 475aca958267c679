"""iseg_ops: fused Triton kernels for iSeg's Ent-Self and iterative refinement.

Stateless functions on tensors, with plain-PyTorch references of the same signatures in
:mod:`iseg_ops.reference`. Triton runs for CUDA tensors (or under ``TRITON_INTERPRET=1``),
the reference elsewhere; ``ISEG_OPS_BACKEND=auto|triton|torch`` overrides.

Besides the ops, what a caller needs to drive them:

* :func:`value_checks` — ``with iseg_ops.value_checks(False):`` turns the ops' NaN/Inf checks
  (their only host synchronisation) off for the block; a caller that checks its own outputs
  (:class:`iseg.ISegPipeline`) uses it so a whole call runs without a device-to-host read.
* :func:`backend` — ``ISEG_OPS_BACKEND`` normalised (``auto`` when unset); ``ValueError`` for
  any other value, so a CLI can report it before loading a model.
* :func:`triton_available` — whether ``triton`` imports; :func:`interpreting` — whether the
  kernels were defined for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import).
"""

from ._dispatch import backend, interpreting, triton_available, value_checks
from .ent_self import ent_self
from .head_mean_attention import head_mean_attention
from .kl import kl_cluster, symmetric_kl
from .refine import refine

__all__ = [
    "backend",
    "ent_self",
    "head_mean_attention",
    "interpreting",
    "kl_cluster",
    "refine",
    "symmetric_kl",
    "triton_available",
    "value_checks",
]
