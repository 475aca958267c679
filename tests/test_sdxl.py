"""SDXL (and the Turbo models) as backbones, on tiny random SDXL-layout components.

Every captured quantity is recomputed independently from the layers' own projections (forward
hooks on ``to_q``/``to_k``) and from the text encoders called directly, as SDXL conditions:
both encoders' penultimate hidden states concatenated, the pooled projection of the second,
the size/crop time ids of the capture resolution.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from iseg import ISegPipeline, Point, get_recipe
from iseg.capture import attention_factors, downsampling_factor
from iseg.images import to_tensor_batch
from iseg.masks import to_model_range
from iseg.pipeline import vae_encode_dtype
from iseg.recipes import SDXL_CROSS_LAYERS, default_recipe_for, is_sdxl
from iseg.testing import make_clip_tokenizer, sdxl_base_components, tiny_sdxl_components

from .conftest import generator, make_image
from .test_diffseg import aggregate_direct, record_attn1
from .test_pipeline import class_positions, head_probs, record_projections

CLASSES = ["cat", "potted plant"]  # "potted plant" is two tokens
TEXT = "a photograph of cat and potted plant and other object and background"
LATENT = 32  # the tiny SDXL: 256 px images, attention at 16×16 (factor 2) and 8×8 (factor 4)
POOLED = 24  # text_encoder_2's projection width in the tiny components


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("ISEG_OPS_BACKEND", "torch")


@pytest.fixture(scope="module")
def sdxl_components(tmp_path_factory):
    return tiny_sdxl_components(seed=0, tokenizer_dir=tmp_path_factory.mktemp("tokenizers"))


@pytest.fixture
def sdxl(sdxl_components):
    pipe = ISegPipeline(**sdxl_components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def hook(module, store: list, pre=True, with_kwargs=False):
    """A forward (pre-)hook appending the call's positional args (or kwargs) to ``store``."""
    if pre:
        def record(m, args, kwargs=None):
            store.append(kwargs if with_kwargs else tuple(a.detach().clone() for a in args))
        return module.register_forward_pre_hook(record, with_kwargs=with_kwargs)
    return module.register_forward_hook(lambda m, args, out: store.append(out.detach().clone()))


def model_input(image) -> torch.Tensor:
    """The VAE's input for ``image`` at 256²: [-1, 1], fp32."""
    return to_model_range(to_tensor_batch(image, 256, antialias=True)[0], torch.float32)


