"""iSeg computed the way the authors' environment did, for benchmarks and agreement tests.

:class:`AuthorsBaseline` is the authors' *compute configuration*, not one of their recipes:
PyTorch 1.13-style classic attention in every layer (``softmax(Q Kᵀ)`` materialised per head,
then ``@ V``), the probabilities kept for the captured layers, the full UNet forward, the text
encoder on every call, and Ent-Self and the refinement in fp32 PyTorch with per-iteration
normalisation. What it computes is the ``"paper"`` recipe (METHOD §1, written out here rather
than imported, so that the agreement test also catches a change to the pipeline's defaults),
with an optional self-attention head subset. The authors' recipes (:mod:`iseg.recipes`) change
what is computed (which heads and layers, clustering, λ), not how, so this configuration's
timings stand for theirs. With ``sdpa_elsewhere=True`` the layers that are not captured use
diffusers' fused SDPA processor instead (what a straightforward modern port gets). It shares no
capture code with the pipeline, so agreement between the two is an independent check of both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.utils.torch_utils import randn_tensor

from iseg_ops import reference

from . import masks
from .images import to_tensor_batch
from .prompts import DEFAULT_TEMPLATE, build_prompt, check_classes
from .recipes import DEFAULT_CROSS_ATTENTION_WEIGHTS, DEFAULT_GAMMA, DEFAULT_ITERS, DEFAULT_LAM, DEFAULT_TIMESTEP
from .timing import StageTimer

SELF_ATTENTION_LAYER = "up_blocks.3.attentions.1.transformer_blocks.0.attn1"
# Cross-attention weight by the layer's side relative to the latent side (METHOD §1).
CROSS_WEIGHTS = dict(DEFAULT_CROSS_ATTENTION_WEIGHTS)


class _ClassicKeepProbs:
    """Classic attention (``get_attention_scores`` then ``bmm``) that keeps the probabilities
    ``[B·heads, Lq, Lk]`` in ``store[name]``."""

    def __init__(self, store: dict[str, torch.Tensor], name: str):
        self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):  # fmt: skip
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, None)
        self.store[self.name] = probs
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


class AuthorsBaseline:
    """The authors' configuration of iSeg on ``pipe``'s modules (see the module docstring).

    Call it like the pipeline (one class list for all images, images of one size); returns
    ``(heatmaps [B, K, H, W], labels [B, H, W])``. ``stage_timer`` records the time per stage.
    """

    def __init__(self, pipe, sdpa_elsewhere: bool = False):
        self.pipe = pipe
        self.sdpa_elsewhere = sdpa_elsewhere
        self.stage_timer = StageTimer()
        unet = pipe.unet
        levels = len(unet.config.down_block_types)
        self.cross_layers = []
        for name, module in unet.named_modules():
            if not (isinstance(module, Attention) and name.endswith("attn2")):
                continue
            block, index = name.split(".")[:2]
            if block in ("down_blocks", "up_blocks"):
                level = int(index) if block == "down_blocks" else levels - 1 - int(index)
                if 2**level in CROSS_WEIGHTS:
                    self.cross_layers.append(name)

    @torch.no_grad()
    def __call__(self, image, classes, iters=DEFAULT_ITERS, lam=DEFAULT_LAM, gamma=DEFAULT_GAMMA,
                 timestep=DEFAULT_TIMESTEP, generator=None, self_attention_heads=None):  # fmt: skip
        pipe, unet, stage = self.pipe, self.pipe.unet, self.stage_timer
        device = pipe._execution_device
        pixels, sizes = to_tensor_batch(image, pipe.default_resolution)
        if len(set(sizes)) != 1:
            raise ValueError("AuthorsBaseline: the images of one call must share their size")
        classes = check_classes(classes)
        batch = len(sizes)

        with stage("text", device):  # the text encoder runs on every call, for every image
            prompt = build_prompt(pipe.tokenizer, classes, DEFAULT_TEMPLATE)
            ids = torch.tensor([prompt.input_ids] * batch, device=device)
            embeds = pipe.text_encoder(ids)[0].to(unet.dtype)
            for positions in prompt.class_positions:
                embeds[:, list(positions)] *= gamma

        with stage("vae", device):
            vae = pipe.vae
            pixels = masks.to_model_range(pixels.to(device), vae.dtype)
            latents = vae.encode(pixels).latent_dist.mean
            latents = latents * vae.config.scaling_factor
            noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=latents.dtype)
            t = torch.full((batch,), timestep, device=device, dtype=torch.long)
            noisy = pipe.scheduler.add_noise(latents, noise, t)

        with stage("unet", device):
            kept: dict[str, torch.Tensor] = {}
            processors = {}
            previous = unet.attn_processors
            for name in previous:
                layer = name.removesuffix(".processor")
                if layer == SELF_ATTENTION_LAYER or layer in self.cross_layers:
                    processors[name] = _ClassicKeepProbs(kept, layer)
                else:
                    processors[name] = AttnProcessor2_0() if self.sdpa_elsewhere else AttnProcessor()
            unet.set_attn_processor(processors)
            try:
                unet(noisy, t, encoder_hidden_states=embeds, return_dict=False)  # full forward
            finally:
                unet.set_attn_processor(previous)

        with stage("ops", device):
            h, w = latents.shape[-2:]
            probs = kept[SELF_ATTENTION_LAYER]
            probs = probs.view(batch, -1, *probs.shape[1:])  # [B, heads, HW, HW]
            if self_attention_heads is not None:
                probs = probs[:, list(self_attention_heads)]
            self_attention = probs.float().mean(dim=1)

            by_side: dict[int, list[torch.Tensor]] = {}
            for layer in self.cross_layers:
                p = kept[layer].float()
                p = p.view(batch, -1, *p.shape[1:]).mean(dim=1)  # [B, HWr, 77]
                by_side.setdefault(round((h * w // p.shape[1]) ** 0.5), []).append(p)
            cross = 0.0
            for factor, maps in by_side.items():
                m = torch.stack(maps).mean(dim=0)
                m = m / m.sum(dim=1, keepdim=True)
                m = m.transpose(1, 2).reshape(batch, -1, h // factor, w // factor)
                m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
                cross = cross + CROSS_WEIGHTS[factor] * m
            cross = torch.stack(
                [cross[:, list(p)].mean(dim=1) for p in prompt.class_positions], dim=-1
            ).reshape(batch, h * w, -1)
            refined = reference.refine(self_attention, cross, iters, lam)

        with stage("post", device):
            heat = masks.heatmaps(refined, (h, w), sizes[0])
            labels = masks.labels(heat)
        return heat, labels
