"""Capture of iSeg's attention maps in one UNet call (METHOD §1).

Attention processors are installed on the captured layers only, for the duration of one call
(:func:`capture_attention`), and the previous processors are always restored. Every layer's
output is computed with fused SDPA; the captured self-attention layer additionally yields the
head-mean probabilities through :func:`iseg_ops.head_mean_attention` (never materialising the
per-head probabilities), the captured cross-attention layers yield the head-mean
probabilities of the class-token columns. Once every captured layer has run, the forward
stops (:class:`StopForward`): nothing after the last captured layer is computed.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from iseg_ops import head_mean_attention

DEFAULT_SELF_ATTENTION_LAYER = "up_blocks.3.attentions.1.transformer_blocks.0.attn1"
# Cross-attention weights by the layer's downsampling factor w.r.t. the latent: 16×16 and
# 32×32 for a 64×64 latent (METHOD §1); 8×8 and 64×64 have weight 0.
DEFAULT_CROSS_ATTENTION_WEIGHTS: Mapping[int, float] = {4: 0.7, 2: 0.3}


class StopForward(Exception):
    """Raised inside the UNet once every captured layer has run, to skip the rest."""


@dataclass
class AttentionStore:
    """What one call captures. ``pending`` names the layers still to run."""

    pending: set[str]
    self_heads: tuple[int, ...] | None = None
    self_attention: torch.Tensor | None = None  # [B, HW, HW]
    cross_sums: dict[int, torch.Tensor] = field(default_factory=dict)  # factor → [B, HWr, L]
    cross_counts: dict[int, int] = field(default_factory=dict)

    def done(self, name: str) -> None:
        self.pending.discard(name)
        if not self.pending:
            raise StopForward


def _check_plain(attn: Attention, name: str) -> None:
    if attn.spatial_norm is not None or attn.group_norm is not None or attn.residual_connection:
        raise ValueError(
            f"capture: {name} is not a transformer-block attention layer (it has a spatial or "
            "group norm or a residual connection); choose a layer like "
            f"{DEFAULT_SELF_ATTENTION_LAYER!r}"
        )


def project_heads(
    attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values of ``attn`` as ``[B, heads, L, D]``."""
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if encoder_hidden_states is not None and attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    batch = hidden_states.shape[0]
    q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    heads = attn.heads
    q, k, v = (x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2) for x in (q, k, v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return q, k, v


def attend(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The layer's output from ``[B, heads, L, D]`` projections, with fused SDPA."""
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    out = out.transpose(1, 2).reshape(q.shape[0], -1, attn.heads * q.shape[-1]).to(q.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    return out / attn.rescale_output_factor


class SelfAttentionCapture:
    """Processor that records the head-mean self-attention probabilities ``[B, HW, HW]``."""

    def __init__(self, store: AttentionStore, name: str):
        self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):  # fmt: skip
        _check_plain(attn, self.name)
        q, k, v = project_heads(attn, hidden_states, encoder_hidden_states)
        heads = self.store.self_heads
        if heads is None:
            probs = head_mean_attention(q, k, attn.scale)
        else:
            probs = head_mean_attention(q[:, list(heads)], k[:, list(heads)], attn.scale)
        self.store.self_attention = probs
        self.store.done(self.name)  # raises StopForward when this was the last captured layer
        return attend(attn, q, k, v)


class CrossAttentionCapture:
    """Processor that adds the head-mean probabilities over the text tokens to
    ``store.cross_sums[factor]`` ``[B, HWr, L]`` (fp32; L = 77 text positions, cheap to keep,
    so that every image of a batch may have its own classes)."""

    def __init__(self, store: AttentionStore, name: str, factor: int):
        self.store, self.name, self.factor = store, name, factor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):  # fmt: skip
        _check_plain(attn, self.name)
        q, k, v = project_heads(attn, hidden_states, encoder_hidden_states)
        out = attend(attn, q, k, v)
        logits = (q @ k.transpose(-1, -2)).float() * attn.scale  # [B, heads, HWr, L]
        probs = logits.softmax(dim=-1).mean(dim=1)
        store = self.store
        if self.factor in store.cross_sums:
            store.cross_sums[self.factor] += probs
        else:
            store.cross_sums[self.factor] = probs
        store.cross_counts[self.factor] = store.cross_counts.get(self.factor, 0) + 1
        store.done(self.name)
        return out


_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^mid_block\.")


def downsampling_factor(unet, name: str) -> int:
    """Latent downsampling factor of the block that holds layer ``name`` (SD's layout: each
    down block but the last halves the resolution, the up blocks mirror them)."""
    levels = len(unet.config.down_block_types)
    match = _BLOCK.match(name)
    if match is None:
        raise ValueError(f"capture: {name!r} is not inside a down, mid or up block of the UNet")
    if match.group(1) is None:
        return 2 ** (levels - 1)
    index = int(match.group(2))
    return 2**index if match.group(1) == "down_blocks" else 2 ** (levels - 1 - index)


def cross_attention_layers(unet, weights: Mapping[int, float]) -> dict[str, int]:
    """Names of the ``attn2`` layers captured for ``weights`` (factor → weight), with factors."""
    layers = {}
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and name.endswith("attn2"):
            factor = downsampling_factor(unet, name)
            if weights.get(factor, 0.0) != 0.0:
                layers[name] = factor
    return layers


# unet → {(self_layer, cross weights): resolved layers}. Walking the UNet's ~1500 modules costs
# milliseconds, so it happens once per UNet and setting, not once per call.
_RESOLVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _resolve_layers(unet, self_layer: str, cross_weights: Mapping[int, float]):
    """``(self_module, {cross layer name: (module, factor)})``, validated."""
    key = (self_layer, tuple(sorted(cross_weights.items())))
    per_unet = _RESOLVED.setdefault(unet, {})
    if key not in per_unet:
        modules = dict(unet.named_modules())
        if not isinstance(modules.get(self_layer), Attention):
            raise ValueError(
                f"self_attention_layer: the UNet has no attention layer {self_layer!r}"
            )
        cross = cross_attention_layers(unet, cross_weights)
        missing = {f for f, w in cross_weights.items() if w != 0.0} - set(cross.values())
        if missing:
            raise ValueError(
                f"cross_attention_weights: the UNet has no cross-attention layer at "
                f"downsampling factor(s) {sorted(missing)}"
            )
        per_unet[key] = (modules[self_layer], {n: (modules[n], f) for n, f in cross.items()})
    return per_unet[key]


@contextlib.contextmanager
def capture_attention(
    unet,
    self_layer: str = DEFAULT_SELF_ATTENTION_LAYER,
    self_heads: Sequence[int] | None = None,
    cross_weights: Mapping[int, float] = DEFAULT_CROSS_ATTENTION_WEIGHTS,
) -> Iterator[AttentionStore]:
    """Install the capture processors on ``unet`` for the ``with`` block; always restore.

    Yields the :class:`AttentionStore` that the UNet's forward fills. The forward raises
    :class:`StopForward` after the last captured layer; the caller catches it.
    """
    module, cross = _resolve_layers(unet, self_layer, cross_weights)
    if self_heads is not None:
        self_heads = tuple(int(h) for h in self_heads)
        if not self_heads or not all(0 <= h < module.heads for h in self_heads):
            raise ValueError(
                f"self_attention_heads must be a non-empty subset of 0..{module.heads - 1} "
                f"(the heads of {self_layer}), got {self_heads}"
            )
    store = AttentionStore(pending={self_layer, *cross}, self_heads=self_heads)
    processors = {module: SelfAttentionCapture(store, self_layer)}
    for name, (cross_module, factor) in cross.items():
        processors[cross_module] = CrossAttentionCapture(store, name, factor)

    # Only the captured layers' processors change; each is put back, whatever happens.
    previous = {m: m.processor for m in processors}
    try:
        for m, processor in processors.items():
            m.set_processor(processor)
        yield store
    finally:
        for m, processor in previous.items():
            m.set_processor(processor)


def fuse_cross_attention(
    store: AttentionStore,
    weights: Mapping[int, float],
    latent_size: tuple[int, int],
    self_factor: int,
    class_tokens: torch.Tensor,
) -> torch.Tensor:
    """Fuse the captured cross-attention into the initial maps ``C₀`` ``[B, HW, K]`` (fp32) at
    the self-attention resolution (METHOD §1): mean over heads and layers per resolution,
    each token's map divided by its sum over space, bilinear upsampling, weighted sum, then
    each class's mean over its tokens.

    ``class_tokens`` ``[B, K, L]`` averages the text positions into classes: row ``k`` of
    image ``b`` holds ``1/n`` at the ``n`` positions of its k-th class (zeros for padding).
    """
    h, w = latent_size[0] // self_factor, latent_size[1] // self_factor
    fused = None
    for factor, weight in weights.items():
        if weight == 0.0:
            continue
        maps = store.cross_sums[factor] / store.cross_counts[factor]  # [B, HWr, L]
        maps = maps / maps.sum(dim=1, keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)
        hr, wr = latent_size[0] // factor, latent_size[1] // factor
        maps = maps.transpose(1, 2).reshape(maps.shape[0], -1, hr, wr)
        maps = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)
        fused = weight * maps if fused is None else fused + weight * maps
    return torch.einsum("bkl,blhw->bhwk", class_tokens, fused).reshape(fused.shape[0], h * w, -1)