def sdxl_text_states(pipe, text: str, scaled=(), gamma: float = 1.6):
    """SDXL's conditioning computed directly: ``(states [1, 77, D1 + D2], pooled [1, P])`` from
    the two tokenizers and encoders, the rows at ``scaled`` multiplied by ``gamma``."""
    ids = pipe.tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids_2 = pipe.tokenizer_2(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
    first = pipe.text_encoder(ids, output_hidden_states=True)
    second = pipe.text_encoder_2(ids_2, output_hidden_states=True)
    states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    for p in scaled:
        states[:, p] *= gamma
    return states, second.text_embeds


# ------------------------------------------------------------------ layout and recipe


def test_tiny_and_full_sdxl_layouts():
    """The tiny builder keeps SDXL-base's attention layout (2 layers per block at the finer
    level, 10 at the coarser, none at the latent resolution); the full builder is SDXL-base."""
    full = sdxl_base_components(device="meta")  # no memory, no init: the configs only
    for components, latent in ((tiny_sdxl_components(), 32), (full, 128)):
        unet = components["unet"]
        per_factor: dict[int, int] = {}
        for name, _ in unet.named_modules():
            if name.endswith("attn1"):
                factor = downsampling_factor(unet, name)
                per_factor[factor] = per_factor.get(factor, 0) + 1
        assert per_factor == {2: 2 * 2 + 3 * 2, 4: 2 * 10 + 10 + 3 * 10}  # down, (mid,) up
        assert attention_factors(unet) == [2, 4] and unet.config.sample_size == latent
        assert all(unet.get_submodule(layer) is not None for layer in SDXL_CROSS_LAYERS)
    sizes = {k: sum(p.numel() for p in full[k].parameters()) for k in ("unet", "vae", "text_encoder", "text_encoder_2")}
    assert sizes == {
        "unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840
    }  # fmt: skip
    unet = full["unet"]
    assert unet.add_embedding.linear_1.in_features == 6 * 256 + 1280 and unet.config.cross_attention_dim == 768 + 1280


def test_sdxl_recipe_is_stated():
    r = get_recipe("sdxl")
    assert r.self_attention_layer == "up_blocks.1.attentions.1.transformer_blocks.0.attn1"
    assert r.self_attention_heads is None and dict(r.cross_attention_weights) == {4: 0.7, 2: 0.3}
    assert (r.timestep, r.gamma, r.lam, r.iters) == (100, 1.6, 0.01, 10)
    layers = [name for name, heads in r.cross_attention_layers]
    assert all(heads is None for _, heads in r.cross_attention_layers) and len(set(layers)) == 60
    assert not any(name.startswith("mid_block") for name in layers)
    assert "iseg's choice" in r.extra["notes"] and "no paper" in r.extra["notes"]
    interactive, sdxl_interactive = get_recipe("interactive"), get_recipe("sdxl-interactive")
    assert sdxl_interactive.self_attention_layer == r.self_attention_layer
    assert (sdxl_interactive.lam, sdxl_interactive.t_max, sdxl_interactive.iters) == (
        interactive.lam, interactive.t_max, interactive.iters
    )


def test_detection_by_config_not_name(sdxl, components):
    sd = ISegPipeline(**components)
    for model, expected in ((sdxl, True), (sdxl.unet, True), (sdxl.unet.config, True),
                            (dict(sdxl.unet.config), True), (sd, False), (sd.unet, False), ({}, False)):  # fmt: skip
        assert is_sdxl(model) is expected
    assert [default_recipe_for(sdxl), default_recipe_for(sdxl, text=False)] == ["sdxl", "sdxl-interactive"]
    assert [default_recipe_for(sd), default_recipe_for(sd, text=False)] == ["paper", "interactive"]
    assert sdxl.resolve_recipe().name == "sdxl" and sd.resolve_recipe().name == "paper"


# ------------------------------------------------------------------ text capture


def test_sdxl_capture_recomputed_from_hooks(sdxl):
    """Default recipe on an SDXL UNet = ``sdxl``: its self-attention layer, its 60 attn2
    layers (the mid block's not among them) fused 0.7 / 0.3 by factor, Cat-Cross on the
    concatenated states, the pooled embedding unchanged, time ids (256, 256, 0, 0, 256, 256)."""
    unet, recipe = sdxl.unet, get_recipe("sdxl")
    image = make_image(0)
    seen, handles = record_projections(unet, [recipe.self_attention_layer, *SDXL_CROSS_LAYERS])
    states, time_ids, add_embeds, temb = [], [], [], []
    handles += [
        hook(unet.get_submodule(SDXL_CROSS_LAYERS[0]), states, with_kwargs=True),
        hook(unet.add_time_proj, time_ids),
        hook(unet.add_embedding, add_embeds),
        hook(unet.down_blocks[0].resnets[0], temb),
    ]
    out = sdxl(image, CLASSES, generator=generator(), output_attentions=True)
    for h in handles:
        h.remove()

    # Self-attention: head mean of the recipe's layer, on the 16×16 grid.
    attn1 = unet.get_submodule(recipe.self_attention_layer)
    q, k = seen[(recipe.self_attention_layer, "to_q")][0], seen[(recipe.self_attention_layer, "to_k")][0]
    assert out.self_attention.shape == (1, 256, 256)
    torch.testing.assert_close(out.self_attention.double(), head_probs(q, k, attn1.heads).mean(1), atol=1e-6, rtol=1e-5)

    # Cross-attention: per factor the mean over (layer, head), per token normalised over
    # space, upsampled to 16×16, weighted.
    per_factor: dict[int, list] = {}
    for name in SDXL_CROSS_LAYERS:
        q, k = seen[(name, "to_q")][0], seen[(name, "to_k")][0]
        probs = head_probs(q, k, unet.get_submodule(name).heads)
        per_factor.setdefault(LATENT // math.isqrt(q.shape[1]), []).extend(probs.unbind(1))
    assert {f: len(v) for f, v in per_factor.items()} == {2: 10 * 4, 4: 50 * 8}  # (layers × heads)
    fused = 0
    for factor, weight in ((4, 0.7), (2, 0.3)):
        m = torch.stack(per_factor[factor]).mean(0)
        m = m / m.sum(dim=1, keepdim=True)
        side = LATENT // factor
        m = m.transpose(1, 2).reshape(1, 77, side, side)
        fused = fused + weight * F.interpolate(m, size=(16, 16), mode="bilinear", align_corners=False)
    positions = class_positions(sdxl.tokenizer, CLASSES, TEXT)
    expected = torch.stack([fused[:, p].mean(1) for p in positions], -1).reshape(1, 256, 2)
    torch.testing.assert_close(out.cross_attention.double(), expected, atol=1e-6, rtol=1e-5)

    # The text states: both encoders' penultimate states, class rows × γ (both halves).
    scaled = [p for ps in positions for p in ps]
    direct, pooled = sdxl_text_states(sdxl, TEXT, scaled, gamma=1.6)
    torch.testing.assert_close(states[0]["encoder_hidden_states"], direct)
    assert sdxl.tokenizer_2(TEXT, padding="max_length", max_length=77).input_ids[-1] == 0  # "!" padding
    # The added conditioning: pooled embedding (no γ) and the capture resolution's time ids.
    assert time_ids[0][0].tolist() == [256.0, 256.0, 0.0, 0.0, 256.0, 256.0]
    torch.testing.assert_close(add_embeds[0][0][:, :POOLED], pooled)
    # ... reaching every resnet through the time embedding (t = 100), as SDXL's forward adds it.
    t = torch.tensor([100])
    ids = torch.tensor([256.0, 256.0, 0.0, 0.0, 256.0, 256.0])
    emb = unet.time_embedding(unet.time_proj(t)) + unet.add_embedding(
        torch.cat([pooled, unet.add_time_proj(ids).reshape(1, -1)], dim=-1)
    )
    torch.testing.assert_close(temb[0][1], emb)


def test_noise_from_the_training_schedule_not_eulers_sigma_space(sdxl):
    """The UNet sees √ᾱ_t·z + √(1 − ᾱ_t)·ε with SD's schedule, although SDXL's Euler
    scheduler's own ``add_noise`` would give z + σ·ε."""
    image = make_image(1)
    sample = []
    handle = hook(sdxl.unet.conv_in, sample)
    sdxl(image, ["cat"], generator=generator(3))
    handle.remove()
    with torch.no_grad():
        z = sdxl.vae.encode(model_input(image)).latent_dist.mean * 0.13025
    eps = torch.randn((1, 4, LATENT, LATENT), generator=generator(3))
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)[100].float()
    expected = alpha_bar.sqrt() * z + (1 - alpha_bar).sqrt() * eps
    torch.testing.assert_close(sample[0][0], expected, atol=1e-5, rtol=1e-5)
    euler = sdxl.scheduler.add_noise(z, eps, torch.tensor([100]))
    assert (euler - expected).abs().max() > 1e-2


def test_batch_with_per_image_classes_matches_single_calls(sdxl):
    images, lists = [make_image(0), make_image(2)], [["cat"], ["dog", "potted plant"]]
    gens = [generator(0), generator(1)]
    batched = sdxl(images, lists, generator=gens, output_attentions=True)
    for b in range(2):
        single = sdxl(images[b], lists[b], generator=generator(b), output_attentions=True)
        k = len(lists[b])
        torch.testing.assert_close(batched.cross_attention[b, :, :k], single.cross_attention[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(batched.self_attention[b], single.self_attention[0], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ text-free tasks


def test_regions_run_text_free_on_sdxl(sdxl):
    unet, recipe = sdxl.unet, get_recipe("sdxl-interactive")
    states, after, time_ids = [], [], []
    handles = [
        hook(unet.get_submodule(SDXL_CROSS_LAYERS[0]), states, with_kwargs=True),
        hook(unet.get_submodule(recipe.self_attention_layer.replace("attn1", "attn2")), after),
        hook(unet.add_time_proj, time_ids),
    ]
    out = sdxl.segment_regions(make_image(0), [Point(30, 20), Point(90, 70)])
    for h in handles:
        h.remove()
    assert out.masks.shape == (1, 2, 96, 120) and torch.isfinite(out.heatmaps).all()
    assert after == []  # the forward ended at sdxl-interactive's self-attention layer
    direct, _ = sdxl_text_states(sdxl, " ", scaled=[0], gamma=1.6)  # BOS × γ
    torch.testing.assert_close(states[0]["encoder_hidden_states"], direct)
    assert time_ids[0][0].tolist() == [256.0, 256.0, 0.0, 0.0, 256.0, 256.0]


def test_refine_masks_on_sdxl(sdxl):
    label_map = torch.zeros(96, 120, dtype=torch.long)
    label_map[10:50, 10:60], label_map[60:90, 70:110] = 3, 7
    out = sdxl.refine_masks(make_image(0), label_map)
    assert out.heatmaps.shape == (1, 2, 96, 120) and set(out.labels.unique().tolist()) <= {0, 3, 7}


def test_unsupervised_aggregates_sdxls_two_levels(sdxl):
    """DiffSeg's aggregate on SDXL's finest attention grid (16×16 here, 64×64 at 1024²): the
    factor-2 layers as full resolution, the factor-4 ones upsampled, weights 2/3 and 1/3."""
    seen, handles = record_attn1(sdxl.unet)
    time_ids = []
    handles.append(hook(sdxl.unet.add_time_proj, time_ids))
    out = sdxl.segment_unsupervised(make_image(0), kl_threshold=0.05, output_attentions=True)
    for h in handles:
        h.remove()
    expected, counts, weights = aggregate_direct(sdxl.unet, seen)
    assert counts == {16: 10, 8: 60} and weights == {16: 2 / 3, 8: 1 / 3}
    torch.testing.assert_close(out.attention.double(), expected, atol=2e-6, rtol=1e-5)
    assert out.labels.shape == (1, 96, 120) and out.merged_maps[0].shape[1:] == (16, 16)
    assert time_ids[0][0].tolist() == [256.0, 256.0, 0.0, 0.0, 256.0, 256.0]


# ------------------------------------------------------------------ the VAE in fp16


def test_vae_encode_dtype_rule():
    def case(dtype, force_upcast, sdxl):
        vae = SimpleNamespace(dtype=dtype, config=SimpleNamespace(force_upcast=force_upcast))
        unet = SimpleNamespace(config={"addition_embed_type": "text_time" if sdxl else None})
        return vae_encode_dtype(vae, unet)

    assert case(torch.float16, True, True) == torch.float32  # SDXL's VAE
    assert case(torch.float16, False, True) == torch.float16  # an fp16-safe VAE (fp16-fix)
    assert case(torch.float16, True, False) == torch.float16  # SD 1.x/2.x: default True, ignored
    assert case(torch.bfloat16, True, True) == torch.bfloat16  # bf16 does not overflow
    assert case(torch.float32, True, True) == torch.float32


@pytest.fixture(scope="module")
def overflowing_vae():
    """The tiny SDXL's VAE with its first convolution scaled so that fp16 activations overflow
    (as SDXL's VAE does on real images) while fp32 ones stay finite."""
    vae = tiny_sdxl_components(seed=0)["vae"]
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(3e5)  # weights stay < 65504
    return vae


def test_sdxl_vae_encodes_in_fp32_when_fp16_overflows(sdxl_components, overflowing_vae):
    image = make_image(0)
    pixels = model_input(image)
    with torch.no_grad():
        z = overflowing_vae.encode(pixels).latent_dist.mean
        assert torch.isfinite(z).all()
        assert not torch.isfinite(copy.deepcopy(overflowing_vae).half().encode(pixels.half()).latent_dist.mean).all()

    fresh = copy.deepcopy(sdxl_components)  # .to(fp16) casts the modules in place
    pipe = ISegPipeline(**{**fresh, "vae": copy.deepcopy(overflowing_vae)})
    pipe = pipe.to(dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    encoder_in, latents = [], []
    handles = [hook(pipe.vae.encoder, encoder_in), hook(pipe.vae.quant_conv, latents, pre=False)]
    out = pipe(image, ["cat"], generator=generator(), output_attentions=True)
    for h in handles:
        h.remove()
    assert encoder_in[0][0].dtype == torch.float32 and pipe.unet.dtype == torch.float16
    assert out.self_attention.dtype == torch.float16 and torch.isfinite(out.heatmaps).all()
    with torch.no_grad():  # the fp16 pipeline's weights, run in fp32
        z = copy.deepcopy(overflowing_vae).half().float().encode(pixels).latent_dist.mean
    torch.testing.assert_close(latents[0][:, :4], z, atol=1e-5, rtol=1e-5)

    # The same VAE declared fp16-safe (force_upcast=False) overflows: an error, never NaN masks.
    unsafe = copy.deepcopy(overflowing_vae)
    unsafe.register_to_config(force_upcast=False)
    pipe = ISegPipeline(**{**fresh, "vae": unsafe}).to(dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="NaN or Inf"):
        pipe(image, ["cat"], generator=generator())
    assert pipe.vae.dtype == torch.float16


def test_sd_vae_stays_fp16(components):
    pipe = ISegPipeline(**copy.deepcopy(components)).to(dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.force_upcast  # diffusers' default, which SD pipelines ignore
    encoder_in = []
    handle = hook(pipe.vae.encoder, encoder_in)
    pipe(make_image(0), ["cat"], generator=generator())
    handle.remove()
    assert encoder_in[0][0].dtype == torch.float16 and pipe.vae.dtype == torch.float16


# ------------------------------------------------------------------ resolution


def test_other_resolutions_warn_and_grids_follow(sdxl, components):
    with pytest.warns(UserWarning, match=r"trained at 256².*at 128² its attention grids are 8×8 and 4×4"):
        out = sdxl.capture(make_image(0), ["cat"], resolution=128)
    assert out.grid == (8, 8) and out.self_attention.shape == (1, 64, 64) and out.cross_attention.shape == (1, 64, 1)
    sd = ISegPipeline(**components)
    sd.set_progress_bar_config(disable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sdxl.capture(make_image(0), ["cat"])  # native: no warning
        sd.capture(make_image(0), ["cat"], resolution=256)  # SD: as before, no warning


# ------------------------------------------------------------------ loading


def _turbo_scheduler(config) -> EulerDiscreteScheduler:
    """The Turbo models ship Euler with trailing timestep spacing."""
    return EulerDiscreteScheduler.from_config(config, timestep_spacing="trailing")


def test_sdxl_folder_round_trips(sdxl, sdxl_components, tmp_path):
    StableDiffusionXLPipeline(**sdxl_components).save_pretrained(tmp_path / "xl")
    loaded = ISegPipeline.from_pretrained(tmp_path / "xl")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert loaded.tokenizer_2.pad_token == "!"
    image = make_image(0)
    expected = sdxl(image, CLASSES, generator=generator(), output_attentions=True)
    got = loaded(image, CLASSES, generator=generator(), output_attentions=True)
    torch.testing.assert_close(got.cross_attention, expected.cross_attention)
    torch.testing.assert_close(got.self_attention, expected.self_attention)

    loaded.save_pretrained(tmp_path / "iseg")
    index = json.loads((tmp_path / "iseg" / "model_index.json").read_text())
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["tokenizer_2"] == ["transformers", "CLIPTokenizer"]
    again = ISegPipeline.from_pretrained(tmp_path / "iseg")
    assert again.text_encoder_2 is not None and is_sdxl(again)

    shared = ISegPipeline.from_pipe(StableDiffusionXLPipeline(**sdxl_components))
    assert shared.text_encoder_2 is sdxl_components["text_encoder_2"]
    assert shared.tokenizer_2 is sdxl_components["tokenizer_2"]


def test_sd_folders_still_round_trip(components, tmp_path):
    sd = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    sd.save_pretrained(tmp_path / "sd")  # a folder without text_encoder_2 in its model_index
    loaded = ISegPipeline.from_pretrained(tmp_path / "sd")
    assert loaded.text_encoder_2 is None and loaded.tokenizer_2 is None
    loaded.save_pretrained(tmp_path / "iseg")
    index = json.loads((tmp_path / "iseg" / "model_index.json").read_text())
    assert index["text_encoder_2"] == [None, None] and not (tmp_path / "iseg" / "text_encoder_2").exists()
    again = ISegPipeline.from_pretrained(tmp_path / "iseg")
    again.set_progress_bar_config(disable=True)
    assert again.text_encoder_2 is None and again(make_image(0), ["cat"]).labels.shape == (1, 96, 120)


def test_turbo_models_load_and_run_with_their_recipes(sdxl_components, components, tmp_path):
    """SD-Turbo: SD 2.1's layout with Euler (trailing): ``paper``; SDXL-Turbo: SDXL's layout
    trained at 512² (``sample_size`` 64; 16 in the tiny one): ``sdxl``, no warning at its size."""
    sd_turbo = {**components, "scheduler": _turbo_scheduler(components["scheduler"].config)}
    StableDiffusionPipeline(**sd_turbo, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp_path / "sd-turbo")  # fmt: skip
    config = dict(sdxl_components["unet"].config, sample_size=16)
    unet = type(sdxl_components["unet"]).from_config(config)
    xl_turbo = {**sdxl_components, "unet": unet, "scheduler": _turbo_scheduler(sdxl_components["scheduler"].config)}
    StableDiffusionXLPipeline(**xl_turbo).save_pretrained(tmp_path / "sdxl-turbo")

    for folder, recipe, grid in (("sd-turbo", "paper", 16), ("sdxl-turbo", "sdxl", 8)):
        pipe = ISegPipeline.from_pretrained(tmp_path / folder)
        pipe.set_progress_bar_config(disable=True)
        assert isinstance(pipe.scheduler, EulerDiscreteScheduler) and pipe.resolve_recipe().name == recipe
        seen, handles = record_projections(pipe.unet, [get_recipe(recipe).self_attention_layer])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = pipe(make_image(0), ["cat"], generator=generator(), output_attentions=True)
        for h in handles:
            h.remove()
        layer = get_recipe(recipe).self_attention_layer
        q, k = seen[(layer, "to_q")][0], seen[(layer, "to_k")][0]
        heads = pipe.unet.get_submodule(layer).heads
        assert out.self_attention.shape == (1, grid * grid, grid * grid)
        torch.testing.assert_close(out.self_attention.double(), head_probs(q, k, heads).mean(1), atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ errors


def test_mismatched_components_fail_clearly(sdxl_components, components, tmp_path):
    no_second = {k: v for k, v in sdxl_components.items() if k not in ("text_encoder_2", "tokenizer_2")}
    with pytest.raises(ValueError, match="SDXL UNet .* needs text_encoder, tokenizer, text_encoder_2"):
        ISegPipeline(**no_second)
    with pytest.raises(ValueError, match="text_encoder_2: an SD 1.x/2.x UNet"):
        second = {k: sdxl_components[k] for k in ("text_encoder_2", "tokenizer_2")}
        ISegPipeline(**components, **second)
    with pytest.raises(ValueError, match="widths add up to 64"):
        ISegPipeline(**{**sdxl_components, "text_encoder_2": sdxl_components["text_encoder"]})

    other = make_clip_tokenizer(tmp_path, words=("a", "cat"))  # "photograph" is not one token there
    pipe = ISegPipeline(**{**sdxl_components, "tokenizer_2": other})
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="tokenizer_2 has no token 'photograph</w>'"):
        pipe(make_image(0), ["cat"])


def test_sd_recipes_on_sdxl_name_the_sdxl_recipe(sdxl):
    with pytest.raises(ValueError, match="no transformer-block attention layer 'up_blocks.3.*recipe 'sdxl'"):
        sdxl(make_image(0), ["cat"], recipe="paper")


# ------------------------------------------------------------------ the command line


@pytest.fixture
def sdxl_cli(sdxl_components, tmp_path, monkeypatch):
    """A saved tiny SDXL folder, one photo, and the names of the recipes the pipeline resolves
    (a spy on ``resolve_recipe``): ``(folder, photo, names)``."""
    StableDiffusionXLPipeline(**sdxl_components).save_pretrained(tmp_path / "xl")
    path = tmp_path / "photo.png"
    make_image(4, (60, 80)).save(path)
    names = []
    original = ISegPipeline.resolve_recipe

    def spy(self, *args, **kwargs):
        recipe = original(self, *args, **kwargs)
        names.append(recipe.name)
        return recipe

    monkeypatch.setattr(ISegPipeline, "resolve_recipe", spy)
    return tmp_path / "xl", path, names


def _cli_options(folder, out):
    return ["--model", str(folder), "--out", str(out), "--device", "cpu", "--dtype", "fp32"]


def test_cli_picks_the_sdxl_recipe_for_an_sdxl_folder(sdxl_cli, tmp_path, capsys):
    from iseg.cli import main
    from iseg.images import load_image

    folder, path, names = sdxl_cli
    argv = ["segment", str(path), "--classes", "cat,potted plant", *_cli_options(folder, tmp_path / "out")]
    assert main(argv) == 0, capsys.readouterr().err
    assert set(names) == {"sdxl"}
    loaded = ISegPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    direct = loaded(load_image(path), CLASSES, generator=generator(0)).labels[0]  # the CLI's seed 0
    with Image.open(tmp_path / "out" / "photo_labels.png") as png:
        assert torch.equal(torch.from_numpy(np.asarray(png).astype(np.int64)), direct)


def test_cli_regions_pick_the_sdxl_interactive_recipe(sdxl_cli, tmp_path, capsys):
    from iseg.cli import main

    folder, path, names = sdxl_cli
    argv = ["regions", str(path), "--point", "20,30", *_cli_options(folder, tmp_path / "out")]
    assert main(argv) == 0, capsys.readouterr().err
    assert set(names) == {"sdxl-interactive"}
    assert (tmp_path / "out" / "photo_region1_mask.png").is_file()
