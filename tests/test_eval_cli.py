"""End-to-end tests of ``iseg eval``: tiny synthetic datasets, the tiny saved model through the
CLI, a fake pipeline whose predictions are known (so the IoU is), kill-and-resume, shards, and
bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iseg import ISegPipeline
from iseg.cli import main
from iseg.data.datasets import class_names, split_ids
from iseg.evaluate import EvalError, run_eval
from iseg.testing import tiny_components

from .test_datasets import label_image, make_context, make_voc, voc_label
from .test_evaluate import loop_confusion

VOC_IDS = split_ids("voc", "train")[:8]
BACKGROUND_ONLY = 2  # the third image has no object: WSSS skips it


def wsss_label(i: int, h: int, w: int) -> np.ndarray:
    if i == BACKGROUND_ONLY:
        label = np.zeros((h, w), np.uint8)
        label[0] = 255
        return label
    return voc_label(i, h, w, [1 + i % 20, 1 + (i + 5) % 20] if i % 3 == 0 else None)


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    monkeypatch.setenv("ISEG_OPS_BACKEND", "torch")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("model")
    (root / "tok").mkdir()
    ISegPipeline(**tiny_components(seed=0, tokenizer_dir=root / "tok")).save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("voc")
    return root, make_voc(root, VOC_IDS, label_fn=wsss_label, image_fn=label_image)


def cli(task, root, model, out, *extra) -> list[str]:
    return [
        "eval", task, "--root", str(root), "--model", str(model), "--out", str(out),
        "--device", "cpu", "--dtype", "fp32", "--recipe", "paper", "--workers", "0", "--quiet",
        *map(str, extra),
    ]  # fmt: skip


def recompute(out: Path, labels: dict, n: int) -> np.ndarray:
    """The split's confusion matrix from the written predictions, by a loop."""
    hist = np.zeros((n, n), np.int64)
    for image_id, gt in labels.items():
        path = out / "pred" / f"{image_id}.png"
        if path.is_file():
            hist += loop_confusion(gt, np.asarray(Image.open(path)), n)
    return hist


def authors_miou(hist: np.ndarray) -> float:
    diag, rows, cols = np.diag(hist), hist.sum(1), hist.sum(0)
    present = rows > 0
    return float(np.mean(diag[present] / (rows + cols - diag)[present])) * 100


# --- the tiny model through the CLI -----------------------------------------------------------


def test_voc_wsss_end_to_end(voc, model, tmp_path, capsys):
    root, labels = voc
    out = tmp_path / "out"
    assert main(cli("voc-wsss", root, model, out, "--limit", 6, "--batch-size", 2)) == 0
    stdout = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    six = dict(list(labels.items())[:6])
    # WSSS: one prediction per image with an object, none for the background-only one
    written = sorted(p.stem for p in (out / "pred").glob("*.png"))
    assert written == sorted(k for i, k in enumerate(six) if i != BACKGROUND_ONLY)
    assert metrics["images_scored"] == 5 and metrics["images_skipped"] == 1
    for image_id in written:
        pred = np.asarray(Image.open(out / "pred" / f"{image_id}.png"))
        gt = six[image_id]
        assert pred.shape == gt.shape  # at the ground truth's size
        assert set(np.unique(pred)) <= {0} | set(np.unique(gt)) - {255}  # classes = GT's
    hist = recompute(out, six, 21)
    assert metrics["miou"] == pytest.approx(authors_miou(hist))
    assert metrics["pixel_acc"] == pytest.approx(100 * np.trace(hist) / hist.sum())
    assert metrics["paper_miou"] == 75.2
    assert metrics["difference"] == pytest.approx(metrics["miou"] - 75.2)
    assert "paper 75.2" in stdout and "background" in stdout
    assert "| mIoU (authors: classes in GT) |" in (out / "metrics.md").read_text()


# --- a fake pipeline: known predictions ----------------------------------------------------------


class FakePipe:
    """Reads the ground truth back from the red channel (4 × class id) and predicts it, except
    that ``drop`` classes are predicted as background. Records the class lists it was given."""

    _execution_device = torch.device("cpu")

    def __init__(self, dataset: str, drop=()):
        self.ids = {name: k + 1 for k, name in enumerate(class_names(dataset))}
        self.drop = set(drop)
        self.calls: list[list[str]] = []

    def __call__(self, image, classes, generator=None):
        labels = []
        for b, names in enumerate(classes):
            self.calls.append(list(names))
            ids = torch.round(image[b, 0] * 255 / 4).long()
            label = torch.zeros_like(ids)
            for k, name in enumerate(names, 1):
                if self.ids[name] not in self.drop:
                    label[ids == self.ids[name]] = k
            labels.append(label)
        return type("Out", (), {"labels": labels})()


