"""Tests for ``iseg.demo``: the web demo's handler functions, on the tiny model and on stubs.

The handlers are plain functions, so what the page shows is checked here without a browser
(tests/test_demo_browser.py drives the served page once).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import iseg
from iseg import ISegPipeline, demo, masks
from iseg.demo import DemoError
from iseg.testing import tiny_components

from .conftest import make_image


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """The PyTorch reference ops: the demo's wiring is under test, not the kernels."""
    monkeypatch.setenv("ISEG_OPS_BACKEND", "torch")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[ISegPipeline, Path]:
    """The tiny pipeline as loaded back from the folder it was saved to (so the CLI, which
    loads the folder, runs the same weights)."""
    root = tmp_path_factory.mktemp("demo-model")
    (root / "tokenizer-src").mkdir()
    ISegPipeline(**tiny_components(seed=0, tokenizer_dir=root / "tokenizer-src")).save_pretrained(
        root / "model"
    )
    pipe = ISegPipeline.from_pretrained(root / "model")
    pipe.set_progress_bar_config(disable=True)
    return pipe, root / "model"


class NoModel:
    """A pipeline stand-in that fails if the model is run: bad input must be refused first."""

    def __call__(self, *args, **kwargs):
        raise AssertionError("the model ran")

    segment_regions = __call__


# --- imports and the command without gradio -----------------------------------------------


def _run_without_gradio(code: str) -> subprocess.CompletedProcess:
    blocker = "import sys; sys.modules['gradio'] = None\n"  # `import gradio` raises ImportError
    return subprocess.run(
        [sys.executable, "-c", blocker + code], capture_output=True, text=True, timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip


def test_iseg_and_demo_module_import_without_gradio():
    result = _run_without_gradio("import iseg, iseg.demo, iseg.cli; print('ok', 'gradio' in sys.modules and sys.modules['gradio'] is not None)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", "False"]


def test_demo_command_without_gradio_names_the_extra(saved):
    code = f"import iseg.cli; raise SystemExit(iseg.cli.main(['demo', '--model', {str(saved[1])!r}]))"
    result = _run_without_gradio(code)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("iseg: error: "), result.stderr
    assert "pip install 'iseg[demo]'" in lines[0]


# --- uploads -------------------------------------------------------------------------------


def test_load_upload_reads_an_image_as_rgb(tmp_path):
    image = make_image(1, (40, 56))
    rgba = image.convert("RGBA")
    rgba.putalpha(255)
    path = tmp_path / "photo.png"
    rgba.save(path)
    loaded = demo.load_upload(str(path))
    assert loaded.mode == "RGB" and loaded.size == (56, 40)
    assert np.array_equal(np.asarray(loaded), np.asarray(image))


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"not an image at all", "'upload.png' is not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "'upload.png' is not an image"),  # a PNG signature, no data
    ],
)
def test_load_upload_refuses_a_file_that_is_not_an_image(tmp_path, content, expected):
    path = tmp_path / "upload.png"
    path.write_bytes(content)
    with pytest.raises(DemoError, match=expected):
        demo.load_upload(str(path))


