"""Recipes: the authors' presets against METHOD §6, and what the pipeline computes with them,
recomputed independently from the layers' own projections (forward hooks on to_q/to_k)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

import iseg_ops
from iseg import ISegPipeline
from iseg.recipes import RECIPES, Recipe, get_recipe
from iseg.testing import tiny_components

from ._real_tokenizer import bpe_file, real_clip_tokenizer
from .conftest import generator, make_image
from .test_pipeline import class_positions, head_probs, record_projections

# METHOD §6, written out: the authors' layers and VOC head subsets.
VOC_HEADS = {
    "down_blocks.2.attentions.0.transformer_blocks.0.attn2": (0, 1, 2, 3, 6, 8, 12, 13, 14, 16, 17, 19),
    "down_blocks.2.attentions.1.transformer_blocks.0.attn2": (0, 2, 4, 7, 8, 10, 12, 13, 14),
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2": (1, 3, 4, 6, 7, 11, 12, 18, 19),
    "up_blocks.1.attentions.1.transformer_blocks.0.attn2": (0, 16, 17, 18),
    "up_blocks.1.attentions.2.transformer_blocks.0.attn2": (1, 3, 7, 8, 13, 14, 16),
    "down_blocks.1.attentions.1.transformer_blocks.0.attn2": (5, 6, 8),
    "up_blocks.2.attentions.0.transformer_blocks.0.attn2": (3,),
    "up_blocks.2.attentions.1.transformer_blocks.0.attn2": (1, 2, 5, 7, 8),
}
VOC_SUFFIX = ", ground, land, grass, tree, building, wall, sky, lake, water"
COCO_SUFFIX = ", ground, land, grass, tree, building, wall, sky, lake, water, river, sea, railway, "


def test_presets_match_method_section_6():
    ln10 = math.log(10)
    expected = {  # name: (ent, iters, background threshold, cross heads)
        "voc-wsss": (0.015, 10, None, "voc"),
        "coco-wsss": (0.1, 10, 0.45, "all"),
        "voc-ovs": (0.015, 8, None, "voc"),
        "context-ovs": (0.002, 5, None, "all"),
        "coco-ovs": (0.2, 10, 0.45, "all"),
    }
    for name, (ent, iters, tau, heads) in expected.items():
        r = get_recipe(name)
        assert r.lam == pytest.approx(ent / ln10, rel=1e-12) and r.iters == iters
        assert r.background_threshold == tau
        assert r.self_attention_heads == (1, 2) and r.gamma == 1.6 and r.timestep == 100
        assert dict(r.cross_attention_weights) == {4: 0.7, 2: 0.3}
        assert r.cluster_cross_attention and r.dataset_order and not r.antialias and r.seed == 1101
        layers = dict(r.cross_attention_layers)
        assert set(layers) == set(VOC_HEADS)
        assert layers == (VOC_HEADS if heads == "voc" else dict.fromkeys(VOC_HEADS))
    at_16 = [h for n, h in VOC_HEADS.items() if n.startswith(("down_blocks.2", "up_blocks.1"))]
    assert sum(map(len, at_16)) == 41 and sum(map(len, VOC_HEADS.values())) == 41 + 9
    assert get_recipe("voc-wsss").prompt_suffix == VOC_SUFFIX
    assert get_recipe("coco-wsss").prompt_suffix == COCO_SUFFIX
    assert get_recipe("voc-ovs").prompt_suffix == VOC_SUFFIX[2:]  # glued: "backgroundground, …"
    assert get_recipe("coco-ovs").prompt_suffix == COCO_SUFFIX[2:]
    assert get_recipe("context-ovs").prompt_suffix == ""
    interactive = get_recipe("interactive")
    assert interactive.lam == pytest.approx(0.0434294, abs=1e-7) and interactive.t_max == 1.0
    assert interactive.iters == 50 and interactive.threshold == 0.5 and interactive.self_attention_heads is None
    paper = get_recipe("paper")
    assert (paper.lam, paper.iters, paper.self_attention_heads, paper.cross_attention_layers) == (0.01, 10, None, None)
    assert not paper.cluster_cross_attention and paper.antialias and paper.seed is None
    assert get_recipe(None) is paper and set(RECIPES) == {
        "paper", "voc-wsss", "coco-wsss", "voc-ovs", "context-ovs", "coco-ovs", "interactive",
        "sdxl", "sdxl-interactive",  # iseg's SDXL settings, tests/test_sdxl.py
    }  # fmt: skip


def test_unknown_recipe_lists_the_known_ones(pipe, image):
    with pytest.raises(ValueError, match="unknown recipe 'voc'.*voc-wsss.*interactive"):
        pipe(image, ["cat"], recipe="voc")
    with pytest.raises(TypeError, match="recipe"):
        get_recipe(3)


@pytest.mark.parametrize(
    "field, value, error",
    [
        ("iters", -1, ValueError), ("iters", 1.5, TypeError), ("lam", -0.1, ValueError),
        ("lam", float("nan"), ValueError), ("t_max", 0.0, ValueError), ("gamma", 0.0, ValueError),
        ("background_threshold", 1.0, ValueError), ("threshold", 0.0, ValueError),
        ("cross_attention_weights", ((4, -0.7),), ValueError), ("cross_attention_weights", (), ValueError),
        ("cross_attention_layers", (("up_blocks.1.attentions.0.transformer_blocks.0.attn1", None),), ValueError),
        ("prompt_template", "no placeholder", ValueError), ("background_words", "sky", TypeError),
        ("dataset", "ade20k", ValueError), ("seed", 1.5, TypeError), ("cluster_arithmetic", "bf16", ValueError),
    ],
)  # fmt: skip
def test_bad_recipe_fields_are_rejected(field, value, error):
    with pytest.raises(error, match=field):
        get_recipe("paper").replace(**{field: value})


def test_bad_keywords_name_the_argument_not_the_recipe(pipe, image):
    with pytest.raises(ValueError, match=r"^lam must be") as info:
        pipe(image, ["cat"], recipe="voc-wsss", lam=-1.0)
    assert "recipe" not in str(info.value)
    with pytest.raises(ValueError, match="cross_attention_weights"):
        pipe(image, ["cat"], cross_attention_weights={})
    with pytest.raises(TypeError, match="unexpected keyword argument 'lamda'"):
        pipe(image, ["cat"], lamda=0.1)


def test_explicit_keywords_override_the_recipe(pipe):
    r = pipe.resolve_recipe("coco-wsss", iters=3, background_threshold=None, lam=None)
    assert (r.iters, r.background_threshold, r.lam) == (3, None, None)
    assert r.cluster_cross_attention and r.seed == 1101  # the rest stays the recipe's
    import numpy as np

    r = pipe.resolve_recipe("paper", iters=np.int64(4), lam=np.float32(0.5), background_words="sky")
    assert (r.iters, r.lam, r.background_words) == (4, 0.5, ("sky",))  # a string is one word


@pytest.fixture
def authors_pipe(components, monkeypatch):
    """The tiny model with SD 2.1's head counts where the authors' head subsets apply (20 at
    the 16×16-equivalent level, 10 at the 32×32 one) and ≥ 3 heads in the self layer."""
    monkeypatch.setenv("ISEG_OPS_BACKEND", "torch")
    config = dict(components["unet"].config)
    config.update(block_out_channels=(8, 20, 20, 20), attention_head_dim=(4, 10, 20, 20))
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config).eval()
    pipe = ISegPipeline(**{**components, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", ["voc-wsss", "coco-wsss"])
def test_recipe_cross_attention_recomputed_from_hooks(authors_pipe, image, name):
    pipe, recipe = authors_pipe, get_recipe(name)
    classes = ["tv monitor", "cat", "potted plant"] if name == "voc-wsss" else ["cat", "dog"]
    self_layer = recipe.self_attention_layer
    seen, handles = record_projections(pipe.unet, [self_layer, *VOC_HEADS])
    out = pipe(image, classes, recipe=name, output_attentions=True)
    for h in handles:
        h.remove()

    # Self-attention: heads (1, 2) only.
    attn1 = pipe.unet.get_submodule(self_layer)
    probs = head_probs(seen[(self_layer, "to_q")][0], seen[(self_layer, "to_k")][0], attn1.heads)
    torch.testing.assert_close(out.self_attention.double(), probs[:, [1, 2]].mean(1), atol=1e-6, rtol=1e-5)

    # Cross-attention: per resolution, the mean over the selected (layer, head) pairs.
    latent, weights = 16, {4: 0.7, 2: 0.3}
    pairs: dict[int, list[torch.Tensor]] = {}
    for layer, heads in VOC_HEADS.items():
        q, k = seen[(layer, "to_q")][0], seen[(layer, "to_k")][0]
        p = head_probs(q, k, pipe.unet.get_submodule(layer).heads)
        heads = heads if name == "voc-wsss" else range(p.shape[1])
        pairs.setdefault(latent // math.isqrt(q.shape[1]), []).extend(p[:, h] for h in heads)
    expected_pairs = {2: 3 + 1 + 5, 4: 41} if name == "voc-wsss" else {2: 30, 4: 100}
    assert {f: len(v) for f, v in pairs.items()} == expected_pairs
    fused = 0
    for factor, maps in pairs.items():
        m = torch.stack(maps).mean(0)
        m = m / m.sum(dim=1, keepdim=True)
        side = latent // factor
        m = m.transpose(1, 2).reshape(1, 77, side, side)
        fused = fused + weights[factor] * F.interpolate(m, size=(latent, latent), mode="bilinear", align_corners=False)
    tokens = fused.flatten(2).transpose(1, 2)  # [1, 256, 77], before the clustering

    # The prompt: classes in dataset order, the authors' suffix, and the token subsets.
    if name == "voc-wsss":
        text = "a photograph of cat and potted plant and tv monitor and other object and background" + VOC_SUFFIX
        words = {"tv monitor": "monitor", "cat": "cat", "potted plant": "plant"}
    else:
        text = "a photograph of cat and dog and other object and background" + COCO_SUFFIX
        words = {"cat": "cat", "dog": "dog"}
    assert list(pipe.tokenizer(text, padding="max_length", max_length=77).input_ids) == list(
        pipe.prompt(classes, recipe).input_ids
    )
    positions = class_positions(pipe.tokenizer, [words[c] for c in classes], text)
    expected = torch.stack([tokens[:, :, p].mean(-1) for p in positions], dim=-1)  # [1, 256, K]
    plain = pipe(image, classes, recipe=name, cluster_cross_attention=False, output_attentions=True)
    torch.testing.assert_close(plain.cross_attention.double(), expected, atol=1e-6, rtol=1e-5)

    # The clustering: pixels of one cluster share one vector, the mean of their unclustered
    # vectors (class columns are linear in the token vectors). Which pixel falls in which
    # cluster is the KL op's business (tests/ops/test_kl.py); a borderline pixel may flip with
    # 1e-7 noise, so the partition is read from the output.
    clustered = out.cross_attention[0].double()
    groups = torch.unique(clustered, dim=0, return_inverse=True)[1]
    # anchors every 16 // √32 = 2 cells on the 16×16 grid (every 11 on SD's 64×64: 36 anchors)
    assert 1 < int(groups.max()) + 1 <= 64
    for g in range(int(groups.max()) + 1):
        members = groups == g
        torch.testing.assert_close(clustered[members][0], expected[0, members].mean(0), atol=2e-6, rtol=1e-4)

    # Labels: (1 − max)² for VOC, τ = 0.45 for COCO.
    best, index = out.heatmaps.max(dim=1)
    if name == "coco-wsss":
        assert torch.equal(out.labels, torch.where(best < 0.45, 0, index + 1))
    else:
        assert torch.equal(out.labels, torch.where((1 - best) ** 2 >= best, 0, index + 1))


def test_recipe_seed_gives_every_image_the_same_noise(authors_pipe):
    pipe, images = authors_pipe, [make_image(1), make_image(1)]
    # Clustering off: it would turn the 1e-7 differences of batched convolutions into
    # borderline cluster flips, and this test is about the noise.
    options = dict(recipe="coco-wsss", cluster_cross_attention=False, output_attentions=True)
    batched = pipe(images, ["cat"], **options)
    single = pipe(images[0], ["cat"], **options)
    explicit = pipe(images[0], ["cat"], generator=generator(1101), **options)
    torch.testing.assert_close(batched.cross_attention[0], batched.cross_attention[1], atol=0, rtol=0)
    torch.testing.assert_close(batched.cross_attention[:1], single.cross_attention, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched.self_attention[:1], single.self_attention, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(single.cross_attention, explicit.cross_attention, atol=0, rtol=0)
    other = pipe(images[0], ["cat"], generator=generator(7), **options)
    assert not torch.equal(other.cross_attention, single.cross_attention)


def test_recipe_resizes_without_antialias(authors_pipe):
    pipe = authors_pipe
    img = make_image(3, size=(300, 260))  # downscaled to 128: antialiasing would change it
    seen = []
    handle = pipe.vae.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    pipe(img, ["cat"], recipe="voc-wsss")
    pipe(img, ["cat"], recipe="paper")
    handle.remove()
    import numpy as np

    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255
    plain = F.interpolate(x, size=(128, 128), mode="bilinear", align_corners=False, antialias=False)
    torch.testing.assert_close(seen[0], plain * 2 - 1, atol=1e-5, rtol=0)
    assert (seen[1] - seen[0]).abs().max() > 0.05  # the paper recipe antialiases


def test_unknown_class_in_a_dataset_recipe_keeps_the_callers_order(pipe):
    recipe = get_recipe("voc-wsss")
    prompt = pipe.prompt(["zebra", "person", "aeroplane"], recipe)
    # "aeroplane" is VOC's spelling of the authors' "plane"; VOC classes go first in label order.
    assert prompt.text.startswith("a photograph of plane and person and zebra and other object")
    assert prompt.class_positions[2][0] == 4  # plane: the first class token, after "a photograph of"


@pytest.mark.skipif(bpe_file() is None, reason="needs the open_clip_torch wheel (pip install --no-deps open_clip_torch)")
def test_real_tokenizer_token_subsets(tmp_path):
    tokenizer = real_clip_tokenizer(str(tmp_path))
    components = tiny_components(seed=0)
    pipe = ISegPipeline(**{**components, "tokenizer": tokenizer})
    tokens = tokenizer.convert_ids_to_tokens

    voc = pipe.prompt(["tv monitor", "person", "potted plant"], "voc-wsss")
    ids = list(voc.input_ids)
    authors = "a photograph of person and potted plant and tv monitor and other object and background" + VOC_SUFFIX
    assert ids == tokenizer(authors, padding="max_length", max_length=77).input_ids
    assert [tokens([ids[p] for p in pos]) for pos in voc.class_positions] == [["monitor</w>"], ["person</w>"], ["plant</w>"]]

    coco = pipe.prompt(["fire hydrant", "stop sign", "person"], "coco-ovs")
    ids = list(coco.input_ids)
    assert [tokens([ids[p] for p in pos]) for pos in coco.class_positions] == [
        ["hydr"], ["stop</w>", "sign</w>"], ["people</w>"]
    ]  # "fire hydr ant" is 3 tokens: "stop sign" is not shifted (the authors' bug, not reproduced)
    glued = tokens(ids[ids.index(tokenizer.convert_tokens_to_ids("back")) :][:4])
    assert glued == ["back", "ground", "ground</w>", ",</w>"]  # OVS: "background" + "ground, …"


def test_authors_recipes_cluster_in_the_authors_fp16_arithmetic(pipe, image, monkeypatch):
    """The presets select the fp16 op-by-op distance (issue 21 §1) and the pipeline hands the
    recipe's choice to the clustering; ``fp32`` stays available as an explicit field."""
    for name in ("voc-wsss", "coco-wsss", "voc-ovs", "context-ovs", "coco-ovs"):
        assert get_recipe(name).cluster_arithmetic == "fp16"
    seen = []
    original = iseg_ops.kl_cluster

    def spy(*args, **kwargs):
        seen.append(kwargs.get("arithmetic"))
        return original(*args, **kwargs)

    monkeypatch.setattr(iseg_ops, "kl_cluster", spy)
    recipe = get_recipe("voc-wsss")
    pipe(image, ["cat"], recipe=recipe.replace(self_attention_heads=None, cross_attention_layers=None))
    pipe(image, ["cat"], recipe=recipe.replace(self_attention_heads=None, cross_attention_layers=None, cluster_arithmetic="fp32"))
    assert seen == ["fp16", "fp32"]


def test_lam_none_drops_the_t_clamp_unless_one_is_given():
    """T exists only with Ent-Self: turning it off (``lam=None``) on a recipe that clamps T
    (interactive: t_max = 1) drops the clamp; asking for both is one error before any model runs
    (it used to fail per image inside ``refine``)."""
    interactive = get_recipe("interactive")
    assert interactive.t_max == 1.0 and interactive.lam is not None
    raw = interactive.replace(lam=None)
    assert (raw.lam, raw.t_max, raw.iters) == (None, None, interactive.iters)
    with pytest.raises(ValueError, match=r"t_max clamps Ent-Self's T, so it needs lam \(got lam=None with t_max=2.0\)"):
        interactive.replace(lam=None, t_max=2.0)
    assert interactive.replace(lam=0.5).t_max == 1.0  # a λ keeps the clamp
