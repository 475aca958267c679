"""End-to-end tests of ``iseg eval``: tiny synthetic datasets, the tiny saved model through the
CLI, a fake pipeline whose predictions are known (so the IoU is), kill-and-resume, shards, and
bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iseg.cli import main
from iseg.data.datasets import class_names, split_ids
from iseg.evaluate import EvalError, run_eval

from ..data.test_datasets import label_image, make_context, make_voc, voc_label
from .test_metrics import loop_confusion

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
def model(saved_model) -> Path:
    return saved_model


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("voc")
    return root, make_voc(root, VOC_IDS, label_fn=wsss_label, image_fn=label_image)


def wait_for(condition, proc, timeout: float = 120.0) -> None:
    """Poll ``condition()`` until it holds (fails after ``timeout`` s or if ``proc`` ends)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None and time.monotonic() < deadline, "the condition never held"
        time.sleep(0.01)


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

    def __call__(self, image, classes, generator=None, recipe=None, output_heatmaps=True):
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


def test_builtin_tagger_gives_the_datasets_1_based_ids_and_loads_once(monkeypatch):
    # VOC's ids by hand (aeroplane 1, bus 6, cat 8): the tagger's names, not its indices.
    from iseg.evaluate.tasks import builtin_tagger, get_task
    from iseg.tagger import CLIPTagger, TagResult

    loads = []

    class FakeTagger:
        def __call__(self, image, preset):
            assert preset == "voc"
            return TagResult(tags=["aeroplane", "bus", "cat"], scores=np.zeros(20, np.float32), indices=[0, 5, 7])

    monkeypatch.setattr(CLIPTagger, "from_pretrained", lambda *a, **k: loads.append(a) or FakeTagger())
    tag = builtin_tagger(get_task("voc-ovs"), model="clip")
    image = np.zeros((4, 4, 3), np.uint8)
    assert tag(image) == tag(image) == (1, 6, 8)
    assert len(loads) == 1
    assert builtin_tagger(get_task("cityscapes")) is None


