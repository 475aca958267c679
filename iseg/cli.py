"""Command line: ``iseg segment IMAGE... --classes "cat,dog"`` writes label and overlay PNGs.

For each image ``OUT/<stem>_labels.png`` (palette PNG: 0 = background, k = the k-th class, VOC
colours) and ``OUT/<stem>_overlay.png`` (the image with the labels' colours blended in). PNGs
are written atomically; a rerun skips images whose two outputs exist, so a long run can be
stopped and resumed. Usage errors exit with 2, a model or image that cannot be read with 1,
each with one ``iseg: error: ...`` line on stderr and no traceback.

Example:
    $ iseg segment cat.jpg dog.jpg --classes "cat, dog, sofa" --out masks
    $ python -m iseg segment photos/*.jpg --classes "person" --device cpu --dtype fp32
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from . import masks
from .pipeline import ISegPipeline

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PROG = "iseg"


class CommandError(Exception):
    """A failure reported as one ``iseg: error: ...`` line and exit status ``code``."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# --- arguments ----------------------------------------------------------------------------


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def _finite_float(text: str, low: float, inclusive: bool) -> float:
    value = float(text)
    if value != value or value == float("inf") or not (value >= low if inclusive else value > low):
        raise argparse.ArgumentTypeError(
            f"must be a finite number {'≥' if inclusive else '>'} {low:g}, got {text}"
        )
    return value


def _positive_float(text: str) -> float:
    return _finite_float(text, 0.0, inclusive=False)


def _lam(text: str) -> float | None:
    """λ ≥ 0, or ``none`` to refine with the raw self-attention (no Ent-Self)."""
    if text.strip().lower() == "none":
        return None
    return _finite_float(text, 0.0, inclusive=True)


def _device(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device: {text!r}") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"expected cuda, cuda:N or cpu, got {text!r}")
    return str(device)


# Friendly names for the type checks in argparse's messages ("invalid positive int value").
_non_negative_int.__name__ = "non-negative int"
_positive_int.__name__ = "positive int"
_positive_float.__name__ = "positive number"
_lam.__name__ = "λ (a number ≥ 0 or 'none')"
_device.__name__ = "device"


def parse_classes(text: str) -> tuple[str, ...]:
    """``"cat, potted plant"`` → ``("cat", "potted plant")``.

    Names are stripped and inner whitespace collapsed. Raises ``ValueError`` for an empty name
    (``"cat,,dog"``, ``" , "``) or a name given twice.
    """
    names = tuple(" ".join(name.split()) for name in text.split(","))
    hint = "give them comma-separated: --classes 'cat,dog'"
    if not any(names):
        raise ValueError(f"no class names in {text!r}; {hint}")
    if not all(names):
        raise ValueError(f"empty class name in {text!r}; {hint}")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"class {name!r} is given twice in {text!r}")
        seen.add(name)
    return names


def _classes(text: str) -> tuple[str, ...]:
    try:
        return parse_classes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The ``iseg`` argument parser (one subcommand, ``segment``)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Training-free segmentation by class names with iSeg on Stable Diffusion.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    segment = commands.add_parser(
        "segment",
        help="segment images into the given classes",
        description=(
            "Write OUT/<stem>_labels.png (palette PNG: 0 = background, k = the k-th class) and "
            "OUT/<stem>_overlay.png for each IMAGE. Images whose two outputs exist are skipped "
            "(unless --overwrite), so an interrupted run resumes where it stopped."
        ),
    )
    # fmt: off
    add = segment.add_argument
    add("images", nargs="+", metavar="IMAGE", help="input image files (any PIL format or mode)")
    add("--classes", type=_classes, required=True, metavar="NAMES",
        help="comma-separated class names, e.g. 'cat,potted plant' (label k = the k-th name)")
    add("--model", default=DEFAULT_MODEL, metavar="REPO_OR_DIR",
        help=f"diffusers Stable Diffusion repo id or local folder (default: {DEFAULT_MODEL})")
    add("--out", default="iseg-out", metavar="DIR", help="output folder (default: iseg-out)")
    add("--device", type=_device, default=None,
        help="cuda, cuda:N or cpu (default: cuda if available, else cpu)")
    add("--dtype", choices=sorted(DTYPES), default=None,
        help="model precision (default: fp16 on cuda, fp32 on cpu)")

    add = segment.add_argument_group("iSeg settings (the pipeline's defaults)").add_argument
    add("--iters", type=_non_negative_int, default=10,
        help="refinement iterations N (default: 10)")
    add("--lam", type=_lam, default=0.01,
        help="Ent-Self strength λ, or 'none' for the raw self-attention (default: 0.01)")
    add("--gamma", type=_positive_float, default=1.6, help="Cat-Cross weight γ (default: 1.6)")
    add("--background-threshold", type=_positive_float, default=None, metavar="TAU",
        help="pixels whose best heat is below TAU are background "
             "(default: the background score (1 - max heat)²)")
    add("--seed", type=int, default=0,
        help="noise seed; the i-th IMAGE uses seed + i, whatever the batching (default: 0)")

    add = segment.add_argument_group("run").add_argument
    add("--batch-size", type=_positive_int, default=1, help="images per UNet call (default: 1)")
    add("--overwrite", action="store_true", help="recompute images whose outputs exist")
    # fmt: on
    return parser


