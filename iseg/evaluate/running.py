"""The resumable ``iseg eval`` runner: predict a split with the pipeline (:func:`run_eval`),
write predictions and records atomically (:mod:`iseg.files`), skip what is done on rerun, and
score the predictions on disk (:func:`score`)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import secrets
import shutil
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..choices import vocabulary_ids
from ..data import data_path
from ..data.datasets import (
    DatasetError,
    cityscapes_ids,
    class_names,
    open_dataset,
    read_ids,
    read_tags,
    split_ids,
)
from ..files import HOST, remove_stale_temps, write_atomic
from ..masks import palette
from ..recipes import AUTHORS_SEED, get_recipe
from .metrics import (
    HungarianScores,
    SegmentationScores,
    confusion_matrix,
    mmseg_miou,
    scores,
)
from .report import format_markdown, per_image_csv
from .samples import (
    PredictSamples,
    Sample,
    ScoreSamples,
    collate_list,
    collate_scores,
    digest,
)
from .tasks import TAGGER_PRESETS, EvalError, Task, builtin_tagger, get_task

# --- files ---------------------------------------------------------------------------------------


def _write_atomic(path, data: bytes) -> None:
    """Write ``data`` to ``path`` with :func:`iseg.files.write_atomic`, creating its folder (ids
    may hold one: Cityscapes' ``city/``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: f.write(data))


def _png_bytes(pred: np.ndarray) -> bytes:
    """``[H, W]`` uint8 label ids → a palette PNG (VOC colours)."""



    img = Image.fromarray(pred.astype(np.uint8), mode="P")
    img.putpalette(palette())
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- the runner -----------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """What :func:`run_eval` did: predictions made, per-image failures, and the metrics (when
    this process scored; ``None`` when another shard will)."""

    predicted: int
    skipped: int
    failures: dict[str, str]
    metrics: dict | None
    scored_by_this_process: bool

    @property
    def ok(self) -> bool:
        return not self.failures and (self.metrics is None or not self.metrics["failures"])


def _recipe_info(recipe: str | None, task: Task):
    """``(name, seed, applied)``: the recipe to ask the pipeline for, its noise seed, and that it
    applies."""
    name = recipe or task.name
    seed = get_recipe(name).seed  # ValueError on an unknown name
    return name, AUTHORS_SEED if seed is None else seed, True


def _segment(pipe, samples: list[Sample], names: Sequence[str], recipe: str | None, seed: int, device):
    """Labels of ``samples`` (one pipeline call per image size), mapped to dataset ids:
    ``[H, W]`` uint8 numpy arrays and ``[n, n]`` per-batch confusion on the device."""
    groups: dict[tuple, list[Sample]] = {}
    for s in samples:
        groups.setdefault(tuple(s.image.shape), []).append(s)
    kwargs = {"recipe": recipe} if recipe is not None else {}
    kwargs["output_heatmaps"] = False  # labels only
    results = {}
    for group in groups.values():
        pixels = torch.stack([s.image for s in group]).to(device, non_blocking=True).float().div_(255)
        class_lists = [[names[c - 1] for c in s.classes] for s in group]
        generators = [torch.Generator().manual_seed(seed) for _ in group]
        out = pipe(pixels, class_lists, generator=generators, **kwargs)
        labels = out.labels
        for b, s in enumerate(group):
            lut = torch.tensor(vocabulary_ids(class_lists[b], names), dtype=torch.uint8, device=labels[b].device)
            results[s.index] = lut[labels[b]]
    return results, {}


def _segment_unsupervised(task: Task, first_pass: str):
    """A ``segment`` function for unsupervised tasks: ``pipe.segment_unsupervised`` on the
    512×512 crops (DiffSeg's τ of the task and the given first pass), segment ids as uint8, and
    the anchors each image's first pass dropped."""

    def segment(pipe, samples, names, recipe, seed, device):
        pixels = torch.stack([s.image for s in samples]).to(device)
        out = pipe.segment_unsupervised(pixels, kl_threshold=task.kl_threshold, first_pass=first_pass)
        results, dropped = {}, {}
        for b, s in enumerate(samples):
            label = out.labels[b]
            if int(label.max()) > 255:
                raise ValueError(f"{int(label.max()) + 1} segments do not fit a uint8 PNG")
            results[s.index] = label.to(torch.uint8)
            dropped[s.index] = int((out.dropped_anchors or [0] * len(samples))[b])
        return results, dropped

    return segment


def run_eval(
    task: str | Task,
    root,
    out,
    *,
    pipe=None,
    load_pipe=None,
    recipe: str | None = None,
    settings: dict | None = None,
    limit: int | None = None,
    ids_file=None,
    batch_size: int = 1,
    tags=None,
    tagger_model: str | None = None,
    num_shards: int = 1,
    shard_index: int = 0,
    context_order: str | None = None,
    first_pass: str | None = None,
    overwrite: bool = False,
    workers: int = 2,
    device=None,
    progress: bool = True,
    log=print,
) -> EvalResult:
    """Segment a task's split with iSeg, write each prediction, and score the written ones.

    Args:
        task: a :data:`TASKS` name or :class:`Task`.
        root: the dataset folder (see :mod:`iseg.data.datasets` for the layouts).
        out: output folder: ``pred/<id>.png`` (palette PNG of dataset label ids), ``eval.json``
            (the settings, the resolved dataset root), ``records/`` (a checksum of every
            prediction written), ``shards/`` (per-shard completion), ``metrics.json``,
            ``metrics.md``, ``per_image.csv``.
        pipe / load_pipe: the :class:`~iseg.ISegPipeline`, or a callable returning it, called
            only when an image needs the model (a rerun that only scores loads nothing).
        recipe: the pipeline recipe (default: the task's name).
        settings: extra values recorded in ``eval.json`` that a rerun must repeat (model, dtype).
        limit: the first ``limit`` ids of the split only.
        ids_file: a list of ids instead of the paper's split (plain names; Cityscapes' are
            ``city/frame``).
        batch_size: images per pipeline call.
        tags: OVS classes: a tags file, ``"published"`` (the shipped TagCLIP tags) or ``None``
            (the built-in tagger, :func:`builtin_tagger`). A tags file whose ids are not the
            split's is an error; images it does not tag are predicted all background and
            counted in the metrics (``images_untagged``).
        num_shards, shard_index: this process predicts ``ids[shard_index::num_shards]``; the
            metric is computed by the shard that completes the set last.
        context_order: Context label order (``official``/``mmseg``; ``None`` detects it).
        first_pass: DiffSeg's first merging pass for unsupervised tasks (``fp16``, Google's, or
            ``fp32``; default the task's, ``fp16``).
        overwrite: start over in ``out`` (its predictions, records and metrics removed) when it
            holds a run with other settings.
        workers: DataLoader worker processes (0 = decode in this process).
        device: where the pixels go (default the pipeline's execution device).

    Returns:
        :class:`EvalResult`. Per-image problems (unreadable files, size mismatches, bad labels)
        are in ``failures`` and the run goes on; set-up problems raise :class:`EvalError`. A
        prediction that is missing, unreadable or not the one recorded is predicted again.
    """
    task = task if isinstance(task, Task) else get_task(task)
    if not (isinstance(num_shards, int) and num_shards >= 1 and 0 <= shard_index < num_shards):
        raise EvalError(f"shard index {shard_index} must be in [0, {num_shards}) with num_shards ≥ 1")
    if task.mode == "unsupervised":
        first_pass = first_pass or task.first_pass
        if first_pass not in ("fp16", "fp32"):
            raise EvalError(f"first pass must be fp16 or fp32, got {first_pass!r}")
    ids = _task_ids(task, root, ids_file, limit)
    try:
        if task.mode == "unsupervised":  # DiffSeg + iSeg: no text recipe
            recipe_name, seed, have_recipes = f"diffseg+iseg (τ = {task.kl_threshold})", AUTHORS_SEED, False
        else:
            recipe_name, seed, have_recipes = _recipe_info(recipe, task)
    except ValueError as exc:
        raise EvalError(str(exc)) from None
    tagger = None
    if task.mode == "ovs" and tags is None:
        tagger = builtin_tagger(task, device, tagger_model)
        if tagger is None:
            raise EvalError(
                f"{task.name}: give --tags FILE (lines 'id c1 c2 …', 0-based class indices) or "
                "--tags published (the TagCLIP tags the paper used)"
            )
    try:
        ds = open_dataset(task.dataset, root, ids[0], context_order=context_order, context_ids=ids)
    except DatasetError as exc:
        raise EvalError(str(exc)) from None
    names = class_names(task.dataset)
    tag_map, tags_id, coverage = _tags(task, tags, tagger_model, ds, ids, log)

    out = Path(out)
    pred_dir, shard_dir = out / "pred", out / "shards"
    manifest = {
        "task": task.name,
        "root": str(Path(root).expanduser().resolve()),
        "recipe": recipe_name,
        "recipes_applied": have_recipes,
        "tags": tags_id,
        "context_order": ds.order,
        **({"first_pass": first_pass} if task.mode == "unsupervised" else {}),
        "records": 1,  # predictions carry checksums in records/ (older folders have none)
        **(settings or {}),
    }
    _claim(out, manifest, overwrite)
    records = _Records(out / "records")
    known = records.load()

    ids_sha = _sha("\n".join(ids))
    mine = ids[shard_index::num_shards]
    todo = [i for i in mine if not _recorded(pred_dir / f"{i}.png", known.get(i))]
    if num_shards > 1:
        log(f"shard {shard_index + 1}/{num_shards}: {len(mine)} images, {len(mine) - len(todo)} already predicted")

    failures: dict[str, str] = {}
    predicted = skipped = 0
    if todo:
        segment = _segment_unsupervised(task, first_pass) if task.mode == "unsupervised" else _segment
        predicted, skipped, failures = _predict(
            task, ds, todo, tag_map, tagger, segment, names, recipe_name if have_recipes else None, seed,
            pipe, load_pipe, device, batch_size, workers, progress, pred_dir, records,
        )  # fmt: skip

    marker = {"ids_sha": ids_sha, "images": len(mine), "failures": failures, "finished": time.time()}
    _write_atomic(shard_dir / f"{shard_index}-of-{num_shards}.json", (json.dumps(marker, indent=1) + "\n").encode())

    # Score: always when unsharded; when sharded, the shard that finds every marker of this set.
    lock = None
    known_failures = dict(failures)
    if num_shards > 1:
        markers = []
        for i in range(num_shards):
            p = shard_dir / f"{i}-of-{num_shards}.json"
            m = _read_json(p) if p.is_file() else None
            if not isinstance(m, dict) or m.get("ids_sha") != ids_sha:
                log(f"shard {shard_index + 1}/{num_shards} done; the last shard to finish scores")
                return EvalResult(predicted, skipped, failures, None, False)
            markers.append(m)
        lock = shard_dir / f"score-{ids_sha}.lock"
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            log(f"shard {shard_index + 1}/{num_shards} done; another shard is scoring")
            return EvalResult(predicted, skipped, failures, None, False)
        known_failures = {k: v for m in markers for k, v in dict(m.get("failures") or {}).items()}
    try:
        metrics = score(
            task, ds, ids, out, workers=workers, known_failures=known_failures, settings=manifest,
            records=records.load(), untagged=coverage[0], tags_cover=coverage[1],
        )  # fmt: skip
    finally:
        if lock is not None:
            lock.unlink(missing_ok=True)
    return EvalResult(predicted, skipped, failures, metrics, True)


def _task_ids(task: Task, root, ids_file, limit) -> list[str]:
    """The ids to evaluate: ``ids_file``'s, or the task's split (Cityscapes: the frames found)."""
    try:
        if ids_file is not None:
            ids = read_ids(ids_file, folders=task.dataset == "cityscapes")
        elif task.dataset == "cityscapes":  # no shipped list: the val frames on disk
            ids = cityscapes_ids(root)
        elif task.dataset == "cocostuff27":
            ids = read_ids(data_path("diffseg", "Coco164kFull_Stuff_Coarse_7.txt"))
        else:
            ids = split_ids(task.dataset, task.split)
    except DatasetError as exc:
        raise EvalError(str(exc)) from None
    return ids[:limit] if limit is not None else ids


def _tags(task: Task, tags, tagger_model, ds, ids: Sequence[str], log):
    """``(tag map | None, what eval.json records about the tags, (untagged, coverage) | (None,
    None))`` for an OVS task. Tag ids that match no image of the split are an error (naming a
    few and the count); images without tags are counted."""
    if task.mode != "ovs":
        return None, None, (None, None)
    if tags is None:
        # transformers' CLIP: imported by OVS runs without --tags only (start-up time)
        from ..tagger import DEFAULT_TAGGER_MODEL, get_preset

        preset = get_preset(TAGGER_PRESETS[task.dataset])
        model = tagger_model or DEFAULT_TAGGER_MODEL
        if Path(model).expanduser().exists():
            model = str(Path(model).expanduser().resolve())
        record = {"tagger": "builtin", "model": model, "preset": preset.name,
                  **{k: getattr(preset, k) for k in ("r_cwr", "w_local", "w_crop", "r_final")}}  # fmt: skip
        return None, record, (None, None)
    published = str(tags) == "published"
    path = data_path("ovs_labels", task.published_tags) if published else Path(tags)
    try:
        tag_map = read_tags(path, ds.num_classes)
    except DatasetError as exc:
        raise EvalError(str(exc)) from None
    split = set(split_ids(task.dataset, task.split)) | set(ids)
    unknown = [i for i in tag_map if i not in split]
    if unknown:
        example = next(iter(sorted(split)))
        raise EvalError(
            f"tags file {path}: {len(unknown)} of its {len(tag_map)} ids match no image of the "
            f"{task.dataset} {task.split} split (e.g. {', '.join(map(repr, unknown[:3]))}; the split's "
            f"ids look like {example!r})"
        )
    untagged = sum(1 for i in ids if i not in tag_map)
    split_size = len(split_ids(task.dataset, task.split))
    cover = f"{'published' if published else path.name} tags cover {len(tag_map)} of the {split_size} split images"
    if untagged:
        log(f"{untagged} of the {len(ids)} images have no tags: predicted all background and counted ({cover})")
    record = "published" if published else _sha(path.read_text())
    return tag_map, record, (untagged, cover)


def _read_json(path):
    """A JSON file iseg wrote, or ``None`` when it cannot be read as JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _claim(out, manifest: dict, overwrite: bool) -> None:
    """Make ``out`` this run's folder: write ``eval.json`` unless it holds these settings.
    A folder with predictions made with other settings is refused (or, with ``overwrite``,
    emptied of what iseg eval wrote); one whose earlier run wrote no prediction is simply
    taken over; a ``pred/`` that iseg eval did not write (no ``eval.json``) is never touched."""
    pred_dir, manifest_path = out / "pred", out / "eval.json"
    has_predictions = pred_dir.is_dir() and any(pred_dir.rglob("*.png"))
    if manifest_path.is_file():
        old = _read_json(manifest_path)
        if not isinstance(old, dict):
            raise EvalError(f"{manifest_path} is not an eval.json iseg eval wrote; use another --out")
        changed = {k: (old.get(k), v) for k, v in manifest.items() if old.get(k) != v}
        if not changed and not overwrite:
            if pred_dir.is_dir():
                remove_stale_temps(pred_dir, recursive=True)
            return
        if changed and has_predictions and not overwrite:
            what = ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in changed.items())
            raise EvalError(
                f"{out} holds predictions made with other settings ({what}); use --overwrite to start "
                "over or another --out"
            )
        for name in ("pred", "records", "shards"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("metrics.json", "metrics.md", "per_image.csv"):
            (out / name).unlink(missing_ok=True)
    elif pred_dir.exists() and any(pred_dir.iterdir()):
        raise EvalError(f"{pred_dir} holds files that iseg eval did not write (no eval.json); use another --out")
    pred_dir.mkdir(parents=True, exist_ok=True)
    (out / "shards").mkdir(exist_ok=True)
    _write_atomic(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())


def _recorded(path, known: dict | None) -> bool:
    """Whether ``path`` is a prediction this folder's records list (same checksum)."""
    if not known:
        return False
    try:
        return digest(path.read_bytes()) in known
    except OSError:
        return False


class _Records:
    """The checksum of every prediction written: one JSON line ``{"id", "sha", "dropped"}`` per
    prediction, appended after its PNG is in place, in one file per process under ``records/``
    (shards on several machines never share a file). A line cut by a kill is ignored (its
    prediction is then predicted again)."""

    def __init__(self, folder):
        self.folder = folder
        self.path = None
        self.lock = threading.Lock()

    def load(self) -> dict[str, dict[str, int]]:
        """``{id: {checksum: anchors dropped}}`` from every process's file."""
        known: dict[str, dict[str, int]] = {}
        if not self.folder.is_dir():
            return known
        for path in sorted(self.folder.glob("*.jsonl")):
            try:
                text = path.read_text()
            except (OSError, UnicodeDecodeError):
                continue
            for line in text.splitlines():
                try:
                    entry = json.loads(line)
                    known.setdefault(str(entry["id"]), {})[str(entry["sha"])] = int(entry.get("dropped", 0))
                except (ValueError, KeyError, TypeError):
                    continue
        return known

    def add(self, image_id: str, data: bytes, dropped: int = 0) -> None:
        line = json.dumps({"id": image_id, "sha": digest(data), "dropped": dropped}) + "\n"
        with self.lock:
            if self.path is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                self.path = self.folder / f"{HOST}-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
            with open(self.path, "a") as f:
                f.write(line)


def _save_prediction(path, array: np.ndarray, records: _Records, image_id: str, dropped: int) -> None:
    data = _png_bytes(array)
    _write_atomic(path, data)
    records.add(image_id, data, dropped)


def _predict(task, ds, todo, tag_map, tagger, segment, names, recipe, seed, pipe, load_pipe, device,
             batch_size, workers, progress, pred_dir, records):  # fmt: skip
    """Predict ``todo`` and write each prediction (and its record); returns ``(predicted,
    skipped, failures)``."""
    failures: dict[str, str] = {}
    predicted = skipped = 0
    loader = DataLoader(
        PredictSamples(ds, todo, task.mode, tag_map), batch_size=batch_size,
        num_workers=workers, collate_fn=collate_list, pin_memory=False,
    )  # fmt: skip
    n = ds.num_classes
    running = None
    model_failures = 0
    bar = tqdm(total=len(todo), unit="img", disable=not progress, dynamic_ncols=True, desc=task.name)

    writer = ThreadPoolExecutor(max_workers=2)
    pending = []
    try:
        for batch in loader:
            ready = []
            for s in batch:
                if tagger is not None and s.error is None and s.image is not None:
                    s.classes = tuple(sorted(set(tagger(s.image.permute(1, 2, 0).numpy()))))
                if s.error is not None:
                    failures[s.image_id] = s.error
                elif s.skip:
                    skipped += 1
                elif task.mode == "ovs" and not s.classes:  # untagged: all background, no model call
                    ready.append((s, torch.zeros(s.gt.shape, dtype=torch.uint8)))
                else:
                    ready.append((s, None))
            need = [s for s, p in ready if p is None]
            labels, dropped = {}, {}
            if need:
                if pipe is None:
                    pipe = load_pipe()
                    done = bar.n
                    bar.reset()  # the rate and ETA count from here, not from before the load
                    bar.update(done)
                if device is None:  # once: diffusers' _execution_device walks every module
                    device = pipe._execution_device
                try:
                    labels, dropped = segment(pipe, need, names, recipe, seed, device)
                except Exception:  # noqa: BLE001 — isolate the image that fails
                    for s in need:
                        try:
                            one, lost = segment(pipe, [s], names, recipe, seed, device)
                            labels.update(one)
                            dropped.update(lost)
                        except Exception as exc:  # noqa: BLE001
                            failures[s.image_id] = f"{ds.image_path(s.image_id)}: {type(exc).__name__}: {exc}"
                            model_failures += 1
                            if model_failures >= 3 and predicted == 0 and not labels:
                                raise EvalError(
                                    f"the model failed on the first {model_failures} images "
                                    f"(last: {type(exc).__name__}: {exc})"
                                ) from exc
            for s, pred in ready:
                pred = labels.get(s.index) if pred is None else pred
                if pred is None:
                    continue
                if task.mode == "unsupervised":
                    running = running or HungarianScores(n)
                    running.update(s.gt, pred.cpu().numpy())
                else:
                    h = confusion_matrix(s.gt, pred.cpu().numpy(), n)
                    running = h if running is None else running + h
                array = pred.cpu().numpy()
                path = pred_dir / f"{s.image_id}.png"
                pending.append(writer.submit(
                    _save_prediction, path, array, records, s.image_id, dropped.get(s.index, 0)
                ))  # fmt: skip
                predicted += 1
            while len(pending) > 16:
                pending.pop(0).result()
            bar.update(len(batch))
            if ready and running is not None:
                miou = running.miou if task.mode == "unsupervised" else scores(running).miou
                bar.set_postfix_str(f"mIoU {100 * miou:.1f}" if miou is not None else "")
        for f in pending:
            f.result()
    finally:
        for f in pending:
            f.cancel()
        writer.shutdown(wait=True)
        bar.close()
    return predicted, skipped, failures


def score(
    task: Task, ds, ids: Sequence[str], out, *, workers: int = 2, known_failures=None, settings=None,
    records: dict | None = None, untagged: int | None = None, tags_cover: str | None = None,
) -> dict:
    """Score the predictions written under ``out/pred`` for ``ids``; write ``metrics.json``,
    ``metrics.md`` and ``per_image.csv`` in ``out`` and return the metrics (percentages).

    ``records`` (id → {checksum: dropped anchors}) are what the run wrote: a prediction whose
    checksum is not among them is an error, not a score. ``untagged`` / ``tags_cover`` are the
    OVS tag coverage, reported as they are."""
    out = Path(out)
    n = ds.num_classes
    unsupervised = task.mode == "unsupervised"
    total = (np.zeros((3, n), np.int64), np.int64(0)) if unsupervised else np.zeros((n, n), np.int64)
    background_only = np.zeros((n, n), np.int64)
    counts = {"scored": 0, "skipped": 0, "missing": 0, "error": 0}
    failures, per_image = {}, {}
    dropped = dropped_images = 0
    loader = DataLoader(
        ScoreSamples(ds, ids, task.mode, out / "pred", records), batch_size=32, num_workers=workers,
        collate_fn=collate_scores,
    )  # fmt: skip
    for hist, skipped, rows in loader:
        if hist is not None:
            total = (total[0] + hist[0], total[1] + hist[1]) if unsupervised else total + hist
        if skipped is not None:
            background_only += skipped
        for image_id, status, message, row, lost in rows:
            counts[status] += 1
            if status in ("missing", "error"):
                failures[image_id] = (known_failures or {}).get(image_id, message) if status == "missing" else message
            if row is not None:
                per_image[image_id] = row
            dropped += lost
            dropped_images += lost > 0
    pct = lambda v: None if v is None else 100.0 * v  # noqa: E731
    extra = {}
    if unsupervised:
        meter = HungarianScores(n)
        (meter.tp, meter.fp, meter.fn), meter.total = total[0], int(total[1])
        present = meter.tp + meter.fn > 0
        s = SegmentationScores(
            iou=meter.iou,
            acc=tuple(float(t / (t + f)) if t + f > 0 else None for t, f in zip(meter.tp, meter.fn)),
            present=tuple(bool(v) for v in present),
            miou=meter.miou, miou_mmseg=None, pixel_acc=meter.acc, mean_acc=None, pixels=meter.total,
        )  # fmt: skip
        names = ds.class_names
        extra = {"first_pass": (settings or {}).get("first_pass"), "anchors_dropped": dropped,
                 "images_with_anchors_dropped": dropped_images}  # fmt: skip
    else:
        s = scores(total)
        names = ("background",) + ds.class_names
        # MMSegmentation sums every image's areas, background-only images included (which the
        # authors skip; iSeg, given no class, predicts them all background).
        s = dataclasses.replace(s, miou_mmseg=mmseg_miou(total + background_only))
        if task.dataset == "voc_context":
            extra = {"miou_context59": pct(mmseg_miou(total + background_only, ignore_background=True))}
    if untagged is not None:
        extra["images_untagged"] = untagged
        extra["tags_cover"] = tags_cover
    metrics = {
        "task": task.name,
        "table": task.table,
        "dataset": ds.name,
        "layout": ds.layout,
        "split": task.split,
        "images": len(ids),
        **{f"images_{k}": v for k, v in counts.items()},
        "metric": "Hungarian-matched per image (DiffSeg)" if unsupervised else "one confusion matrix (authors)",
        "miou": pct(s.miou),
        "miou_mmseg": pct(s.miou_mmseg),
        **{k: v for k, v in extra.items() if k == "miou_context59"},
        "pixel_acc": pct(s.pixel_acc),
        "mean_acc": pct(s.mean_acc),
        "paper_miou": task.paper_miou,
        "difference": None if s.miou is None else round(100.0 * s.miou - task.paper_miou, 6),
        **{k: v for k, v in extra.items() if k != "miou_context59"},
        "per_class": [
            {"id": c, "name": names[c], "iou": pct(s.iou[c]), "acc": pct(s.acc[c]), "present": s.present[c]}
            for c in range(n)
        ],
        "settings": settings or {},
        "failures": dict(sorted(failures.items())),
        "pixels": s.pixels,
    }
    _write_atomic(out / "per_image.csv", per_image_csv(ids, per_image, names).encode())
    _write_atomic(out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    _write_atomic(out / "metrics.md", format_markdown(metrics).encode())
    return metrics
