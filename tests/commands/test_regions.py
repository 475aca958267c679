"""``iseg regions`` and ``iseg refine-masks`` on a tiny saved pipeline: outputs equal the
pipeline's own results, resume, per-image mask errors, and bad regions as one usage error
before the model loads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iseg import Box, ISegPipeline, Line, Mask, Point
from iseg.cli import main
from iseg.hub import dtype_keyword
from iseg.images import load_image
from iseg.runner import MANIFEST

from ._cli import forbid_loading, one_error_line


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISEG_OPS_BACKEND", "torch")  # the CLI's wiring is under test


@pytest.fixture(scope="module")
def model(saved_model: Path) -> Path:
    return saved_model


@pytest.fixture(scope="module")
def loaded(model: Path) -> ISegPipeline:
    """The saved pipeline loaded back as the CLI loads it (fp32, CPU)."""
    pipe = ISegPipeline.from_pretrained(model, **{dtype_keyword(): torch.float32})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def blob_image(seed: int, size=(48, 64)) -> Image.Image:
    """Two coloured blobs on noise, ``size`` (H, W)."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    img = rng.integers(0, 60, size=(h, w, 3)).astype(np.float64)
    for cy, cx, colour in ((h * 0.3, w * 0.3, (220, 40, 40)), (h * 0.7, w * 0.7, (40, 40, 220))):
        blob = np.exp(-(((yy - cy) / (h / 6)) ** 2 + ((xx - cx) / (w / 6)) ** 2))
        img += blob[..., None] * np.array(colour)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def read_png(path: Path) -> tuple[str, np.ndarray]:
    with Image.open(path) as image:
        image.load()
    return image.mode, np.asarray(image)


# --- iseg regions ---------------------------------------------------------------------------


