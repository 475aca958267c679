"""Tests for ``iseg.demo``: the web demo's handler functions, on the tiny model and on stubs.

The handlers are plain functions, so what the page shows is checked here without a browser
(tests/test_demo_browser.py drives the served page once).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import iseg
from iseg import ISegPipeline, demo, masks
from iseg.demo import DemoError

from .conftest import make_image


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """The PyTorch reference ops: the demo's wiring is under test, not the kernels."""
    monkeypatch.setenv("ISEG_OPS_BACKEND", "torch")


@pytest.fixture(scope="module")
def saved(saved_model: Path) -> tuple[ISegPipeline, Path]:
    """The tiny pipeline as loaded back from the folder it was saved to (so the CLI, which
    loads the folder, runs the same weights)."""
    pipe = ISegPipeline.from_pretrained(saved_model)
    pipe.set_progress_bar_config(disable=True)
    return pipe, saved_model


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


# --- display copies and clicks ----------------------------------------------------------------


def test_a_large_photo_is_shown_as_a_display_copy_and_clicks_map_back():
    big = Image.new("RGB", (6000, 4000))
    shown = demo.display_copy(big, side=1024)
    assert shown.size == (1024, 683)  # 4000 · 1024 / 6000 = 682.67
    small = make_image(0, (40, 56))
    assert demo.display_copy(small, side=1024) is small  # small images: the image itself
    # the image pixel under the centre of the clicked display pixel
    assert demo.to_image_pixel((0, 0), big.size, shown.size) == (2, 2)  # 0.5 · 6000/1024 = 2.9
    assert demo.to_image_pixel((1023, 682), big.size, shown.size) == (5997, 3997)
    assert demo.to_image_pixel((512, 100), big.size, shown.size) == (3002, 588)  # 512.5·5.859, 100.5·5.857
    assert demo.to_image_pixel((13, 7), small.size, small.size) == (13, 7)  # exact where not scaled
    with pytest.raises(DemoError, match="outside the image"):
        demo.to_image_pixel((56, 0), small.size, small.size)


def test_shrink_samples_the_pixel_centres():
    values = np.arange(6 * 8).reshape(6, 8)
    assert np.array_equal(demo.shrink(values, (4, 3)), values[1::2, 1::2])
    assert demo.shrink(values, (8, 6)) is values


def test_clicks_make_points_background_points_boxes_and_lines():
    regions, pending = demo.add_click("point", 5, 6, [], None)
    assert regions == [{"type": "point", "x": 5, "y": 6}] and pending is None
    regions, pending = demo.add_click("negative", 7, 8, regions, None)
    assert regions[-1] == {"type": "point", "x": 7, "y": 8, "negative": True} and pending is None
    # a box: the first click is a corner, the second adds the box holding both clicked pixels
    regions, pending = demo.add_click("box", 30, 4, regions, None)
    assert len(regions) == 2 and pending == {"type": "box", "points": [[30, 4]]}
    regions, pending = demo.add_click("box", 10, 20, regions, pending)
    assert regions[-1] == {"type": "box", "x0": 10, "y0": 4, "x1": 31, "y1": 21} and pending is None
    # a line: vertices until finished
    regions, pending = demo.add_click("line", 1, 1, regions, None)
    regions, pending = demo.add_click("line", 9, 3, regions, pending)
    assert len(regions) == 3 and pending == {"type": "line", "points": [[1, 1], [9, 3]]}
    regions, pending = demo.finish_line(regions, pending)
    assert regions[-1] == {"type": "line", "points": [[1, 1], [9, 3]]} and pending is None
    # a pending corner of another kind is dropped by a click in a new mode
    _, pending = demo.add_click("line", 2, 2, regions, {"type": "box", "points": [[0, 0]]})
    assert pending == {"type": "line", "points": [[2, 2]]}
    with pytest.raises(DemoError, match="a line needs at least 2 clicks"):
        demo.finish_line(regions, {"type": "line", "points": [[1, 1]]})
    with pytest.raises(DemoError, match="no line to finish"):
        demo.finish_line(regions, None)
    with pytest.raises(DemoError, match="mode must be one of"):
        demo.add_click("circle", 1, 1, [], None)


