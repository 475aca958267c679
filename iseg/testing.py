"""Stable Diffusion components built offline, for tests and benchmarks.

Nothing here touches the Hugging Face hub. Two builders return the five
components a ``StableDiffusionPipeline`` takes (``vae``, ``text_encoder``,
``tokenizer``, ``unet``, ``scheduler``), with randomly initialised weights:

* :func:`tiny_components` keeps Stable Diffusion's block layout (four UNet
  levels, three with cross-attention, two resnets per down block and three
  per up block, a 4-block VAE with ``vae_scale_factor`` 8) at a tiny width,
  so a full pipeline runs on CPU in well under a second. The UNet's latent is
  ``[B, 4, 16, 16]`` (images ``[B, 3, 128, 128]``) and the text states are
  ``[B, 77, 32]``. Attention resolutions (latent side) are 16, 8 and 4 in
  ``down_blocks.0-2`` / ``up_blocks.3-1`` and 2 in the mid block, so
  ``up_blocks.3.attentions.*.transformer_blocks.0.attn1`` sees
  ``HW = 16 * 16 = 256`` query tokens (4096 in SD 2.1-base at 512 px).
* :func:`sd21_base_components` writes out the real Stable Diffusion
  2.1-base architectures (865.9M-parameter UNet, 83.7M VAE, 340.4M OpenCLIP-H
  text tower), for benchmarks whose speed does not depend on weight values.

Both use :func:`make_clip_tokenizer`, a real byte-level BPE CLIP tokenizer
with a small vocabulary written to disk (``vocab.json`` and ``merges.txt``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

__all__ = [
    "DEFAULT_WORDS",
    "bytes_to_unicode",
    "make_clip_tokenizer",
    "sd14_components",
    "sd21_base_components",
    "sdxl_base_components",
    "tiny_components",
    "tiny_sdxl_components",
]

DEFAULT_WORDS: tuple[str, ...] = (
    "a",
    "photograph",
    "of",
    "and",
    "other",
    "object",
    "background",
    "cat",
    "dog",
    "person",
    "car",
    "bird",
    "sky",
    "tree",
    "grass",
    "road",
    "potted",
    "plant",
    "tv",
    "monitor",
)
"""Words that :func:`make_clip_tokenizer` turns into single tokens by default.

"potted plant" is therefore two tokens and any other word (e.g. "zebra")
several, so prompts with multi-token class names occur naturally.
"""

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
END_OF_WORD = "</w>"

TINY_VOCAB_SIZE = 1000
"""Embedding rows of the tiny text encoder; the default tokenizer uses 579."""


def bytes_to_unicode() -> dict[int, str]:
    """Map each of the 256 byte values to a printable unicode character.

    This is the reversible byte-level alphabet of GPT-2 and CLIP: printable
    Latin-1 bytes map to themselves, the other 68 bytes to code points 256
    and up, so BPE never has to handle whitespace or control characters.

    Returns:
        ``{byte: character}`` with 256 entries, in CLIP's vocabulary order
        (printable bytes first, then the remapped ones).
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    remapped = [b for b in range(256) if b not in printable]
    code_points = printable + [256 + n for n in range(len(remapped))]
    return {b: chr(c) for b, c in zip(printable + remapped, code_points)}


