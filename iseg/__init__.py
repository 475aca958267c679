"""iseg: training-free segmentation from Stable Diffusion attention (iSeg, arXiv 2409.03209).

``ISegPipeline`` captures the attention maps in one UNet call and turns them into masks; the
kernels live in :mod:`iseg_ops`.
"""

from .pipeline import ISegPipeline, ISegPipelineOutput

__all__ = ["ISegPipeline", "ISegPipelineOutput"]
__version__ = "0.1.0"