# --- the Classes tab ----------------------------------------------------------------------


def test_segment_classes_shows_what_the_pipeline_computes(saved):
    pipe, _ = saved
    image = make_image(2, (48, 64))
    result = demo.segment_classes(pipe, image, " cat ,  potted plant", "paper", 7, 0.02, 1.3, seed=5)
    call = {"recipe": "paper", "iters": 7, "lam": 0.02, "gamma": 1.3}
    reference = pipe(image, ["cat", "potted plant"], generator=torch.Generator().manual_seed(5), **call)
    lean = pipe(image, ["cat", "potted plant"], generator=torch.Generator().manual_seed(5),
                output_heatmaps=False, **call)  # fmt: skip
    label = lean.labels[0]  # the labels as `iseg segment` makes them
    assert result.classes == ("cat", "potted plant")
    assert np.array_equal(np.asarray(result.labels), label.numpy()) and result.labels.mode == "P"
    assert result.labels.getpalette()[:9] == masks.palette(3)
    assert np.array_equal(np.asarray(result.overlay), np.asarray(masks.overlay(image, label)))
    assert [caption for _, caption in result.heatmaps] == ["cat", "potted plant"]
    for (picture, _), heat in zip(result.heatmaps, reference.heatmaps[0]):  # the pipeline's heatmaps
        assert np.array_equal(np.asarray(picture), np.asarray(demo.heatmap_image(heat)))
    assert result.legend == demo.legend_html(["cat", "potted plant"])
    for k in (1, 2):
        assert np.array_equal(np.asarray(result.masks[f"IMAGE_class{k}_mask.png"]) > 0, label.numpy() == k)
    assert shlex.split(result.command) == [
        "iseg", "segment", "IMAGE", "--classes", "cat,potted plant", "--recipe", "paper",
        "--iters", "7", "--lam", "0.02", "--gamma", "1.3", "--seed", "5", "--out", "iseg-out",
    ]  # fmt: skip


def test_classes_on_a_display_copy_keep_full_size_labels(saved):
    pipe, _ = saved
    image = make_image(8, (96, 128))
    display = demo.display_copy(image, side=64)
    result = demo.segment_classes(pipe, image, "cat, dog", None, 3, 0.01, 1.6, 0, display=display)
    assert result.labels.size == (128, 96) and result.masks["IMAGE_class1_mask.png"].size == (128, 96)
    assert result.overlay.size == (64, 48) and result.heatmaps[0][0].size == (64, 48)


class ClassesStub:
    """A pipeline with only the public ``__call__``: records its keywords, returns fixed maps."""

    def __init__(self):
        self.calls = []

    def __call__(self, image, classes, generator=None, *, recipe=None, iters=None, lam=None, gamma=None,
                 output_heatmaps=True, heatmap_size=None):  # fmt: skip
        self.calls.append({"output_heatmaps": output_heatmaps, "heatmap_size": heatmap_size})
        h, w = heatmap_size
        self.heat = torch.rand(1, len(classes), h, w, generator=torch.Generator().manual_seed(0))
        labels = torch.zeros(1, image.height, image.width, dtype=torch.long)
        return types.SimpleNamespace(heatmaps=self.heat, labels=labels)


def test_classes_heatmaps_come_from_one_public_call_at_the_display_size():
    image = make_image(8, (96, 128))
    display = demo.display_copy(image, side=64)
    stub = ClassesStub()
    result = demo.segment_classes(stub, image, "cat, dog", None, 3, 0.01, 1.6, 0, display=display)
    assert stub.calls == [{"output_heatmaps": True, "heatmap_size": (48, 64)}]
    for (picture, _), heat in zip(result.heatmaps, stub.heat[0]):
        assert np.array_equal(np.asarray(picture), np.asarray(demo.heatmap_image(heat)))