def test_ovs_builtin_tagger_hook(tmp_path, monkeypatch):
    ids = split_ids("voc_context", "val")[:2]
    make_context(tmp_path / "ctx", ids, image_fn=label_image)
    seen = []

    def fake_tagger(task, device=None, model=None):
        def tag(image):
            seen.append(image.shape)
            return (20, 11)  # any order: the runner sorts

        return tag

    monkeypatch.setattr("iseg.evaluate.running.builtin_tagger", fake_tagger)
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
    # The run blocks in its third model call (one image per call) and says so; it is killed
    # once the first two predictions are on disk: deterministic, whatever the machine's speed.
    script = textwrap.dedent(
        f"""
        import threading
        from iseg import ISegPipeline
        from iseg.cli import main
        original, calls = ISegPipeline.__call__, []
        def blocking(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                print("third", flush=True)
                threading.Event().wait()
            return original(self, *args, **kwargs)
        ISegPipeline.__call__ = blocking
        raise SystemExit(main({args!r}))
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ISEG_OPS_BACKEND": "torch"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "third", "the run ended before its third image"
        wait_for(lambda: len(list((resumed / "pred").glob("*.png"))) == 2, proc)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    done = len(list((resumed / "pred").glob("*.png")))
    assert done == 2 and not (resumed / "metrics.json").exists()
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
    monkeypatch.setattr("iseg.commands._model.check_model_folder", lambda model: None)
    monkeypatch.setattr("iseg.commands._model.load_pipeline", lambda *a, **k: FakePipe("voc"))
    capsys.readouterr()
    argv = cli("voc-wsss", tmp_path / "voc", "fake", tmp_path / "o2", "--limit", 5)
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "mIoU 100.00" in captured.out
    assert captured.err.count("iseg: error:") == 4 and f"{ids[3]}.png" in captured.err


class FailOn(FakePipe):
    """FakePipe that raises on images whose class lists hold ``bad`` (every image when ``bad``
    is ``None``)."""

    def __init__(self, bad=None):
        super().__init__("voc")
        self.bad = bad

    def __call__(self, image, classes, **kwargs):
        if self.bad is None or any(self.bad in names for names in classes):
            raise RuntimeError("CUDA error: an illegal memory access")
        return super().__call__(image, classes, **kwargs)


def test_a_model_failure_fails_its_image_only_and_a_broken_model_ends_the_run(voc, tmp_path):
    root, labels = voc
    names = class_names("voc")
    present = {i: set(np.unique(labels[i])) - {0, 255} for i in VOC_IDS}
    bad = names[int(min(present[VOC_IDS[0]])) - 1]  # the first image's first class fails the model
    failing = {i for i in VOC_IDS if names.index(bad) + 1 in present[i]}
    # the first batch of 4 holds images that do not fail: they are predicted all the same
    assert failing and len(failing & set(VOC_IDS[:4])) < len([i for i in VOC_IDS[:4] if present[i]])
    pipe = FailOn(bad)
    run = run_eval("voc-wsss", root, tmp_path / "o", pipe=pipe, limit=8, batch_size=4, workers=0, progress=False)
    assert set(run.failures) == failing
    assert all(m.endswith("RuntimeError: CUDA error: an illegal memory access") for m in run.failures.values())
    predicted = {i for i in VOC_IDS if present[i]} - failing
    assert run.predicted == len(predicted) and run.skipped == 1
    assert {p.stem for p in (tmp_path / "o" / "pred").glob("*.png")} == predicted
    # a model that fails on every image ends the run after the first three, with one error
    with pytest.raises(EvalError, match=r"^the model failed on the first 3 images \(last: RuntimeError: CUDA"):
        run_eval("voc-wsss", root, tmp_path / "broken", pipe=FailOn(), limit=8, workers=0, progress=False)
    assert not list((tmp_path / "broken" / "pred").glob("*.png"))


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
        "from iseg.evaluate.samples import _read_gt\n"
        "image = np.asarray(Image.new('RGB', (8, 12)))\n"  # 12×8: the crop keeps the full width
        "label = np.asarray(Image.new('L', (8, 12)))\n"
        "assert not image.flags.writeable\n"
        "center_crop_resize(image, label, 16)\n"
        "class Ds:\n"
        "    def read_label(self, i): return label\n"
        "_read_gt(Ds(), 'x', 'unsupervised')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "not writable" not in done.stderr


def test_stale_temporary_files_of_dead_local_writers_are_removed(tmp_path):
    from iseg.evaluate.running import _write_atomic
    from iseg.files import HOST, remove_stale_temps

    _write_atomic(tmp_path / "city" / "frame.png", b"png")  # folders in ids are created
    assert (tmp_path / "city" / "frame.png").read_bytes() == b"png"
    dead = tmp_path / "city" / f".frame.png.{HOST}-999999999-0123abcd.iseg-tmp"  # no such pid
    remote = tmp_path / "city" / ".frame.png.otherhost-999999999-0123abcd.iseg-tmp"  # another machine's
    alive = tmp_path / f".x.png.{HOST}-1-0123abcd.iseg-tmp"  # pid 1 runs
    for path in (dead, remote, alive):
        path.write_bytes(b"")
    remove_stale_temps(tmp_path, recursive=True)
    assert not dead.exists() and remote.exists() and alive.exists()


# --- issue 21 §3 / issue 18 §2, §4, §11: the silent paths ----------------------------------------


def test_tags_ids_that_match_nothing_are_an_error(tmp_path):
    ids = split_ids("voc", "val")[:3]
    make_voc(tmp_path / "voc", ids, image_fn=label_image)
    tags = tmp_path / "tags.txt"
    tags.write_text("".join(f"{i.split('_')[1]} 0\n" for i in ids))  # '000033' for '2007_000033'
    with pytest.raises(EvalError) as info:
        run_eval("voc-ovs", tmp_path / "voc", tmp_path / "o", pipe=FakePipe("voc"), tags=tags, limit=3,
                 workers=0, progress=False)  # fmt: skip
    message = str(info.value)
    assert "3 of its 3 ids match no image" in message and repr(ids[0].split("_")[1]) in message
    assert "2007_" in message  # what the split's ids look like
    assert not (tmp_path / "o" / "pred").exists()


def test_untagged_images_are_counted_and_published_coverage_reported(tmp_path):
    ids = split_ids("voc", "val")[:4]
    make_voc(tmp_path / "voc", ids, image_fn=label_image)
    tags = tmp_path / "tags.txt"
    tags.write_text(f"{ids[0]} 0\n{ids[2]} 1\n")
    logged = []
    run = run_eval("voc-ovs", tmp_path / "voc", tmp_path / "o", pipe=FakePipe("voc"), tags=tags, limit=4,
                   workers=0, progress=False, log=logged.append)  # fmt: skip
    m = run.metrics
    assert m["images_untagged"] == 2 and m["images_scored"] == 4
    assert m["tags_cover"] == f"tags.txt tags cover 2 of the {len(split_ids('voc', 'val'))} split images"
    assert any("2 of the 4 images have no tags" in line for line in logged)
    assert "2 image(s) of this run had no tags" in (tmp_path / "o" / "metrics.md").read_text()
    published = [w.split()[0] for w in (Path(__file__).parents[2] / "iseg/data/ovs_labels/voc_context_val_tagclip.txt")
                 .read_text().splitlines() if w.strip()]  # fmt: skip
    ctx = split_ids("voc_context", "val")[:2]
    make_context(tmp_path / "ctx", ctx, image_fn=label_image)
    m = run_eval("context-ovs", tmp_path / "ctx", tmp_path / "o2", pipe=FakePipe("voc_context"), tags="published",
                 limit=2, workers=0, progress=False, log=logged.append).metrics  # fmt: skip
    total = len(split_ids("voc_context", "val"))
    assert m["tags_cover"] == f"published tags cover {len(set(published))} of the {total} split images"


def test_manifest_records_root_and_checksums_repredicts_what_changed(voc, tmp_path):
    root, labels = voc
    out = tmp_path / "o"
    first = run_eval("voc-wsss", root, out, pipe=FakePipe("voc"), limit=6, workers=0, progress=False)
    manifest = json.loads((out / "eval.json").read_text())
    assert manifest["root"] == str(root.resolve())
    records = [json.loads(line) for f in (out / "records").glob("*.jsonl") for line in f.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(p.stem for p in (out / "pred").glob("*.png"))
    altered, truncated = VOC_IDS[0], VOC_IDS[1]
    png = out / "pred" / f"{altered}.png"
    Image.fromarray(np.zeros_like(np.asarray(Image.open(png)))).save(png)  # readable, but not ours
    (out / "pred" / f"{truncated}.png").write_bytes(b"\x89PNG\r\n")  # unreadable
    pipe = FakePipe("voc")
    again = run_eval("voc-wsss", root, out, pipe=pipe, limit=6, workers=0, progress=False)
    assert again.predicted == 2 and len(pipe.calls) == 2  # exactly the two, predicted again
    assert again.metrics["miou"] == first.metrics["miou"] and not again.metrics["failures"]
    # a prediction changed between predicting and scoring is refused, not scored
    from iseg.data.datasets import open_dataset
    from iseg.evaluate import get_task, score
    from iseg.evaluate.running import _Records

    Image.fromarray(np.zeros_like(np.asarray(Image.open(png)))).save(png)
    m = score(get_task("voc-wsss"), open_dataset("voc", root), VOC_IDS[:6], out, workers=0,
              records=_Records(out / "records").load())  # fmt: skip
    assert "not the prediction iseg eval wrote" in m["failures"][altered] and m["images_error"] == 1
    # the same predictions against another copy of the data: refused, or started over
    copy = tmp_path / "copy"
    make_voc(copy, VOC_IDS[:6], label_fn=wsss_label, image_fn=label_image)
    with pytest.raises(EvalError, match="other settings .*root"):
        run_eval("voc-wsss", copy, out, pipe=FakePipe("voc"), limit=6, workers=0, progress=False)
    redo = run_eval("voc-wsss", copy, out, pipe=FakePipe("voc"), limit=6, workers=0, progress=False, overwrite=True)
    assert redo.predicted == 5 and json.loads((out / "eval.json").read_text())["root"] == str(copy.resolve())


def test_a_failed_first_run_locks_nothing_and_overwrite_starts_over(voc, tmp_path, capsys, monkeypatch):
    root, _ = voc

    def broken():
        raise RuntimeError("weights missing")

    with pytest.raises(RuntimeError):
        run_eval("voc-wsss", root, tmp_path / "o", load_pipe=broken, settings={"model": "a"}, limit=2,
                 workers=0, progress=False)  # fmt: skip
    run = run_eval("voc-wsss", root, tmp_path / "o", pipe=FakePipe("voc"), settings={"model": "b"}, limit=2,
                   workers=0, progress=False)  # fmt: skip
    assert run.metrics is not None and json.loads((tmp_path / "o" / "eval.json").read_text())["model"] == "b"
    # through the CLI: other settings are refused, --overwrite starts over
    monkeypatch.setattr("iseg.commands._model.load_pipeline", lambda *a, **k: FakePipe("voc"))
    argv = cli("voc-wsss", root, "fake", tmp_path / "c", "--limit", 2)
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv, "--recipe", "voc-wsss"]) == 1
    assert "use --overwrite" in capsys.readouterr().err
    assert main([*argv, "--recipe", "voc-wsss", "--overwrite"]) == 0
    assert json.loads((tmp_path / "c" / "eval.json").read_text())["recipe"] == "voc-wsss"


@pytest.mark.parametrize("bad", ["../escape", "a/b", "/etc/passwd", "x\\..\\y", ".hidden"])
def test_list_ids_never_leave_out(voc, tmp_path, capsys, monkeypatch, bad):
    root, _ = voc
    listing = tmp_path / "ids.txt"
    listing.write_text(f"{VOC_IDS[0]}\n{bad}\n")
    monkeypatch.setattr("iseg.commands._model.load_pipeline", lambda *a, **k: FakePipe("voc"))
    assert main(cli("voc-wsss", root, "fake", tmp_path / "o", "--list", listing)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"ids.txt:2: image id {bad!r}" in err[0]
    assert not (tmp_path / "o").exists()


def test_eval_full_disk_is_one_line_keeps_finished_predictions(voc, tmp_path, capsys, monkeypatch):
    root, _ = voc
    monkeypatch.setattr("iseg.commands._model.load_pipeline", lambda *a, **k: FakePipe("voc"))
    real = open
    writes = []

    def full_disk(path, mode="r", *args, **kwargs):
        if "x" in mode and str(path).endswith(".iseg-tmp") and "pred" in str(path):
            writes.append(path)
            if len(writes) == 3:
                f = real(path, mode, *args, **kwargs)
                f.close()
                raise OSError(28, "No space left on device")
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_disk)
    code = main(cli("voc-wsss", root, "fake", tmp_path / "o", "--limit", 6))
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("iseg: error:")
    # the runner's wording of a full disk, naming the prediction (not its temporary file)
    assert "no space left on device" in err[0] and "rerun to resume" in err[0]
    assert str(tmp_path / "o" / "pred") in err[0] and ".iseg-tmp" not in err[0]
    left = sorted(p.name for p in (tmp_path / "o" / "pred").iterdir())
    assert 2 <= len(left) < 5 and all(name.endswith(".png") for name in left)  # no temporary file
    for name in left:  # every prediction kept is whole (the writer threads may have finished more)
        Image.open(tmp_path / "o" / "pred" / name).load()
    # the next run (space again) resumes: only what is missing is predicted
    monkeypatch.setattr("iseg.commands._model.load_pipeline", lambda *a, **k: FakePipe("voc"))
    assert main(cli("voc-wsss", root, "fake", tmp_path / "o", "--limit", 6)) == 0


# --- issue 21 §4: the scores users compare against -----------------------------------------------


def mmseg_intersect_and_union(pred, label, num_classes, reduce_zero_label=False):
    """MMSegmentation's ``IoUMetric.intersect_and_union`` restated (``torch.histc`` over
    ``[0, num_classes − 1]``: values outside are not counted; 255 ignored)."""
    label = label.astype(np.int64)
    pred = pred.astype(np.int64)
    if reduce_zero_label:
        label[label == 0] = 255
        label = label - 1
        label[label == 254] = 255
    mask = label != 255
    pred, label = pred[mask], label[mask]
    hist = lambda v: np.histogram(v, bins=num_classes, range=(0, num_classes - 1))[0]  # noqa: E731
    inside = lambda v: v[(v >= 0) & (v <= num_classes - 1)]  # noqa: E731
    intersect = pred[pred == label]
    a_i, a_p, a_l = hist(inside(intersect)), hist(inside(pred)), hist(inside(label))
    return a_i, a_p + a_l - a_i


def mmseg_miou(pairs, num_classes, reduce_zero_label=False):
    """``IoUMetric.compute_metrics``: total areas over all images, IoU = Σ∩ / Σ∪, nanmean."""
    total_i = total_u = 0
    for pred, label in pairs:
        i, u = mmseg_intersect_and_union(pred, label, num_classes, reduce_zero_label)
        total_i, total_u = total_i + i, total_u + u
    with np.errstate(invalid="ignore", divide="ignore"):
        return 100 * float(np.nanmean(total_i / total_u))


def test_mmseg_column_is_what_mmsegmentation_computes(voc, tmp_path):
    """All images count, the background-only one included (iSeg gives it no class: all
    background), unlike the authors' figure; per_image.csv holds each image's scores."""
    root, labels = voc
    out = tmp_path / "o"
    m = run_eval("voc-wsss", root, out, pipe=FakePipe("voc", drop={1, 6}), limit=8, workers=0, progress=False).metrics
    pairs = []
    for i, (image_id, gt) in enumerate(labels.items()):
        pred = np.zeros_like(gt) if i == BACKGROUND_ONLY else np.asarray(Image.open(out / "pred" / f"{image_id}.png"))
        pairs.append((pred, gt))
    assert m["miou_mmseg"] == pytest.approx(mmseg_miou(pairs, 21), abs=1e-9)
    scored = [p for i, p in enumerate(pairs) if i != BACKGROUND_ONLY]
    assert m["miou_mmseg"] != pytest.approx(mmseg_miou(scored, 21))  # the skipped image matters here
    assert m["miou"] == pytest.approx(authors_miou(recompute(out, labels, 21)))
    # per_image.csv: id, pixel accuracy, IoU of each class present (in GT or prediction)
    import csv

    rows = {r["id"]: r for r in csv.DictReader((out / "per_image.csv").open())}
    assert set(rows) == {k for i, k in enumerate(labels) if i != BACKGROUND_ONLY}
    for pred, gt in scored[:3]:
        image_id = next(k for k, v in labels.items() if v is gt)
        valid = gt != 255
        assert float(rows[image_id]["pixel_acc"]) == pytest.approx(100 * (pred[valid] == gt[valid]).mean(), abs=1e-3)
        names = ("background",) + class_names("voc")
        for c in range(21):
            inter = ((pred == c) & (gt == c) & valid).sum()
            union = (((pred == c) & valid) | (gt == c)).sum()
            value = rows[image_id][f"iou_{names[c]}"]
            assert (value == "") == (union == 0)
            if union:
                assert float(value) == pytest.approx(100 * inter / union, abs=1e-3)
    text = (out / "metrics.md").read_text()
    assert "mIoU (MMSegmentation, all images)" in text and "## Protocols" in text


def test_context59_column_ignores_background(tmp_path):
    ids = split_ids("voc_context", "val")[:4]
    make_context(tmp_path / "ctx", ids, image_fn=label_image)
    tags = tmp_path / "tags.txt"
    lines = []
    for line in (Path(__file__).parents[2] / "iseg/data/voc_context/val_cls.txt").read_text().splitlines():
        words = line.split()
        if words and words[0] in ids:
            lines.append(line)
    tags.write_text("\n".join(lines) + "\n")
    out = tmp_path / "o"
    m = run_eval("context-ovs", tmp_path / "ctx", out, pipe=FakePipe("voc_context", drop={20}), tags=tags,
                 limit=4, workers=0, progress=False).metrics  # fmt: skip
    pairs = []
    for image_id in ids:
        gt = np.asarray(Image.open(tmp_path / "ctx/VOCdevkit/VOC2010/SegmentationClassContext" / f"{image_id}.png"))
        pred = np.asarray(Image.open(out / "pred" / f"{image_id}.png"))
        pairs.append((pred.astype(np.int64) - 1, gt))  # MMSeg's 59-class model has no background id
    assert m["miou_context59"] == pytest.approx(mmseg_miou(pairs, 59, reduce_zero_label=True), abs=1e-9)
    assert m["miou_context59"] != pytest.approx(m["miou_mmseg"])
    assert "Context-59" in (out / "metrics.md").read_text()


def test_model_folder_compared_as_its_resolved_path_and_bad_manifest(voc, tmp_path, capsys, monkeypatch):
    """Issue 18 §5, §6: ``--model ./m`` and ``--model <abs>/m`` are the same setting; an
    ``eval.json`` of the wrong shape is one error line."""
    root, _ = voc
    (tmp_path / "m").mkdir()
    monkeypatch.setattr("iseg.commands._model.check_model_folder", lambda model: None)
    monkeypatch.setattr("iseg.commands._model.load_pipeline", lambda *a, **k: FakePipe("voc"))
    monkeypatch.chdir(tmp_path)
    assert main(cli("voc-wsss", root, "./m", tmp_path / "o", "--limit", 2)) == 0
    assert json.loads((tmp_path / "o" / "eval.json").read_text())["model"] == str((tmp_path / "m").resolve())
    assert main(cli("voc-wsss", root, tmp_path / "m", tmp_path / "o", "--limit", 2)) == 0  # same setting
    (tmp_path / "o" / "eval.json").write_text("[1, 2]")
    capsys.readouterr()
    assert main(cli("voc-wsss", root, "./m", tmp_path / "o", "--limit", 2)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not an eval.json iseg eval wrote" in err[0]


def test_eval_quiet_loads_the_model_quietly(voc, tmp_path, monkeypatch):
    """Like the other commands, ``--quiet`` (or ``-q``) also silences the model's loading bars."""
    root, _ = voc
    calls = []

    def load(*args, **kwargs):
        calls.append(kwargs.get("quiet", False))
        return FakePipe("voc")

    monkeypatch.setattr("iseg.commands._model.load_pipeline", load)
    assert main(cli("voc-wsss", root, "fake", tmp_path / "o", "--limit", 1)) == 0  # --quiet
    argv = [a for a in cli("voc-wsss", root, "fake", tmp_path / "p", "--limit", 1) if a != "--quiet"]
    assert main([*argv, "-q"]) == 0
    argv = [a for a in cli("voc-wsss", root, "fake", tmp_path / "r", "--limit", 1) if a != "--quiet"]
    assert main(argv) == 0  # not quiet
    assert calls == [True, True, False]
