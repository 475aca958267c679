"""iseg: training-free segmentation from Stable Diffusion attention (iSeg, arXiv 2409.03209).

``ISegPipeline`` captures the attention maps in one UNet call and turns them into masks; the
kernels live in :mod:`iseg_ops`.
"""

__all__ = [
    "ISegPipeline", "ISegPipelineOutput", "CaptureOutput", "RegionsOutput", "UnsupervisedOutput",
    "Point", "Box", "Line", "Mask", "Recipe", "RECIPES", "get_recipe", "DiffSegSettings",
]  # fmt: skip
__version__ = "0.2.0"
_SEEDS = ("Point", "Box", "Line", "Mask")  # regions for ISegPipeline.segment_regions


def __getattr__(name: str):
    # Lazy: `import iseg` (and the `iseg` command's --help) must not import torch/diffusers.
    if name in _SEEDS:
        from . import seeds

        return getattr(seeds, name)
    if name in ("Recipe", "RECIPES", "get_recipe", "DiffSegSettings"):
        from . import recipes

        return getattr(recipes, name)
    if name.endswith("Output"):
        from . import outputs

        return getattr(outputs, name)
    if name in __all__:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'iseg' has no attribute {name!r}")