def test_known_iou_with_a_fake_pipeline(voc, tmp_path):
    root, labels = voc
    perfect = run_eval("voc-wsss", root, tmp_path / "a", pipe=FakePipe("voc"), limit=8, workers=0, progress=False)
    assert perfect.metrics["miou"] == pytest.approx(100.0) and perfect.metrics["pixel_acc"] == 100.0
    # Drop class 1 (the first image's square): its pixels become background.
    run = run_eval("voc-wsss", root, tmp_path / "b", pipe=FakePipe("voc", drop={1}), limit=8, workers=0,
                   progress=False)  # fmt: skip
    m = run.metrics
    gt = labels[VOC_IDS[0]]
    lost = int((gt == 1).sum())
    assert lost > 0 and all(not (labels[k] == 1).any() for k in VOC_IDS[1:])
    hist = np.zeros((21, 21), np.int64)
    for i, g in enumerate(labels.values()):
        if i == BACKGROUND_ONLY:
            continue  # skipped by WSSS: its pixels are not scored
        valid = g != 255
        np.add.at(hist, (g[valid], np.where(g[valid] == 1, 0, g[valid])), 1)
    background = hist[0, 0] / (hist[0, 0] + lost)  # class 1's pixels are false background
    present = int((hist.sum(1) > 0).sum())
    expected = (background + 0.0 + (present - 2) * 1.0) / present
    assert m["miou"] == pytest.approx(100 * expected)
    assert m["per_class"][1]["iou"] == 0.0 and m["per_class"][0]["iou"] == pytest.approx(100 * background)


def test_ovs_classes_from_tags_in_id_order(tmp_path):
    ids = split_ids("voc_context", "val")[:3]
    make_context(tmp_path / "ctx", ids, order="mmseg", image_fn=label_image)
    tags = tmp_path / "tags.txt"
    tags.write_text(f"{ids[0]} 57 10 19\n{ids[1]} 0\n")  # ids[2] untagged: all background
    pipe = FakePipe("voc_context")
    run = run_eval("context-ovs", tmp_path / "ctx", tmp_path / "out", pipe=pipe, tags=tags, limit=3, workers=0,
                   progress=False)  # fmt: skip
    names = class_names("voc_context")
    assert pipe.calls == [[names[10], names[19], names[57]], [names[0]]]  # ascending ids
    assert run.metrics["settings"]["context_order"] == "mmseg"
    pred = np.asarray(Image.open(tmp_path / "out" / "pred" / f"{ids[0]}.png"))
    assert set(np.unique(pred)) == {0, 11, 20, 58}  # mapped back to (official) dataset ids
    assert not np.asarray(Image.open(tmp_path / "out" / "pred" / f"{ids[2]}.png")).any()
    # Without --tags the built-in tagger runs; its weights missing (offline, a folder that does
    # not exist) end the run with one error that also names --tags.
    with pytest.raises(EvalError, match=r"cannot load the CLIP tagger.*give --tags FILE"):
        run_eval("context-ovs", tmp_path / "ctx", tmp_path / "out2", pipe=pipe, limit=3, workers=0,
                 progress=False, tagger_model=str(tmp_path / "no-clip"))  # fmt: skip