def test_load_upload_refuses_a_huge_image_before_decoding_it(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("L", (300, 200)).save(path)
    monkeypatch.setattr(demo, "MAX_PIXELS", 300 * 200 - 1)
    with pytest.raises(DemoError, match=r"'huge.png' is 300 × 200 = 0 MP; the demo takes at most"):
        demo.load_upload(str(path))
    monkeypatch.setattr(demo, "MAX_PIXELS", 300 * 200)  # exactly at the limit: taken
    assert demo.load_upload(str(path)).size == (300, 200)


def test_load_upload_without_a_file():
    with pytest.raises(DemoError, match="upload an image first"):
        demo.load_upload(None)


# --- pictures ------------------------------------------------------------------------------


def test_heatmap_image_maps_0_and_1_to_the_colour_map_ends_and_clips():
    heat = torch.tensor([[0.0, 1.0], [-3.0, 7.0], [0.5, float("nan")]])
    picture = np.asarray(demo.heatmap_image(heat))
    assert picture.shape == (3, 2, 3) and picture.dtype == np.uint8
    dark, pale = (0, 0, 4), (252, 255, 164)
    assert tuple(picture[0, 0]) == dark and tuple(picture[1, 0]) == dark  # 0 and clipped -3
    assert tuple(picture[0, 1]) == pale and tuple(picture[1, 1]) == pale  # 1 and clipped 7
    assert tuple(picture[2, 1]) == dark  # NaN shows as 0, never raises
    # 0.5 → entry 128 of the 256-entry map: between anchors 3 (159, 42, 99) and 4 (212, 72, 66)
    t = 128 / 255 * 7 - 3
    expected = np.rint(np.array([159, 42, 99]) * (1 - t) + np.array([212, 72, 66]) * t)
    assert tuple(picture[2, 0]) == tuple(expected.astype(int))


def test_colour_map_gets_brighter_from_0_to_1():
    ramp = np.asarray(demo.heatmap_image(np.linspace(0, 1, 256)[None]), dtype=np.float64)[0]
    luma = ramp @ np.array([0.299, 0.587, 0.114])
    assert np.all(np.diff(luma) > -1.0)  # monotone up to rounding
    assert luma[-1] - luma[0] > 200


def test_legend_shows_each_name_in_its_label_colour_and_escapes_names():
    legend = demo.legend_html(["cat", "<b>dog</b>"])
    palette = masks.palette(3)
    for label, name in enumerate(["background", "cat", "&lt;b&gt;dog&lt;/b&gt;"]):
        r, g, b = palette[3 * label : 3 * label + 3]
        item = f'data-label="{label}"><span class="iseg-swatch" style="background: rgb({r}, {g}, {b})"></span>{name}</span>'
        assert item in legend
    assert "<b>" not in legend
    assert (128, 0, 0) == demo.label_colour(1) and (0, 128, 0) == demo.label_colour(2)


# --- the Classes tab ----------------------------------------------------------------------


def test_segment_classes_shows_what_the_pipeline_computes(saved):
    pipe, _ = saved
    image = make_image(2, (48, 64))
    result = demo.segment_classes(pipe, image, " cat ,  potted plant", "paper", 7, 0.02, 1.3, seed=5)
    reference = pipe(image, ["cat", "potted plant"], recipe="paper", iters=7, lam=0.02, gamma=1.3,
                     generator=torch.Generator().manual_seed(5))  # fmt: skip
    label = reference.labels[0]
    assert result.classes == ("cat", "potted plant")
    assert np.array_equal(np.asarray(result.labels), label.numpy()) and result.labels.mode == "P"
    assert result.labels.getpalette()[:9] == masks.palette(3)
    assert np.array_equal(np.asarray(result.overlay), np.asarray(masks.overlay(image, label)))
    assert [caption for _, caption in result.heatmaps] == ["cat", "potted plant"]
    for (picture, _), heat in zip(result.heatmaps, reference.heatmaps[0]):
        assert np.array_equal(np.asarray(picture), np.asarray(demo.heatmap_image(heat)))
    assert result.legend == demo.legend_html(["cat", "potted plant"])
    assert shlex.split(result.command) == [
        "iseg", "segment", "IMAGE", "--classes", "cat,potted plant", "--recipe", "paper",
        "--iters", "7", "--lam", "0.02", "--gamma", "1.3", "--seed", "5",
    ]  # fmt: skip


def test_the_shown_command_reproduces_the_label_png(saved, tmp_path):
    pipe, model = saved
    from iseg import cli

    image = make_image(3, (40, 56))
    image.save(tmp_path / "photo.png")
    result = demo.segment_classes(pipe, image, "cat, dog", "paper", 4, 0.01, 1.6, seed=2,
                                  image_name="photo.png")  # fmt: skip
    args = shlex.split(result.command)
    assert args[:3] == ["iseg", "segment", "photo.png"]
    args[2] = str(tmp_path / "photo.png")
    out = tmp_path / "out"
    status = cli.main([*args[1:], "--model", str(model), "--out", str(out), "--device", "cpu",
                       "--dtype", "fp32"])  # fmt: skip
    assert status == 0
    written = Image.open(out / "photo_labels.png")
    assert np.array_equal(np.asarray(written), np.asarray(result.labels))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image": None}, "upload an image first"),
        ({"classes_text": " , "}, "no class names"),
        ({"classes_text": "cat,,dog"}, "empty class name"),
        ({"classes_text": "cat, cat"}, "'cat' is given twice"),
        ({"iters": -1}, "iterations must be a whole number ≥ 0"),
        ({"iters": 2.5}, "iterations must be a whole number"),
        ({"lam": float("nan")}, "λ must be a finite number ≥ 0"),
        ({"gamma": 0}, "γ must be a finite number > 0"),
        ({"seed": -2}, "seed must be a whole number ≥ 0"),
    ],
)
def test_segment_classes_refuses_bad_input_before_the_model_runs(kwargs, message):
    call = {"image": make_image(0, (32, 32)), "classes_text": "cat, dog", "recipe": None,
            "iters": 10, "lam": 0.01, "gamma": 1.6, "seed": 0, **kwargs}  # fmt: skip
    with pytest.raises(DemoError, match=message):
        demo.segment_classes(NoModel(), **call)


