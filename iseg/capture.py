"""Capture of iSeg's attention maps in one truncated UNet call (METHOD §1).

A :class:`CapturePlan` says which layers one call captures: the self-attention layer (with a
head subset) and, for text, the ``attn2`` layers (each with a head subset) and the weight of
each resolution. :func:`capture_processors` builds the attention processors of a plan once
per UNet (cached: they hold no per-call state); :func:`installed` swaps them in for one call
with that call's own :class:`AttentionStore`, holding the UNet's lock, and always puts the
previous ones back, so two threads sharing a pipeline never see each other's attention.
:func:`run_unet` runs the UNet's blocks explicitly up to the last captured layer and returns:
no exception ends the forward, no host synchronisation happens inside, so a compiler can hold
the whole step in one graph (:meth:`iseg.ISegPipeline.compile`).

Every layer's output is computed with fused SDPA; the captured self-attention layer yields the
head-mean probabilities through :func:`iseg_ops.head_mean_attention` (never materialising the
per-head probabilities), the captured cross-attention layers add the sum over their selected
heads of the probabilities over the text tokens.

Resolutions are latent downsampling factors, so one plan shape serves every layout: SD 1.x/2.x
attend at factors 1, 2, 4, 8 (64×64 … 8×8 at 512²); SDXL at 2 and 4 only (64×64 with 2
transformer layers per block and 32×32 with 10, at 1024²), with the added conditioning (pooled
text embedding, size/crop ids) passed to :func:`run_unet`.
"""

from __future__ import annotations

import contextlib
import re
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from iseg_ops import head_mean_attention

from .recipes import DEFAULT_CROSS_ATTENTION_WEIGHTS, DEFAULT_SELF_ATTENTION_LAYER, SDXL_SELF_ATTENTION_LAYER, is_sdxl

_LAYER = re.compile(
    r"^(?:(down_blocks|up_blocks)\.(\d+)|(mid_block))\.attentions\.(\d+)"
    r"\.transformer_blocks\.(\d+)\.(attn1|attn2)$"
)
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^mid_block\.")


@dataclass(frozen=True)
class CrossLayer:
    """One captured ``attn2`` layer: its name, downsampling factor and head subset."""

    name: str
    factor: int
    heads: tuple[int, ...] | None


@dataclass(frozen=True)
class CapturePlan:
    """What one UNet call captures.

    Attributes:
        self_layer, self_heads: the ``attn1`` layer whose head-mean self-attention is captured,
            and its head subset (``None`` = all heads).
        cross: the captured ``attn2`` layers (empty for a text-free capture).
        weights: ``((factor, weight), ...)`` of the cross-attention resolutions.
        head_counts: ``((factor, n), ...)``: how many (layer, head) pairs each resolution
            averages.
        last_layer: the captured layer that runs last; the forward ends after it.
    """

    self_layer: str
    self_heads: tuple[int, ...] | None
    cross: tuple[CrossLayer, ...]
    weights: tuple[tuple[int, float], ...]
    head_counts: tuple[tuple[int, int], ...]
    last_layer: str
    self_factor: int


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


def _execution_rank(name: str) -> tuple[int, ...]:
    """Sort key of a transformer-block attention layer in forward order."""
    match = _LAYER.match(name)
    kind, block, mid, attention, transformer, which = match.groups()
    stage = 1 if mid else (0 if kind == "down_blocks" else 2)
    return (stage, int(block or 0), int(attention), int(transformer), which == "attn2")


def _check_layer(unet, name: str, what: str, which: str) -> Attention:
    try:
        module = unet.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, Attention) or _LAYER.match(name) is None:
        example = SDXL_SELF_ATTENTION_LAYER if is_sdxl(unet) else DEFAULT_SELF_ATTENTION_LAYER
        hint = "; an SDXL-layout UNet takes the recipe 'sdxl' (or 'sdxl-interactive')" if is_sdxl(unet) else ""
        raise ValueError(
            f"{what}: the UNet has no transformer-block attention layer {name!r} (expected a "
            f"name like {example!r}){hint}"
        )
    if not name.endswith(which):
        kind = "self-attention (attn1)" if which == "attn1" else "cross-attention (attn2)"
        raise ValueError(f"{what}: {name!r} is not a {kind} layer")
    if module.spatial_norm is not None or module.group_norm is not None or module.residual_connection:
        raise ValueError(f"{what}: {name!r} is not a plain transformer-block attention layer")
    return module


