"""Tests for ``iseg.testing``: the offline CLIP tokenizer and tiny SD components."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import Attention
from transformers import CLIPTokenizer

from iseg.testing import (
    DEFAULT_WORDS,
    bytes_to_unicode,
    make_clip_tokenizer,
    tiny_components,
)

PROMPT_WORDS = ["a", "photograph", "of", "cat", "and", "dog"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> CLIPTokenizer:
    return make_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def components() -> dict:
    return tiny_components(seed=0)


def word_ids(tokenizer: CLIPTokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without the bos/eos tokens."""
    return tokenizer(text, add_special_tokens=False).input_ids


# --- bytes_to_unicode ------------------------------------------------------


def test_bytes_to_unicode_is_a_bijection_onto_printable_characters() -> None:
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(table[b] == chr(b) for b in range(ord("!"), ord("~") + 1))
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord(" ")] == "Ġ"  # as in GPT-2 and CLIP


# --- make_clip_tokenizer ---------------------------------------------------


def test_tokenizer_writes_clip_layout_vocab(tmp_path: Path) -> None:
    tokenizer = make_clip_tokenizer(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    base = list(bytes_to_unicode().values())
    assert [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1])][:512] == (
        base + [c + "</w>" for c in base]
    )
    assert merges[0].startswith("#version")
    assert len(vocab) == 512 + len(merges[1:]) + 2
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert len(tokenizer) == len(vocab) < 1000


def test_special_tokens_and_max_length(tokenizer: CLIPTokenizer) -> None:
    assert tokenizer.model_max_length == 77
    assert tokenizer.bos_token == "<|startoftext|>"
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id != tokenizer.bos_token_id
    ids = tokenizer(
        "a cat", padding="max_length", max_length=tokenizer.model_max_length,
        truncation=True,
    ).input_ids
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id
    assert ids[1:3] == word_ids(tokenizer, "a cat")
    assert ids[3:] == [tokenizer.eos_token_id] * 74


@pytest.mark.parametrize("word", DEFAULT_WORDS)
def test_default_words_are_single_tokens(tokenizer: CLIPTokenizer, word: str) -> None:
    (token,) = tokenizer.convert_ids_to_tokens(word_ids(tokenizer, word))
    assert token == word + "</w>"


def test_multi_token_names(tokenizer: CLIPTokenizer) -> None:
    assert len(word_ids(tokenizer, "cat")) == 1
    assert word_ids(tokenizer, "potted plant") == (
        word_ids(tokenizer, "potted") + word_ids(tokenizer, "plant")
    )
    assert len(word_ids(tokenizer, "potted plant")) == 2
    zebra = tokenizer.convert_ids_to_tokens(word_ids(tokenizer, "zebra"))
    assert len(zebra) > 1
    assert "".join(zebra) == "zebra</w>"


def test_prompt_is_concatenation_of_words(tokenizer: CLIPTokenizer) -> None:
    prompt = " ".join(PROMPT_WORDS + ["zebra", "potted", "plant"])
    expected = [i for word in prompt.split() for i in word_ids(tokenizer, word)]
    assert word_ids(tokenizer, prompt) == expected
    assert tokenizer(prompt).input_ids == (
        [tokenizer.bos_token_id] + expected + [tokenizer.eos_token_id]
    )
    assert tokenizer.decode(expected) == prompt


def test_normalisation_lowercases_and_splits_punctuation(
    tokenizer: CLIPTokenizer,
) -> None:
    assert word_ids(tokenizer, "Cat,  DOG!") == (
        word_ids(tokenizer, "cat") + word_ids(tokenizer, ",")
        + word_ids(tokenizer, "dog") + word_ids(tokenizer, "!")
    )


def test_custom_words_with_overlapping_pieces(tmp_path: Path) -> None:
    # Independent left-to-right merge chains would break here: "o t" (from
    # "other") or "to" would split "photograph" unless ranked carefully.
    words = ["other", "to", "graph", "photograph", "photo", "zebra"]
    tokenizer = make_clip_tokenizer(tmp_path, words)
    for word in words:
        assert len(word_ids(tokenizer, word)) == 1, word
    assert len(word_ids(tokenizer, "cat")) == 3