def test_recipe_settings_are_the_recipes_values():
    from iseg.recipes import RECIPES

    assert demo.recipe_names() == list(RECIPES)
    for name, recipe in RECIPES.items():
        settings = demo.recipe_settings(name)
        assert settings["iters"] == recipe.iters and settings["gamma"] == recipe.gamma
        assert settings["lam"] == (0.0 if recipe.lam is None else recipe.lam)
    with pytest.raises(ValueError, match="unknown recipe"):
        demo.recipe_settings("no-such-recipe")


# --- strokes → regions -----------------------------------------------------------------------


def _stroke(size=(120, 160), **draw) -> np.ndarray:
    """A [H, W] bool stroke drawn with PIL: line=(points, width) or ellipse=box."""
    canvas = Image.new("L", (size[1], size[0]))
    pen = ImageDraw.Draw(canvas)
    if "line" in draw:
        points, width = draw["line"]
        pen.line(points, fill=255, width=width)
    if "ellipse" in draw:
        pen.ellipse(draw["ellipse"], fill=255)
    return np.asarray(canvas) > 0


def test_a_click_is_a_point_at_its_centre():
    dot = _stroke(ellipse=(30, 50, 36, 56))  # a 7-pixel disc centred on (33, 53)
    assert demo.stroke_region("point", dot) == {"type": "point", "x": 33, "y": 53}
    # a "line" that is a dot is a point too
    assert demo.stroke_region("line", dot) == {"type": "point", "x": 33, "y": 53}


def test_a_drag_is_the_box_around_it():
    stroke = _stroke(line=([(20, 30), (90, 70)], 3))
    ys, xs = np.nonzero(stroke)
    region = demo.stroke_region("box", stroke)
    assert region == {"type": "box", "x0": int(xs.min()), "y0": int(ys.min()),
                      "x1": int(xs.max()) + 1, "y1": int(ys.max()) + 1}  # fmt: skip
    assert region["x1"] > region["x0"] and region["y1"] > region["y0"]


@pytest.mark.parametrize("width", [1, 5, 13])
def test_a_drawn_line_is_its_centre_line_whatever_the_brush(width):
    vertices = [(10, 100), (60, 40), (140, 60)]
    region = demo.stroke_region("line", _stroke(line=(vertices, width)))
    assert region["type"] == "line"
    points = np.array(region["points"], dtype=np.float64)
    # its ends are the stroke's ends (either direction), within the brush's half width + 2
    ends = sorted([tuple(points[0]), tuple(points[-1])])
    for end, expected in zip(ends, sorted([vertices[0], vertices[-1]])):
        assert np.hypot(*(np.array(end) - expected)) <= width / 2 + 2
    # every vertex lies near the drawn polyline, and the corner is kept
    def distance_to_polyline(p):
        best = np.inf
        for a, b in zip(vertices, vertices[1:]):
            a, b = np.array(a, float), np.array(b, float)
            t = np.clip(np.dot(p - a, b - a) / np.dot(b - a, b - a), 0, 1)
            best = min(best, np.hypot(*(p - (a + t * (b - a)))))
        return best

    assert max(distance_to_polyline(p) for p in points) <= width / 2 + 2
    assert min(np.hypot(*(p - np.array(vertices[1]))) for p in points) <= width / 2 + 3
    assert len(points) <= 8  # simplified, not one vertex per pixel


def test_new_stroke_is_what_was_painted_since_the_drawn_regions():
    regions = [{"type": "box", "x0": 10, "y0": 10, "x1": 40, "y1": 30}]
    drawn = np.asarray(demo.draw_regions((64, 48), regions))  # [48, 64, 4]
    seen = drawn[..., 3] > 0
    layer = drawn.copy()
    layer[35:38, 50:53] = (255, 0, 0, 255)  # a new dot
    stroke = demo.new_stroke(layer, seen)
    expected = np.zeros((48, 64), bool)
    expected[35:38, 50:53] = True
    assert np.array_equal(stroke, expected)
    assert not demo.new_stroke(drawn, seen).any()  # nothing new
    assert np.array_equal(demo.new_stroke(layer[..., 3], None), layer[..., 3] > 0)