def _check_heads(heads, module: Attention, what: str) -> tuple[int, ...] | None:
    if heads is None:
        return None
    if isinstance(heads, (str, bytes)) or not isinstance(heads, Sequence):
        raise TypeError(f"{what} must be a sequence of head indices or None, got {heads!r}")
    out = []
    for h in heads:
        if isinstance(h, bool) or not hasattr(h, "__index__"):
            raise TypeError(f"{what} must hold ints, got {h!r}")
        out.append(int(h.__index__()))
    if not out or len(set(out)) != len(out) or not all(0 <= h < module.heads for h in out):
        raise ValueError(
            f"{what} must be a non-empty set of distinct heads in 0..{module.heads - 1}, got {tuple(heads)}"
        )
    return tuple(out)


# unet → {plan key: plan}. Walking the UNet's ~1500 modules costs milliseconds, so it
# happens once per UNet and setting, not once per call.
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def make_plan(
    unet,
    self_layer: str = DEFAULT_SELF_ATTENTION_LAYER,
    self_heads: Sequence[int] | None = None,
    cross_weights: Mapping[int, float] | Sequence[tuple[int, float]] | None = DEFAULT_CROSS_ATTENTION_WEIGHTS,
    cross_layers: Sequence[tuple[str, Sequence[int] | None]] | None = None,
) -> CapturePlan:
    """The validated :class:`CapturePlan` (cached per UNet and arguments).

    ``cross_weights`` (``{factor: weight}`` or ``((factor, weight), ...)``; default 0.7 at
    16×16 and 0.3 at 32×32 of a 64×64 latent, METHOD §1); ``None`` captures no
    cross-attention (text-free). ``cross_layers=None`` takes
    every ``attn2`` at a factor with a non-zero weight, all heads; otherwise the named layers
    with their head subsets (each must sit at a weighted factor).
    """
    weights = None if cross_weights is None else tuple(sorted((int(f), float(w)) for f, w in dict(cross_weights).items()))
    layers = None if cross_layers is None else tuple(
        (name, None if heads is None else tuple(heads)) for name, heads in cross_layers
    )
    key = (self_layer, None if self_heads is None else tuple(self_heads), weights, layers)
    per_unet = _PLANS.setdefault(unet, {})
    if key in per_unet:
        return per_unet[key]

    module = _check_layer(unet, self_layer, "self_attention_layer", "attn1")
    heads = _check_heads(self_heads, module, "self_attention_heads")
    cross: list[CrossLayer] = []
    counts: dict[int, int] = {}
    if weights is not None:
        weighted = {f for f, w in weights if w != 0.0}
        if layers is None:
            layers = tuple(
                (name, None)
                for name, m in unet.named_modules()
                if isinstance(m, Attention) and _LAYER.match(name) and name.endswith("attn2")
                and downsampling_factor(unet, name) in weighted
            )  # fmt: skip
        for name, layer_heads in layers:
            m = _check_layer(unet, name, "cross_attention_layers", "attn2")
            factor = downsampling_factor(unet, name)
            if factor not in weighted:
                raise ValueError(
                    f"cross_attention_layers: {name!r} is at downsampling factor {factor}, which "
                    f"has no weight in cross_attention_weights {dict(weights)}"
                )
            layer_heads = _check_heads(layer_heads, m, f"cross_attention_layers[{name!r}]")
            cross.append(CrossLayer(name, factor, layer_heads))
            counts[factor] = counts.get(factor, 0) + (m.heads if layer_heads is None else len(layer_heads))
        missing = weighted - set(counts)
        if missing:
            raise ValueError(
                f"cross_attention_weights: the UNet has no captured cross-attention layer at "
                f"downsampling factor(s) {sorted(missing)}"
            )
    names = [self_layer, *(c.name for c in cross)]
    plan = CapturePlan(
        self_layer=self_layer,
        self_heads=heads,
        cross=tuple(cross),
        weights=tuple((f, w) for f, w in (weights or ()) if w != 0.0),
        head_counts=tuple(sorted(counts.items())),
        last_layer=max(names, key=_execution_rank),
        self_factor=downsampling_factor(unet, self_layer),
    )
    per_unet[key] = plan
    return plan


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