def _run_shown_command(command: str, image_path: Path, out: Path) -> None:
    """The command as shown, but for the image's path and the output folder, run in-process."""
    from iseg import cli

    args = shlex.split(command)
    assert args[0] == "iseg" and "--model" in args
    args[2] = str(image_path)
    args[args.index("--out") + 1] = str(out)
    assert cli.main(args[1:]) == 0


def test_the_classes_command_reproduces_the_labels(saved, tmp_path):
    """On a 640 × 480 image where the labels of the full-size heatmaps and the command's
    (computed in row chunks) differ: the demo shows the command's."""
    pipe, model = saved
    image = make_image(0, (480, 640))  # 1 pixel of 307,200 differs between the two label paths
    image.save(tmp_path / "photo.png")
    result = demo.segment_classes(pipe, image, "a, b, c, d, e", "paper", 4, 0.01, 1.6, seed=2,
                                  image_name="photo.png", model_args=["--model", str(model)])  # fmt: skip
    assert shlex.split(result.command)[-2:] == ["--model", str(model)]
    _run_shown_command(result.command, tmp_path / "photo.png", tmp_path / "out")
    written = Image.open(tmp_path / "out" / "photo_labels.png")
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
        ({"iters": "many"}, "iterations must be a whole number, got 'many'"),
        ({"iters": float("inf")}, "iterations must be a whole number"),
        ({"lam": float("nan")}, "λ must be a finite number ≥ 0"),
        ({"lam": None}, "λ must be a number, got None"),
        ({"gamma": 0}, "γ must be a finite number > 0"),
        ({"seed": -2}, r"seed must be a whole number in \[0, 18446744073709551615\]"),
        ({"seed": 2**64}, r"seed must be a whole number in \[0, 18446744073709551615\], got '2\*\*64' \(0 to 2\*\*64 − 1\)"),
        ({"seed": float(2**64)}, r"seed must be a whole number in \[0, 18446744073709551615\]"),
        ({"seed": 1e300}, r"seed must be a whole number in"),
        ({"seed": None}, "seed must be a whole number, got None"),
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


# --- the Regions tab --------------------------------------------------------------------------

REGIONS = [
    {"type": "point", "x": 20, "y": 12},
    {"type": "box", "x0": 4, "y0": 6, "x1": 30, "y1": 28},
    {"type": "line", "points": [[2, 3], [40, 30], [50, 10]]},
    {"type": "point", "x": 45, "y": 30, "negative": True},
]


class RegionsStub:
    """Records the call and returns fixed heatmaps, masks and labels for 4 regions."""

    def __init__(self, size):
        h, w = size
        generator = torch.Generator().manual_seed(0)
        self.heat = torch.rand(1, 4, h, w, generator=generator)
        self.masks = self.heat > 0.5
        self.labels = torch.randint(0, 4, (1, h, w), generator=generator)
        self.calls = []

    def segment_regions(self, image, regions, **kwargs):
        self.calls.append((image, regions, kwargs))
        return types.SimpleNamespace(heatmaps=self.heat, masks=self.masks, labels=self.labels)


