"""iseg_ops: fused Triton kernels for iSeg's Ent-Self and iterative refinement.

Stateless functions on tensors, with plain-PyTorch references of the same signatures in
:mod:`iseg_ops.reference`. Triton runs for CUDA tensors (or under ``TRITON_INTERPRET=1``),
the reference elsewhere; ``ISEG_OPS_BACKEND=auto|triton|torch`` overrides.
"""

from ._triton_compat import patch_interpreter

patch_interpreter()  # before any kernel runs under Triton's interpreter

from .ent_self import ent_self  # noqa: E402
from .head_mean_attention import head_mean_attention  # noqa: E402
from .kl import kl_cluster, symmetric_kl  # noqa: E402
from .refine import refine  # noqa: E402

__all__ = ["ent_self", "refine", "head_mean_attention", "symmetric_kl", "kl_cluster"]