class AttentionStore:
    """What one call captures: ``self_attention`` ``[B, HW, HW]`` and, per factor, the sum over
    the captured (layer, head) pairs of the probabilities over the text tokens ``[B, HWr, L]``
    (fp32; all 77 positions are cheap to keep, so each image of a batch may have its own
    classes)."""

    def __init__(self) -> None:
        self.self_attention: torch.Tensor | None = None
        self.cross_sums: dict[int, torch.Tensor] = {}

    def clear(self) -> None:
        self.self_attention = None
        self.cross_sums = {}


class SelfAttentionCapture:
    """Processor recording the head-mean self-attention probabilities ``[B, HW, HW]`` into the
    ``store`` that :func:`installed` binds for one call. As the last layer of a truncated
    forward (``last=True``) it skips the layer's output."""

    def __init__(self, heads: tuple[int, ...] | None, last: bool):
        self.store: AttentionStore | None = None
        self.heads, self.last = heads, last

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):  # fmt: skip
        q, k, v = project_heads(attn, hidden_states, encoder_hidden_states)
        if self.heads is None:
            self.store.self_attention = head_mean_attention(q, k, attn.scale)
        else:
            heads = list(self.heads)
            self.store.self_attention = head_mean_attention(q[:, heads], k[:, heads], attn.scale)
        return hidden_states if self.last else attend(attn, q, k, v)


class CrossAttentionCapture:
    """Processor adding the sum over its selected heads of the probabilities over the text
    tokens to ``store.cross_sums[factor]`` (the ``store`` :func:`installed` binds for one call)."""

    def __init__(self, factor: int, heads: tuple[int, ...] | None, last: bool):
        self.store: AttentionStore | None = None
        self.factor, self.heads, self.last = factor, heads, last

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):  # fmt: skip
        q, k, v = project_heads(attn, hidden_states, encoder_hidden_states)
        qs, ks = (q, k) if self.heads is None else (q[:, list(self.heads)], k[:, list(self.heads)])
        logits = (qs @ ks.transpose(-1, -2)).float() * attn.scale  # [B, heads, HWr, L]
        probs = logits.softmax(dim=-1).sum(dim=1)
        sums = self.store.cross_sums
        sums[self.factor] = sums[self.factor] + probs if self.factor in sums else probs
        return hidden_states if self.last else attend(attn, q, k, v)


# (unet, plan) → {module: processor}: built once per UNet and plan, so a compiled capture
# step sees the same processor objects on every call. They hold no per-call state: each call
# binds its own AttentionStore (installed).
_PROCESSORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def capture_processors(unet, plan: CapturePlan) -> dict[Attention, object]:
    """The capture processors of ``plan`` on ``unet`` (built once, cached); :func:`installed`
    binds a store to them for one call."""
    per_unet = _PROCESSORS.setdefault(unet, {})
    if plan not in per_unet:
        processors = {
            unet.get_submodule(plan.self_layer): SelfAttentionCapture(plan.self_heads, plan.last_layer == plan.self_layer)
        }
        for c in plan.cross:
            processors[unet.get_submodule(c.name)] = CrossAttentionCapture(c.factor, c.heads, plan.last_layer == c.name)
        per_unet[plan] = processors
    return per_unet[plan]


# unet → its lock: one call at a time swaps processors on a UNet and runs it.
_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def unet_lock(unet) -> threading.RLock:
    """The lock held while processors are swapped on ``unet`` and it runs with them."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(unet, threading.RLock())


@contextlib.contextmanager
def installed(
    unet, processors: Mapping[Attention, object], store: AttentionStore | None = None
) -> Iterator[None]:
    """Install ``processors`` on their layers of ``unet`` for the ``with`` block, each bound to
    this call's ``store`` (when given); always restore the previous ones (only these layers
    change) and unbind the store. Holds the UNet's lock (:func:`unet_lock`) throughout, so
    another thread's call neither swaps these layers nor writes into this store meanwhile."""
    with unet_lock(unet):
        previous = {m: m.processor for m in processors}
        try:
            for m, processor in processors.items():
                if store is not None:
                    processor.store = store
                m.set_processor(processor)
            yield
        finally:
            for m, processor in previous.items():
                m.set_processor(processor)
            if store is not None:
                for processor in processors.values():
                    processor.store = None


