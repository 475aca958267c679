"""``ISegPipeline``: training-free segmentation from one Stable Diffusion UNet call.

METHOD §1 (capture), §2–3 (Ent-Self and refinement, in :mod:`iseg_ops`) and §4 (masks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from iseg_ops import refine

from . import masks
from .capture import (
    DEFAULT_CROSS_ATTENTION_WEIGHTS,
    DEFAULT_SELF_ATTENTION_LAYER,
    StopForward,
    capture_attention,
    downsampling_factor,
    fuse_cross_attention,
)
from .prompts import DEFAULT_TEMPLATE, ClassPrompt, build_prompt, check_classes
from .timing import StageTimer

_TEXT_CACHE_SIZE = 256


@dataclass
class ISegPipelineOutput(BaseOutput):
    """Output of :class:`ISegPipeline`.

    Args:
        heatmaps: ``[B, K, H, W]`` float in [0, 1] at the input images' size (a list of
            ``[K_i, H_i, W_i]`` when the images' sizes or class counts differ).
        labels: ``[B, H, W]`` int64, 0 = background, k = ``classes[k-1]`` (a list of ``[H_i, W_i]``
            likewise).
        self_attention: ``[B, HW, HW]`` raw head-mean self-attention, before Ent-Self; only
            with ``output_attentions=True``.
        cross_attention: ``[B, HW, K]`` fused cross-attention of the classes, before
            refinement (K = the largest class count, zero columns pad the others); only with
            ``output_attentions=True``.
    """

    heatmaps: torch.Tensor | list[torch.Tensor]
    labels: torch.Tensor | list[torch.Tensor]
    self_attention: torch.Tensor | None = None
    cross_attention: torch.Tensor | None = None


def _bounded_put(cache: dict, key, value) -> None:
    """Insert into a cache of at most ``_TEXT_CACHE_SIZE`` entries, dropping the oldest."""
    if len(cache) >= _TEXT_CACHE_SIZE:
        cache.pop(next(iter(cache)))
    cache[key] = value


def _class_lists(classes: object, batch: int) -> list[tuple[str, ...]]:
    """One class list for all images, or one per image."""
    if isinstance(classes, (list, tuple)) and classes and all(
        isinstance(c, (list, tuple)) for c in classes
    ):
        if len(classes) != batch:
            raise ValueError(
                f"classes: got {len(classes)} class lists for {batch} images; give one list "
                "for all images or one per image"
            )
        return [check_classes(c, f"classes[{i}]") for i, c in enumerate(classes)]
    return [check_classes(classes)] * batch


def _check_number(name: str, value: object, low: float, inclusive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (value >= low if inclusive else value > low) or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a finite number {'≥' if inclusive else '>'} {low}, got {value}")
    return float(value)


class ISegPipeline(DiffusionPipeline):
    r"""Segment images by class names with iSeg (arXiv 2409.03209) on Stable Diffusion.

    One UNet call per batch at a fixed timestep captures the head-mean self-attention of one
    up-block layer and the cross-attention of the class tokens; the cross-attention is refined
    by the entropy-reduced self-attention and upsampled to each image's size.

    Example:
        >>> pipe = ISegPipeline.from_pretrained(
        ...     "stabilityai/stable-diffusion-2-1-base", torch_dtype=torch.float16).to("cuda")
        >>> out = pipe(Image.open("cat.jpg"), ["cat", "sofa"])
        >>> out.labels.shape  # [1, H, W]
    """

    model_cpu_offload_seq = "text_encoder->vae->unet"

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler):
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self._prompts: dict[tuple, ClassPrompt] = {}
        self._text_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.stage_timer = StageTimer()  # per-stage seconds for benchmarks; off by default

    @property
    def default_resolution(self) -> int:
        """Working resolution: ``unet.config.sample_size * vae_scale_factor`` (512 for SD 2.1-base)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    def prompt(
        self,
        classes: Sequence[str],
        prompt_template: str = DEFAULT_TEMPLATE,
        background_words: Sequence[str] = (),
    ) -> ClassPrompt:
        """The tokenized iSeg prompt of ``classes`` (cached; raises ``ValueError`` when it does
        not fit the text encoder)."""
        key = (tuple(classes), prompt_template, tuple(background_words))
        if key not in self._prompts:
            prompt = build_prompt(self.tokenizer, classes, prompt_template, background_words)
            _bounded_put(self._prompts, key, prompt)
        return self._prompts[key]

    def encode_classes(
        self,
        classes: Sequence[str],
        gamma: float = 1.6,
        prompt_template: str = DEFAULT_TEMPLATE,
        background_words: Sequence[str] = (),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text embeddings of the iSeg prompt with Cat-Cross applied, and the class averaging.

        Returns ``(embeds [1, L, D], class_tokens [K, L])``: the text encoder's output with the
        class tokens' embeddings multiplied by ``gamma`` (Eq. 8–9), and for each class ``1/n``
        at its ``n`` token positions. Cached per distinct class list and settings.
        """
        device, dtype = self._execution_device, self.unet.dtype
        key = (tuple(classes), gamma, prompt_template, tuple(background_words), device, dtype)
        if key in self._text_cache:
            return self._text_cache[key]
        prompt = self.prompt(classes, prompt_template, background_words)
        ids = torch.tensor([prompt.input_ids], device=device)
        embeds = self.text_encoder(ids)[0].to(dtype)
        class_tokens = torch.zeros(len(classes), ids.shape[1], device=device)
        for k, positions in enumerate(prompt.class_positions):
            embeds[:, list(positions)] *= gamma
            class_tokens[k, list(positions)] = 1.0 / len(positions)
        _bounded_put(self._text_cache, key, (embeds, class_tokens))
        return embeds, class_tokens

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels from :func:`masks.to_tensor_batch` ``[B, 3, R, R]`` → VAE latents
        (``latent_dist.mean``, scaled; no sampling). Uploaded from pinned memory without
        blocking the host, then mapped to [-1, 1] on the device."""
        vae = self.vae
        pixels = self._upload(pixels)
        latents = vae.encode(masks.to_model_range(pixels, vae.dtype)).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def make_noise(self, shape: tuple[int, ...], generator=None) -> torch.Tensor:
        """Gaussian noise of ``shape`` on the execution device in the UNet's dtype, drawn with
        ``generator`` (one per image allowed) exactly as diffusers' ``randn_tensor`` draws it.
        Noise drawn on the CPU is uploaded from pinned memory without blocking the host."""
        first = generator[0] if isinstance(generator, list) else generator
        source = first.device if first is not None else self._execution_device
        dtype = self.unet.dtype
        return self._upload(randn_tensor(shape, generator=generator, device=source, dtype=dtype))

    def _upload(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on the execution device; from the CPU to CUDA through pinned memory, so
        the copy does not block the host."""
        device = self._execution_device
        if tensor.device.type == "cpu" and device.type == "cuda":
            tensor = tensor.pin_memory()
        return tensor.to(device, non_blocking=True)

    @torch.no_grad()
    def __call__(
        self,
        image,
        classes,
        iters: int = 10,
        lam: float | None = 0.01,
        gamma: float = 1.6,
        timestep: int = 100,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_attentions: bool = False,
        *,
        resolution: int | None = None,
        self_attention_layer: str = DEFAULT_SELF_ATTENTION_LAYER,
        self_attention_heads: Sequence[int] | None = None,
        cross_attention_weights: Mapping[int, float] = DEFAULT_CROSS_ATTENTION_WEIGHTS,
        background_threshold: float | None = None,
        prompt_template: str = DEFAULT_TEMPLATE,
        background_words: Sequence[str] = (),
        return_dict: bool = True,
    ) -> ISegPipelineOutput | tuple:
        r"""Segment ``image`` into ``classes``.

        Args:
            image: a PIL image (any mode), a list of them, or a float tensor ``[B, 3, H, W]`` in
                [0, 1].
            classes: class names for all images (``["cat", "dog"]``), or one list per image.
            iters: refinement iterations N (default 10).
            lam: Ent-Self strength λ, natural log (default 0.01); ``None`` refines with the raw
                self-attention.
            gamma: Cat-Cross weight of the class tokens' text embeddings (default 1.6).
            timestep: the noise level t the UNet sees (default 100).
            generator: a ``torch.Generator`` (or one per image) for the noise.
            output_attentions: also return the captured self- and cross-attention.
            resolution: working resolution (default ``unet.config.sample_size *
                vae_scale_factor``).
            self_attention_layer: the attention layer whose self-attention is captured.
            self_attention_heads: average only these heads (the authors' VOC/COCO scripts use
                ``(0, 1)``); default all heads.
            cross_attention_weights: weight per latent downsampling factor of the ``attn2``
                layers (default ``{4: 0.7, 2: 0.3}``: 16×16 and 32×32 on a 64×64 latent).
            background_threshold: τ; pixels whose best heat is below τ are background (COCO used
                0.45). Default: the background score ``(1 - max heat)²``.
            prompt_template: the prompt, with ``{classes}`` where the class names go.
            background_words: words appended to the prompt (" and sky and tree …").

        Returns:
            :class:`ISegPipelineOutput` (or a tuple when ``return_dict=False``).
        """
        resolution = self.default_resolution if resolution is None else resolution
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
            raise ValueError(f"resolution must be a positive int, got {resolution!r}")
        if resolution % (self.vae_scale_factor * 8):
            raise ValueError(
                f"resolution must be a multiple of {self.vae_scale_factor * 8}, got {resolution}"
            )
        pixels, sizes = masks.to_tensor_batch(image, resolution)
        batch = len(sizes)
        class_lists = _class_lists(classes, batch)
        gamma = _check_number("gamma", gamma, 0.0)
        if isinstance(iters, bool) or not isinstance(iters, int):
            raise TypeError(f"iters must be an int, got {type(iters).__name__}")
        if iters < 0:
            raise ValueError(f"iters must be ≥ 0, got {iters}")
        if lam is not None:
            lam = _check_number("lam", lam, 0.0, inclusive=True)
        if background_threshold is not None:
            background_threshold = _check_number("background_threshold", background_threshold, 0.0)
        train_steps = self.scheduler.config.num_train_timesteps
        if isinstance(timestep, bool) or not isinstance(timestep, int) or not 0 <= timestep < train_steps:
            raise ValueError(f"timestep must be an int in [0, {train_steps}), got {timestep!r}")
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"generator: got {len(generator)} generators for {batch} images")
        for classes_i in dict.fromkeys(class_lists):  # prompts that do not fit fail here
            self.prompt(classes_i, prompt_template, background_words)

        device, stage = self._execution_device, self.stage_timer
        with self.progress_bar(total=3) as progress:
            with stage("text", device):
                text = [
                    self.encode_classes(c, gamma, prompt_template, background_words)
                    for c in class_lists
                ]
                embeds = torch.cat([e for e, _ in text])
                num_classes = [t.shape[0] for _, t in text]
                class_tokens = torch.zeros(batch, max(num_classes), embeds.shape[1], device=device)
                for b, (_, tokens) in enumerate(text):
                    class_tokens[b, : tokens.shape[0]] = tokens

            with stage("vae", device):
                side = resolution // self.vae_scale_factor
                shape = (batch, self.vae.config.latent_channels, side, side)
                noise = self.make_noise(shape, generator)  # before the VAE: no stall on upload
                latents = self.encode_images(pixels)
                t = torch.full((batch,), timestep, device=device, dtype=torch.long)
                noisy = self.scheduler.add_noise(latents, noise, t)
            progress.update()

            with stage("unet", device), capture_attention(
                self.unet, self_attention_layer, self_attention_heads, cross_attention_weights
            ) as store:
                try:
                    self.unet(noisy, t, encoder_hidden_states=embeds, return_dict=False)
                except StopForward:
                    pass
                else:
                    raise RuntimeError(
                        f"capture: the UNet finished without running {sorted(store.pending)}"
                    )
            progress.update()

            with stage("ops", device):
                self_factor = downsampling_factor(self.unet, self_attention_layer)
                latent_size = tuple(latents.shape[-2:])
                cross = fuse_cross_attention(
                    store, cross_attention_weights, latent_size, self_factor, class_tokens
                )
                refined = refine(store.self_attention, cross, iters=iters, lam=lam)
            with stage("post", device):
                grid = (latent_size[0] // self_factor, latent_size[1] // self_factor)
                heat, label = self._masks(refined, grid, sizes, num_classes, background_threshold)
            progress.update()

        self.maybe_free_model_hooks()
        self_attention = store.self_attention if output_attentions else None
        cross_attention = cross if output_attentions else None
        if not return_dict:
            return heat, label, self_attention, cross_attention
        return ISegPipelineOutput(heat, label, self_attention, cross_attention)

    @staticmethod
    def _masks(refined, grid, sizes, num_classes, background_threshold):
        """Heatmaps and labels at each image's size; stacked when sizes and K agree."""
        if len(set(sizes)) == 1 and len(set(num_classes)) == 1:
            heat = masks.heatmaps(refined, grid, sizes[0])
            return heat, masks.labels(heat, background_threshold)
        heat = [
            masks.heatmaps(refined[b : b + 1, :, :k], grid, size)[0]
            for b, (size, k) in enumerate(zip(sizes, num_classes))
        ]
        return heat, [masks.labels(h[None], background_threshold)[0] for h in heat]
