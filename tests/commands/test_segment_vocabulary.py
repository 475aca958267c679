"""``iseg segment --vocabulary``: tag each image with the CLIP tagger, then segment what was
found; label ids are vocabulary ids. And the CLI's default batch size."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from iseg import ISegPipeline
from iseg.cli import main
from iseg.commands import _common
from iseg.hub import dtype_keyword
from iseg.tagger import CLIPTagger, tag_classes

from ..conftest import make_image


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    monkeypatch.setenv("ISEG_OPS_BACKEND", "torch")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, saved_model, saved_tagger):
    """A folder with two images and a vocabulary file, ``model`` (the tiny pipeline) and ``clip``
    (the tiny tagger) linked in."""
    root = tmp_path_factory.mktemp("vocab")
    (root / "model").symlink_to(saved_model, target_is_directory=True)
    (root / "clip").symlink_to(saved_tagger, target_is_directory=True)
    images = []
    for i in range(2):
        path = root / f"img{i}.png"
        make_image(i + 1, size=(64, 80)).save(path)
        images.append(path)
    (root / "vocab.txt").write_text("cat\ndog\nperson\nsky\n")
    return root, images


def test_vocabulary_labels_are_vocabulary_ids(folders, tmp_path):
    root, images = folders
    out = tmp_path / "out"
    args = [
        "segment", *map(str, images), "--vocabulary", str(root / "vocab.txt"), "--model", str(root / "model"),
        "--tagger-model", str(root / "clip"), "--out", str(out), "--device", "cpu", "--dtype", "fp32",
        "--seed", "0", "--no-overlay",
    ]  # fmt: skip
    assert main(args) == 0
    # Independently: the same tagger and pipeline, classes = the tags, label k → vocabulary id.
    vocabulary = ["cat", "dog", "person", "sky"]
    clip = CLIPTagger.from_pretrained(root / "clip")
    pipe = ISegPipeline.from_pretrained(root / "model", **{dtype_keyword(): torch.float32})
    pipe.set_progress_bar_config(disable=True)
    for i, path in enumerate(images):
        image = Image.open(path).convert("RGB")
        tags = tag_classes(clip, [image], vocabulary)[0]
        labels = pipe(image, tags, generator=torch.Generator().manual_seed(i)).labels[0]
        lut = torch.tensor([0] + [vocabulary.index(t) + 1 for t in tags])
        written = np.asarray(Image.open(out / f"img{i}_labels.png"))
        assert np.array_equal(written, lut[labels].numpy().astype(np.uint8))
        assert set(np.unique(written)) <= {0} | {vocabulary.index(t) + 1 for t in tags}


def test_classes_or_vocabulary_exactly_one(folders, tmp_path, capsys):
    root, images = folders
    base = ["segment", str(images[0]), "--model", str(root / "model"), "--out", str(tmp_path / "o")]
    assert main(base) == 2
    assert main([*base, "--classes", "cat", "--vocabulary", "voc"]) == 2
    assert main([*base, "--vocabulary", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err
    assert err.count("iseg: error:") == 3 and "Traceback" not in err
    assert "--vocabulary" in err.splitlines()[-1]


def test_default_batch_size_is_eight_on_cuda_one_elsewhere():
    args = argparse.Namespace(batch_size=None)
    assert _common.batch_size(args, "cuda:0") == 8 and _common.batch_size(args, "cpu") == 1
    assert _common.batch_size(argparse.Namespace(batch_size=3), "cuda") == 3


def test_a_vocabulary_name_clip_cannot_hold_is_one_usage_error_before_writing(folders, tmp_path, capsys):
    """Not silently truncated by the tagger: one line after the models load, nothing written."""
    root, images = folders
    vocab = tmp_path / "long.txt"
    vocab.write_text("cat\n" + " ".join(["dog"] * 80) + "\n")
    out = tmp_path / "out"
    args = ["segment", *map(str, images), "--vocabulary", str(vocab), "--model", str(root / "model"),
            "--tagger-model", str(root / "clip"), "--out", str(out), "--device", "cpu", "--dtype", "fp32"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("iseg: error: --vocabulary: class name 'dog dog")
    assert "over the CLIP text encoder's limit of 77" in err[0]
    assert not out.exists() or not list(out.glob("*.png"))
