"""Tests for ``iseg.cli``: the ``iseg segment`` command on a tiny saved pipeline (128 px)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iseg import ISegPipeline
import iseg.cli
from iseg.cli import CommandError, main, output_names, parse_classes, save_atomic
from iseg.testing import tiny_components

CLASSES = ["cat", "potted plant"]  # "potted plant" is two tokens in the tiny tokenizer


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """The PyTorch reference ops: the CLI's wiring is under test, not the kernels (which
    tests/conftest.py defines for Triton's slow CPU interpreter on a machine without a GPU)."""
    monkeypatch.setenv("ISEG_OPS_BACKEND", "torch")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny model gains nothing from more, and OpenMP threads that
    spin while another process holds the cores made these tests 10× slower on 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[ISegPipeline, Path]:
    """The in-memory tiny pipeline and the folder it was saved to."""
    root = tmp_path_factory.mktemp("model")
    (root / "tokenizer-src").mkdir()
    pipe = ISegPipeline(**tiny_components(seed=0, tokenizer_dir=root / "tokenizer-src"))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root / "model")
    return pipe, root / "model"


@pytest.fixture(scope="module")
def rgb_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("images")
    paths = [root / "first.png", root / "second.jpg"]
    random_image("RGB", (56, 40), seed=1).save(paths[0])  # landscape, not a multiple of 8
    random_image("RGB", (48, 64), seed=2).save(paths[1], quality=95)  # portrait JPEG
    return paths


def command(images, model, out, *extra: str) -> list[str]:
    return [
        "segment", *map(str, images), "--classes", ",".join(CLASSES), "--model", str(model),
        "--out", str(out), "--device", "cpu", "--dtype", "fp32", *extra,
    ]  # fmt: skip


def read_labels(path: Path) -> tuple[Image.Image, torch.Tensor]:
    with Image.open(path) as image:
        image.load()
    return image, torch.from_numpy(np.asarray(image).astype(np.int64))


