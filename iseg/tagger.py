"""Image tags from CLIP for open-vocabulary runs: TagCLIP as the iSeg authors ran it.

Which classes of a vocabulary are in an image, from one CLIP ViT-B/16 pass over the whole image
(no crop) plus one 224² pass per re-identified class (``../shared/docs/TAGCLIP.md``; TagCLIP,
Lin et al., AAAI 2024). Built on transformers' ``CLIPModel`` with a hand-written layer loop: the
last layer gets a diagonal attention mask and every layer's pre-mask attention is recorded.

Steps (``F`` foreground classes, ``C`` = foreground + background, ``N`` = gh·gw patches):

1. coarse: ``P = softmax_c(T · f_p · t_c)`` ``[N, C]`` (:func:`coarse_scores`);
2. refinement: vote mask over all layers, ``Ā = mean(A_8, A_9, A_10) ⊙ V``, class boxes from
   ``Ā · P``, ``R = Ā · (Bᵀ ⊙ P)`` (:func:`vote_mask`, :func:`class_box_masks`,
   :func:`refine_scores`);
3. local score ``s_c = max_p R[p, c]``;
4. class-wise re-identification of the candidates above ``min(R) + r_cwr·(max(R) − min(R))``
   on a crop around each (:func:`crop_window`), ``s_c ← w_local·s_c + w_crop·q_c``;
5. tags: ``s_c > min(s) + r_final·(max(s) − min(s))``, else ``[argmax s]`` (:func:`final_tags`).

Example:
    >>> tagger = CLIPTagger.from_pretrained("openai/clip-vit-base-patch16")
    >>> tagger(Image.open("2007_000033.jpg"), preset="voc").tags
    ['aeroplane']
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from .data import data_path
from .hub import download_command, hub_offline
from .images import to_rgb
from .recipes import DEFAULT_TAGGER_MODEL

__all__ = [
    "BACKGROUND",
    "DEFAULT_TAGGER_MODEL",
    "PRESET_NAMES",
    "TEMPLATES",
    "CLIPTagger",
    "Preset",
    "TagResult",
    "TaggerModelNotFoundError",
    "class_box_masks",
    "coarse_scores",
    "crop_window",
    "final_tags",
    "get_preset",
    "interpolate_position_embedding",
    "preprocess",
    "read_vocabulary_file",
    "refine_scores",
    "resolve_vocabulary",
    "tag_classes",
    "tag_indices",
    "vote_mask",
]


PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)

# --- text side: templates and background lists (TAGCLIP.md "Text side") ------------------------

IMAGENET_TEMPLATES: tuple[str, ...] = (
    # OpenAI CLIP's 80 ImageNet prompt templates (notebooks/Prompt_Engineering_for_ImageNet).
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

SCENE_TEMPLATES: tuple[str, ...] = (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)

TEMPLATES: tuple[str, ...] = IMAGENET_TEMPLATES + SCENE_TEMPLATES
"""The 85 prompt templates: a class's text embedding is the normalised mean over all of them."""

_VOC_BACKGROUND = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river",
    "sea", "railway", "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean",
    "road", "rock", "street", "valley", "bridge", "sign",
)  # fmt: skip

BACKGROUND: dict[str, tuple[str, ...]] = {
    "voc": _VOC_BACKGROUND,
    "coco": tuple(c for c in _VOC_BACKGROUND if c not in ("keyboard", "sign")),
    "context": (
        "land", "tree", "lake", "railway", "railroad", "helmet", "cloud", "house", "road",
        "rock", "street", "valley", "bridge",
    ),  # fmt: skip
}
"""Background class names per preset, scored with the foreground but never returned as tags.

Context's list repeats some of its foreground names (tree, road, rock); the duplicates are kept,
as the authors ran it.
"""

# (class table, field holding the names as the authors' tagger spelled them), thresholds.
_PRESET_TABLES = {
    "voc": ("voc", "tagclip_name"),
    "context": ("voc_context", "tagclip_name"),
    "coco": ("coco14", "class_names_coco"),
}
_PRESET_SETTINGS = {
    "voc": {"r_cwr": 0.6, "w_local": 0.4, "w_crop": 0.8, "r_final": 0.6},
    "context": {"r_cwr": 0.2, "w_local": 0.5, "w_crop": 0.5, "r_final": 0.2},
    "coco": {"r_cwr": 0.3, "w_local": 0.8, "w_crop": 0.2, "r_final": 0.6},
}
PRESET_NAMES: tuple[str, ...] = tuple(_PRESET_SETTINGS)
_DEFAULT_SETTINGS = _PRESET_SETTINGS["voc"]


