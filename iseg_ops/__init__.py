"""iseg_ops: fused Triton kernels for iSeg's Ent-Self and iterative refinement.

Stateless functions on tensors, with plain-PyTorch references of the same signatures in
:mod:`iseg_ops.reference`. Triton runs for CUDA tensors (or under ``TRITON_INTERPRET=1``),
the reference elsewhere; ``ISEG_OPS_BACKEND=auto|triton|torch`` overrides.
"""

from .ent_self import ent_self
from .head_mean_attention import head_mean_attention
from .kl import kl_cluster, symmetric_kl
from .refine import refine

__all__ = ["ent_self", "head_mean_attention", "kl_cluster", "refine", "symmetric_kl"]