def test_stroke_region_of_nothing_and_of_an_unknown_kind():
    assert demo.stroke_region("point", np.zeros((8, 8), bool)) is None
    with pytest.raises(ValueError, match="kind: expected one of point, box, line"):
        demo.stroke_region("circle", np.ones((8, 8), bool))


# --- the Regions tab --------------------------------------------------------------------------

REGIONS = [
    {"type": "point", "x": 20, "y": 12},
    {"type": "box", "x0": 4, "y0": 6, "x1": 30, "y1": 28},
    {"type": "line", "points": [[2, 3], [40, 30], [50, 10]]},
]


@pytest.fixture
def region_types(monkeypatch):
    """iseg's Point/Box/Line, or stand-ins with the contract's fields until they land."""
    if all(hasattr(iseg, name) for name in ("Point", "Box", "Line")):
        return iseg.Point, iseg.Box, iseg.Line

    @dataclasses.dataclass
    class Point:
        x: float
        y: float

    @dataclasses.dataclass
    class Box:
        x0: float
        y0: float
        x1: float
        y1: float

    @dataclasses.dataclass
    class Line:
        points: list

    for cls in (Point, Box, Line):
        monkeypatch.setattr(iseg, cls.__name__, cls, raising=False)
    return Point, Box, Line


class RegionsStub:
    """Records the call and returns fixed heatmaps, masks and labels for 3 regions."""

    def __init__(self, size):
        h, w = size
        generator = torch.Generator().manual_seed(0)
        self.heat = torch.rand(1, 3, h, w, generator=generator)
        self.masks = self.heat > 0.5
        self.labels = torch.randint(0, 4, (1, h, w), generator=generator)
        self.calls = []

    def segment_regions(self, image, regions, **kwargs):
        self.calls.append((image, regions, kwargs))
        return types.SimpleNamespace(heatmaps=self.heat, masks=self.masks, labels=self.labels)


def test_segment_regions_passes_the_regions_and_shows_each_heatmap_and_mask(region_types):
    Point, Box, Line = region_types
    image = make_image(4, (36, 52))
    stub = RegionsStub((36, 52))
    result = demo.segment_regions(stub, image, REGIONS, iters=20, threshold=0.4, seed=3,
                                  image_name="my photo.png")  # fmt: skip
    [(called_image, regions, kwargs)] = stub.calls
    assert called_image is image
    assert regions == [Point(20, 12), Box(4, 6, 30, 28), Line([(2, 3), (40, 30), (50, 10)])]
    assert kwargs["iters"] == 20 and kwargs["threshold"] == 0.4
    assert torch.equal(kwargs["generator"].get_state(), torch.Generator().manual_seed(3).get_state())
    # per region: its heatmap, then its mask tinted in its label colour
    assert [c for _, c in result.gallery] == [
        "1 · point (20, 12): heatmap", "1 · point (20, 12): mask",
        "2 · box (4, 6)–(30, 28): heatmap", "2 · box (4, 6)–(30, 28): mask",
        "3 · line 3 vertices: heatmap", "3 · line 3 vertices: mask",
    ]  # fmt: skip
    for r in range(3):
        heat_picture, mask_picture = result.gallery[2 * r][0], result.gallery[2 * r + 1][0]
        assert np.array_equal(np.asarray(heat_picture), np.asarray(demo.heatmap_image(stub.heat[0, r])))
        expected = demo.mask_image(image, stub.masks[0, r], demo.label_colour(r + 1))
        assert np.array_equal(np.asarray(mask_picture), np.asarray(expected))
    assert np.array_equal(np.asarray(result.labels), stub.labels[0].numpy())
    assert result.overlay.size == image.size and result.overlay.mode == "RGB"
    # the session's JSON: image, size, settings, regions and the CLI command
    session = json.loads(result.json)
    assert session["image"] == "my photo.png" and session["size"] == [52, 36]
    assert session["iters"] == 20 and session["threshold"] == 0.4 and session["seed"] == 3
    assert session["regions"] == REGIONS
    assert session["command"] == result.command
    assert shlex.split(result.command) == [
        "iseg", "regions", "my photo.png", "--point", "20,12", "--box", "4,6,30,28",
        "--line", "2,3:40,30:50,10", "--iters", "20", "--threshold", "0.4", "--seed", "3",
        "--out", "iseg-regions",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image": None}, "upload an image first"),
        ({"regions": []}, "add a region first"),
        ({"regions": [{"type": "circle"}]}, "region 0: unknown type 'circle'"),
        ({"iters": 0}, "iterations must be a whole number ≥ 1"),
        ({"threshold": 1.0}, r"threshold must be in \(0, 1\)"),
        ({"threshold": 0}, "threshold must be a finite number > 0"),
    ],
)
def test_segment_regions_refuses_bad_input_before_the_model_runs(region_types, kwargs, message):
    call = {"image": make_image(0, (32, 32)), "regions": REGIONS[:1], "iters": 50,
            "threshold": 0.5, **kwargs}  # fmt: skip
    with pytest.raises(DemoError, match=message):
        demo.segment_regions(NoModel(), **call)