@dataclass(frozen=True)
class Preset:
    """A dataset's tagging settings as the authors ran them (TAGCLIP.md's table).

    Args:
        name: ``"voc"``, ``"context"`` or ``"coco"``.
        vocabulary: the foreground names; a tag's index is its position here (the indices of
            ``iseg/data/ovs_labels``).
        background: names scored alongside but never tagged.
        r_cwr, w_local, w_crop, r_final: the thresholds and weights of steps 4 and 5.
    """

    name: str
    vocabulary: tuple[str, ...]
    background: tuple[str, ...]
    r_cwr: float
    w_local: float
    w_crop: float
    r_final: float


def get_preset(name: str) -> Preset:
    """The preset of a dataset: ``"voc"`` (20 classes), ``"context"`` (59), ``"coco"`` (80).

    Raises:
        ValueError: an unknown name.
    """
    if name not in _PRESET_SETTINGS:
        raise ValueError(f"preset must be one of {', '.join(PRESET_NAMES)}; got {name!r}")
    folder, field = _PRESET_TABLES[name]
    table = json.loads(data_path(folder, "class_names.json").read_text(encoding="utf-8"))
    vocabulary = tuple(entry[field] for entry in table["classes"])
    return Preset(name, vocabulary, BACKGROUND[name], **_PRESET_SETTINGS[name])


def read_vocabulary_file(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """Class names from a text file: one per line; blank lines and ``#`` comments skipped.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file names no class, or a name twice.
    """
    text = Path(path).read_text(encoding="utf-8")
    names = tuple(
        line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    )
    return _check_names(names, f"vocabulary file {os.fspath(path)!r}", allow_empty=False)


def resolve_vocabulary(spec: str | Sequence[str]) -> Preset:
    """A preset name (``voc|context|coco``), a vocabulary file, or a list of names → settings.

    A file or a list gets no background names and the VOC thresholds (the defaults of
    :meth:`CLIPTagger.__call__`); its ``name`` is ``""``.
    """
    if isinstance(spec, str):
        if spec in _PRESET_SETTINGS:
            return get_preset(spec)
        if not Path(spec).is_file():
            raise ValueError(
                f"vocabulary must be one of {', '.join(PRESET_NAMES)} or a text file with one "
                f"class name per line; {spec!r} is neither"
            )
        vocabulary = read_vocabulary_file(spec)
    else:
        vocabulary = _check_names(spec, "vocabulary", allow_empty=False)
    return Preset("", vocabulary, (), **_DEFAULT_SETTINGS)


# --- results --------------------------------------------------------------------------------------


@dataclass
class TagResult:
    """Tags of one image.

    Args:
        tags: the kept foreground names, in vocabulary order.
        scores: ``[F]`` float32, the final per-class scores (the local score, updated by the
            crop re-identification for the re-identified classes).
        indices: positions of ``tags`` in the vocabulary (0-based, ascending).
    """

    tags: list[str]
    scores: torch.Tensor
    indices: list[int]


class TaggerModelNotFoundError(OSError):
    """The CLIP weights or tokenizer for the tagger could not be loaded."""


# --- the steps as plain functions -----------------------------------------------------------------


def preprocess(image: Image.Image | np.ndarray, patch_size: int = 16) -> torch.Tensor:
    """The authors' preprocessing: no crop, sides rounded up to a multiple of the patch size.

    Grayscale is stacked to 3 channels (transparency composited on white, as
    :func:`iseg.images.to_rgb`), then a PIL bicubic resize to
    ``(ceil(h/p)·p, ceil(w/p)·p)`` and CLIP's normalisation.

    Args:
        image: a PIL image (any mode) or a uint8 array ``[H, W]``, ``[H, W, 1|3|4]``.
        patch_size: p.

    Returns:
        ``[3, ceil(H/p)·p, ceil(W/p)·p]`` float32.
    """
    rgb = _as_rgb(image, "image")
    w, h = rgb.size
    size = (math.ceil(w / patch_size) * patch_size, math.ceil(h / patch_size) * patch_size)
    resized = rgb.resize(size, Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / np.float32(255.0))
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float32)
    std = torch.tensor(PIXEL_STD, dtype=torch.float32)
    return ((pixels - mean) / std).permute(2, 0, 1).contiguous()