def _learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Learn BPE merges that turn every word into exactly one token.

    Standard BPE training on the word list (each word counted once), run
    until no word has two symbols left: at each step the most frequent
    adjacent pair is merged, ties going to the pair seen first. Merges
    learned this way apply correctly in rank order, whereas independent
    per-word chains can break each other (``o t`` from "other" would split
    "photograph" if ranked before ``ph o``).

    Args:
        words: lower-case words; each must be a single CLIP pre-token.

    Returns:
        Merges in rank order, each a pair of existing symbols.
    """
    byte_encoder = bytes_to_unicode()
    segmented = []
    for word in dict.fromkeys(words):
        symbols = [byte_encoder[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        segmented.append(symbols)

    merges = []
    while True:
        counts = Counter(
            pair for symbols in segmented for pair in zip(symbols, symbols[1:])
        )
        if not counts:
            return merges
        best = max(counts, key=counts.__getitem__)  # first seen wins ties
        merges.append(best)
        for symbols in segmented:
            i = 0
            while i < len(symbols) - 1:
                if (symbols[i], symbols[i + 1]) == best:
                    symbols[i : i + 2] = [best[0] + best[1]]
                i += 1


def make_clip_tokenizer(
    directory: str | os.PathLike[str],
    words: Sequence[str] = DEFAULT_WORDS,
    pad_token: str = EOS_TOKEN,
) -> CLIPTokenizer:
    """Write a small byte-level BPE vocabulary and load it as a CLIP tokenizer.

    The vocabulary follows CLIP's layout: the 256 byte-level characters of
    :func:`bytes_to_unicode`, the same 256 with the ``</w>`` end-of-word
    suffix, one token per merge, then ``<|startoftext|>`` and
    ``<|endoftext|>`` (the latter also serves as pad token, as in SD 1.x).
    The merges make each of ``words`` a single token; any other word falls
    apart into several sub-word or character tokens. Since CLIP
    pre-tokenizes on whitespace and letter runs, encoding a prompt gives the
    concatenation of encoding its words one by one.

    Args:
        directory: existing folder; ``vocab.json`` and ``merges.txt`` are
            written there (and overwritten if present).
        words: lower-case, letters-only words to make single tokens.
        pad_token: ``<|endoftext|>`` (SD 1.x/2.x and SDXL's first tokenizer) or ``"!"``
            (SDXL's second tokenizer pads with it, id 0).

    Returns:
        A ``CLIPTokenizer`` with ``model_max_length`` 77. ``tokenizer(text,
        padding="max_length", max_length=77).input_ids`` is
        ``[bos, word tokens..., eos, pad...]``; with the default words there
        are 579 ids, all below 1000.

    Raises:
        ValueError: if a word is empty, not lower case or not all letters.
    """
    for word in words:
        if not (word.isalpha() and word == word.lower()):
            raise ValueError(f"not a lower-case, letters-only word: {word!r}")

    base = list(bytes_to_unicode().values())
    merges = _learn_merges(words)
    tokens = (
        base
        + [char + END_OF_WORD for char in base]
        + [left + right for left, right in merges]
        + [BOS_TOKEN, EOS_TOKEN]
    )
    vocab_file = os.path.join(directory, "vocab.json")
    merges_file = os.path.join(directory, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(tokens)}, f, ensure_ascii=False)
    with open(merges_file, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{left} {right}\n" for left, right in merges)
    return CLIPTokenizer.from_pretrained(
        directory,
        model_max_length=MODEL_MAX_LENGTH,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=pad_token,
        unk_token=EOS_TOKEN,
    )


# Stable Diffusion's training noise schedule (1.x, 2.x-base and SDXL share it).
_SD_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, prediction_type="epsilon",
)  # fmt: skip


def _sd_scheduler() -> DDIMScheduler:
    """DDIM with Stable Diffusion's (1.x and 2.x-base) noise schedule."""
    return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **_SD_SCHEDULE)


def _text_config(tokenizer: CLIPTokenizer, **sizes: int | str) -> CLIPTextConfig:
    """A CLIP text config whose special-token ids match ``tokenizer``."""
    return CLIPTextConfig(
        max_position_embeddings=MODEL_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )


def tiny_components(
    seed: int = 0, tokenizer_dir: str | os.PathLike[str] | None = None
) -> dict[str, torch.nn.Module | CLIPTokenizer | DDIMScheduler]:
    """Tiny random-weight Stable Diffusion components in SD 2.x's layout.

    ``torch.manual_seed(seed)`` runs before each model is built, so the same
    seed gives identical weights. Models are float32 and in eval mode.

    * UNet: latent ``[B, 4, 16, 16]``, channels (8, 16, 16, 16), heads
      (2, 4, 4, 4) of width 4, linear projections, text states
      ``[B, 77, 32]``. Cross-attention at latent sides 16, 8, 4 (down and
      up) and 2 (mid); ``up_blocks.3.attentions.{0,1,2}`` self-attend over
      ``HW = 256`` tokens.
    * VAE: 4 blocks (``vae_scale_factor`` 8), channels (8, 16, 16, 16),
      4 latent channels, scaling factor 0.18215; images ``[B, 3, 128, 128]``.
    * Text encoder: 2 layers, width 32, 4 heads, ``[B, 77]`` ids ->
      ``[B, 77, 32]``.

    Args:
        seed: torch seed set before each model.
        tokenizer_dir: where to write the tokenizer files; a new temporary
            folder if ``None``.

    Returns:
        ``{"vae", "text_encoder", "tokenizer", "unet", "scheduler"}``, ready
        for ``StableDiffusionPipeline(**components, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)``.
    """
    tokenizer = make_clip_tokenizer(tokenizer_dir or tempfile.mkdtemp())

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=2,
        attention_head_dim=(2, 4, 4, 4),  # diffusers reads these as head counts
        cross_attention_dim=32,
        norm_num_groups=4,
        use_linear_projection=True,
    )

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=128,
        scaling_factor=0.18215,
    )

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        _text_config(
            tokenizer,
            vocab_size=TINY_VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            hidden_act="gelu",
        )
    )

    return {
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "unet": unet.eval(),
        "scheduler": _sd_scheduler(),
    }