# --- helpers ------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its class name if it has none)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def output_names(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """One output name per input: its stem, suffixed with ``_<index>`` where stems collide.

    ``["a/x.png", "b/x.png", "y.jpg"]`` → ``["x_0", "x_1", "y"]``. Names are unique even on a
    case-insensitive file system and depend only on the list, so a rerun finds its outputs.
    """
    stems = [Path(p).stem or "image" for p in paths]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem.casefold()] = counts.get(stem.casefold(), 0) + 1
    names, used = [], set()
    for index, stem in enumerate(stems):
        name = stem if counts[stem.casefold()] == 1 else f"{stem}_{index}"
        while name.casefold() in used:  # "x_1" given as an input too
            name += f"_{index}"
        used.add(name.casefold())
        names.append(name)
    return names


def save_atomic(image: Image.Image, path: Path) -> None:
    """Save ``image`` as PNG at ``path`` via a temporary file in the same folder and
    ``os.replace``, so ``path`` is either absent, the old file or the complete new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:  # not mkstemp: its files are 0600, these follow the umask
            image.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _check_image(path: str) -> None:
    """Fail fast on a missing or unidentifiable image (reads the header only)."""
    try:
        with Image.open(path):
            pass
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # PIL's are OSErrors
        raise CommandError(f"cannot read image '{path}': {_first_line(exc)}") from None


def _read_image(path: str) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CommandError(f"cannot read image '{path}': {_first_line(exc)}") from None
    return image


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """While loading: silence diffusers/transformers warnings (accelerate missing, renamed
    arguments, hub retries) unless more verbose logging was asked for, and their loading bars
    when stderr is not a terminal (hub downloads keep theirs). Restores both afterwards."""
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
            # diffusers ≥ 0.42 renamed torch_dtype to dtype (FutureWarning); older ones lack dtype
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for module, level, bar in zip(modules, levels, bars):
            module.set_verbosity(level)
            (module.enable_progress_bar if bar else module.disable_progress_bar)()


def _looks_like_path(model: str) -> bool:
    """A model given as a path, never a hub repo id (``/abs``, ``./rel``, ``../rel``, ``~``)."""
    return os.path.isabs(model) or model.startswith(("./", "../", "~", ".\\", "..\\"))


def load_pipeline(model: str, device: str, dtype: torch.dtype) -> ISegPipeline:
    """``ISegPipeline.from_pretrained(model)`` in ``dtype`` on ``device``.

    Raises:
        CommandError: for any failure (missing folder, offline, corrupt files, no such device),
            with the first line of the cause.
    """
    if _looks_like_path(model) and not os.path.exists(model):
        raise CommandError(f"cannot load model '{model}': no such folder")
    try:
        with _quiet_loading():
            pipe = ISegPipeline.from_pretrained(model, torch_dtype=dtype)
    except Exception as exc:
        raise CommandError(f"cannot load model '{model}': {_first_line(exc)}") from None
    try:
        pipe = pipe.to(device)
    except Exception as exc:
        message = f"cannot move model '{model}' to {device}: {_first_line(exc)}"
        raise CommandError(message) from None
    pipe.set_progress_bar_config(disable=True)  # the CLI's own bar counts images
    return pipe


# --- the command --------------------------------------------------------------------------


def segment(args: argparse.Namespace) -> int:
    """Run ``iseg segment`` on parsed arguments; returns the exit status."""
    classes = args.classes
    for path in args.images:  # before the model loads, so a typo fails fast
        _check_image(path)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {device}: CUDA is not available; use --device cpu", code=2)
    dtype = DTYPES[args.dtype or ("fp16" if torch.device(device).type == "cuda" else "fp32")]

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(f"cannot create output folder '{out}': {_first_line(exc)}") from None

    names = output_names(args.images)
    targets = [(out / f"{n}_labels.png", out / f"{n}_overlay.png") for n in names]
    todo = [
        i for i, (labels_png, overlay_png) in enumerate(targets)
        if args.overwrite or not (labels_png.is_file() and overlay_png.is_file())
    ]  # fmt: skip
    skipped = len(args.images) - len(todo)

    done = 0
    if todo:
        pipe = load_pipeline(args.model, device, dtype)
        try:  # names that do not fit the text encoder fail here, once, not at the first image
            pipe.prompt(classes)
        except ValueError as exc:
            raise CommandError(f"--classes: {_first_line(exc)}", code=2) from None
        with tqdm(total=len(todo), unit="img", disable=None, desc=PROG) as bar:
            for start in range(0, len(todo), args.batch_size):
                batch = todo[start : start + args.batch_size]
                images = [_read_image(args.images[i]) for i in batch]
                try:
                    output = pipe(
                        images,
                        list(classes),
                        iters=args.iters,
                        lam=args.lam,
                        gamma=args.gamma,
                        generator=[torch.Generator().manual_seed(args.seed + i) for i in batch],
                        background_threshold=args.background_threshold,
                    )
                except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError since 2.5
                    raise CommandError(
                        f"out of memory on {device} with --batch-size {args.batch_size}; "
                        "try a smaller --batch-size or --dtype fp16"
                    ) from None
                for i, image, label in zip(batch, images, output.labels):  # tensor [B,H,W] or list
                    label = label.cpu()
                    labels_png, overlay_png = targets[i]
                    save_atomic(masks.label_image(label), labels_png)
                    save_atomic(masks.overlay(image, label), overlay_png)
                    done += 1
                bar.update(len(batch))

    print(
        f"{PROG}: segmented {done} image{'s' * (done != 1)}, skipped {skipped} already done; "
        f"outputs in {out}",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``iseg`` command; returns the exit status.

    Usage errors (bad options, empty class names) exit through ``parser.error`` with status 2;
    a model or image that cannot be read returns 1 after one ``iseg: error: ...`` line.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return segment(args)
    except CommandError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