def test_segment_regions_passes_the_regions_and_shows_each_heatmap_and_mask():
    image = make_image(4, (36, 52))
    stub = RegionsStub((36, 52))
    result = demo.segment_regions(stub, image, REGIONS, iters=20, threshold=0.4, seed=3,
                                  image_name="my photo.png", model_args=["--model", "m"])  # fmt: skip
    [(called_image, regions, kwargs)] = stub.calls
    assert called_image is image
    assert regions == [iseg.Point(20, 12), iseg.Box(4, 6, 30, 28), iseg.Line([(2, 3), (40, 30), (50, 10)]),
                       iseg.Point(45, 30, negative=True)]  # fmt: skip
    assert kwargs["iters"] == 20 and kwargs["threshold"] == 0.4
    assert torch.equal(kwargs["generator"].get_state(), torch.Generator().manual_seed(3).get_state())
    # per object region: its heatmap, then its mask tinted in its label colour (not the background point's)
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
    assert "4 · background point (45, 30)" in result.legend
    assert np.array_equal(np.asarray(result.labels), stub.labels[0].numpy())
    assert result.overlay.size == image.size and result.overlay.mode == "RGB"
    # downloads: labels, each region's mask as `iseg regions` names them, the session
    assert list(result.files) == ["my photo_labels.png", *[f"my photo_region{r}_mask.png" for r in (1, 2, 3, 4)],
                                  "my photo_regions.json"]  # fmt: skip
    for r in range(4):
        assert np.array_equal(np.asarray(result.files[f"my photo_region{r + 1}_mask.png"]) > 0, stub.masks[0, r].numpy())
    session = json.loads(result.json)
    assert session["image"] == "my photo.png" and session["size"] == [52, 36]
    assert session["iters"] == 20 and session["threshold"] == 0.4 and session["seed"] == 3
    assert session["recipe"] == "interactive"  # what segment_regions runs on an SD model
    assert session["regions"] == REGIONS and session["command"] == result.command
    assert shlex.split(result.command) == [
        "iseg", "regions", "my photo.png", "--point", "20,12", "--box", "4,6,30,28",
        "--line", "2,3:40,30:50,10", "--negative-point", "45,30", "--iters", "20", "--threshold", "0.4",
        "--seed", "3", "--out", "iseg-regions", "--model", "m",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image": None}, "upload an image first"),
        ({"regions": []}, "add a region first"),
        ({"regions": [{"type": "circle"}]}, "region 0: unknown type 'circle'"),
        ({"iters": 0}, "iterations must be a whole number ≥ 1"),
        ({"threshold": 1.0}, r"threshold must be a finite number in \(0, 1\)"),
        ({"threshold": 0}, r"threshold must be a finite number in \(0, 1\)"),
        ({"seed": 2**64}, "seed must be a whole number in"),
    ],
)
def test_segment_regions_refuses_bad_input_before_the_model_runs(kwargs, message):
    call = {"image": make_image(0, (32, 32)), "regions": REGIONS[:1], "iters": 50,
            "threshold": 0.5, **kwargs}  # fmt: skip
    with pytest.raises(DemoError, match=message):
        demo.segment_regions(NoModel(), **call)


def test_only_background_points_are_refused_before_the_model_runs(saved):
    pipe, _ = saved  # the pipeline validates the regions before its model runs
    with pytest.raises(DemoError, match="only negative points"):
        demo.segment_regions(pipe, make_image(0, (40, 56)), [REGIONS[3]])


def test_segment_regions_on_the_tiny_model_matches_the_pipeline(saved):
    pipe, _ = saved
    image = make_image(5, (36, 52))
    result = demo.segment_regions(pipe, image, REGIONS, iters=30, threshold=0.5, seed=1)
    reference = pipe.segment_regions(
        image, [iseg.Point(20, 12), iseg.Box(4, 6, 30, 28), iseg.Line([(2, 3), (40, 30), (50, 10)]),
                iseg.Point(45, 30, negative=True)],
        iters=30, threshold=0.5, generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    assert np.array_equal(np.asarray(result.labels), reference.labels[0].numpy())
    for r in range(3):
        expected = demo.heatmap_image(reference.heatmaps[0, r])
        assert np.array_equal(np.asarray(result.gallery[2 * r][0]), np.asarray(expected))
    for r in range(4):
        assert np.array_equal(result.masks[r], reference.masks[0, r].numpy())
    assert not result.masks[3].any()  # the background point's own mask is empty


def _cli_has(flag: str, command: str) -> bool:
    import argparse

    from iseg import cli

    parser, _ = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices.get(command)
    return sub is not None and flag in sub._option_string_actions


@pytest.mark.parametrize("with_negative", [False, True], ids=["objects", "with-a-background-point"])
def test_the_regions_command_reproduces_the_masks(saved, tmp_path, with_negative):
    pipe, model = saved
    if with_negative and not _cli_has("--negative-point", "regions"):
        pytest.skip("`iseg regions --negative-point` has not landed (the CLI's part)")
    regions = REGIONS if with_negative else REGIONS[:3]
    image = make_image(6, (36, 52))
    image.save(tmp_path / "photo.png")
    result = demo.segment_regions(pipe, image, regions, iters=12, threshold=0.45, seed=4,
                                  image_name="photo.png", model_args=["--model", str(model)])  # fmt: skip
    _run_shown_command(json.loads(result.json)["command"], tmp_path / "photo.png", tmp_path / "out")
    written = Image.open(tmp_path / "out" / "photo_labels.png")
    assert np.array_equal(np.asarray(written), np.asarray(result.labels))
    for r, mask in enumerate(result.masks, 1):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / f"photo_region{r}_mask.png")) > 0, mask)