def _check_sd_layout(unet, added_cond_kwargs) -> None:
    config = unet.config
    unsupported = [
        name
        for name in ("class_embed_type", "addition_embed_type", "encoder_hid_dim_type", "time_cond_proj_dim")
        if getattr(config, name, None) is not None and not (name == "addition_embed_type" and is_sdxl(unet))
    ]
    if unsupported or getattr(config, "center_input_sample", False):
        raise ValueError(
            f"capture: the truncated forward supports Stable Diffusion 1.x/2.x and SDXL UNets; "
            f"this one sets {', '.join(unsupported) or 'center_input_sample'}"
        )
    if is_sdxl(unet) and not {"text_embeds", "time_ids"} <= set(added_cond_kwargs or ()):
        raise ValueError(
            "capture: an SDXL UNet (addition_embed_type 'text_time') needs added_cond_kwargs "
            "with 'text_embeds' (the pooled text embedding) and 'time_ids' (size and crop)"
        )


def time_embedding(unet, sample, timestep, context, added_cond_kwargs=None) -> torch.Tensor:
    """The embedding every resnet receives: the timestep's, plus for SDXL the added
    conditioning (pooled text embedding and size/crop ids through ``add_embedding``), as
    ``UNet2DConditionModel.forward`` computes it."""
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    if is_sdxl(unet):
        emb = emb + unet.get_aug_embed(emb=emb, encoder_hidden_states=context, added_cond_kwargs=added_cond_kwargs)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    return emb


def attention_factors(unet) -> list[int]:
    """The latent downsampling factors at which ``unet`` has transformer-block attention,
    ascending: ``[1, 2, 4, 8]`` for SD 1.x/2.x, ``[2, 4]`` for SDXL (64×64 and 32×32 of a
    128×128 latent; nothing at 128×128)."""
    return sorted({
        downsampling_factor(unet, name)
        for name, m in unet.named_modules()
        if isinstance(m, Attention) and _LAYER.match(name)
    })  # fmt: skip


def _run_transformer_until(transformer, hidden, context, block_index: int) -> None:
    """Run a ``Transformer2DModel`` on ``hidden`` ``[B, C, h, w]`` up to (and including) the
    self-attention of ``transformer_blocks[block_index]``."""
    batch, _, height, width = hidden.shape
    x = transformer.norm(hidden)
    if transformer.use_linear_projection:
        x = transformer.proj_in(x.permute(0, 2, 3, 1).reshape(batch, height * width, -1))
    else:
        x = transformer.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(batch, height * width, -1)
    for block in transformer.transformer_blocks[:block_index]:
        x = block(x, encoder_hidden_states=context)
    block = transformer.transformer_blocks[block_index]
    block.attn1(block.norm1(x), encoder_hidden_states=context if block.only_cross_attention else None)


def _partial_transformer_ok(transformer, which: str) -> bool:
    block = transformer.transformer_blocks[0]
    return (
        which == "attn1"
        and getattr(transformer, "is_input_continuous", True)
        and getattr(block, "norm_type", "layer_norm") == "layer_norm"
        and getattr(block, "pos_embed", None) is None
    )


def _run_block(block, hidden, emb, context, stop, res=None):
    """Run a down, mid or up block up to the attention layer ``stop = (attention index,
    transformer index, "attn1"|"attn2")`` inside it (up blocks take their skip connections
    ``res``)."""
    attentions = block.attentions
    attention_index, transformer_index, which = stop
    is_mid = not hasattr(block, "downsamplers") and not hasattr(block, "upsamplers")
    resnets = list(block.resnets)
    if is_mid:  # resnet, (attention, resnet)*
        hidden = resnets[0](hidden, emb)
        steps = zip(attentions, resnets[1:])
    else:
        steps = zip(resnets, attentions)
    for index, step in enumerate(steps):
        if is_mid:
            attention, resnet = step
        else:
            resnet, attention = step
            if res is not None:
                hidden = torch.cat([hidden, res[-1]], dim=1)
                res = res[:-1]
            hidden = resnet(hidden, emb)
        if index == attention_index:
            if _partial_transformer_ok(attention, which):
                _run_transformer_until(attention, hidden, context, transformer_index)
            else:
                attention(hidden, encoder_hidden_states=context, return_dict=False)
            return None
        hidden = attention(hidden, encoder_hidden_states=context, return_dict=False)[0]
        if is_mid:
            hidden = resnet(hidden, emb)
    raise ValueError(f"capture: the block has no attention module {attention_index}")