def test_segment_regions_on_the_tiny_model_matches_the_pipeline(saved):
    pipe, _ = saved
    if not all(hasattr(iseg, name) for name in ("Point", "Box", "Line")):
        pytest.skip("the regions API (iseg.Point/Box/Line, issue 8) has not landed")
    image = make_image(5, (36, 52))
    result = demo.segment_regions(pipe, image, REGIONS, iters=30, threshold=0.5, seed=1)
    reference = pipe.segment_regions(
        image, [iseg.Point(20, 12), iseg.Box(4, 6, 30, 28), iseg.Line([(2, 3), (40, 30), (50, 10)])],
        iters=30, threshold=0.5, generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    assert np.array_equal(np.asarray(result.labels), reference.labels[0].numpy())
    for r in range(3):
        expected = demo.heatmap_image(reference.heatmaps[0, r])
        assert np.array_equal(np.asarray(result.gallery[2 * r][0]), np.asarray(expected))
        assert np.array_equal(result.masks[r], reference.masks[0, r].numpy())


def test_the_regions_command_reproduces_the_masks(saved, tmp_path):
    pipe, model = saved
    from iseg import cli

    if not all(hasattr(iseg, name) for name in ("Point", "Box", "Line")) or "regions" not in cli.COMMANDS:
        pytest.skip("the regions API and `iseg regions` (issue 8) have not landed")
    image = make_image(6, (36, 52))
    image.save(tmp_path / "photo.png")
    result = demo.segment_regions(pipe, image, REGIONS, iters=12, threshold=0.45, seed=4,
                                  image_name="photo.png")  # fmt: skip
    args = shlex.split(json.loads(result.json)["command"])
    assert args[:3] == ["iseg", "regions", "photo.png"] and args[-2:] == ["--out", "iseg-regions"]
    args[2], args[-1] = str(tmp_path / "photo.png"), str(tmp_path / "out")
    assert cli.main([*args[1:], "--model", str(model), "--device", "cpu", "--dtype", "fp32"]) == 0
    written = Image.open(tmp_path / "out" / "photo_labels.png")
    assert np.array_equal(np.asarray(written), np.asarray(result.labels))
    for r, mask in enumerate(result.masks, 1):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / f"photo_region{r}_mask.png")) > 0, mask)


def test_draw_regions_draws_each_region_in_its_colour():
    layer = np.asarray(demo.draw_regions((64, 48), REGIONS))
    assert layer.shape == (48, 64, 4)
    assert tuple(layer[12, 20]) == (*demo.label_colour(1), 255)  # the point's centre
    assert tuple(layer[6 + 1, 17]) == (*demo.label_colour(2), 255)  # on the box's top edge
    assert layer[18, 12, 3] == 0  # inside the box, away from the line: transparent
    assert layer[0, 63, 3] == 0


# --- the Unsupervised tab ---------------------------------------------------------------------


def test_segment_unsupervised_shows_every_segment_and_reproduces_with_the_cli(saved, tmp_path):
    pipe, model = saved
    from iseg import cli

    if not hasattr(pipe, "segment_unsupervised"):
        pytest.skip("segment_unsupervised has not landed")
    image = make_image(7, (40, 56))
    overlay, legend, labels, command = demo.segment_unsupervised(pipe, image, 0.4, 3, "photo.png")
    reference = pipe.segment_unsupervised(image, kl_threshold=0.4, iters=3).labels[0]
    assert np.array_equal(np.asarray(labels), reference.numpy()) and labels.mode == "P"
    expected = Image.blend(image, masks.label_image(reference).convert("RGB"), 0.5)
    assert np.array_equal(np.asarray(overlay), np.asarray(expected))  # segment 0 tinted too
    for k in range(int(reference.max()) + 1):
        assert f'data-label="{k}"' in legend and f"segment {k}<" in legend
    assert shlex.split(command) == ["iseg", "unsupervised", "photo.png", "--kl-threshold", "0.4", "--iters", "3"]
    if "unsupervised" not in cli.COMMANDS:
        return
    image.save(tmp_path / "photo.png")
    args = [*shlex.split(command)[1:], "--model", str(model), "--device", "cpu", "--dtype", "fp32",
            "--out", str(tmp_path / "out")]  # fmt: skip
    args[1] = str(tmp_path / "photo.png")
    assert cli.main(args) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "photo_labels.png")), np.asarray(labels))
    with pytest.raises(DemoError, match="KL threshold must be a finite number > 0"):
        demo.segment_unsupervised(NoModel(), image, 0.0, 3)


