"""Stable Diffusion's real CLIP tokenizer, built offline from the BPE file that ships in the
``open_clip_torch`` wheel (installed with ``pip install --no-deps open_clip_torch`` by
``.ci/run``; found without importing open_clip, which would need torchvision)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os

from transformers import CLIPTokenizer

from iseg.testing import bytes_to_unicode


def bpe_file() -> str | None:
    """Path of ``bpe_simple_vocab_16e6.txt.gz``, or ``None`` when open_clip_torch is missing."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    return path if os.path.isfile(path) else None


def real_clip_tokenizer(directory: str) -> CLIPTokenizer:
    """CLIP's tokenizer (49408 tokens, as SD 1.x/2.x use): the vocabulary is the 256 byte
    characters, the same with ``</w>``, one token per merge (the first 48894 merges), then the
    two special tokens; written as ``vocab.json``/``merges.txt`` and loaded by transformers."""
    with gzip.open(bpe_file(), "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1 : 49152 - 256 - 2 + 1]]
    base = list(bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    return CLIPTokenizer.from_pretrained(
        directory, model_max_length=77, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>",
    )  # fmt: skip