def _sd_components(
    unet_config: dict, text_config: dict, torch_dtype: torch.dtype, tokenizer_dir
) -> dict[str, torch.nn.Module | CLIPTokenizer | DDIMScheduler]:
    """Stable Diffusion 1.x/2.x components with random weights, built directly in
    ``torch_dtype``: the block layout, VAE and scheduler all SD 1.x/2.x-base share, plus the
    UNet and text-encoder settings in which the versions differ."""
    tokenizer = make_clip_tokenizer(tokenizer_dir or tempfile.mkdtemp())
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            norm_num_groups=32,
            norm_eps=1e-5,
            act_fn="silu",
            flip_sin_to_cos=True,
            freq_shift=0,
            downsample_padding=1,
            mid_block_scale_factor=1,
            **unet_config,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            act_fn="silu",
            sample_size=512,
            scaling_factor=0.18215,
        )
        text_encoder = CLIPTextModel(
            _text_config(tokenizer, vocab_size=49408, layer_norm_eps=1e-5, **text_config)
        )
    finally:
        torch.set_default_dtype(default_dtype)
    return {
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "unet": unet.eval(),
        "scheduler": _sd_scheduler(),
    }

def sd21_base_components(
    torch_dtype: torch.dtype = torch.float16,
    tokenizer_dir: str | os.PathLike[str] | None = None,
) -> dict[str, torch.nn.Module | CLIPTokenizer | DDIMScheduler]:
    """Stable Diffusion 2.1-base architectures with random weights.

    The configs are those of ``stabilityai/stable-diffusion-2-1-base``
    written out, so nothing is downloaded; weights are random, which is
    fine for benchmarks whose speed does not depend on weight values.
    Models are built directly in ``torch_dtype`` (no float32 copy) and put
    in eval mode; the parameters take 2.6 GB in float16. With these random
    weights, activations stay below 10 in magnitude, so float16 does not
    overflow.

    * UNet (865.9M parameters): latent ``[B, 4, 64, 64]`` (512 px), channels
      (320, 640, 1280, 1280), heads (5, 10, 20, 20) of width 64, text states
      ``[B, 77, 1024]``. ``up_blocks.3`` self-attention is over
      ``HW = 4096`` tokens.
    * VAE (83.7M): channels (128, 256, 512, 512), scaling factor 0.18215.
    * Text encoder (340.4M): OpenCLIP ViT-H/14's text tower as converted for
      SD 2.x (23 of its 24 layers, width 1024, 16 heads).
    * Scheduler: DDIM with SD 2.1-base's schedule (the checkpoint ships the
      same schedule as a PNDM config).
    * Tokenizer: :func:`make_clip_tokenizer`'s, whose ids (< 1000) are valid
      in the 49408-entry embedding.

    Args:
        torch_dtype: parameter dtype of the three models.
        tokenizer_dir: where to write the tokenizer files; a new temporary
            folder if ``None``.

    Returns:
        ``{"vae", "text_encoder", "tokenizer", "unet", "scheduler"}``.
    """
    unet = dict(
        attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
        use_linear_projection=True, upcast_attention=False,
    )  # fmt: skip
    text = dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
        num_attention_heads=16, hidden_act="gelu", projection_dim=512,
    )  # fmt: skip
    return _sd_components(unet, text, torch_dtype, tokenizer_dir)