def test_draw_regions_draws_each_region_in_its_colour():
    layer = np.asarray(demo.draw_regions((64, 48), REGIONS))
    assert layer.shape == (48, 64, 4)
    assert tuple(layer[12, 20]) == (*demo.label_colour(1), 255)  # the point's centre
    assert tuple(layer[6 + 1, 17]) == (*demo.label_colour(2), 255)  # on the box's top edge
    assert tuple(layer[27, 45]) == (20, 20, 20, 255)  # the background point: dark, a white bar
    assert tuple(layer[30, 45]) == (255, 255, 255, 255)
    assert layer[18, 12, 3] == 0  # inside the box, away from the line: transparent
    assert layer[0, 63, 3] == 0
    # on a display copy at half size, the point is drawn at half its coordinates
    half = np.asarray(demo.draw_regions((32, 24), REGIONS[:1], scale=0.5))
    assert tuple(half[6, 10]) == (*demo.label_colour(1), 255)


# --- the Unsupervised tab ---------------------------------------------------------------------


def test_segment_unsupervised_shows_every_segment_and_reproduces_with_the_cli(saved, tmp_path):
    pipe, model = saved
    image = make_image(7, (40, 56))
    result = demo.segment_unsupervised(pipe, image, 0.4, 3, "photo.png", ["--model", str(model)])
    reference = pipe.segment_unsupervised(image, kl_threshold=0.4, iters=3).labels[0]
    assert np.array_equal(np.asarray(result.labels), reference.numpy()) and result.labels.mode == "P"
    expected = Image.blend(image, masks.label_image(reference).convert("RGB"), 0.5)
    assert np.array_equal(np.asarray(result.overlay), np.asarray(expected))  # segment 0 tinted too
    count = int(reference.max()) + 1
    for k in range(count):
        assert f'data-label="{k}"' in result.legend and f"segment {k}<" in result.legend
        assert np.array_equal(np.asarray(result.masks[f"photo_segment{k}_mask.png"]) > 0, reference.numpy() == k)
    assert shlex.split(result.command) == ["iseg", "unsupervised", "photo.png", "--kl-threshold", "0.4",
                                           "--iters", "3", "--out", "iseg-unsupervised", "--model", str(model)]  # fmt: skip
    image.save(tmp_path / "photo.png")
    _run_shown_command(result.command, tmp_path / "photo.png", tmp_path / "out")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "photo_labels.png")), np.asarray(result.labels))
    with pytest.raises(DemoError, match="KL threshold must be a finite number > 0"):
        demo.segment_unsupervised(NoModel(), image, 0.0, 3)


# --- one model call at a time -------------------------------------------------------------------