@pytest.mark.parametrize("word", ["Cat", "potted plant", "", "tv2"])
def test_rejects_words_that_are_not_one_lowercase_pretoken(
    tmp_path: Path, word: str
) -> None:
    with pytest.raises(ValueError, match="letters-only"):
        make_clip_tokenizer(tmp_path, ["cat", word])


# --- tiny_components -------------------------------------------------------


def test_component_types_and_modes(components: dict) -> None:
    assert set(components) == {
        "vae", "text_encoder", "tokenizer", "unet", "scheduler"
    }
    for name in ("vae", "text_encoder", "unet"):
        model = components[name]
        assert not model.training
        assert {p.dtype for p in model.parameters()} == {torch.float32}
    vae = components["vae"]
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8
    assert vae.config.scaling_factor == 0.18215
    scheduler = components["scheduler"].config
    assert (scheduler.beta_start, scheduler.beta_end) == (0.00085, 0.012)
    assert scheduler.beta_schedule == "scaled_linear"
    assert not scheduler.clip_sample and not scheduler.set_alpha_to_one
    text_config = components["text_encoder"].config
    tokenizer = components["tokenizer"]
    assert text_config.eos_token_id == tokenizer.eos_token_id
    assert text_config.bos_token_id == tokenizer.bos_token_id
    assert len(tokenizer) <= text_config.vocab_size


@pytest.mark.parametrize(
    ("name", "tokens", "heads"),
    [
        ("down_blocks.0.attentions.1.transformer_blocks.0.attn1", 256, 2),
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn2", 64, 4),
        ("mid_block.attentions.0.transformer_blocks.0.attn2", 4, 4),
        ("up_blocks.1.attentions.2.transformer_blocks.0.attn2", 16, 4),
        ("up_blocks.3.attentions.1.transformer_blocks.0.attn1", 256, 2),
    ],
)
def test_unet_attention_layout(
    components: dict, name: str, tokens: int, heads: int
) -> None:
    unet = components["unet"]
    attn = unet.get_submodule(name)
    assert isinstance(attn, Attention)
    assert attn.heads == heads
    assert attn.is_cross_attention == name.endswith("attn2")
    seen = []
    handle = attn.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    try:
        with torch.no_grad():
            text = torch.randn(1, 77, 32)
            unet(torch.randn(1, 4, 16, 16), 10, encoder_hidden_states=text)
    finally:
        handle.remove()
    assert seen == [torch.Size([1, tokens, attn.inner_dim])]


def test_unet_has_sd_attention_counts(components: dict) -> None:
    unet = components["unet"]
    assert [len(b.attentions) for b in unet.down_blocks[:3]] == [2, 2, 2]
    assert [len(b.attentions) for b in unet.up_blocks[1:]] == [3, 3, 3]
    assert not hasattr(unet.down_blocks[3], "attentions")
    assert not hasattr(unet.up_blocks[0], "attentions")


def test_forward_shapes(components: dict) -> None:
    tokenizer = components["tokenizer"]
    ids = tokenizer(
        "a photograph of cat", padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        text = components["text_encoder"](ids)[0]
        latent = components["vae"].encode(torch.randn(1, 3, 128, 128)).latent_dist.mean
        noise = components["unet"](latent, 500, encoder_hidden_states=text).sample
    assert text.shape == (1, 77, 32)
    assert latent.shape == (1, 4, 16, 16)
    assert noise.shape == (1, 4, 16, 16)
    assert torch.isfinite(noise).all()


def test_same_seed_same_weights() -> None:
    first, again, other = (tiny_components(seed=s) for s in (3, 3, 4))
    for name in ("vae", "text_encoder", "unet"):
        a, b, c = (dict(x[name].named_parameters()) for x in (first, again, other))
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert any(not torch.equal(a[k], c[k]) for k in a), name


def test_components_drive_a_stable_diffusion_pipeline(components: dict) -> None:
    pipe = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 128
    latents = pipe(
        "a photograph of cat", num_inference_steps=2, output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert latents.shape == (1, 4, 16, 16)
    assert torch.isfinite(latents).all()