@pytest.fixture
def scene(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    image = tmp_path / "scene.png"
    blob_image(1).save(image)
    mask = np.zeros((48, 64), dtype=bool)
    mask[30:44, 36:60] = True
    mask_path = tmp_path / "given.png"
    Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
    return image, mask_path, mask


def regions_command(image, model, out, *regions: str, seed: int = 3) -> list[str]:
    return ["regions", str(image), *regions, "--model", str(model), "--out", str(out),
            "--device", "cpu", "--dtype", "fp32", "--seed", str(seed)]  # fmt: skip


def test_regions_round_trip_matches_the_pipeline(model, loaded, scene, tmp_path, capsys):
    image_path, mask_path, mask = scene
    out = tmp_path / "out"
    argv = regions_command(image_path, model, out, "--point", "10,10", "--box", "0,0,30,20",
                           "--line", "5,40:60,40:60,30", "--mask", str(mask_path),
                           "--point", "50,12:52,14")  # fmt: skip
    assert main(argv) == 0
    names = [f"scene_region{r}_mask.png" for r in range(1, 6)]
    assert sorted(os.listdir(out)) == sorted(
        [MANIFEST, *names, "scene_labels.png", "scene_overlay.png"]
    )
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (f"iseg: segmented the regions of 1 image, skipped 0 already done; "
                       f"outputs in {out}")  # fmt: skip

    # The same regions, in the order of the options, on the pipeline with the CLI's generator.
    regions = [Point(10, 10), Box(0, 0, 30, 20), Line([(5, 40), (60, 40), (60, 30)]), Mask(mask),
               Point([(50, 12), (52, 14)])]  # fmt: skip
    image = load_image(image_path)
    direct = loaded.segment_regions(image, regions, generator=torch.Generator().manual_seed(3))
    for r, name in enumerate(names):
        mode, pixels = read_png(out / name)
        assert mode == "L" and pixels.shape == (48, 64)
        assert set(np.unique(pixels)) <= {0, 255}
        np.testing.assert_array_equal(pixels == 255, direct.masks[0, r].numpy(), err_msg=name)
    mode, labels = read_png(out / "scene_labels.png")
    assert mode == "P"
    np.testing.assert_array_equal(labels, direct.labels[0].numpy())
    assert direct.masks.any()  # a non-trivial result is compared
    with Image.open(out / "scene_overlay.png") as overlay:
        assert (overlay.mode, overlay.size) == ("RGB", (64, 48))


def test_negative_points_are_regions_in_the_order_given(model, loaded, scene, tmp_path, capsys):
    """--negative-point interleaved with other options: regions numbered in the command line's
    order (as the demo numbers them), the background point's own mask written (empty)."""
    image_path, _, _ = scene
    out = tmp_path / "out"
    argv = regions_command(image_path, model, out, "--negative-point", "60,45", "--point", "10,10",
                           "--box", "30,25,62,46", "--negative-point", "2,44:4,44",
                           "--line", "5,40:20,30")  # fmt: skip
    assert main(argv) == 0
    regions = [Point(60, 45, negative=True), Point(10, 10), Box(30, 25, 62, 46),
               Point([(2, 44), (4, 44)], negative=True), Line([(5, 40), (20, 30)])]  # fmt: skip
    direct = loaded.segment_regions(load_image(image_path), regions,
                                    generator=torch.Generator().manual_seed(3))  # fmt: skip
    for r in range(5):
        mode, pixels = read_png(out / f"scene_region{r + 1}_mask.png")
        assert mode == "L"
        np.testing.assert_array_equal(pixels == 255, direct.masks[0, r].numpy(), err_msg=str(r))
    for r in (0, 3):  # the background points' masks: written, empty
        assert not read_png(out / f"scene_region{r + 1}_mask.png")[1].any()
    np.testing.assert_array_equal(read_png(out / "scene_labels.png")[1], direct.labels[0].numpy())
    assert not set(np.unique(direct.labels[0].numpy())) & {1, 4}
    assert direct.masks[0, 1].any() or direct.masks[0, 2].any()  # a non-trivial result


def test_lam_none_is_the_raw_attention_and_a_setting_of_its_own(model, loaded, scene, tmp_path, capsys,
                                                                 monkeypatch):
    """One ``--lam`` parser for every command: ``none`` switches Ent-Self off in ``regions`` as in
    ``segment`` and ``unsupervised``, and is recorded apart from "not given" (the recipe's λ)."""
    image_path, _, _ = scene
    out = tmp_path / "out"
    argv = regions_command(image_path, model, out, "--point", "10,10", "--box", "0,0,30,20")
    assert main([*argv, "--lam", "none", "--iters", "3"]) == 0
    regions = [Point(10, 10), Box(0, 0, 30, 20)]
    image = load_image(image_path)
    raw = loaded.segment_regions(image, regions, generator=torch.Generator().manual_seed(3), lam=None, iters=3)
    ent = loaded.segment_regions(image, regions, generator=torch.Generator().manual_seed(3), iters=3)
    assert not torch.equal(raw.heatmaps, ent.heatmaps)  # λ = None is not the recipe's λ
    _, labels = read_png(out / "scene_labels.png")
    np.testing.assert_array_equal(labels, raw.labels[0].numpy())
    settings = json.loads((out / MANIFEST).read_text())["commands"]["regions"]["settings"]
    assert settings["lam"] == "none"
    capsys.readouterr()
    assert main([*argv, "--iters", "3"]) == 1  # the recipe's λ is another setting
    assert "lam: 'none' → None" in one_error_line(capsys.readouterr().err)
    forbid_loading(monkeypatch)  # no T without Ent-Self: a usage error before the model loads
    assert main([*argv, "--lam", "none", "--t-max", "2", "--out", str(tmp_path / "o2")]) == 2
    assert "t_max clamps Ent-Self's T, so it needs lam" in one_error_line(capsys.readouterr().err)


def test_regions_rerun_skips_and_other_regions_need_overwrite(model, scene, tmp_path, capsys):
    image_path, _, _ = scene
    out = tmp_path / "out"
    assert main(regions_command(image_path, model, out, "--point", "10,10")) == 0
    capsys.readouterr()
    assert main(regions_command(image_path, model, out, "--point", "10,10")) == 0
    assert "skipped 1 already done" in capsys.readouterr().err
    assert main(regions_command(image_path, model, out, "--point", "20,10")) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "holds results of other settings" in line and "--overwrite" in line
    argv = regions_command(image_path, model, out, "--point", "20,10", "--box", "1,1,9,9")
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "scene_region2_mask.png").is_file()


@pytest.mark.parametrize(
    ("regions", "message"),
    [
        (["--point", "500,10"], "--point 500,10: point 0 (500, 10) is outside the image"),
        (["--point", "5,5:5,48"], "--point 5,5:5,48: point 1 (5, 48) is outside the image"),
        (["--box", "50,10,40,20"], "--box 50,10,40,20: x1 (40) must be > x0 (50)"),
        (["--box", "0,0,65,20"], "--box 0,0,65,20: (0, 0, 65, 20) is outside the image"),
        (["--line", "5,5:70,5"], "--line 5,5:70,5: vertex 1 (70, 5) is outside the image"),
        ([], "give at least one region"),
        (["--negative-point", "70,5"], "--negative-point 70,5: point 0 (70, 5) is outside the image"),
        (["--negative-point", "5,5"], "--negative-point only marks background: give a region"),
        (["--negative-point", "5,5", "--negative-point", "6,6"], "--negative-point only marks"),
    ],
)
def test_bad_regions_are_one_usage_error_before_loading(
    regions, message, scene, tmp_path, capsys, monkeypatch
):
    forbid_loading(monkeypatch)
    assert main(regions_command(scene[0], "unused", tmp_path / "out", *regions)) == 2
    assert one_error_line(capsys.readouterr().err).startswith(f"iseg: error: {message}")
    assert not (tmp_path / "out").exists()