# --- the app ----------------------------------------------------------------------------------


def _tabs(app) -> dict[str, bool]:
    import gradio as gr

    return {block.label: block.visible for block in app.blocks.values() if isinstance(block, gr.Tab)}


def test_build_app_shows_the_tabs_the_pipeline_supports(saved):
    pytest.importorskip("gradio")
    pipe, _ = saved

    class TextOnly:  # the Classes tab only
        def __call__(self, *args, **kwargs):
            return pipe(*args, **kwargs)

    assert _tabs(demo.build_app(TextOnly())) == {"Classes": True, "Regions": False, "Unsupervised": False}

    class WithRegions(TextOnly):
        def segment_regions(self, *args, **kwargs):
            raise AssertionError

    assert _tabs(demo.build_app(WithRegions())) == {"Classes": True, "Regions": True, "Unsupervised": False}
    assert _tabs(demo.build_app(pipe))["Unsupervised"] is hasattr(pipe, "segment_unsupervised")


def test_demo_command_loads_the_model_once_and_serves_the_app(saved, monkeypatch):
    pytest.importorskip("gradio")
    from iseg import cli
    from iseg.commands import _common

    pipe, model = saved
    loads, served = [], []

    def load_pipeline(model_name, device, dtype):
        loads.append((model_name, device, dtype))
        return pipe

    monkeypatch.setattr(_common, "load_pipeline", load_pipeline)
    monkeypatch.setattr(demo, "launch", lambda app, **kwargs: served.append((app, kwargs)))
    status = cli.main(["demo", "--model", str(model), "--device", "cpu", "--port", "8123"])
    assert status == 0
    assert loads == [(str(model), "cpu", torch.float32)]
    [(app, kwargs)] = served
    assert kwargs == {"host": "127.0.0.1", "port": 8123, "share": False}
    assert set(_tabs(app)) == {"Classes", "Regions", "Unsupervised"}


def test_demo_command_refuses_a_taken_port_before_loading_anything(monkeypatch, capsys):
    import socket

    from iseg import cli
    from iseg.commands import _common

    monkeypatch.setattr(_common, "load_pipeline", lambda *a: pytest.fail("the model loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["demo", "--port", str(port), "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"iseg: error: cannot serve on 127.0.0.1:{port}: Address already in use; "
                   "give a free one with --port N"]  # fmt: skip


def test_launch_queues_requests_one_model_call_at_a_time():
    calls = []

    class App:
        def queue(self, **kwargs):
            calls.append(("queue", kwargs))

        def launch(self, **kwargs):
            calls.append(("launch", kwargs))

    demo.launch(App(), host="127.0.0.1", port=7001)
    assert calls[0] == ("queue", {"default_concurrency_limit": 1})
    name, kwargs = calls[1]
    assert name == "launch" and kwargs["server_name"] == "127.0.0.1" and kwargs["server_port"] == 7001
    assert kwargs["max_file_size"] == demo.MAX_FILE_SIZE and kwargs["show_error"] is False


def test_downloads_are_written_where_gradio_can_serve_them():
    png = Path(demo.save_download(Image.new("P", (3, 2)), "x_labels.png"))
    text = Path(demo.save_download('{"a": 1}', "x_regions.json"))
    assert png.name == "x_labels.png" and Image.open(png).size == (3, 2)
    assert json.loads(text.read_text()) == {"a": 1}
    assert png.parent != text.parent and png.parent.parent == text.parent.parent  # one folder each


@pytest.mark.parametrize("port", ["0", "65536", "http"])
def test_demo_command_refuses_a_bad_port(port, capsys):
    from iseg import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--port", port])
    assert exit_info.value.code == 2
    assert "--port" in capsys.readouterr().err
