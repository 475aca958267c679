"""DiffSeg + iSeg (iseg.diffseg) on a tiny random model, recomputed independently.

The tiny UNet's attention is nearly uniform, so the tests sharpen it (``to_q`` of every attn1
layer × 6, in a copy) to get several segments. Everything the module computes is redone here
from the layers' own projections (forward hooks on ``to_q``/``to_k``, per-head probabilities
materialised in float64 in the test only) and from UNSUPERVISED.md §1 written out literally:
aggregation, anchors, DiffSeg's three merging passes with an elementwise KL, labels, refinement.
"""

from __future__ import annotations

import copy
import math
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from iseg import ISegPipeline, diffseg, evaluate
from iseg_ops import kl as kl_module
from iseg_ops import reference

from .conftest import make_image

GRID = (16, 16)  # the tiny model's latent grid (128 px images)
HW = 256
TAU = 0.03  # on the sharpened tiny model: 20–40 merged maps


@pytest.fixture(scope="module")
def sharp(components):
    """A pipeline whose attn1 layers attend sharply (random tiny weights are nearly uniform)."""
    unet = copy.deepcopy(components["unet"])
    for name, module in unet.named_modules():
        if name.endswith("attn1"):
            module.to_q.weight.data *= 6.0
    pipe = ISegPipeline(**{**components, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def base(sharp):
    """One call on image 0 with refinement off, recording every attn1 layer's projections."""
    seen, handles = record_attn1(sharp.unet)
    mp = pytest.MonkeyPatch()
    mp.setenv("ISEG_OPS_BACKEND", "torch")
    try:
        out = run(sharp, iters=None, kl_threshold=TAU, output_attentions=True)
    finally:
        mp.undo()
        for h in handles:
            h.remove()
    return out, seen


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("ISEG_OPS_BACKEND", "torch")


def run(pipe, image=None, **kwargs):
    return pipe.segment_unsupervised(make_image(0) if image is None else image, **kwargs)


# ------------------------------------------------------------------ direct implementations


def record_attn1(unet):
    """Forward hooks recording ``to_q``/``to_k`` outputs of every attn1 layer."""
    seen, handles = {}, []
    for name, module in unet.named_modules():
        if name.endswith("attn1"):
            for proj in ("to_q", "to_k"):
                def hook(mod, args, output, key=(name, proj)):
                    seen[key] = output.detach().double()
                handles.append(getattr(module, proj).register_forward_hook(hook))
    return seen, handles


def aggregate_direct(unet, seen):
    """UNSUPERVISED §1 aggregation, literally, from per-head probabilities (float64)."""
    by_res = {}
    for name, module in unet.named_modules():
        if not name.endswith("attn1"):
            continue
        q, k = seen[(name, "to_q")], seen[(name, "to_k")]
        b, length, c = q.shape
        heads, d = module.heads, c // module.heads
        q = q.view(b, length, heads, d).transpose(1, 2)
        k = k.view(b, length, heads, d).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)  # per head
        by_res.setdefault(int(math.isqrt(length)), []).append(probs.mean(1))
    g = GRID[0]
    total = sum(by_res)
    out = 0
    for r, maps in by_res.items():
        a_r = torch.stack(maps).mean(0)  # [B, r², r²] layer mean
        b = a_r.shape[0]
        up = F.interpolate(a_r.reshape(b * r * r, 1, r, r), size=(g, g), mode="bilinear", align_corners=False)
        up = up.reshape(b, r, r, g * g)
        up = up / up.sum(-1, keepdim=True)
        rep = up.repeat_interleave(g // r, dim=1).repeat_interleave(g // r, dim=2)  # queries
        out = out + (r / total) * rep.reshape(b, g * g, g * g)
    aggregate_direct.full_resolution = torch.stack(by_res[g]).mean(0)  # for the option test
    return out, {r: len(m) for r, m in by_res.items()}, {r: r / total for r in by_res}


def kl64(x, y):
    """Elementwise symmetric KL in float64, with the limits at zeros, [M, N] × [Q, N] → [M, Q]."""
    x, y = x.double()[:, None], y.double()[None]
    one = (x == 0) ^ (y == 0)
    term = torch.where((x == 0) | (y == 0), 0.0, (x - y) * (torch.log(x) - torch.log(y)))
    return torch.where(one.any(-1), math.inf, 0.5 * term.sum(-1))


def diffseg_anchors(side, n):
    seg = (side - 1) // (n - 1)
    start = (side - 1 - seg * (n - 1)) // 2
    return [start + i * seg for i in range(n)]


def merge_direct(a, tau, n):
    """DiffSeg's three passes as its code runs them (loops, KL per map). Returns the maps and
    the smallest |D − τ| seen (how far every decision was from the threshold)."""
    a = a.double()
    pts = diffseg_anchors(GRID[0], n)
    anchors = [r * GRID[1] + c for r in pts for c in pts]
    margin = math.inf
    maps = []
    for i in anchors:  # pass 0
        d = kl64(a[i : i + 1], a)[0]
        margin = min(margin, (d - tau).abs().min().item())
        maps.append(a[d < tau].mean(0))
    maps = torch.stack(maps)
    for _ in range(2):  # passes 1 and 2
        matched, merged = set(), []
        for i in range(len(maps)):
            if i in matched:
                continue
            matched.add(i)
            d = kl64(maps[i : i + 1], maps)[0]
            margin = min(margin, (d - tau).abs().min().item())
            js = torch.nonzero(d < tau).flatten().tolist()
            matched.update(js)
            merged.append(maps[js].mean(0))
        maps = torch.stack(merged)
    return maps, margin


def upsample_argmax(maps, size):
    up = F.interpolate(maps.float().reshape(1, -1, *GRID), size=size, mode="bilinear", align_corners=False)
    return up[0].argmax(0)


# ------------------------------------------------------------------ tests


def test_aggregation_recomputed_from_hooks(sharp, base):
    out, seen = base
    expected, counts, weights = aggregate_direct(sharp.unet, seen)
    assert counts == {16: 5, 8: 5, 4: 5, 2: 1}  # SD's layout: 64/32/16/8 at 512 px
    assert [round(weights[r], 4) for r in (16, 8, 4, 2)] == [0.5333, 0.2667, 0.1333, 0.0667]
    assert out.attention.shape == (1, HW, HW) and out.attention.dtype == torch.float32
    torch.testing.assert_close(out.attention.double(), expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(1, HW), atol=1e-5, rtol=0)


def test_sd1_layout(components):
    """SD 1.x's UNet layout (conv projections in and out of the transformers, one head count
    for all levels) at the tiny width: the same aggregation and a full call."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(8, 16, 16, 16), layers_per_block=2, attention_head_dim=2,
        cross_attention_dim=32, norm_num_groups=4,
    ).eval()  # fmt: skip
    for name, module in unet.named_modules():
        if name.endswith("attn1"):
            module.to_q.weight.data *= 6.0
    pipe = ISegPipeline(**{**components, "unet": unet})
    seen, handles = record_attn1(unet)
    try:
        out = run(pipe, kl_threshold=TAU, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    expected, counts, _ = aggregate_direct(unet, seen)
    assert counts == {16: 5, 8: 5, 4: 5, 2: 1}
    torch.testing.assert_close(out.attention.double(), expected, atol=2e-6, rtol=1e-5)
    assert out.labels.shape == (1, 96, 120) and int(out.labels.max()) < len(out.merged_maps[0])


def test_labels_feed_the_hungarian_evaluation(base):
    pred = base[0].labels[0]
    # ground truth = the segments themselves under other ids (segments beyond 27 unlabelled)
    ids = pred.unique()
    lookup = torch.full((int(ids.max()) + 1,), 255)
    lookup[ids[:27]] = torch.randperm(27, generator=torch.Generator().manual_seed(0))[: min(27, len(ids))]
    gt = lookup[pred]
    tp, fp, fn, total = evaluate.hungarian_match(gt, pred, 27)
    assert total == int((gt != 255).sum()) and tp.sum() == total and fn.sum() == 0


def test_anchor_grid_is_diffsegs():
    assert diffseg_anchors(64, 16) == list(range(1, 62, 4))
    idx = diffseg.anchor_indices((64, 64), 16)
    assert idx.tolist() == [r * 64 + c for r in range(1, 62, 4) for c in range(1, 62, 4)]
    assert diffseg.anchor_indices((16, 16), 5).tolist() == [
        r * 16 + c for r in (1, 4, 7, 10, 13) for c in (1, 4, 7, 10, 13)
    ]
    assert diffseg.anchor_indices((16, 16), 1).tolist() == [7 * 16 + 7]


def pick_tau(a, n):
    """A threshold in a wide gap of the pass-0 distances (between their 5 % and 50 %
    quantiles) that also keeps passes 1–2 away from every decision boundary, so that fp32
    GEMMs and float64 loops must take the same decisions."""
    pts = diffseg_anchors(GRID[0], n)
    d = kl64(a[[r * GRID[1] + c for r in pts for c in pts]], a).flatten().sort().values
    d = d[int(0.05 * len(d)) : int(0.5 * len(d))]
    gaps = d[1:] - d[:-1]
    for i in gaps.argsort(descending=True)[:10].tolist():
        tau = float(d[i] + d[i + 1]) / 2
        maps, margin = merge_direct(a, tau, n)
        if margin > 2e-5 and 2 <= len(maps) < n * n:
            return tau, maps
    pytest.fail("no threshold keeps every KL decision 2e-5 away")


@pytest.mark.parametrize("anchor_grid", [8, 5])  # 8: steps of 2 from 0; 5: steps of 3 from 1
def test_merging_matches_direct_greedy(base, anchor_grid):
    a = base[0].attention[0]
    tau, expected = pick_tau(a, anchor_grid)
    merged = diffseg.merge_maps(a, GRID, tau, anchor_grid)
    assert merged.shape == expected.shape
    torch.testing.assert_close(merged.double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(merged.sum(1), torch.ones(len(expected)), atol=1e-5, rtol=0)


def test_output_merged_maps_are_merge_maps(base):
    out = base[0]
    maps = out.merged_maps[0]
    assert maps.shape[1:] == GRID and 2 <= len(maps) < HW
    torch.testing.assert_close(maps.reshape(len(maps), -1), diffseg.merge_maps(out.attention[0], GRID, TAU))
    torch.testing.assert_close(maps.sum((1, 2)), torch.ones(len(maps)), atol=1e-5, rtol=0)


def test_greedy_groups_hand_case():
    close = np.array(
        [
            [1, 1, 0, 0],
            [1, 1, 1, 0],  # 1 is matched by 0: never leads, though it is close to 2
            [0, 1, 1, 0],
            [0, 0, 1, 1],  # 3 takes 2 again (matched or not)
        ],
        dtype=bool,
    )
    groups = diffseg.greedy_groups(close)
    assert [g.tolist() for g in groups] == [[0, 1], [1, 2], [2, 3]]


def test_labels_diffseg_and_refined(sharp, base):
    out = base[0]
    maps = out.merged_maps[0]
    assert out.labels.shape == (1, 96, 120) and out.labels.dtype == torch.int64
    # refinement off: DiffSeg's labels, the argmax of the upsampled merged maps
    assert torch.equal(out.labels[0], upsample_argmax(maps, (96, 120)))
    assert out.labels.unique().numel() >= 2
    a = out.attention
    flat = maps.reshape(len(maps), -1)
    for init, c0 in (("maps", flat.T), ("onehot", F.one_hot(flat.argmax(0), len(maps)).float())):
        refined = run(sharp, iters=7, lam=0.02, kl_threshold=TAU, init=init)
        expected = reference.refine(a, c0[None], iters=7, lam=0.02)[0]  # [HW, M]
        assert torch.equal(refined.labels[0], upsample_argmax(expected.T, (96, 120)))
        assert int(refined.labels.max()) < len(maps)  # ids are DiffSeg's merged-map order
        assert torch.equal(refined.merged_maps[0], maps)


def test_refine_with_full_resolution_attention(sharp, base):
    out, seen = base
    aggregate_direct(sharp.unet, seen)
    full = aggregate_direct.full_resolution.float()  # mean of the five 16×16 layers
    flat = out.merged_maps[0].reshape(len(out.merged_maps[0]), -1)
    refined = run(sharp, iters=5, kl_threshold=TAU, refine_attention="full-resolution")
    assert torch.equal(refined.merged_maps[0], out.merged_maps[0])  # DiffSeg part unchanged
    expected = upsample_argmax(reference.refine(full, flat.T[None], iters=5, lam=0.01)[0].T, (96, 120))
    # the full-resolution mean is recomputed in float64 here: a near-tied pixel may flip
    assert (refined.labels[0] == expected).float().mean() > 0.99
    default = run(sharp, iters=5, kl_threshold=TAU)
    assert not torch.equal(default.labels, refined.labels)  # the option changes the result


def test_labels_at_another_size(sharp):
    image = make_image(1, size=(90, 70))
    out = run(sharp, image, iters=None, kl_threshold=TAU)
    assert out.labels.shape == (1, 90, 70)
    assert torch.equal(out.labels[0], upsample_argmax(out.merged_maps[0], (90, 70)))


def test_label_maps_chunked_equals_argmax(monkeypatch):
    maps = torch.rand(9, HW)
    maps[3] = maps[5]  # an exact tie: the lower id wins
    expected = upsample_argmax(maps, (33, 47))
    monkeypatch.setattr(diffseg, "_LABEL_CHUNK_ELEMENTS", 2 * 33 * 47)  # chunks of 2 maps
    assert torch.equal(diffseg.label_maps(maps, GRID, (33, 47)), expected)


def test_iters0_and_lam_none(sharp, base):
    out = base[0]
    flat = out.merged_maps[0].reshape(len(out.merged_maps[0]), -1)
    zero = run(sharp, iters=0, kl_threshold=TAU)
    # iters = 0: the per-map min-max of the merged maps competes (not the raw sum-1 maps)
    assert torch.equal(zero.labels[0], upsample_argmax(reference.minmax(flat.T).T, (96, 120)))
    raw = run(sharp, iters=3, lam=None, kl_threshold=TAU)
    expected = reference.refine(out.attention, flat.T[None], iters=3, lam=None)[0]
    assert torch.equal(raw.labels[0], upsample_argmax(expected.T, (96, 120)))


def test_deterministic_and_batched(sharp):
    images = [make_image(0), make_image(2)]
    first = run(sharp, images, kl_threshold=TAU, output_attentions=True)
    second = run(sharp, images, kl_threshold=TAU, output_attentions=True)
    assert torch.equal(first.labels, second.labels)
    assert torch.equal(first.attention, second.attention)
    assert all(torch.equal(a, b) for a, b in zip(first.merged_maps, second.merged_maps))
    single = run(sharp, images[1], kl_threshold=TAU, output_attentions=True)
    # batched convolutions round differently: A agrees to fp32 precision (the merging may then
    # take a near-threshold decision differently, so labels are not compared)
    torch.testing.assert_close(single.attention[0], first.attention[1], atol=1e-6, rtol=1e-5)
    # different sizes: a list of labels
    mixed = run(sharp, [make_image(0, (40, 50)), make_image(2, (64, 32))], kl_threshold=TAU)
    assert [tuple(l.shape) for l in mixed.labels] == [(40, 50), (64, 32)]


def test_pipeline_method_and_tensor_input(sharp):
    image = make_image(3)
    out = sharp.segment_unsupervised(image, kl_threshold=TAU)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    same = run(sharp, pixels, kl_threshold=TAU)
    assert torch.equal(out.labels, same.labels)  # PIL and float input resize identically


def test_add_noise_uses_generator(sharp, base):
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = run(sharp, iters=None, add_noise=True, generator=g(), output_attentions=True).attention
    b = run(sharp, iters=None, add_noise=True, generator=g(), output_attentions=True).attention
    assert torch.equal(a, b) and not torch.allclose(a, base[0].attention)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"kl_threshold": 0}, ValueError, "kl_threshold must be a finite number > 0"),
        ({"kl_threshold": -1.0}, ValueError, "kl_threshold"),
        ({"kl_threshold": math.nan}, ValueError, "kl_threshold"),
        ({"kl_threshold": "1.1"}, TypeError, "kl_threshold must be a number"),
        ({"anchor_grid": 0}, ValueError, "anchor_grid must be ≥ 1"),
        ({"anchor_grid": 17}, ValueError, "anchor_grid must be ≤ the latent grid side 16"),
        ({"iters": -1}, ValueError, "iters must be ≥ 0"),
        ({"iters": 2.0}, TypeError, "iters must be an int"),
        ({"lam": -0.1}, ValueError, "lam"),
        ({"init": "kmeans"}, ValueError, "init must be one of maps, onehot"),
        ({"refine_attention": "64"}, ValueError, "refine_attention must be one of all, full-resolution"),
        ({"timestep": 1000}, ValueError, "timestep must be < 1000"),
        ({"resolution": 100}, ValueError, "resolution must be a multiple of 64"),
        ({"image": "photo.jpg"}, TypeError, "image must be a PIL image"),
        ({"image": [make_image(0), 3]}, TypeError, r"image\[1\] must be a PIL image"),
        ({"image": torch.zeros(1, 1, 8, 8)}, ValueError, r"\[B, 3, H, W\]"),
    ],
)
def test_bad_inputs_fail_before_the_model(sharp, kwargs, error, match):
    calls = []
    handle = sharp.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        image = kwargs.pop("image", make_image(0))
        with pytest.raises(error, match=match):
            run(sharp, image, **kwargs)
    finally:
        handle.remove()
    assert not calls


def test_processors_restored_even_on_error(sharp):
    before = dict(sharp.unet.attn_processors)
    layer = sharp.unet.get_submodule("up_blocks.2.attentions.0.transformer_blocks.0.attn2")

    def boom(*args):
        raise RuntimeError("boom")

    handle = layer.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            run(sharp)
    finally:
        handle.remove()
    assert sharp.unet.attn_processors == before


def test_nan_from_the_model_is_an_error_not_an_output(sharp):
    handle = sharp.unet.conv_in.register_forward_hook(lambda m, a, out: out * math.nan)
    try:
        with pytest.raises(RuntimeError, match="NaN or Inf"):
            run(sharp)
    finally:
        handle.remove()


class LiveBigTensors(TorchDispatchMode):
    """Counts the distinct storages of live tensors with ≥ ``threshold`` elements created by
    ops inside the mode, and records the peak (checked at every op)."""

    def __init__(self, threshold):
        super().__init__()
        self.threshold, self.refs, self.peak, self.at_peak = threshold, [], 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.threshold:
                self.refs.append((weakref.ref(t), f"{func} {tuple(t.shape)} {t.dtype}"))
        live = {}
        for ref, what in self.refs:
            if ref() is not None:
                live.setdefault(ref().untyped_storage().data_ptr(), what)
        if len(live) > self.peak:
            self.peak, self.at_peak = len(live), sorted(live.values())
        return out


def test_memory_only_the_aggregate_and_one_head_mean(sharp, monkeypatch):
    """While the UNet runs and aggregates, at most two HW×HW tensors live: ``A`` and the
    current layer's head-mean. Measured with the Triton kernel (interpreted on CPU) for the
    head-mean, as on a GPU; the PyTorch reference of head_mean_attention materialises one
    head's probabilities at a time by design, so it is not the path measured here."""
    from iseg_ops import interpreting, triton_available

    if not triton_available() or not (interpreting() or torch.cuda.is_available()):
        pytest.skip("needs the Triton head-mean kernel (CUDA or TRITON_INTERPRET=1)")
    monkeypatch.setenv("ISEG_OPS_BACKEND", "triton")
    pixels = torch.rand(1, 3, 128, 128)
    latents = sharp.encode_images(pixels)
    context = sharp.encode_prompt("")[0]
    with LiveBigTensors(HW * HW) as mode:
        a = diffseg.aggregate_self_attention(sharp.unet, latents, 300, context)
    assert mode.peak == 2, f"{mode.peak} HW×HW tensors alive at once: {mode.at_peak}"
    # the merging: only A (its logarithm goes block by block, as at 64×64 where a block holds
    # a quarter of the rows; the tiny grid needs the block size scaled to the same fraction)
    monkeypatch.setattr(kl_module, "_BLOCK_ELEMENTS", HW * HW // 2)
    a0 = a[0]
    with LiveBigTensors(HW * HW) as mode:
        diffseg.merge_maps(a0, GRID, 0.1, anchor_grid=8)
    assert mode.peak == 0, mode.at_peak  # A was created outside; nothing as big inside


# ------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def saved_sharp(sharp, tmp_path_factory):
    """The sharpened pipeline saved to disk and loaded back, as the CLI loads it."""
    folder = tmp_path_factory.mktemp("model") / "sharp"
    sharp.save_pretrained(folder)
    loaded = ISegPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    loaded.set_progress_bar_config(disable=True)
    return folder, loaded


def cli(images, model, out, *extra):
    from iseg.cli import main

    argv = ["unsupervised", *map(str, images), "--model", str(model), "--out", str(out),
            "--device", "cpu", "--dtype", "fp32", "--kl-threshold", str(TAU), *extra]  # fmt: skip
    return main(argv)


def test_cli_round_trip_and_resume(saved_sharp, tmp_path, capsys):
    from PIL import Image

    from iseg.images import load_image

    folder, loaded = saved_sharp
    paths = [tmp_path / "a.png", tmp_path / "b.jpg"]
    make_image(0, (60, 80)).save(paths[0])
    make_image(2, (50, 40)).save(paths[1], quality=95)
    out = tmp_path / "out"
    assert cli(paths, folder, out, "--iters", "none") == 0
    for path in paths:
        image = load_image(path)
        with Image.open(out / f"{path.stem}_labels.png") as png:
            assert png.mode == "P" and png.size == image.size
            labels = torch.from_numpy(np.asarray(png).astype(np.int64))
        direct = loaded.segment_unsupervised(image, kl_threshold=TAU, iters=None).labels[0]
        assert torch.equal(labels, direct) and labels.unique().numel() >= 2
        with Image.open(out / f"{path.stem}_overlay.png") as overlay:
            assert (overlay.mode, overlay.size) == ("RGB", image.size)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert cli(paths, folder, out, "--iters", "none") == 0  # finished: skipped, nothing rewritten
    assert "segmented 0 images, skipped 2 already done" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix != ".json"} == {
        k: v for k, v in stamps.items() if not k.endswith(".json")
    }
    assert cli(paths, folder, out, "--iters", "3") == 1  # other settings: refused
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--kl-threshold", "0"], ["--iters", "-2"], ["--lam", "x"]])
def test_cli_bad_option_is_one_line(option, tmp_path, capsys):
    from iseg.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["unsupervised", "x.png", "--out", str(tmp_path), *option])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"argument {option[0]}" in err


# ------------------------------------- Google's fp16 first pass (issue 21 §5), restated here


def google_kl(x, y):
    """DiffSeg's ``KL`` as its TensorFlow code writes it, in the inputs' dtype: ``q = ln x −
    ln Y``; ``Σ x·q / 2 + (−Σ Y·q / 2)``. A zero anywhere gives NaN."""
    q = torch.log(x) - torch.log(y)
    return torch.sum(x * q, dim=-1) / 2 + (-torch.sum(y * q, dim=-1) / 2)


def merge_google(a, tau, n):
    """Google's three passes: pass 0 with anchors and attention cast to fp16 and τ compared in
    fp16 (``kl_bin`` → ``matmul(kl_bin, A) / Σ kl_bin``, 0/0 = NaN for an anchor matching
    nothing); passes 1–2 in float64, a map whose row matches nothing is not appended."""
    pts = diffseg_anchors(GRID[0], n)
    anchors = a[[r * GRID[1] + c for r in pts for c in pts]]
    kl_bin = google_kl(anchors.half()[:, None, :], a.half()[None]) < torch.tensor(tau, dtype=torch.float16)
    kl_bin = kl_bin.double()
    maps = (kl_bin @ a.double()) / kl_bin.sum(1, keepdim=True)
    nan_maps = int(torch.isnan(maps).any(1).sum())
    for _ in range(2):
        matched, merged = set(), []
        for i in range(len(maps)):
            if i in matched:
                continue
            matched.add(i)
            close = google_kl(maps[i : i + 1], maps) < tau
            if close.sum() > 0:
                js = torch.nonzero(close).flatten().tolist()
                matched.update(js)
                merged.append(maps[js].mean(0))
        maps = torch.stack(merged)
    return maps, nan_maps


def quadrant_attention(peaked_quadrants, seed=0):
    """A row-stochastic ``[256, 256]`` attention on the 16×16 grid: each query attends to its
    own quadrant. Rows of ``peaked_quadrants`` are so sharp that their other entries fall below
    fp16's 2.98e-8 (they underflow to 0 in Google's pass); the others stay above 1e-4."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.arange(16).repeat_interleave(16)
    cols = torch.arange(16).repeat(16)
    quadrant = (rows // 8) * 2 + cols // 8  # [256]
    same = (quadrant[:, None] == quadrant[None]).float()
    sharp = torch.tensor([q in peaked_quadrants for q in quadrant.tolist()])[:, None]
    logits = torch.where(sharp, 25.0, 4.0) * same + 0.3 * torch.rand(256, 256, generator=g)
    return torch.softmax(logits.double(), -1).float(), quadrant


@pytest.mark.parametrize("peaked", [(0, 1), (3,), ()], ids=["half-underflow", "one-quadrant", "no-underflow"])
def test_google_first_pass_equals_its_restatement(peaked):
    a, quadrant = quadrant_attention(peaked)
    assert ((a < 2.98e-8).any(1) == torch.tensor([q in peaked for q in quadrant.tolist()])).all()
    tau, n = 1.1, 8
    expected, nan_maps = merge_google(a, tau, n)
    maps, dropped = diffseg._merge(a, GRID, tau, n, "fp16")
    assert dropped == nan_maps == 16 * len(peaked)  # 8×8 anchors, 16 per quadrant
    assert maps.shape == expected.shape == (4 - len(peaked), HW)
    torch.testing.assert_close(maps.double(), expected, atol=1e-6, rtol=1e-5)
    fp32 = diffseg.merge_maps(a, GRID, tau, n)  # the fp32 pass keeps every quadrant
    assert len(fp32) == 4 and (len(fp32) != len(expected)) == bool(peaked)


def spy_merge(monkeypatch, dropped: int) -> list:
    """Record the first pass each merging call gets, and report ``dropped`` anchors."""
    seen = []
    original = diffseg._merge

    def spy(*args):
        seen.append(args[-1])
        return original(*args)[0], dropped

    monkeypatch.setattr(diffseg, "_merge", spy)
    return seen


def test_first_pass_option_reaches_the_output(sharp, monkeypatch):
    """``segment_unsupervised(first_pass=…)`` runs that pass and reports the dropped anchors;
    a bad value fails before the model."""
    seen = spy_merge(monkeypatch, dropped=7)
    out = run(sharp, iters=None, kl_threshold=TAU, first_pass="fp16")
    assert seen == ["fp16"] and out.dropped_anchors == [7]
    with pytest.raises(ValueError, match="first_pass must be one of fp32, fp16"):
        run(sharp, first_pass="fp64")


def test_cli_first_pass_reaches_the_call_and_reports_dropped_anchors(saved_sharp, tmp_path, capsys, monkeypatch):
    folder, _ = saved_sharp
    path = tmp_path / "a.png"
    make_image(0, (40, 40)).save(path)
    seen = spy_merge(monkeypatch, dropped=5)
    assert cli([path], folder, tmp_path / "out", "--iters", "none", "--first-pass", "fp16") == 0
    assert seen == ["fp16"]
    assert "a: 5 anchor(s) dropped (fp16 underflow in the first pass)" in capsys.readouterr().err
    assert cli([path], folder, tmp_path / "out2", "--iters", "none") == 0 and seen[-1] == "fp32"


# ------------------------------------------------------------------ settings (a Recipe sibling)


def test_settings_presets_hold_diffsegs_tau_and_keywords_override_them(sharp, monkeypatch):
    """``settings="cityscapes"`` merges with τ = 0.9 (DiffSeg's Cityscapes value), the
    default with 1.1 (COCO-Stuff-27); an explicit keyword wins over the preset's field."""
    from iseg.recipes import DIFFSEG_SETTINGS, DiffSegSettings

    assert DIFFSEG_SETTINGS["cityscapes"].kl_threshold == 0.9
    assert DIFFSEG_SETTINGS["cocostuff27"].kl_threshold == DiffSegSettings().kl_threshold == 1.1
    seen = []
    original = diffseg._merge
    monkeypatch.setattr(diffseg, "_merge", lambda a, g, tau, *rest: seen.append(tau) or original(a, g, tau, *rest))
    run(sharp, iters=None, settings="cityscapes")
    run(sharp, iters=None)
    run(sharp, iters=None, settings="cityscapes", kl_threshold=TAU)
    assert seen == [0.9, 1.1, TAU]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"settings": "voc"}, ValueError, "unknown DiffSeg settings 'voc'; known: cocostuff27, cityscapes"),
        ({"settings": 3}, TypeError, "settings must be a name or a DiffSegSettings"),
        ({"gamma": 1.6}, TypeError, "unexpected keyword argument 'gamma'"),
    ],
)
def test_bad_settings_fail_before_the_model(sharp, kwargs, error, match):
    calls = []
    handle = sharp.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(error, match=match):
            run(sharp, **kwargs)
    finally:
        handle.remove()
    assert not calls


def test_settings_are_frozen_and_checked_on_replace():
    from dataclasses import FrozenInstanceError

    from iseg.recipes import DiffSegSettings

    with pytest.raises(FrozenInstanceError):
        DiffSegSettings().kl_threshold = 2.0
    with pytest.raises(ValueError, match="anchor_grid must be ≥ 1"):
        DiffSegSettings().replace(anchor_grid=0)