def test_bad_mask_files_are_usage_errors(scene, tmp_path, capsys, monkeypatch):
    forbid_loading(monkeypatch)
    small = tmp_path / "small.png"
    Image.fromarray(np.ones((40, 64), np.uint8)).save(small)
    assert main(regions_command(scene[0], "unused", tmp_path / "o", "--mask", str(small))) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"iseg: error: --mask {small}: mask is 40×64 but the image is 48×64")
    missing = tmp_path / "missing.png"
    assert main(regions_command(scene[0], "unused", tmp_path / "o", "--mask", str(missing))) == 2
    assert one_error_line(capsys.readouterr().err).startswith(f"iseg: error: --mask {missing}:")
    empty = tmp_path / "empty.png"
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(empty)
    assert main(regions_command(scene[0], "unused", tmp_path / "o", "--mask", str(empty))) == 2
    assert "selects no pixel" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "regions",
    [["--line", "5,5"], ["--point", "nan,5"], ["--point", "5"], ["--box", "1,2,3"],
     ["--point", "a,b"], ["--box", "0,0,inf,4"], ["--negative-point", "5"],
     ["--negative-point", "5,nan"]],
)
def test_malformed_options_are_argparse_errors(regions, scene, tmp_path, capsys, monkeypatch):
    forbid_loading(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        main(regions_command(scene[0], "unused", tmp_path / "out", *regions))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1].startswith("iseg regions: error:")


# --- iseg refine-masks ----------------------------------------------------------------------


def palette_png(ids: np.ndarray, path: Path) -> None:
    image = Image.fromarray(ids.astype(np.uint8), mode="P")
    image.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    image.save(path)


@pytest.fixture
def dataset(tmp_path: Path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i, stem in enumerate(["a", "b", "c", "d", "e"]):
        blob_image(10 + i).save(images / f"{stem}.png")
    ids = np.zeros((48, 64), np.uint8)
    ids[5:25, 5:30] = 1
    ids[28:46, 30:60] = 3
    ids[0:4, :] = 255  # ignored strip
    palette_png(ids, masks / "a.png")
    palette_png(ids[:40], masks / "b.png")  # another size
    # c: no mask
    background = np.zeros((48, 64), np.uint8)
    background[:, :3] = 255
    palette_png(background, masks / "d.png")  # only background and ignore
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(masks / "e.png")  # a colour image
    return images, masks, ids, background


def refine_command(images, masks, model, out, *extra) -> list[str]:
    return ["refine-masks", str(images), "--masks", str(masks), "--model", str(model),
            "--out", str(out), "--device", "cpu", "--dtype", "fp32", *extra]  # fmt: skip


def test_refine_masks_writes_refined_ids_and_reports_bad_masks(model, loaded, dataset, tmp_path,
                                                               capsys):
    images, masks, ids, background = dataset
    out = tmp_path / "out"
    assert main(refine_command(images, masks, model, out, "--seed", "5")) == 1
    err = capsys.readouterr().err.splitlines()
    errors = [line for line in err if line.startswith("iseg: error: ")]
    assert len(errors) == 3, err
    assert f"mask '{masks / 'b.png'}' is 64×40 but the image is 64×48" in errors[0]
    assert f"no mask '{masks / 'c.png'}' for this image" in errors[1]
    assert f"mask '{masks / 'e.png'}' is a RGB image" in errors[2]
    assert err[-1] == (f"iseg: refined the masks of 2 images, skipped 0 already done, 3 failed; "
                       f"outputs in {out}")  # fmt: skip
    assert sorted(os.listdir(out)) == sorted([MANIFEST, "a.png", "d.png"])

    # a: the pipeline's refinement of the same label map with the generator seed + index (0).
    mode, refined = read_png(out / "a.png")
    assert mode == "P"
    label_map = torch.from_numpy(ids.astype(np.int64))
    direct = loaded.refine_masks(load_image(images / "a.png"), label_map,
                                 generator=torch.Generator().manual_seed(5))  # fmt: skip
    np.testing.assert_array_equal(refined, direct.labels[0].numpy())
    assert (refined[ids == 255] == 255).all() and set(np.unique(refined)) <= {0, 1, 3, 255}
    # d: nothing to refine, written as given.
    np.testing.assert_array_equal(read_png(out / "d.png")[1], background)

    # A rerun skips the finished images and reports the bad masks again.
    assert main(refine_command(images, masks, model, out, "--seed", "5")) == 1
    err = capsys.readouterr().err.splitlines()
    assert sum(line.startswith("iseg: error: ") for line in err) == 3
    assert "refined the masks of 0 images, skipped 2 already done, 3 failed" in err[-1]


def test_refine_masks_needs_a_masks_folder(dataset, tmp_path, capsys, monkeypatch):
    forbid_loading(monkeypatch)
    images = dataset[0]
    argv = refine_command(images, tmp_path / "nowhere", "unused", tmp_path / "out")
    assert main(argv) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"iseg: error: --masks {tmp_path / 'nowhere'}: not a folder"
    )
