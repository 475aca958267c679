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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

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
from ..recipes import AUTHORS_SEED, DIFFSEG_FIRST_PASSES, get_recipe
from ..runner import GaveUp, Item, LoadFailed, Runner
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
        if first_pass not in DIFFSEG_FIRST_PASSES:
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
    store = PredictionStore(out, manifest, overwrite=overwrite)
    mine = ids[shard_index::num_shards]
    todo = store.plan(mine)
    if num_shards > 1:
        log(f"shard {shard_index + 1}/{num_shards}: {len(mine)} images, {store.skipped} already predicted")

    failures: dict[str, str] = {}
    predicted = skipped = 0
    if todo:
        segment = _segment_unsupervised(task, first_pass) if task.mode == "unsupervised" else _segment
        predicted, skipped, failures = _predict(
            task, ds, store, todo, tag_map, tagger, segment, names, recipe_name if have_recipes else None,
            seed, pipe, load_pipe, device, batch_size, workers, progress,
        )  # fmt: skip

    ids_sha = _sha("\n".join(ids))
    store.mark_shard(shard_index, num_shards, {"ids_sha": ids_sha, "images": len(mine), "failures": failures})

    # Score: always when unsharded; when sharded, the shard that finds every marker of this set.
    known_failures = dict(failures)
    lock = None
    if num_shards > 1:
        markers = store.shard_markers(num_shards, ids_sha)
        if markers is None:
            log(f"shard {shard_index + 1}/{num_shards} done; the last shard to finish scores")
            return EvalResult(predicted, skipped, failures, None, False)
        lock = store.scoring_lock(ids_sha)
        if lock is None:
            log(f"shard {shard_index + 1}/{num_shards} done; another shard is scoring")
            return EvalResult(predicted, skipped, failures, None, False)
        known_failures = {k: v for m in markers for k, v in dict(m.get("failures") or {}).items()}
    try:
        metrics = score(
            task, ds, ids, out, workers=workers, known_failures=known_failures, settings=manifest,
            records=store.records.load(), untagged=coverage[0], tags_cover=coverage[1],
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


class PredictionStore:
    """``iseg eval``'s :class:`~iseg.runner.Store`: a prediction ``pred/<id>.png`` (palette PNG
    of dataset label ids) per dataset id, in an ``--out`` that several shards, on several
    machines, may share. So nothing is one file rewritten by every process: the settings are
    ``eval.json`` (compared key by key; see :func:`_claim`), each process appends the checksum
    of every prediction it wrote to its own ``records/HOST-PID-….jsonl`` (a prediction is done
    when its PNG has a recorded checksum, which also carries DiffSeg's dropped-anchor count into
    the metrics), and each shard writes its marker ``shards/<i>-of-<n>.json`` when it finishes;
    the shard that finds every marker scores, under ``shards/score-<ids hash>.lock``."""

    def __init__(self, out, settings: dict, *, overwrite: bool = False):
        self.out = Path(out)
        self.pred_dir, self.shard_dir = self.out / "pred", self.out / "shards"
        self.settings = settings
        self.overwrite = overwrite
        self.records = _Records(self.out / "records")
        self.skipped = 0

    def __str__(self) -> str:
        return str(self.out)

    def plan(self, ids: Sequence[str]) -> list[Item]:
        """Claim ``out`` for these settings (:func:`_claim`, which writes ``eval.json``) and
        return the ids whose prediction is missing, unreadable or not the one recorded."""
        _claim(self.out, self.settings, self.overwrite)
        known = self.records.load()
        todo = []
        for image_id in ids:
            path = self.pred_dir / f"{image_id}.png"
            if _recorded(path, known.get(image_id)):
                self.skipped += 1
            else:
                todo.append(Item(len(todo), path, image_id, [f"pred/{image_id}.png"], id=image_id))
        return todo

    def start(self, todo: Sequence[Item]) -> None:
        pass  # _claim made pred/ and shards/; records/ is made by the first record

    def write(self, item: Item, result: tuple[np.ndarray, int]) -> None:
        """Write the prediction ``result = (labels [H, W] uint8, anchors dropped)`` atomically,
        then record its checksum (thread-safe: the runner's writer threads call it)."""
        array, dropped = result
        data = _png_bytes(array)
        _write_atomic(item.path, data)
        self.records.add(item.id, data, dropped)

    def fail(self, item: Item, message: str) -> None:
        pass  # no record: the next run predicts it again

    def flush(self) -> None:
        pass  # every record is appended as its prediction lands

    def mark_shard(self, index: int, count: int, marker: dict) -> None:
        """Write shard ``index`` of ``count``'s marker (``ids_sha``, images, failures)."""
        marker = {**marker, "finished": time.time()}
        _write_atomic(self.shard_dir / f"{index}-of-{count}.json", (json.dumps(marker, indent=1) + "\n").encode())

    def shard_markers(self, count: int, ids_sha: str) -> list[dict] | None:
        """Every shard's marker for this set of ids, or ``None`` while one is missing."""
        markers = []
        for i in range(count):
            path = self.shard_dir / f"{i}-of-{count}.json"
            marker = _read_json(path) if path.is_file() else None
            if not isinstance(marker, dict) or marker.get("ids_sha") != ids_sha:
                return None
            markers.append(marker)
        return markers

    def scoring_lock(self, ids_sha: str) -> Path | None:
        """Take the lock that makes one shard score (its path, to remove after), or ``None``
        when another shard holds it."""
        lock = self.shard_dir / f"score-{ids_sha}.lock"
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return None
        return lock


def _predict(task, ds, store, todo, tag_map, tagger, segment, names, recipe, seed, pipe, load_pipe, device,
             batch_size, workers, progress):  # fmt: skip
    """Predict ``todo`` through the :class:`~iseg.runner.Runner` into ``store``: images and
    ground truth decode in DataLoader workers, the model loads when a batch first needs it,
    predictions are written by two writer threads. Returns ``(predicted, skipped, failures)``
    (skipped: WSSS images with background only, which are scored without a prediction)."""
    runner = Runner.using(
        store, desc=task.name, quiet=not progress, report=None, give_up_after=3, writers=2,
        failure_message=lambda item, exc: f"{ds.image_path(item.id)}: {type(exc).__name__}: {exc}",
    )  # fmt: skip
    items = {item.id: item for item in todo}
    loader = DataLoader(
        PredictSamples(ds, [item.id for item in todo], task.mode, tag_map), batch_size=batch_size,
        num_workers=workers, collate_fn=collate_list, pin_memory=False,
    )  # fmt: skip
    n = ds.num_classes
    state = {"pipe": pipe, "device": device, "running": None, "skipped": 0}

    def needs_model(s: Sample) -> bool:
        return s.error is None and not s.skip and not (task.mode == "ovs" and not s.classes)

    def batches():
        """``(item, sample | LoadFailed)`` per image; the built-in tagger's classes and the model
        (loaded when a batch first needs it) count as loading."""
        for batch in loader:
            for s in batch:
                if tagger is not None and s.error is None and s.image is not None:
                    s.classes = tuple(sorted(set(tagger(s.image.permute(1, 2, 0).numpy()))))
            if state["pipe"] is None and any(needs_model(s) for s in batch):
                state["pipe"] = load_pipe()
                runner.restart_clock()  # the rate and ETA count from here, not from before the load
            if state["device"] is None and state["pipe"] is not None:  # once: it walks every module
                state["device"] = state["pipe"]._execution_device
            yield [(items[s.image_id], LoadFailed(s.error) if s.error is not None else s) for s in batch]

    def process(batch_items, samples):
        need = [s for s in samples if needs_model(s)]
        labels, dropped = segment(state["pipe"], need, names, recipe, seed, state["device"]) if need else ({}, {})
        results = []
        for s in samples:
            if s.skip:
                results.append(None)
                continue
            pred = labels[s.index] if needs_model(s) else torch.zeros(s.gt.shape, dtype=torch.uint8)
            results.append((pred.cpu().numpy(), dropped.get(s.index, 0)))
        # counted once the batch succeeded (a failed batch is retried one image at a time)
        state["skipped"] += sum(s.skip for s in samples)
        for s, result in zip(samples, results):
            if result is None:
                continue
            if task.mode == "unsupervised":
                state["running"] = state["running"] or HungarianScores(n)
                state["running"].update(s.gt, result[0])
            else:
                h = confusion_matrix(s.gt, result[0], n)
                state["running"] = h if state["running"] is None else state["running"] + h
        running = state["running"]
        if running is not None:
            miou = running.miou if task.mode == "unsupervised" else scores(running).miou
            runner.status(f"mIoU {100 * miou:.1f}" if miou is not None else "")
        return results

    try:
        runner.run_batches(todo, batches(), process)
    except GaveUp as exc:  # the model failed on the first images: a broken set-up
        raise EvalError(str(exc)) from exc.__cause__
    failures = {item.id: message for item, message in runner.failed}
    return runner.done, state["skipped"], failures


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