def run_unet(
    unet, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, stop_after: str,
    added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Run ``unet`` on ``sample`` up to and including the attention layer ``stop_after`` (whose
    processor records what is needed) and return; nothing after it is computed.

    The blocks run explicitly, as ``UNet2DConditionModel.forward`` runs them for Stable
    Diffusion 1.x/2.x and SDXL, with no exception and no host synchronisation, so the step can
    be compiled into one graph.

    Args:
        unet: a ``UNet2DConditionModel`` in SD 1.x/2.x or SDXL layout.
        sample (Tensor): ``[B, 4, h, w]`` noisy latents.
        timestep (Tensor): ``[B]`` or scalar timestep.
        context (Tensor): ``[B, L, D]`` text embeddings.
        stop_after (str): a ``...transformer_blocks.N.attn1|attn2`` layer name.
        added_cond_kwargs (dict): SDXL only: ``{"text_embeds": [B, P] pooled text embedding,
            "time_ids": [B, 6] original size, crop top-left, target size}``.
    """
    match = _LAYER.match(stop_after)
    if match is None:
        raise ValueError(f"capture: cannot stop after {stop_after!r}: not a transformer-block attention layer")
    kind, block_index, mid, attention_index, transformer_index, which = match.groups()
    stop = (int(attention_index), int(transformer_index), which)
    block_index = int(block_index or 0)
    _check_sd_layout(unet, added_cond_kwargs)

    emb = time_embedding(unet, sample, timestep, context, added_cond_kwargs)
    hidden = unet.conv_in(sample)
    residuals = (hidden,)
    for i, block in enumerate(unet.down_blocks):
        if kind == "down_blocks" and i == block_index:
            _run_block(block, hidden, emb, context, stop)
            return
        cross = getattr(block, "has_cross_attention", False)
        if cross:
            hidden, res = block(hidden_states=hidden, temb=emb, encoder_hidden_states=context)
        else:
            hidden, res = block(hidden_states=hidden, temb=emb)
        residuals += res
    if mid:
        _run_block(unet.mid_block, hidden, emb, context, stop)
        return
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            hidden = unet.mid_block(hidden, emb, encoder_hidden_states=context)
        else:
            hidden = unet.mid_block(hidden, emb)
    up_factor = 2**unet.num_upsamplers
    forward_size = any(s % up_factor for s in sample.shape[-2:])
    for i, block in enumerate(unet.up_blocks):
        res = residuals[-len(block.resnets):]
        residuals = residuals[: -len(block.resnets)]
        size = residuals[-1].shape[2:] if forward_size and i < len(unet.up_blocks) - 1 else None
        if i == block_index:
            _run_block(block, hidden, emb, context, stop, res=res)
            return
        cross = getattr(block, "has_cross_attention", False)
        kwargs = {"encoder_hidden_states": context} if cross else {}
        hidden = block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res, upsample_size=size, **kwargs)
    raise ValueError(f"capture: the UNet has no layer {stop_after!r}")


def fuse_token_maps(
    cross_sums: Mapping[int, torch.Tensor], plan: CapturePlan, latent_size: tuple[int, int]
) -> torch.Tensor:
    """Fuse the captured cross-attention into per-token maps ``[B, HW, L]`` (fp32) at the
    self-attention resolution (METHOD §1, §6): per resolution the mean over the captured
    (layer, head) pairs, each token's map divided by its sum over space, bilinear upsampling,
    weighted sum."""
    h, w = latent_size[0] // plan.self_factor, latent_size[1] // plan.self_factor
    counts = dict(plan.head_counts)
    fused = None
    for factor, weight in plan.weights:
        maps = cross_sums[factor] / counts[factor]  # [B, HWr, L]
        maps = maps / maps.sum(dim=1, keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)
        hr, wr = latent_size[0] // factor, latent_size[1] // factor
        maps = maps.transpose(1, 2).reshape(maps.shape[0], -1, hr, wr)
        maps = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)
        fused = weight * maps if fused is None else fused + weight * maps
    return fused.flatten(2).transpose(1, 2)  # [B, HW, L]


def class_maps(token_maps: torch.Tensor, class_tokens: torch.Tensor) -> torch.Tensor:
    """Per-token maps ``[B, HW, L]`` → per-class maps ``[B, HW, K]``: ``class_tokens`` ``[B, K, L]``
    holds ``1/n`` at the ``n`` selected positions of each class (zeros for padding)."""
    return torch.einsum("bpl,bkl->bpk", token_maps, class_tokens)