def _clip_model(tokenizer: CLIPTokenizer, text: dict, vision: dict, projection_dim: int):
    """A random-weight ``CLIPModel`` whose text special-token ids match ``tokenizer``."""
    config = CLIPConfig(
        text_config=_text_config(tokenizer, hidden_act="quick_gelu", **text).to_dict(),
        vision_config={"hidden_act": "quick_gelu", "patch_size": 16, **vision},
        projection_dim=projection_dim,
        logit_scale_init_value=math.log(100.0),  # OpenAI's trained temperature, exp() = 100
    )
    return CLIPModel(config).eval()


def tiny_clip_components(
    seed: int = 0,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    image_size: int = 112,
) -> dict:
    """A tiny random ``CLIPModel`` with ViT-B/16's layout (12 vision layers, patch 16) and a tokenizer.

    Vision: 12 layers, width 32, 4 heads, ``image_size`` 112 (a 7×7 pretrained position grid,
    so crops are 112² and any other grid is interpolated). Text: 2 layers, width 32, vocabulary
    1000. Projection 16, ``logit_scale.exp() = 100``. ``torch.manual_seed(seed)`` runs first, so
    the same seed gives the same weights. Save both with ``save_pretrained`` to test loading.

    Returns:
        ``{"model": CLIPModel (float32, eval), "tokenizer": CLIPTokenizer}``.
    """
    tokenizer = make_clip_tokenizer(tokenizer_dir or tempfile.mkdtemp())
    torch.manual_seed(seed)
    model = _clip_model(
        tokenizer,
        text={"vocab_size": TINY_VOCAB_SIZE, "hidden_size": 32, "intermediate_size": 37,
              "num_hidden_layers": 2, "num_attention_heads": 4},
        vision={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 12,
                "num_attention_heads": 4, "image_size": image_size},
        projection_dim=16,
    )  # fmt: skip
    return {"model": model, "tokenizer": tokenizer}


def clip_vit_b16_components(tokenizer_dir: str | os.PathLike[str] | None = None) -> dict:
    """``openai/clip-vit-base-patch16``'s architecture with random weights (149.6M parameters).

    For benchmarks of the tagger, whose speed does not depend on weight values: vision 12
    layers, width 768, 12 heads, 224² input, patch 16; text 12 layers, width 512, 8 heads;
    projection 512. The tokenizer is :func:`make_clip_tokenizer`'s (ids < 1000).

    Returns:
        ``{"model": CLIPModel (float32, eval), "tokenizer": CLIPTokenizer}``.
    """
    tokenizer = make_clip_tokenizer(tokenizer_dir or tempfile.mkdtemp())
    model = _clip_model(
        tokenizer,
        text={"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
              "num_hidden_layers": 12, "num_attention_heads": 8},
        vision={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                "num_attention_heads": 12, "image_size": 224},
        projection_dim=512,
    )  # fmt: skip
    return {"model": model, "tokenizer": tokenizer}