def test_two_tabs_from_two_threads_get_what_each_gets_alone(saved):
    """A Classes run and a Regions run of two "browsers" at the same time, many times: each
    result equals the same request run alone (the attention processors are swapped on shared
    layers during a call, so overlapping calls fail or mix their maps without the lock)."""
    import threading

    pipe, _ = saved
    app = demo.Demo(pipe)
    first = demo.Upload(make_image(9, (40, 56)), make_image(9, (40, 56)), "a.png")
    second = demo.Upload(make_image(10, (48, 40)), make_image(10, (48, 40)), "b.png")
    regions = REGIONS[:2]
    alone_classes = np.asarray(app.classes(first, "cat, dog", "paper", 3, 0.01, 1.6, 0).labels)
    alone_regions = np.asarray(app.regions(second, regions, 5, 0.5, 0).labels)
    failures: list[str] = []

    def hammer(run, expected):
        for _ in range(12):
            try:
                if not np.array_equal(np.asarray(run().labels), expected):
                    failures.append("different labels")
            except Exception as exc:  # noqa: BLE001 - any failure is the finding
                failures.append(f"{type(exc).__name__}: {exc}")

    threads = [
        threading.Thread(target=hammer, args=(lambda: app.classes(first, "cat, dog", "paper", 3, 0.01, 1.6, 0),
                                              alone_classes)),
        threading.Thread(target=hammer, args=(lambda: app.regions(second, regions, 5, 0.5, 0), alone_regions)),
    ]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


# --- examples ---------------------------------------------------------------------------------


def test_examples_are_small_pictures_with_a_prompt_for_each_tab(saved):
    pipe, _ = saved
    app = demo.Demo(pipe)
    for index, entry in enumerate(demo.EXAMPLES):
        path = demo.EXAMPLES_DIR / entry["file"]
        assert path.stat().st_size < 40_000
        upload = app.example(index)
        assert upload.name == entry["file"] and upload.image.size == (512, 384)
        demo.parse_class_names(entry["classes"])  # a valid prompt
        iseg.seeds.validate_regions(demo.to_api_regions(entry["regions"]), (384, 512))
        assert entry["clicks"]


def test_an_image_smaller_than_the_attention_grid_is_refused(saved, tmp_path):
    pipe, _ = saved
    grid = demo.attention_grid(pipe)
    assert grid == (16, 16)  # the tiny model: 128 px, VAE ÷ 2, self-attention at ÷ 4
    Image.new("RGB", (16, 15)).save(tmp_path / "thin.png")
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "ok.png")
    app = demo.Demo(pipe)
    for name in ("thin.png", "dot.png"):
        with pytest.raises(DemoError, match=r"the model needs at least 16 × 16 pixels"):
            app.upload(tmp_path / name)
    assert app.upload(tmp_path / "ok.png").image.size == (16, 16)


# --- the app ----------------------------------------------------------------------------------


def _tabs(app) -> dict[str, bool]:
    import gradio as gr

    return {block.label: block.visible for block in app.blocks.values() if isinstance(block, gr.Tab)}


def test_build_app_shows_every_tab(saved):
    pytest.importorskip("gradio")
    pipe, _ = saved
    assert _tabs(demo.build_app(pipe)) == {"Classes": True, "Regions": True, "Unsupervised": True}


def _handler(app, name: str):
    """The function of the app's event handled by ``name`` (the first one)."""
    return next(f.fn for f in app.fns.values() if getattr(f.fn, "__name__", "") == name)


def _by_id(app, values: dict) -> dict:
    """``{component: value}`` → ``{elem_id: value}`` (elem_id-less components left out)."""
    return {c.elem_id: v for c, v in values.items() if getattr(c, "elem_id", None)}


MODEL_HANDLERS = {"on_classes", "on_classes_example", "on_click", "on_finish", "on_undo", "on_region_settings",
                  "on_regions_example", "on_unsupervised", "on_unsupervised_example"}  # fmt: skip


def test_every_model_call_of_every_tab_shares_one_concurrency_slot(saved):
    pytest.importorskip("gradio")
    app = demo.build_app(saved[0])
    found = {}
    for f in app.fns.values():
        name = getattr(f.fn, "__name__", "")
        if name in MODEL_HANDLERS:
            found[name] = (f.concurrency_id, f.concurrency_limit)
    assert set(found) == MODEL_HANDLERS
    assert set(found.values()) == {(demo.CONCURRENCY_ID, 1)}