@pytest.fixture
def count_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Batch sizes of each ``ISegPipeline.__call__`` (which still runs)."""
    calls: list[int] = []
    original = ISegPipeline.__call__

    def spy(self, image, *args, **kwargs):
        calls.append(len(image) if isinstance(image, list) else 1)
        return original(self, image, *args, **kwargs)

    monkeypatch.setattr(ISegPipeline, "__call__", spy)
    return calls


def forbid_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(ISegPipeline, "from_pretrained", fail)


# --- the round trip -------------------------------------------------------------------------


def test_round_trip_matches_the_pipeline(saved, rgb_images, tmp_path, capsys):
    pipe, model = saved
    out = tmp_path / "out"
    assert main(command(rgb_images, model, out)) == 0
    assert sorted(os.listdir(out)) == sorted(  # and no temporary files left behind
        f"{stem}_{kind}.png" for stem in ("first", "second") for kind in ("labels", "overlay")
    )
    assert capsys.readouterr().err == (  # stderr is no terminal: no bars, one summary line
        f"iseg: segmented 2 images, skipped 0 already done; outputs in {out}\n"
    )

    loaded = ISegPipeline.from_pretrained(model, torch_dtype=torch.float32)
    loaded.set_progress_bar_config(disable=True)
    text = " ".join(CLASSES)
    assert loaded.tokenizer(text).input_ids == pipe.tokenizer(text).input_ids

    for index, path in enumerate(rgb_images):
        labels_png, cli_labels = read_labels(out / f"{path.stem}_labels.png")
        with Image.open(path) as image:
            image.load()
        assert labels_png.mode == "P"
        assert labels_png.size == image.size
        assert set(cli_labels.unique().tolist()) <= {0, 1, 2}
        with Image.open(out / f"{path.stem}_overlay.png") as overlay:
            assert (overlay.mode, overlay.size) == ("RGB", image.size)

        # The i-th image uses a CPU generator seeded with seed + i (seed 0 by default).
        direct = loaded(image, CLASSES, generator=torch.Generator().manual_seed(index)).labels[0]
        differ = int((cli_labels != direct).sum())
        assert differ == 0, f"{path.name}: {differ} of {direct.numel()} labels differ"
        # The in-memory pipeline has the same weights, yet its UNet output differs from the
        # reloaded one by ~1e-6 (float rounding), which flips a few near-tied pixels.
        memory = pipe(image, CLASSES, generator=torch.Generator().manual_seed(index)).labels[0]
        agree = (cli_labels == memory).float().mean().item()
        assert agree > 0.98, f"{path.name}: {agree:.1%} of the labels agree with the pipeline's"
        assert len(memory.unique()) > 1  # a non-trivial segmentation is compared


def test_resume_skips_done_images_and_overwrite_recomputes(
    saved, rgb_images, tmp_path, capsys, monkeypatch, count_calls
):
    _, model = saved
    out = tmp_path / "out"
    assert main(command(rgb_images, model, out)) == 0
    assert count_calls == [1, 1]
    outputs = sorted(out.iterdir())
    stamps = {p: p.stat().st_mtime_ns for p in outputs}

    # Everything done: nothing is loaded or computed, nothing rewritten.
    with monkeypatch.context() as patch:
        forbid_loading(patch)
        assert main(command(rgb_images, model, out)) == 0
    assert count_calls == [1, 1]
    assert {p: p.stat().st_mtime_ns for p in outputs} == stamps
    assert "segmented 0 images, skipped 2 already done" in capsys.readouterr().err

    # An interrupted run: the second image's overlay is missing, so only it is recomputed.
    (out / "second_overlay.png").unlink()
    assert main(command(rgb_images, model, out)) == 0
    assert count_calls == [1, 1, 1]
    assert (out / "first_labels.png").stat().st_mtime_ns == stamps[out / "first_labels.png"]
    assert (out / "second_overlay.png").is_file()
    assert "segmented 1 image, skipped 1 already done" in capsys.readouterr().err

    # --overwrite recomputes both, in one batch here, with the same result.
    before = {p.name: read_labels(p)[1] for p in outputs if p.name.endswith("_labels.png")}
    assert main(command(rgb_images, model, out, "--overwrite", "--batch-size", "2")) == 0
    assert count_calls == [1, 1, 1, 2]
    assert "segmented 2 images, skipped 0 already done" in capsys.readouterr().err
    for name, labels in before.items():
        # Batching changes the noise of no image (one generator each) but the float sums of
        # the batched convolutions, so a few near-tied pixels may flip.
        assert (read_labels(out / name)[1] == labels).float().mean() > 0.98


def test_mixed_modes_sizes_and_shared_stems(saved, tmp_path, count_calls):
    _, model = saved
    images = {
        tmp_path / "a" / "x.png": random_image("RGBA", (33, 47), seed=3),
        tmp_path / "b" / "x.png": random_image("L", (64, 24), seed=4),  # same stem as a/x.png
        tmp_path / "c" / "pal.gif": random_image("P", (40, 40), seed=5),
    }
    for path, image in images.items():
        path.parent.mkdir()
        image.save(path)
    out = tmp_path / "out"
    assert main(command(images, model, out, "--batch-size", "2")) == 0
    assert count_calls == [2, 1]
    for (path, image), name in zip(images.items(), ["x_0", "x_1", "pal"]):
        labels_png, labels = read_labels(out / f"{name}_labels.png")
        assert labels_png.mode == "P" and labels_png.size == image.size, path
        assert set(labels.unique().tolist()) <= {0, 1, 2}
        with Image.open(out / f"{name}_overlay.png") as overlay:
            assert overlay.size == image.size
    assert len(os.listdir(out)) == 6


def test_output_names_are_unique_and_stable():
    assert output_names(["a/x.png", "b/y.jpg"]) == ["x", "y"]
    assert output_names(["a/x.png", "b/x.png", "x_1.png"]) == ["x_0", "x_1", "x_1_2"]
    assert output_names(["A.png", "a.jpg"]) == ["A_0", "a_1"]  # case-insensitive file systems


def test_interrupted_run_resumes(saved, rgb_images, tmp_path, capsys, monkeypatch):
    _, model = saved
    out = tmp_path / "out"
    original = ISegPipeline.__call__
    calls = []

    def interrupt_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(ISegPipeline, "__call__", interrupt_second)
        assert main(command(rgb_images, model, out)) == 130
    assert "iseg: interrupted; rerun the same command to resume" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["first_labels.png", "first_overlay.png"]
    assert main(command(rgb_images, model, out)) == 0
    assert "segmented 1 image, skipped 1 already done" in capsys.readouterr().err
    assert len(os.listdir(out)) == 4


def test_save_atomic_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "x_labels.png"
    save_atomic(Image.new("P", (4, 3)), target)
    before = target.read_bytes()

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG truncated")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_atomic(Image.new("P", (4, 3)), target)
    assert target.read_bytes() == before  # the old file, whole
    assert os.listdir(tmp_path) == ["x_labels.png"]  # no temporary file left


@pytest.mark.parametrize(
    "cuda, extra, expected",
    [
        (False, [], ("cpu", torch.float32)),
        (True, [], ("cuda", torch.float16)),
        (True, ["--device", "cpu"], ("cpu", torch.float32)),
        (False, ["--dtype", "fp16"], ("cpu", torch.float16)),  # allowed, if slow
        (True, ["--device", "cuda:1", "--dtype", "bf16"], ("cuda:1", torch.bfloat16)),
    ],
)
def test_device_and_dtype_defaults(
    cuda, extra, expected, rgb_images, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    seen = []

    def fake_load(model, device, dtype):
        seen.append((device, dtype))
        raise CommandError("stop here")

    monkeypatch.setattr(iseg.cli, "load_pipeline", fake_load)
    argv = ["segment", str(rgb_images[0]), "--classes", "cat", "--out", str(tmp_path), *extra]
    assert main(argv) == 1
    assert seen == [expected]
    assert capsys.readouterr().err == "iseg: error: stop here\n"


def test_cuda_without_cuda_is_a_usage_error(rgb_images, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    forbid_loading(monkeypatch)
    argv = ["segment", str(rgb_images[0]), "--classes", "cat", "--out", str(tmp_path)]
    argv += ["--device", "cuda"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == "iseg: error: --device cuda: CUDA is not available; use --device cpu\n"


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["missing", "empty folder", "broken model_index.json"])
def test_unloadable_model_is_one_line(kind, rgb_images, tmp_path, capsys):
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    model = tmp_path / "nope"
    if kind != "missing":
        model.mkdir()
    if kind == "broken model_index.json":
        (model / "model_index.json").write_text("{not json")
    assert main(command(rgb_images, model, tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"iseg: error: cannot load model '{model}': ")
    assert "Traceback" not in err
    assert diffusers_logging.get_verbosity() == level  # restored
    assert diffusers_logging.is_progress_bar_enabled()


def test_unloadable_model_in_a_subprocess(rgb_images, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "iseg", *command(rgb_images[:1], "/nonexistent", tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == "iseg: error: cannot load model '/nonexistent': no such folder"


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
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"iseg: error: cannot read image '{text}': ")


@pytest.mark.parametrize("classes", [" , ", "", "cat,,dog", "cat, cat"])
def test_bad_classes_are_usage_errors(classes, rgb_images, capsys, monkeypatch):
    forbid_loading(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", str(rgb_images[0]), "--classes", classes])
    assert exit_info.value.code == 2
    assert "iseg segment: error: argument --classes:" in capsys.readouterr().err


def test_classes_that_do_not_fit_the_prompt(saved, rgb_images, tmp_path, capsys, count_calls):
    classes = ",".join(f"class{i}" for i in range(40))  # several tokens each: > 77 in all
    argv = command(rgb_images, saved[1], tmp_path / "out")
    argv[argv.index("--classes") + 1] = classes
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("iseg: error: --classes: "), err
    assert count_calls == []


@pytest.mark.parametrize(
    "extra", [[], ["--iters", "-1"], ["--gamma", "0"], ["--batch-size", "0"], ["--dtype", "fp64"]]
)
def test_bad_options_are_usage_errors(extra, rgb_images, monkeypatch):
    forbid_loading(monkeypatch)
    argv = ["segment", str(rgb_images[0]), "--classes", "cat", *extra] if extra else []
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2


def test_parse_classes_normalises_whitespace():
    assert parse_classes(" cat ,potted   plant,dog ") == ("cat", "potted plant", "dog")