def test_ovs_builtin_tagger_hook(tmp_path, monkeypatch):
    ids = split_ids("voc_context", "val")[:2]
    make_context(tmp_path / "ctx", ids, image_fn=label_image)
    seen = []

    def fake_tagger(task, device=None, model=None):
        def tag(image):
            seen.append(image.shape)
            return (20, 11)  # any order: the runner sorts

        return tag

    monkeypatch.setattr("iseg.evaluate.builtin_tagger", fake_tagger)
    pipe = FakePipe("voc_context")
    run = run_eval("context-ovs", tmp_path / "ctx", tmp_path / "out", pipe=pipe, limit=2, workers=0, progress=False)
    names = class_names("voc_context")
    assert pipe.calls == [[names[10], names[19]]] * 2 and seen == [(24, 32, 3)] * 2
    tags = run.metrics["settings"]["tags"]
    assert tags["tagger"] == "builtin" and tags["model"] == "openai/clip-vit-base-patch16"
    assert (tags["preset"], tags["r_cwr"], tags["w_local"], tags["w_crop"], tags["r_final"]) == ("context", 0.2, 0.5, 0.5, 0.2)
    # Issue 18 §5: another tagger's predictions never mix into this metric; a model folder is
    # recorded as its resolved path.
    folder = tmp_path / "clip"
    folder.mkdir()
    with pytest.raises(EvalError, match="other settings.*tags"):
        run_eval("context-ovs", tmp_path / "ctx", tmp_path / "out", pipe=pipe, limit=2, workers=0,
                 progress=False, tagger_model=str(folder))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    run = run_eval("context-ovs", tmp_path / "ctx", tmp_path / "out2", pipe=pipe, limit=2, workers=0,
                   progress=False, tagger_model="./clip")  # fmt: skip
    assert run.metrics["settings"]["tags"]["model"] == str(folder.resolve())


# --- resume, shards ------------------------------------------------------------------------------


def test_kill_and_resume_gives_the_same_metrics(voc, model, tmp_path):
    root, _ = voc
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    args = cli("voc-wsss", root, model, resumed, "--limit", len(VOC_IDS))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ISEG_OPS_BACKEND": "torch"}
    proc = subprocess.Popen([sys.executable, "-m", "iseg", *args], env=env, stderr=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list((resumed / "pred").glob("*.png"))) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((resumed / "pred").glob("*.png")))
    assert 2 <= done < len(VOC_IDS) - 1 and not (resumed / "metrics.json").exists()
    assert main(args) == 0  # resumes: the rest only
    assert main(cli("voc-wsss", root, model, clean, "--limit", len(VOC_IDS))) == 0
    assert (resumed / "metrics.json").read_text() == (clean / "metrics.json").read_text()
    assert not list((resumed / "pred").glob(".*"))  # no temporary file left


def test_two_shards_equal_one(voc, tmp_path, monkeypatch):
    root, _ = voc
    one = run_eval("voc-wsss", root, tmp_path / "one", pipe=FakePipe("voc", drop={3}), limit=8, workers=0,
                   progress=False)  # fmt: skip
    sharded = tmp_path / "sharded"
    first = run_eval("voc-wsss", root, sharded, pipe=FakePipe("voc", drop={3}), num_shards=2, shard_index=1,
                     limit=8, workers=0, progress=False)  # fmt: skip
    assert first.metrics is None and not (sharded / "metrics.json").exists()  # waits for shard 0
    last = run_eval("voc-wsss", root, sharded, pipe=FakePipe("voc", drop={3}), num_shards=2, shard_index=0,
                    limit=8, workers=0, progress=False)  # fmt: skip
    assert last.scored_by_this_process and first.predicted + last.predicted == one.predicted
    assert last.metrics == one.metrics
    # a rerun without shard flags only scores: the model is never loaded
    def no_model():
        raise AssertionError("the model was loaded")

    again = run_eval("voc-wsss", root, sharded, load_pipe=no_model, limit=8, workers=1, progress=False)
    assert again.predicted == 0 and again.metrics == one.metrics