def interpolate_position_embedding(weight: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize the patch part of a ViT position embedding to a ``gh×gw`` grid, as the authors did.

    Bilinear (align_corners=False) from the square pretrained grid, the CLS row kept, and the
    whole result rounded through float16 (the authors kept it as a half parameter). At the
    pretrained grid itself (224² for ViT-B/16: the crops of step 4) the embedding is used as it
    is, as in TagCLIP's model. Not transformers' ``interpolate_pos_encoding``, which is bicubic.

    Args:
        weight: ``[1 + g0², D]`` the CLS row then the ``g0×g0`` patch rows.
        grid: ``(gh, gw)``.

    Returns:
        ``[1 + gh·gw, D]`` in ``weight``'s dtype.
    """
    side = math.isqrt(weight.shape[0] - 1)
    if side * side != weight.shape[0] - 1:
        raise ValueError(f"position embedding has {weight.shape[0] - 1} patch rows, not a square")
    if tuple(grid) == (side, side):
        return weight
    dim = weight.shape[1]
    patch = weight[1:].float().T.reshape(1, dim, side, side)
    patch = F.interpolate(patch, size=grid, mode="bilinear", align_corners=False)
    patch = patch.reshape(dim, grid[0] * grid[1]).T
    out = torch.cat([weight[:1].float(), patch], dim=0)
    return out.half().to(weight.dtype)


def coarse_scores(patch_features: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """Step 1: ``P = softmax_c(T · f_p · t_c)``.

    Args:
        patch_features: ``[N, E]`` L2-normalised patch embeddings.
        text: ``[C, E]`` L2-normalised class embeddings (foreground then background).
        temperature: T, CLIP's ``logit_scale.exp()`` (100 for OpenAI's weights).

    Returns:
        ``[N, C]`` rows summing to 1.
    """
    return (temperature * patch_features @ text.T).softmax(dim=-1)


def vote_mask(attention: torch.Tensor, min_votes: int = 4) -> torch.Tensor:
    """Step 2's vote: which patch pairs are above their layer's mean attention in enough layers.

    Args:
        attention: ``[L, N, N]`` head-mean patch-to-patch attention of every layer.
        min_votes: layers a pair must win.

    Returns:
        ``[N, N]`` bool, ``Σ_l [A_l > mean(A_l)] ≥ min_votes``.
    """
    means = attention.mean(dim=(1, 2), keepdim=True)
    return (attention > means).sum(dim=0) >= min_votes


_EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)


def _min_max(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``(x − min) / (max − min)`` along ``dim``; 0 where the values are all equal."""
    low = x.amin(dim=dim, keepdim=True)
    span = x.amax(dim=dim, keepdim=True) - low
    return torch.where(span > 0, (x - low) / torch.where(span > 0, span, 1), 0)


