"""What the pipeline's tasks return: one documented dataclass per task (diffusers'
``pipeline_output.py``). Importable from :mod:`iseg` and, as before, from :mod:`iseg.pipeline`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.utils import BaseOutput


@dataclass
class ISegPipelineOutput(BaseOutput):
    """Output of :class:`ISegPipeline` (text segmentation and :meth:`~ISegPipeline.refine_masks`).

    Args:
        heatmaps: ``[B, K, H, W]`` float in [0, 1] at the input images' size, or at
            ``heatmap_size`` (a list of ``[K_i, H_i, W_i]`` when the sizes or class counts
            differ); ``None`` with ``output_heatmaps=False`` and no ``heatmap_size``.
        labels: ``[B, H, W]`` int64, 0 = background, k = ``classes[k-1]`` (a list of ``[H_i, W_i]``
            likewise).
        self_attention: ``[B, HW, HW]`` raw head-mean self-attention, before Ent-Self; only
            with ``output_attentions=True``.
        cross_attention: ``[B, HW, K]`` initial maps of the classes, before refinement (K = the
            largest class count, zero columns pad the others); only with ``output_attentions=True``.
    """

    heatmaps: torch.Tensor | list[torch.Tensor] | None
    labels: torch.Tensor | list[torch.Tensor]
    self_attention: torch.Tensor | None = None
    cross_attention: torch.Tensor | None = None


@dataclass
class CaptureOutput(BaseOutput):
    """What one UNet call captured (:meth:`ISegPipeline.capture`).

    Args:
        self_attention: ``[B, HW, HW]`` head-mean self-attention of the captured layer.
        cross_attention: ``[B, HW, K]`` fused class cross-attention (the initial maps of text
            segmentation), or ``None`` for a text-free capture.
        grid: ``(h, w)`` of the self-attention (HW = h·w).
        sizes: each input image's ``(H, W)``.
    """

    self_attention: torch.Tensor
    cross_attention: torch.Tensor | None
    grid: tuple[int, int]
    sizes: list[tuple[int, int]]


@dataclass
class RegionsOutput(BaseOutput):
    """Output of :meth:`ISegPipeline.segment_regions`.

    Args:
        heatmaps: ``[B, R, H, W]`` float in [0, 1], one per region, at the image's size.
        masks: ``[B, R, H, W]`` bool: ``heatmap > threshold`` (a tie is not in the mask).
        labels: ``[B, H, W]`` int64: 0 = no region, r = region r (the highest heat among the
            regions over the threshold).
        (Lists of per-image tensors when the images' sizes or region counts differ.)
    """

    heatmaps: torch.Tensor | list[torch.Tensor]
    masks: torch.Tensor | list[torch.Tensor]
    labels: torch.Tensor | list[torch.Tensor]


@dataclass
class UnsupervisedOutput(BaseOutput):
    """Output of :meth:`ISegPipeline.segment_unsupervised`.

    Args:
        labels: ``[B, H, W]`` int64 segment ids at the input images' size (a list of
            ``[H_i, W_i]`` when the sizes differ); id ``m`` = ``merged_maps[b][m]``.
        merged_maps: per image ``[M_b, g, g]`` float32 DiffSeg merged maps on the latent grid,
            each summing to 1 (a distribution over the ``g × g`` keys).
        attention: ``[B, HW, HW]`` float32 aggregated self-attention ``A`` (row-stochastic);
            only with ``output_attentions=True``.
        dropped_anchors: per image, the anchors Google's fp16 first pass dropped because they
            matched nothing (a value underflowed to 0); all 0 with ``first_pass="fp32"``.
    """

    labels: torch.Tensor | list[torch.Tensor]
    merged_maps: list[torch.Tensor]
    attention: torch.Tensor | None = None
    dropped_anchors: list[int] | None = None