def sd14_components(
    torch_dtype: torch.dtype = torch.float16,
    tokenizer_dir: str | os.PathLike[str] | None = None,
) -> dict[str, torch.nn.Module | CLIPTokenizer | DDIMScheduler]:
    """Stable Diffusion 1.4 architectures with random weights (DiffSeg's backbone).

    The configs of ``CompVis/stable-diffusion-v1-4`` written out, built in ``torch_dtype``:

    * UNet (859.5M parameters): latent ``[B, 4, 64, 64]`` (512 px), channels
      (320, 640, 1280, 1280), 8 heads everywhere (width 40, 80, 160, 160), conv projections,
      text states ``[B, 77, 768]``; 16 ``attn1`` layers (5 at 64×64, 5 at 32×32, 5 at 16×16,
      1 at 8×8).
    * VAE: as SD 2.1's (the same architecture), scaling factor 0.18215.
    * Text encoder: CLIP ViT-L/14's text tower (12 layers, width 768, quick-GELU).
    * Scheduler and tokenizer as :func:`sd21_base_components`.

    Returns:
        ``{"vae", "text_encoder", "tokenizer", "unet", "scheduler"}``.
    """
    unet = dict(attention_head_dim=8, cross_attention_dim=768)
    text = dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768,
    )  # fmt: skip
    return _sd_components(unet, text, torch_dtype, tokenizer_dir)


# --- SDXL ------------------------------------------------------------------------------------


def _sdxl_scheduler() -> EulerDiscreteScheduler:
    """Euler with SDXL-base's schedule (the training schedule is SD's scaled-linear one)."""
    return EulerDiscreteScheduler(
        interpolation_type="linear", timestep_spacing="leading", use_karras_sigmas=False, **_SD_SCHEDULE
    )


def _sdxl_components(
    unet: dict, vae: dict, text: dict, text_2: dict, seed: int | None, tokenizer_dir
) -> dict:
    """SDXL components in SDXL-base's block layout with random weights: the two tokenizers (the
    same vocabulary; the second pads with ``"!"`` as SDXL's does), ``CLIPTextModel`` and
    ``CLIPTextModelWithProjection``, a 3-level UNet with ``text_time`` added conditioning
    (``addition_time_embed_dim · 6`` size/crop ids + the pooled projection), the VAE with
    ``force_upcast``. ``torch.manual_seed(seed)`` before each model unless ``seed`` is None.
    No scheduler (it must not be built under another default dtype or device)."""
    directory = tokenizer_dir or tempfile.mkdtemp()
    tokenizer = make_clip_tokenizer(directory)
    directory_2 = os.path.join(directory, "tokenizer_2")  # the second one's files beside
    os.makedirs(directory_2, exist_ok=True)
    tokenizer_2 = make_clip_tokenizer(directory_2, pad_token="!")

    def seeded(build):
        if seed is not None:
            torch.manual_seed(seed)
        return build().eval()

    time_ids_dim = unet.pop("addition_time_embed_dim") * 6
    models = {
        "unet": seeded(lambda: UNet2DConditionModel(
            in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=2, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
            downsample_padding=1, mid_block_scale_factor=1, norm_eps=1e-5,
            use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=time_ids_dim // 6,
            projection_class_embeddings_input_dim=time_ids_dim + text_2["projection_dim"],
            cross_attention_dim=text["hidden_size"] + text_2["hidden_size"],
            **unet,
        )),  # fmt: skip
        "vae": seeded(lambda: AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
            act_fn="silu", scaling_factor=0.13025, force_upcast=True, **vae,
        )),  # fmt: skip
        "text_encoder": seeded(lambda: CLIPTextModel(_text_config(tokenizer, **text))),
        "text_encoder_2": seeded(
            lambda: CLIPTextModelWithProjection(_text_config(tokenizer_2, **text_2))
        ),
    }
    return {**models, "tokenizer": tokenizer, "tokenizer_2": tokenizer_2}


