"""What the library and the ``iseg`` commands say about the Hugging Face hub (stdlib only).

* :func:`download_command`: the installed client's download command, for error messages
  (``hf download`` with huggingface_hub ≥ 0.34, else ``huggingface-cli download``).
* :func:`hub_offline`: whether ``HF_HUB_OFFLINE`` is set to a true value (huggingface_hub's
  own rule: ``1``, ``true``, ``yes``, ``on``, any case).

Example:
    >>> f"download it with `{download_command()} openai/clip-vit-base-patch16 --local-dir DIR`"
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

__all__ = ["download_command", "dtype_keyword", "hub_offline"]


def download_command() -> str:
    """The installed huggingface_hub's download command: ``hf download`` (≥ 0.34) or the
    older ``huggingface-cli download``."""
    with contextlib.suppress(ImportError, ValueError):
        if importlib.util.find_spec("huggingface_hub.cli.hf") is not None:
            return "hf download"
    return "huggingface-cli download"


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set to a true value."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def dtype_keyword() -> str:
    """The dtype keyword of the installed diffusers' ``from_pretrained``: ``"dtype"`` from
    diffusers 0.40 (``torch_dtype`` then warns that it is deprecated), else ``"torch_dtype"``."""
    import importlib.metadata  # here, not at the top: ~20 ms (email, zipfile) of `iseg --help`

    try:
        major, minor = (int(part) for part in importlib.metadata.version("diffusers").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return "torch_dtype"
    return "dtype" if (major, minor) >= (0, 40) else "torch_dtype"