def class_box_masks(coarse_refined: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Step 2's box mask ``B`` from ``R0 = Ā · P``: where each class's components' boxes lie.

    Per class whose column max is > 0: min-max the column to ``m`` in [0, 1] on the grid,
    binarise ``uint8(255·m) > int(255·mean(m))``, take the bounding box of each 8-connected
    component and fill ``[y0, min(y0 + h, gh − 1)) × [x0, min(x0 + w, gw − 1))`` (exclusive
    ends, so a component touching the right or bottom edge loses that column or row). Other
    classes get no box.

    Args:
        coarse_refined: ``[N, C]`` R0, rows in row-major grid order.
        grid: ``(gh, gw)`` with ``gh·gw = N``.

    Returns:
        ``[N, C]`` float32 0/1 (``Bᵀ``).
    """
    gh, gw = grid
    n, c = coarse_refined.shape
    device = coarse_refined.device
    column = coarse_refined.float().T  # [C, N]
    m = _min_max(column, dim=1)
    binary = (255 * m).to(torch.uint8) > (255 * m.mean(dim=1, keepdim=True)).floor().to(torch.uint8)
    binary &= column.amax(dim=1, keepdim=True) > 0
    # Boxes of the 8-connected components, [y0, y0 + h) × [x0, x0 + w) cut at gh − 1, gw − 1.
    binary = binary.view(c, gh, gw).cpu().numpy()
    boxes = np.zeros((c, gh, gw), dtype=np.float32)
    for k in np.flatnonzero(binary.any(axis=(1, 2))):
        labels, _ = ndimage.label(binary[k], structure=_EIGHT_NEIGHBOURS)
        for rows, cols in ndimage.find_objects(labels):
            boxes[k, rows.start : min(rows.stop, gh - 1), cols.start : min(cols.stop, gw - 1)] = 1
    return torch.from_numpy(boxes).view(c, n).T.to(device)


def refine_scores(
    attention: torch.Tensor,
    coarse: torch.Tensor,
    grid: tuple[int, int],
    refine_layers: Sequence[int] = (8, 9, 10),
    min_votes: int = 4,
) -> torch.Tensor:
    """Step 2: ``R = Ā · (Bᵀ ⊙ P)`` with ``Ā = mean_{l ∈ refine_layers}(A_l) ⊙ V``.

    Args:
        attention: ``[L, N, N]`` head-mean patch attention of every layer (not renormalised).
        coarse: ``[N, C]`` P of :func:`coarse_scores`.
        grid: ``(gh, gw)``.
        refine_layers: the layers averaged into Ā.
        min_votes: the vote of :func:`vote_mask`.

    Returns:
        ``[N, C]`` float32 R.
    """
    attention = attention.float()
    coarse = coarse.float()
    affinity = attention[list(refine_layers)].mean(dim=0) * vote_mask(attention, min_votes)
    boxes = class_box_masks(affinity @ coarse, grid)
    return affinity @ (boxes * coarse)


def crop_window(column: torch.Tensor, grid: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """Step 4's crop box of one class on the patch grid.

    The box of ``minmax(R[:, c]) > 0.5``: ``x1..x2+1``, ``y1..y2+1``, then
    ``x2 = min(x2, gw − 1)``, ``y2 = min(y2, gh − 1)``.

    Args:
        column: ``[N]`` R[:, c].
        grid: ``(gh, gw)``.

    Returns:
        ``(x1, y1, x2, y2)`` in patches, ends exclusive, or ``None`` when the box is empty
        (``x1 == x2`` or ``y1 == y2``, or a constant column) — which stops the loop.
    """
    gh, gw = grid
    above = (_min_max(column.float(), dim=0) > 0.5).view(gh, gw)
    ys, xs = above.nonzero(as_tuple=True)
    if ys.numel() == 0:
        return None
    x1, x2 = int(xs.min()), min(int(xs.max()) + 1, gw - 1)
    y1, y2 = int(ys.min()), min(int(ys.max()) + 1, gh - 1)
    if x1 == x2 or y1 == y2:
        return None
    return x1, y1, x2, y2


def final_tags(scores: torch.Tensor, r_final: float) -> list[int]:
    """Step 5: the classes above ``min(s) + r_final·(max(s) − min(s))``, else ``[argmax s]``.

    Args:
        scores: ``[F]`` final scores.

    Returns:
        Ascending foreground indices, at least one.
    """
    low, high = scores.min(), scores.max()
    kept = (scores > low + r_final * (high - low)).nonzero().flatten().tolist()
    return kept or [int(scores.argmax())]


# --- validation -----------------------------------------------------------------------------------


def _check_names(names: object, what: str, allow_empty: bool) -> tuple[str, ...]:
    if isinstance(names, str) or not isinstance(names, Sequence):
        hint = " (for a dataset's vocabulary pass preset=...)" if isinstance(names, str) else ""
        raise TypeError(f"{what} must be a list of class names, got {type(names).__name__}{hint}")
    names = tuple(names)
    if not names and not allow_empty:
        raise ValueError(f"{what} is empty: give at least one class name")
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{what} must hold non-empty strings, got {name!r}")
    # CLIP's tokenizer lowercases and splits on whitespace: "Cat" and "cat " are one class to
    # it, so a vocabulary naming both is refused as a duplicate (as iseg.prompts.check_classes).
    seen: dict[str, str] = {}
    for name in names:
        key = " ".join(name.split()).casefold()
        if key in seen:
            same = "" if seen[key] == name else f" (as {seen[key]!r}: the same tokens to CLIP)"
            raise ValueError(f"{what} names {name!r} more than once{same}")
        seen[key] = name
    return names


def _as_rgb(image: object, what: str) -> Image.Image:
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"{what} is empty ({image.width}×{image.height})")
        return to_rgb(image)  # transparency on white, 16-bit and float grey rescaled
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (
            image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))
        ):
            raise TypeError(
                f"{what} must be a uint8 array [H, W] or [H, W, 1|3|4]; got {image.dtype} "
                f"{list(image.shape)}"
            )
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"{what} is empty ({image.shape[1]}×{image.shape[0]})")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[..., 0]
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.shape[2] == 4:
            return to_rgb(Image.fromarray(np.ascontiguousarray(image), "RGBA"))
        return Image.fromarray(np.ascontiguousarray(image), "RGB")
    raise TypeError(
        f"{what} must be a PIL.Image.Image or a uint8 numpy array, got {type(image).__name__}"
    )


def _check_fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def _check_weight(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number ≥ 0, got {value}")
    return float(value)


# --- the tagger -----------------------------------------------------------------------------------


class CLIPTagger:
    """TagCLIP on a transformers ``CLIPModel`` (ViT vision tower), fp32 by default.

    Args:
        model: a ``CLIPModel``; its vision tower's layers are run by hand.
        tokenizer: the matching CLIP tokenizer.
        templates: prompt templates with one ``{}`` (default: the 85 of :data:`TEMPLATES`).
        refine_layers: layers whose attention is averaged into Ā (default ``(8, 9, 10)``;
            negative indices count from the last layer).
        masked_layer: the layer whose attention gets the diagonal mask ``−100·(1 − I)`` in the
            main pass (default the last, ``-1``).
        min_votes: layers a patch pair must win in the vote mask (default 4).
        crop_batch: re-identification crops run per forward pass.

    Example:
        >>> tagger = CLIPTagger.from_pretrained("openai/clip-vit-base-patch16")
        >>> tagger([img1, img2], ["cat", "dog", "sofa"], background=["floor", "wall"])
    """

    def __init__(
        self,
        model,
        tokenizer,
        templates: Sequence[str] = TEMPLATES,
        refine_layers: Sequence[int] = (8, 9, 10),
        masked_layer: int = -1,
        min_votes: int = 4,
        crop_batch: int = 16,
    ):
        layers = model.vision_model.encoder.layers
        depth = len(layers)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        if isinstance(templates, str) or not templates or any(t.count("{}") != 1 for t in templates):
            raise ValueError("templates must be a non-empty list of strings with one '{}' each")
        self.templates = tuple(templates)
        for layer in (*refine_layers, masked_layer):
            if not -depth <= layer < depth:
                raise ValueError(f"layer index {layer} out of range for a {depth}-layer vision tower")
        if not refine_layers:
            raise ValueError("refine_layers must name at least one layer")
        self.refine_layers = tuple(layer % depth for layer in refine_layers)
        self.masked_layer = masked_layer % depth
        if not 1 <= min_votes <= depth:
            raise ValueError(f"min_votes must be in 1..{depth}, got {min_votes}")
        self.min_votes = min_votes
        self.crop_batch = max(1, int(crop_batch))
        # T = logit_scale.exp() (100 for OpenAI's weights), read once: a later cast to bf16
        # would round logit_scale to 4.59375 and T to 98.9.
        self.temperature = float(model.logit_scale.detach().float().exp())
        self._text_cache: dict[str, torch.Tensor] = {}

    # --- loading and placement

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str] = DEFAULT_TAGGER_MODEL,
        *,
        torch_dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        **kwargs,
    ) -> CLIPTagger:
        """Load a CLIP model and its tokenizer from a folder or the Hugging Face hub.

        Args:
            name_or_path: a folder with ``config.json``, ``model.safetensors`` and the tokenizer
                files, or a hub id (default ``openai/clip-vit-base-patch16``).
            torch_dtype: weights' dtype (float32 as the authors; bf16/fp16 can flip tags).
            device: where to put the model.
            **kwargs: :class:`CLIPTagger` options (``refine_layers``, ...).

        Raises:
            TaggerModelNotFoundError: no such folder, or the hub cannot provide the files.
        """
        from transformers import AutoTokenizer, CLIPModel  # start-up time: only loading needs it

        source = os.fspath(name_or_path)
        local = Path(source).is_dir()
        offline = hub_offline()
        try:
            files = {"local_files_only": local or offline}
            model = CLIPModel.from_pretrained(source, use_safetensors=True, **files)
            tokenizer = AutoTokenizer.from_pretrained(source, **files)
        except (OSError, ValueError) as error:
            where = "the folder" if local else "Hugging Face hub id"
            raise TaggerModelNotFoundError(
                f"cannot load the CLIP tagger from {where} {source!r} "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                f"it needs a CLIPModel as safetensors plus its tokenizer: download "
                f"{DEFAULT_TAGGER_MODEL} once (e.g. `{download_command()} {DEFAULT_TAGGER_MODEL} "
                "--local-dir DIR`) and pass --tagger-model DIR, or give a hub id"
                + (" with HF_HUB_OFFLINE unset (it is set)" if offline else " with network access")
            ) from error
        return cls(model, tokenizer, **kwargs).to(device, torch_dtype)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> CLIPTagger:
        """Move the model (and cached text embeddings) to ``device`` / cast it to ``dtype``
        (the temperature stays the one read at construction)."""
        self.model.to(device=device, dtype=dtype)
        if device is not None:
            self._text_cache = {k: v.to(device) for k, v in self._text_cache.items()}
        if dtype is not None:
            self._text_cache.clear()
        return self

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual_projection.weight.dtype

    @property
    def patch_size(self) -> int:
        return self.model.config.vision_config.patch_size

    @property
    def image_size(self) -> int:
        """Side of the re-identification crops (224 for ViT-B/16)."""
        return self.model.config.vision_config.image_size

    # --- text side

    @torch.no_grad()
    def text_embeddings(self, names: Sequence[str]) -> torch.Tensor:
        """Class embeddings: each template encoded, L2-normalised, averaged, normalised.

        Cached per name (so per vocabulary); only names not seen before are encoded.

        Args:
            names: C class names.

        Returns:
            ``[C, E]`` float32 on the model's device.

        Raises:
            ValueError: a name whose prompt is longer than the text encoder's token limit
                (77 for CLIP), before anything is encoded.
        """
        missing = [n for n in dict.fromkeys(names) if n not in self._text_cache]
        self._check_token_lengths(missing)
        per_pass = max(1, 1024 // len(self.templates))
        for start in range(0, len(missing), per_pass):
            chunk = missing[start : start + per_pass]
            prompts = [t.format(n) for n in chunk for t in self.templates]
            tokens = self.tokenizer(prompts, padding=True, return_tensors="pt")  # lengths checked
            pooled = self.model.text_model(
                input_ids=tokens.input_ids.to(self.device),
                attention_mask=tokens.attention_mask.to(self.device),
            ).pooler_output
            features = F.normalize(self.model.text_projection(pooled).float(), dim=-1)
            features = features.view(len(chunk), len(self.templates), -1).mean(dim=1)
            for name, embedding in zip(chunk, F.normalize(features, dim=-1)):
                self._text_cache[name] = embedding
        return torch.stack([self._text_cache[n] for n in names])

    def _check_token_lengths(self, names: Sequence[str]) -> None:
        """Refuse a name that CLIP would truncate in one of the templates (not cut silently)."""
        if not names:
            return
        limit = self.model.config.text_config.max_position_embeddings
        if 0 < getattr(self.tokenizer, "model_max_length", limit) < limit:
            limit = self.tokenizer.model_max_length
        prompts = [t.format(n) for n in names for t in self.templates]
        lengths = [len(ids) for ids in self.tokenizer(prompts, truncation=False, verbose=False).input_ids]
        for i, length in enumerate(lengths):
            if length > limit:
                name = names[i // len(self.templates)]
                shown = name if len(name) <= 60 else name[:59] + "…"
                raise ValueError(
                    f"class name {shown!r} is too long: {length} tokens in a prompt, over the CLIP "
                    f"text encoder's limit of {limit}; shorten it"
                )

    # --- vision side

    def _vision_forward(
        self,
        pixels: torch.Tensor,
        grid: tuple[int, int],
        bias: dict[int, torch.Tensor],
        record: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The vision tower, layer by layer.

        Args:
            pixels: ``[B, 3, gh·p, gw·p]`` normalised.
            bias: layer → additive attention bias ``[B or 1, 1, T, T]`` on the scaled logits.
            record: keep every layer's head-mean softmax of the unbiased logits.

        Returns:
            ``[B, T, E]`` L2-normalised projected tokens (post-layernorm on all tokens), float32;
            ``[L, B, N, N]`` recorded patch attention (float32) or None.
        """
        vision = self.model.vision_model
        dtype = self.dtype
        embeddings = vision.embeddings
        x = embeddings.patch_embedding(pixels.to(dtype)).flatten(2).transpose(1, 2)
        batch = x.shape[0]
        cls_token = embeddings.class_embedding.to(dtype).expand(batch, 1, -1)
        position = interpolate_position_embedding(embeddings.position_embedding.weight, grid)
        x = vision.pre_layrnorm(torch.cat([cls_token, x], dim=1) + position)
        tokens = x.shape[1]
        recorded = []
        for index, layer in enumerate(vision.encoder.layers):
            attn = layer.self_attn
            h = layer.layer_norm1(x)
            shape = (batch, tokens, attn.num_heads, attn.head_dim)
            q = (attn.q_proj(h) * attn.scale).view(shape).transpose(1, 2)
            k = attn.k_proj(h).view(shape).transpose(1, 2)
            v = attn.v_proj(h).view(shape).transpose(1, 2)
            logits = q @ k.transpose(-1, -2)  # [B, heads, T, T]
            weights = logits.float().softmax(dim=-1)
            if record:
                recorded.append(weights.mean(dim=1)[:, 1:, 1:])
            if index in bias:
                weights = (logits.float() + bias[index]).softmax(dim=-1)
            out = (weights.to(v.dtype) @ v).transpose(1, 2).reshape(batch, tokens, -1)
            x = x + attn.out_proj(out)
            x = x + layer.mlp(layer.layer_norm2(x))
        features = self.model.visual_projection(vision.post_layernorm(x))
        return F.normalize(features.float(), dim=-1), torch.stack(recorded) if record else None

    def _local_scores(self, pixels: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Steps 1–2 on one image: R ``[N, C]`` and the grid."""
        p = self.patch_size
        grid = (pixels.shape[1] // p, pixels.shape[2] // p)
        tokens = 1 + grid[0] * grid[1]
        eye = torch.eye(tokens, device=self.device)
        bias = {self.masked_layer: -100.0 * (1 - eye)}
        features, attention = self._vision_forward(pixels[None].to(self.device), grid, bias, record=True)
        coarse = coarse_scores(features[0, 1:], text, self.temperature)
        return refine_scores(attention[:, 0], coarse, grid, self.refine_layers, self.min_votes), grid

    def _crop_scores(
        self,
        pixels: torch.Tensor,
        refined: torch.Tensor,
        grid: tuple[int, int],
        windows: list[tuple[int, int, int, int]],
        columns: list[int],
        text: torch.Tensor,
    ) -> torch.Tensor:
        """Step 4's ``q_c``: each crop re-scored through its CLS token, masked to the class.

        Returns:
            ``[len(windows)]`` ``softmax(T · g_CLS · t)[c]`` per crop.
        """
        p, side = self.patch_size, self.image_size
        g0 = side // p
        crops, masks = [], []
        for (x1, y1, x2, y2), c in zip(windows, columns):
            crop = pixels[:, p * y1 : p * y2, p * x1 : p * x2]
            crops.append(F.interpolate(crop[None], size=(side, side), mode="bilinear", align_corners=False))
            above = (_min_max(refined[:, c], dim=0) > 0.5).view(grid)[y1:y2, x1:x2].float()
            masks.append(F.interpolate(above[None, None], size=(g0, g0), mode="nearest").flatten())
        keep = torch.stack(masks)  # [K, g0²]
        bias = torch.zeros(len(windows), 1, 1 + g0 * g0, 1 + g0 * g0, device=self.device)
        bias[:, 0, 0, 1:] = torch.where(keep > 0, 0.0, -1000.0)
        layers = {i: bias for i in range(len(self.model.vision_model.encoder.layers))}
        features, _ = self._vision_forward(torch.cat(crops).to(self.device), (g0, g0), layers, record=False)
        probabilities = (self.temperature * features[:, 0] @ text.T).softmax(dim=-1)
        rows = torch.arange(len(columns), device=self.device)
        return probabilities[rows, torch.tensor(columns, device=self.device)]

    @torch.no_grad()
    def _tag_one(self, image, text: torch.Tensor, foreground: tuple[str, ...], settings: Mapping[str, float]) -> TagResult:
        pixels = preprocess(image, self.patch_size).to(self.device)
        # 1–2. coarse scores refined by the voted attention and the class boxes
        refined, grid = self._local_scores(pixels, text)
        # 3. local scores
        count = len(foreground)
        scores = refined[:, :count].amax(dim=0)
        # 4. class-wise re-identification of the candidates, fixed before any update
        low, high = refined.min(), refined.max()
        threshold = low + settings["r_cwr"] * (high - low)
        windows, columns = [], []
        for c in (scores > threshold).nonzero().flatten().tolist():
            window = crop_window(refined[:, c], grid)
            if window is None:
                break
            windows.append(window)
            columns.append(c)
        for start in range(0, len(windows), self.crop_batch):
            part = slice(start, start + self.crop_batch)
            crop = self._crop_scores(pixels, refined, grid, windows[part], columns[part], text)
            index = torch.tensor(columns[part], device=scores.device)
            scores[index] = settings["w_local"] * scores[index] + settings["w_crop"] * crop
        # 5. relative threshold, argmax fallback
        indices = final_tags(scores, settings["r_final"])
        return TagResult([foreground[i] for i in indices], scores.cpu(), indices)

    def __call__(
        self,
        image,
        vocabulary: Sequence[str] | None = None,
        background: Sequence[str] | None = None,
        r_cwr: float | None = None,
        w_local: float | None = None,
        w_crop: float | None = None,
        r_final: float | None = None,
        *,
        preset: str | None = None,
    ) -> TagResult | list[TagResult]:
        """Tag one image or a list of images.

        Args:
            image: a PIL image or uint8 array ``[H, W(, 3)]``, or a list of them.
            vocabulary: F foreground class names (unique); tags are taken from these.
            background: names scored with the foreground but never tagged (default none).
            r_cwr: relative threshold on R for the re-identification candidates.
            w_local, w_crop: weights of the local and the crop score.
            r_final: relative threshold on the final scores.
            preset: ``"voc"``, ``"context"`` or ``"coco"`` instead of ``vocabulary``: the
                dataset's vocabulary, background and settings. Settings given explicitly win.
                Without a preset, unset settings are VOC's (0.6, 0.4, 0.8, 0.6).

        Returns:
            A :class:`TagResult` for one image, a list of them for a list (equal to tagging the
            images one by one).

        Raises:
            ValueError / TypeError: bad input, before any model runs.
        """
        # 1. Check inputs
        if preset is not None:
            if vocabulary is not None:
                raise ValueError("give either vocabulary or preset, not both")
            chosen = get_preset(preset)
            if background is None:
                background = chosen.background
        else:
            if vocabulary is None:
                raise ValueError("vocabulary: give the class names to tag (or preset='voc'|'context'|'coco')")
            chosen = Preset("", (), (), **_DEFAULT_SETTINGS)
        foreground = chosen.vocabulary or _check_names(vocabulary, "vocabulary", allow_empty=False)
        background = _check_names(() if background is None else background, "background", allow_empty=True)
        settings = {
            "r_cwr": _check_fraction("r_cwr", chosen.r_cwr if r_cwr is None else r_cwr),
            "w_local": _check_weight("w_local", chosen.w_local if w_local is None else w_local),
            "w_crop": _check_weight("w_crop", chosen.w_crop if w_crop is None else w_crop),
            "r_final": _check_fraction("r_final", chosen.r_final if r_final is None else r_final),
        }
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        if not images:
            raise ValueError("image: got an empty list")
        for i, item in enumerate(images):
            _as_rgb(item, "image" if single else f"image[{i}]")
        # 2. Encode the classes (cached), 3. tag each image
        text = self.text_embeddings(foreground + background)
        results = [self._tag_one(item, text, foreground, settings) for item in images]
        return results[0] if single else results


def _tag_all(tagger: CLIPTagger, images, vocabulary: str | Sequence[str], settings) -> tuple[Preset, list[TagResult]]:
    chosen = resolve_vocabulary(vocabulary)
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if chosen.name:
        return chosen, tagger(images, preset=chosen.name, **settings)
    return chosen, tagger(images, chosen.vocabulary, chosen.background, **settings)


def tag_classes(
    tagger: CLIPTagger,
    images,
    vocabulary: str | Sequence[str],
    **settings: float,
) -> list[list[str]]:
    """The tags of each image, for the pipeline and the evaluation.

    Args:
        tagger: a loaded :class:`CLIPTagger`.
        images: one image or a list (PIL or uint8 arrays).
        vocabulary: a preset name (``voc|context|coco``: its vocabulary, background list and
            settings), a vocabulary file (one name per line), or a list of names.
        **settings: ``r_cwr``, ``w_local``, ``w_crop``, ``r_final`` overriding the preset's.

    Returns:
        Per image, the kept names in vocabulary order (at least one).

    Example:
        >>> tag_classes(tagger, [img1, img2], "voc")
        [['aeroplane'], ['person', 'tvmonitor']]
    """
    return [r.tags for r in _tag_all(tagger, images, vocabulary, settings)[1]]


def tag_indices(
    tagger: CLIPTagger,
    images,
    vocabulary: str | Sequence[str],
    **settings: float,
) -> list[list[int]]:
    """As :func:`tag_classes`, but the 0-based vocabulary indices (the ``ovs_labels`` ids):
    for a preset, index k is row k of the dataset's class table (label ``k + 1``)."""
    return [r.indices for r in _tag_all(tagger, images, vocabulary, settings)[1]]