def tiny_sdxl_components(seed: int = 0, tokenizer_dir: str | os.PathLike[str] | None = None) -> dict:
    """Tiny random-weight SDXL components in SDXL-base's layout, for tests on CPU.

    * UNet: 3 levels (``down_blocks.0`` and ``up_blocks.2`` without attention), latent
      ``[B, 4, 32, 32]`` (images ``[B, 3, 256, 256]``), channels (8, 16, 32), heads (2, 4, 8)
      of width 4, SDXL's 2 transformer layers per block at the first attention level (latent
      side 16: SDXL's 64×64 at 1024²) and 10 at the second (side 8: SDXL's 32×32, also the mid
      block), so the ``sdxl`` recipe's layer names all exist. Text states ``[B, 77, 80]`` (32 +
      48, the two encoders' penultimate states concatenated), ``text_time`` added conditioning:
      6 size/crop ids × 8 + the 24-wide pooled projection.
    * VAE: SDXL's 4 blocks (``vae_scale_factor`` 8) at channels (8, 16, 16, 16), scaling factor
      0.13025, ``force_upcast=True`` as SDXL's VAE (which overflows in fp16).
    * ``text_encoder``: ``CLIPTextModel``, 2 layers, width 32; ``text_encoder_2``:
      ``CLIPTextModelWithProjection``, 2 layers, width 48, projection 24.
    * ``tokenizer``/``tokenizer_2``: :func:`make_clip_tokenizer`'s vocabulary; the second pads
      with ``"!"`` (id 0) as SDXL's.
    * ``scheduler``: ``EulerDiscreteScheduler`` with SDXL's schedule.

    ``torch.manual_seed(seed)`` runs before each model. Models are float32 and in eval mode.

    Returns:
        ``{"vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet",
        "scheduler"}``, ready for ``StableDiffusionXLPipeline(**components)``.
    """
    unet = dict(
        sample_size=32, block_out_channels=(8, 16, 32), attention_head_dim=(2, 4, 8),
        transformer_layers_per_block=(1, 2, 10), norm_num_groups=4, addition_time_embed_dim=8,
    )  # fmt: skip
    vae = dict(block_out_channels=(8, 16, 16, 16), norm_num_groups=4, sample_size=256)
    small = dict(vocab_size=TINY_VOCAB_SIZE, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    text = dict(hidden_size=32, hidden_act="quick_gelu", **small)
    text_2 = dict(hidden_size=48, hidden_act="gelu", projection_dim=24, **small)
    return {**_sdxl_components(unet, vae, text, text_2, seed, tokenizer_dir), "scheduler": _sdxl_scheduler()}


def sdxl_base_components(
    torch_dtype: torch.dtype = torch.float16,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """``stabilityai/stable-diffusion-xl-base-1.0``'s architectures with random weights.

    The configs written out, so nothing is downloaded; for benchmarks, whose speed does not
    depend on weight values. Built directly in ``torch_dtype`` on ``device`` (``"cuda"`` skips
    a CPU copy and initialises in seconds); eval mode.

    * UNet (2.57B parameters): latent ``[B, 4, 128, 128]`` (1024 px), channels (320, 640,
      1280), heads (5, 10, 20) of width 64, 2 transformer layers per block at 64×64 and 10 at
      32×32 (and in the mid block), none at 128×128; text states ``[B, 77, 2048]``;
      ``text_time`` added conditioning (6 ids × 256 + the 1280-wide pooled projection = 2816).
    * VAE (83.7M): as SD's, scaling factor 0.13025, ``force_upcast=True``.
    * ``text_encoder``: CLIP ViT-L/14's text tower (12 layers, width 768, quick-GELU);
      ``text_encoder_2``: OpenCLIP ViT-bigG/14's (32 layers, width 1280, projection 1280).
    * Tokenizers: :func:`make_clip_tokenizer`'s (ids < 1000), the second padding with ``"!"``.
    * Scheduler: Euler with SDXL's schedule.
    """
    unet = dict(
        sample_size=128, block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10), norm_num_groups=32, addition_time_embed_dim=256,
    )  # fmt: skip
    vae = dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=1024)
    common = dict(vocab_size=49408, layer_norm_eps=1e-5)
    text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768, **common)  # fmt: skip
    text_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                  num_attention_heads=20, hidden_act="gelu", projection_dim=1280, **common)  # fmt: skip
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(device):
            components = _sdxl_components(unet, vae, text, text_2, None, tokenizer_dir)
    finally:
        torch.set_default_dtype(default_dtype)
    return {**components, "scheduler": _sdxl_scheduler()}