def test_shards_from_launcher_environment():
    import argparse

    from iseg.commands.eval import shards_from

    args = argparse.Namespace(num_shards=None, shard_index=None)
    assert shards_from(args, {"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}) == (4, 2, 0)
    assert shards_from(args, {}) == (1, 0, None)
    assert shards_from(argparse.Namespace(num_shards=3, shard_index=1), {"WORLD_SIZE": "4"}) == (3, 1, None)


# --- bad input ---------------------------------------------------------------------------------


def test_bad_root_and_missing_list(voc, model, tmp_path, capsys):
    root, _ = voc
    assert main(cli("voc-wsss", tmp_path / "nowhere", model, tmp_path / "o")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"dataset root {tmp_path / 'nowhere'} not found" in err
    assert main(cli("voc-wsss", root, model, tmp_path / "o", "--list", tmp_path / "ids.txt")) == 1
    assert f"split list {tmp_path / 'ids.txt'} not found" in capsys.readouterr().err
    # OVS without --tags: the built-in tagger would run, but the val images are missing here
    # and that is found first, before any weights load.
    assert main(cli("voc-ovs", root, model, tmp_path / "o")) == 1
    err = capsys.readouterr().err
    assert err.count("iseg: error:") == 1 and "JPEGImages" in err
    assert not (tmp_path / "o" / "pred").exists()


def test_changed_settings_refused(voc, tmp_path):
    root, _ = voc
    run_eval("voc-wsss", root, tmp_path / "o", pipe=FakePipe("voc"), limit=2, workers=0, progress=False)
    with pytest.raises(EvalError, match="other settings .*recipe: 'voc-wsss' → 'paper'"):
        run_eval("voc-wsss", root, tmp_path / "o", pipe=FakePipe("voc"), recipe="paper", limit=2, workers=0,
                 progress=False)  # fmt: skip


def test_broken_files_are_reported_and_the_run_goes_on(tmp_path, capsys, monkeypatch):
    ids = VOC_IDS[:5]
    labels = make_voc(tmp_path / "voc", ids, label_fn=wsss_label, image_fn=label_image)
    base = tmp_path / "voc" / "VOCdevkit" / "VOC2012"
    jpeg = base / "JPEGImages" / f"{ids[0]}.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:200])  # truncated
    Image.fromarray(np.ones((5, 7), np.uint8)).save(base / "SegmentationClassAug" / f"{ids[1]}.png")  # size
    bad = labels[ids[3]].copy()
    bad[5, 5] = 42
    Image.fromarray(bad).save(base / "SegmentationClassAug" / f"{ids[3]}.png")  # out of range
    run = run_eval("voc-wsss", tmp_path / "voc", tmp_path / "o", pipe=FakePipe("voc"), limit=5, workers=1,
                   progress=False)  # fmt: skip
    assert set(run.failures) == {ids[0], ids[1], ids[3]}
    assert f"{ids[0]}.jpg: cannot read the image" in run.failures[ids[0]]
    assert f"{ids[1]}.png: label is 5×7 but the image" in run.failures[ids[1]]
    assert f"{ids[3]}.png: label value 42 outside [0, 21)" in run.failures[ids[3]]
    m = run.metrics
    assert m["images_scored"] == 1 and m["images_skipped"] == 1 and set(m["failures"]) == set(run.failures)
    assert m["miou"] == pytest.approx(100.0) and not run.ok
    # the same through the CLI: non-zero exit, one error line per file, the metric still printed
    monkeypatch.setattr("iseg.commands._common.check_model_folder", lambda model: None)
    monkeypatch.setattr("iseg.commands._common.load_pipeline", lambda *a: FakePipe("voc"))
    capsys.readouterr()
    argv = cli("voc-wsss", tmp_path / "voc", "fake", tmp_path / "o2", "--limit", 5)
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "mIoU 100.00" in captured.out
    assert captured.err.count("iseg: error:") == 4 and f"{ids[3]}.png" in captured.err


# --- unsupervised (Table 3) ----------------------------------------------------------------------


class FakeUnsupervised:
    """``segment_unsupervised`` that returns the (cropped) ground truth under renamed segment
    ids, with the ids of ``merge`` classes merged into one segment."""

    _execution_device = torch.device("cpu")

    def __init__(self, merge=()):
        self.merge = set(merge)
        self.shapes = []

    def segment_unsupervised(self, image, kl_threshold, first_pass="fp32"):
        self.shapes.append((tuple(image.shape), kl_threshold))
        self.first_pass = first_pass
        ids = torch.round(image[:, 0] * 255 / 4).long()  # the red channel: 4 × labelId
        segments = (ids * 7 + 3) % 256  # a renaming: Hungarian matching must undo it
        for c in self.merge:
            segments[ids == c] = (min(self.merge) * 7 + 3) % 256
        dropped = [3 if first_pass == "fp16" else 0] * len(segments)  # as Google's pass would report
        return type("Out", (), {"labels": segments, "dropped_anchors": dropped})()


def make_cityscapes(root: Path, frames, size=(512, 600)):  # the crop is then 512² as is
    labels = {}
    for i, frame in enumerate(frames):
        h, w = size
        label = np.full((h, w), 7, np.uint8)  # road
        label[:, w // 2 - 8 : w // 2 + 4] = 11 + i  # building / wall ... in the centre crop
        label[:4] = 1  # ego vehicle: ignored
        label[:, :10] = 26  # car, left: outside the centre crop (cropped away)
        for folder, suffix, image in (
            ("leftImg8bit", "_leftImg8bit.png", label_image(i, label)),
            ("gtFine", "_gtFine_labelIds.png", Image.fromarray(label)),
        ):
            path = root / folder / "val" / f"{frame}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
        labels[frame] = label
    return labels


def test_unsupervised_cityscapes_with_hungarian_matching(tmp_path):
    frames = ["frankfurt/frankfurt_000000_000294", "lindau/lindau_000001_000019"]
    make_cityscapes(tmp_path / "cs", frames)
    pipe = FakeUnsupervised()
    run = run_eval("cityscapes", tmp_path / "cs", tmp_path / "out", pipe=pipe, workers=0, progress=False)
    m = run.metrics
    assert pipe.shapes == [((1, 3, 512, 512), 0.9)] * 2  # centre crop at 512, Cityscapes τ
    assert m["images_scored"] == 2 and m["miou"] == 100.0 and m["pixel_acc"] == 100.0
    present = [c["name"] for c in m["per_class"] if c["present"]]
    assert present == ["road", "building", "wall"]  # labelIds 7, 11, 12 → 0, 4, 5; car cropped away
    # merging road and building into one segment: one of them is lost per image
    merged = run_eval("cityscapes", tmp_path / "cs", tmp_path / "out2", pipe=FakeUnsupervised(merge={7, 11}),
                      workers=0, progress=False).metrics  # fmt: skip
    assert merged["per_class"][0]["iou"] < 100.0 and merged["pixel_acc"] < 100.0
    pred = np.asarray(Image.open(tmp_path / "out2" / "pred" / f"{frames[0]}.png"))
    assert pred.shape == (512, 512)
    # Issue 21 §5: Google's fp16 first pass by default, its dropped anchors counted (recorded with
    # each prediction, so a rerun that only scores still reports them); fp32 on request.
    assert pipe.first_pass == "fp16" and m["first_pass"] == "fp16"
    assert m["anchors_dropped"] == 6 and m["images_with_anchors_dropped"] == 2
    again = run_eval("cityscapes", tmp_path / "cs", tmp_path / "out", pipe=None, workers=0, progress=False)
    assert again.predicted == 0 and again.metrics["anchors_dropped"] == 6
    assert "6 anchor(s) dropped for fp16 underflow in 2 image(s)" in (tmp_path / "out" / "metrics.md").read_text()
    fp32 = FakeUnsupervised()
    m32 = run_eval("cityscapes", tmp_path / "cs", tmp_path / "out3", pipe=fp32, first_pass="fp32", workers=0,
                   progress=False).metrics  # fmt: skip
    assert fp32.first_pass == "fp32" and m32["anchors_dropped"] == 0 and m32["settings"]["first_pass"] == "fp32"


def test_unsupervised_crops_raise_no_torch_warning(tmp_path):
    """Issue 21 §3: a full-width crop of PIL's read-only buffer went to torch as is, and torch
    warned "The given NumPy array is not writable" (once per process: checked in a fresh one)."""
    code = (
        "import numpy as np, warnings\n"
        "from PIL import Image\n"
        "from iseg.data.datasets import center_crop_resize\n"
        "from iseg.evaluate import _read_gt\n"
        "image = np.asarray(Image.new('RGB', (8, 12)))\n"  # 12×8: the crop keeps the full width
        "label = np.asarray(Image.new('L', (8, 12)))\n"
        "assert not image.flags.writeable\n"
        "center_crop_resize(image, label, 16)\n"
        "class Ds:\n"
        "    def read_label(self, i): return label\n"
        "_read_gt(Ds(), 'x', 'unsupervised')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "not writable" not in done.stderr


def test_stale_temporary_files_of_dead_local_writers_are_removed(tmp_path):
    from iseg.evaluate import _HOST, _remove_stale_temps, _write_atomic

    _write_atomic(tmp_path / "city" / "frame.png", b"png")  # folders in ids are created
    assert (tmp_path / "city" / "frame.png").read_bytes() == b"png"
    dead = tmp_path / "city" / f".frame.png.{_HOST}-999999999-0123abcd.iseg-tmp"  # no such pid
    remote = tmp_path / "city" / ".frame.png.otherhost-999999999-0123abcd.iseg-tmp"  # another machine's
    alive = tmp_path / f".x.png.{_HOST}-1-0123abcd.iseg-tmp"  # pid 1 runs
    for path in (dead, remote, alive):
        path.write_bytes(b"")
    _remove_stale_temps(tmp_path)
    assert not dead.exists() and remote.exists() and alive.exists()