def test_a_new_upload_clears_every_result_and_shows_the_new_image(saved, tmp_path):
    pytest.importorskip("gradio")
    app = demo.build_app(saved[0], model_name="m")
    make_image(1, (40, 56)).save(tmp_path / "photo.png")
    values = _by_id(app, _handler(app, "on_upload")(str(tmp_path / "photo.png")))
    for tab in ("classes", "regions", "unsupervised"):
        assert values[f"iseg-{tab}-files"] is None and values[f"iseg-{tab}-command"] == ""
        assert values[f"iseg-{tab}-legend"] == ""
    assert values["iseg-classes-heatmaps"] == [] and values["iseg-regions-gallery"] == []
    for shown in ("iseg-classes-overlay", "iseg-regions-image", "iseg-unsupervised-overlay"):
        assert np.array_equal(np.asarray(values[shown]), np.asarray(make_image(1, (40, 56))))
    assert values["iseg-upload"] is None  # ready for the next file, no × first
    # a rejected file: a warning, the upload box emptied, nothing else changed
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.warns(UserWarning, match="'notes.png' is not an image"):  # gr.Warning outside a request
        rejected = _handler(app, "on_upload")(str(tmp_path / "notes.png"))
    [(component, value)] = rejected.items()
    assert component.elem_id == "iseg-upload" and value.value is None


def test_a_rejected_input_is_a_warning_and_the_last_result_stays(saved, monkeypatch):
    gr = pytest.importorskip("gradio")
    warnings = []
    monkeypatch.setattr(gr, "Warning", lambda message, *a, **k: warnings.append(message))
    app = demo.build_app(saved[0])
    upload = demo.Upload(make_image(1, (40, 56)), make_image(1, (40, 56)), "photo.png")
    on_classes = _handler(app, "on_classes")
    good = _by_id(app, on_classes(upload, "cat, dog", "paper", 2, 0.01, 1.6, 0))
    assert good["iseg-classes-command"].startswith("iseg segment photo.png")
    for bad in (("cat, cat", 0), ("cat", 2**64)):
        values = on_classes(upload, bad[0], "paper", 2, 0.01, 1.6, bad[1])
        assert list(values.values()) == [gr.skip()]  # nothing replaced
    assert warnings == ["class 'cat' is given twice",
                        "seed must be a whole number in [0, 18446744073709551615], got '2**64' (0 to 2**64 − 1)"]  # fmt: skip


def test_a_click_on_the_display_copy_adds_the_pixel_under_it(saved):
    gr = pytest.importorskip("gradio")
    pipe, _ = saved
    app = demo.build_app(pipe)
    image = make_image(2, (200, 300))
    upload = demo.Upload(image, demo.display_copy(image, side=150), "photo.png")  # half size
    on_click = _handler(app, "on_click")

    def click(x, y, mode, regions, pending):
        event = gr.SelectData(None, {"index": [x, y], "value": None})
        values = on_click(upload, mode, regions, pending, upload.display, 5, 0.5, 0, event)
        return {getattr(c, "elem_id", None) or c: v for c, v in values.items()}

    out = click(40, 20, "point", [], None)
    regions = [v for k, v in out.items() if isinstance(v, list) and v and isinstance(v[0], dict)][0]
    assert regions == [{"type": "point", "x": 81, "y": 41}]  # (40.5·2, 20.5·2)
    assert out["iseg-regions-command"].split()[3:5] == ["--point", "81,41"]
    assert out["iseg-regions-image"].size == (150, 100)
    # a box's first corner: no model call, the corner drawn on the image
    out = click(10, 10, "box", regions, None)
    assert "iseg-regions-command" not in out and "iseg-regions-image" in out


def test_demo_command_loads_the_model_once_and_serves_the_app(saved, monkeypatch):
    pytest.importorskip("gradio")
    from iseg import cli
    from iseg.commands import _model

    pipe, model = saved
    loads, served = [], []

    def load_pipeline(model_name, device, dtype):
        loads.append((model_name, device, dtype))
        return pipe

    monkeypatch.setattr(_model, "load_pipeline", load_pipeline)
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
    from iseg.commands import _model

    monkeypatch.setattr(_model, "load_pipeline", lambda *a: pytest.fail("the model loaded"))
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
