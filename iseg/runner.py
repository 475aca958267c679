"""The one resumable runner of every ``iseg`` command that writes results per input.

:class:`Runner` is the loop: it loads inputs (in this process, or takes them from a batch
source such as DataLoader workers), calls ``process`` on batches, writes each result through a
:class:`Store`, reports failures and progress, and leaves the store consistent however the run
ends. The store is where results and their resume state live:

* :class:`FolderStore` — files per input in ``OUT``, recorded in ``OUT/iseg-manifest.json``
  (``segment``, ``regions``, ``refine-masks``, ``unsupervised``): per subcommand, the settings
  of the results and each input (absolute path) with its output name and files;
* :class:`LinesFile` — one text file, a line ``<id> ...`` per input, with a sidecar holding its
  settings (``tag``);
* :class:`MissingFiles` — files per input whose content depends on the input alone, done
  when they exist (``data``);
* ``iseg eval``'s :class:`~iseg.evaluate.running.PredictionStore` — ``pred/<id>.png`` per
  dataset id with per-process checksum records, ``eval.json`` and per-shard markers (several
  processes, on several machines, share one ``--out``).

Every store

* skips inputs whose results exist and were written with the same settings (a stopped run is
  resumed by rerunning the same command);
* refuses, in one line and before the model loads, a rerun with other settings (unless
  ``--overwrite``) and any output path holding a file it did not write (never overwritten,
  even with ``--overwrite``); results of other settings lock only when one was finished: a
  run that wrote nothing locks nothing;
* writes atomically (:func:`iseg.files.write_atomic`: a hidden
  ``.NAME.HOST-PID-XXXXXXXX.iseg-tmp`` file beside the target, then ``os.replace``);
  temporary files of a run that was killed are removed by the next run.

:class:`FolderStore` keeps output names stable: an input seen before keeps its name; a new one
gets its stem, suffixed ``_<i>`` (its position in the input list) where stems clash (see
:func:`output_names`).

A write that fails (a full disk) ends the run in one ``iseg: error:`` line: finished outputs
stay, the temporary file is removed, and the rerun resumes. An input that cannot be read is
reported in one ``iseg: error:`` line and the run goes on; so is an input that fails inside the
model (a batch that fails is retried one input at a time, so one bad image does not fail its
batch); the exit status is 1 at the end if any failed, and the next run retries only those.
Progress: a tqdm bar when stderr is a terminal, else a line every few images; none when
``quiet``.

How a subcommand uses it (``iseg/commands/segment.py`` is the full example)::

    runner = Runner(args.out, "segment", settings={"classes": [...], "seed": 0, ...},
                    overwrite=args.overwrite)
    todo = runner.plan(paths, lambda name: [f"{name}_labels.png"])  # before the model loads
    if todo:
        pipe = load_pipeline(...)            # may fail: nothing was created on disk yet
        runner.run(todo, load=load_image, process=segment_batch, batch_size=args.batch_size)
    return runner.finish("segmented")        # summary line; 0, or 1 if any input failed

and over another store (``iseg/commands/tag.py``)::

    runner = Runner.using(LinesFile(args.out, "tag", settings, what="tags"))
    todo = runner.plan({stem: path, ...})

``process(items, loaded)`` gets a batch of :class:`Item` and their loaded inputs and returns
one result per item, what the store writes (:class:`FolderStore`: ``{file name: save}`` where
``save(binary_file)`` writes the file's bytes; :class:`LinesFile`: the line). An exception from
``process`` on a batch of several items retries them one at a time; on one item it fails that
item (reported, the run goes on), except :class:`~iseg.errors.RunError`, ``KeyboardInterrupt``
and ``MemoryError``, which end the run (the store is flushed first, so finished outputs are
kept).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from .errors import PROG, RunError, first_line, report_error, shorten
from .files import remove_stale_temps, write_atomic

MANIFEST = "iseg-manifest.json"
"""The file in an output folder that records what iseg wrote there, per subcommand."""
MANIFEST_VERSION = 1
Save = Callable[[BinaryIO], None]


@dataclass
class Item:
    """One input: ``index`` is its position in the input list (seeds use it), ``name`` the
    stem of its outputs, ``outputs`` their file names in the output folder, ``id`` its key in
    stores that key inputs by id (``iseg tag``'s image stems, ``iseg eval``'s dataset ids)
    rather than by absolute path."""

    index: int
    path: Path
    name: str
    outputs: list[str]
    id: str | None = None

    @property
    def key(self) -> str:
        return self.id if self.id is not None else _key(self.path)


def _key(path: str | os.PathLike[str]) -> str:
    return os.path.normcase(os.path.abspath(path))


def output_names(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """One output name per input: its stem, suffixed with ``_<index>`` where stems collide.

    ``["c1/x.png", "c2/x.png", "c1/x_1.png"]`` → ``["x_0", "x_1", "x_1_2"]``. Names are unique
    even on a case-insensitive file system and depend only on the list.
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


def settings_id(settings: dict) -> str:
    """A short hash of the JSON of ``settings`` (keys sorted)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_plain_name(name: object, what: str = "name") -> str:
    """``name`` if it is a plain file name, which stays in the output folder it is joined to.

    Raises:
        ValueError: not a string, empty, ``.`` or ``..``, or holding a path separator or NUL
            (``a/b``, ``../x``, ``/abs``, ``C:\\x``), naming ``what``.
    """
    if not isinstance(name, str):
        raise ValueError(f"{what} {name!r} is not a string")
    separators = {"/", "\\", os.sep, os.altsep or "/", "\0"}
    if name.strip() in ("", ".", "..") or any(c in name for c in separators) or (
        os.name == "nt" and ":" in name
    ):
        raise ValueError(
            f"{what} {name!r} is not a plain file name (empty, '.', '..' or a path separator): "
            "outputs must stay in the output folder"
        )
    return name


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number",
               float: "a number", bool: "true/false", type(None): "null"}  # fmt: skip


def _check_manifest(data: object) -> str | None:
    """What makes ``data`` not an iseg manifest (its shape: every field the runner reads,
    with its type), or ``None`` when it is one."""
    kind = lambda value: _JSON_TYPES.get(type(value), type(value).__name__)  # noqa: E731
    if not isinstance(data, dict):
        return f"it is {kind(data)}, not an object"
    if not isinstance(data.get("commands"), dict):
        return f'"commands" is {kind(data.get("commands"))}, not an object'
    for command, section in data["commands"].items():
        where = f"commands.{command}"
        if not isinstance(section, dict):
            return f"{where} is {kind(section)}, not an object"
        if not isinstance(section.get("settings"), (dict, type(None))):
            return f"{where}.settings is {kind(section.get('settings'))}"
        if not isinstance(section.get("items"), dict):
            return f"{where}.items is {kind(section.get('items'))}, not an object"
        for key, entry in section["items"].items():
            if not isinstance(entry, dict):
                return f"{where}.items[{key!r}] is {kind(entry)}, not an object"
            for field, types in (("input", str), ("name", str), ("outputs", list),
                                 ("settings", (str, type(None)))):  # fmt: skip
                if not isinstance(entry.get(field), types):
                    return f"{where}.items[{key!r}].{field} is {kind(entry.get(field))}"
            try:
                check_plain_name(entry["name"], "its name")
                for name in entry["outputs"]:
                    check_plain_name(name, "output")
            except ValueError as exc:
                return f"{where}.items[{key!r}]: {exc}"
    return None


def describe_changes(old: dict, new: dict) -> str:
    """``"iters: 10 → 20, lam: ..."``: the settings that differ (values cut to 60 characters,
    so that a long class list does not make an endless line)."""
    return ", ".join(
        f"{k}: {shorten(repr(old.get(k)), 60)} → {shorten(repr(new.get(k)), 60)}"
        for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
    )  # fmt: skip


def _read_manifest(out: Path) -> dict:
    path = out / MANIFEST
    todo = "remove it (files it recorded are then no longer overwritten) or choose another --out"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"iseg_manifest": MANIFEST_VERSION, "commands": {}}
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: absurdly deep JSON
        raise RunError(f"cannot read '{path}': {first_line(exc)}; {todo}") from None
    problem = _check_manifest(data)
    if problem is not None:
        raise RunError(f"'{path}' is not an iseg manifest: {problem}; {todo}")
    return data


def manifest_outputs(folder: Path) -> set[str]:
    """Names of the files that ``folder/iseg-manifest.json`` records as written (any
    subcommand); empty when there is no readable manifest."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
        return {
            name
            for section in data["commands"].values()
            for entry in section["items"].values()
            for name in entry["outputs"]
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


_FULL = {errno.ENOSPC: "no space left on device", getattr(errno, "EDQUOT", -1): "disk quota exceeded"}


def os_error_line(exc: OSError) -> str:
    """One line for a failed read or write (a full disk, a missing file): the file and why
    (a full disk or quota says so in words)."""
    reason = _FULL.get(exc.errno) or exc.strerror
    if not reason:
        return first_line(exc)
    return f"{exc.filename}: {reason}" if exc.filename else reason


def write_error(path: Path, exc: OSError) -> RunError:
    """The one-line error of a write to ``path`` that failed (a full disk says so, and that
    the finished outputs are kept and a rerun resumes)."""
    if exc.errno in _FULL:
        return RunError(
            f"cannot write '{path}': {_FULL[exc.errno]}; the finished outputs are kept: free "
            "some space, then rerun the same command to resume"
        )
    return RunError(f"cannot write '{path}': {first_line(exc)}")


def save_atomic(save: Save, path: Path) -> None:
    """:func:`iseg.files.write_atomic` that ends the run on a failed write.

    Raises:
        RunError: the write failed with an ``OSError`` (a full disk, ...); one line (see
            :func:`write_error`), and the temporary file is removed.
    """
    try:
        write_atomic(path, save)
    except OSError as exc:
        raise write_error(path, exc) from None


_FATAL = (KeyboardInterrupt, RunError, MemoryError)  # end the run; anything else fails its items


def check_writable(out: Path) -> None:
    """That ``out`` (or, if it does not exist yet, the folder that would hold it) is a writable
    folder, without creating anything."""
    probe = out.absolute()
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    what = "output folder" if probe == out.absolute() else f"folder '{probe}' for --out"
    if not probe.is_dir():
        raise RunError(f"cannot write to '{out}': '{probe}' is not a folder")
    read_only = False
    with contextlib.suppress(OSError, AttributeError):
        read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    if read_only:
        raise RunError(f"cannot write to '{out}': the {what} is on a read-only file system")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunError(f"cannot write to '{out}': the {what} is not writable (permission denied)")


class GaveUp(RunError):
    """The run ended because its first inputs all failed inside ``process`` (``give_up_after``
    of them, none succeeding): a broken model or set-up rather than bad inputs."""


@dataclass(frozen=True)
class LoadFailed:
    """What a batch source yields instead of a loaded input that could not be read: the one
    line that reports it (the item fails; the run goes on)."""

    message: str


class Store(Protocol):
    """Where a run's results and its resume state live. :class:`Runner` drives one; four
    exist: :class:`FolderStore` (files per input in an output folder, with a manifest),
    :class:`LinesFile` (one text file, a line per input id), :class:`MissingFiles` (files that
    depend on the input alone, done when present) and ``iseg eval``'s predictions
    (:class:`iseg.evaluate.running.PredictionStore`: ``pred/<id>.png`` with checksum records
    and shard markers).

    A store's ``plan(...)`` (its own arguments: paths, ids) checks the settings against what is
    there, before any model loads, and returns the :class:`Item` s still to do; ``skipped`` is
    how many it found done."""

    skipped: int

    def start(self, todo: Sequence[Item]) -> None:
        """Before the first write: create what holds the outputs, remove stale temporary files,
        record ``todo`` as this run's (unfinished) work."""

    def write(self, item: Item, result: Any) -> None:
        """Write ``item``'s result (what ``process`` returned for it) atomically and mark it
        finished. Runs in a writer thread with ``Runner(writers=N)``: only a store that says it
        is thread-safe (eval's ``PredictionStore``) may be run so; :class:`FolderStore`,
        :class:`LinesFile` and :class:`MissingFiles` are written from the run's thread."""

    def fail(self, item: Item, message: str) -> None:
        """Record that ``item`` failed (the next run retries it)."""

    def flush(self) -> None:
        """Save the resume state; called at the end of a run however it ends."""


class FolderStore:
    """Files per input in an output folder, recorded in its ``iseg-manifest.json`` (the module
    docstring says how); what ``segment``, ``regions``, ``refine-masks`` and ``unsupervised``
    write."""

    def __init__(self, out: str | os.PathLike[str], command: str, settings: dict, *,
                 overwrite: bool = False):  # fmt: skip
        self.out = Path(out)
        self.command = command
        self.settings = json.loads(json.dumps(settings, default=str))  # as it is stored
        self.settings_id = settings_id(self.settings)
        self.overwrite = overwrite
        self.skipped = 0
        self._manifest: dict | None = None
        self._items: dict = {}
        self._started = False
        self._last_flush = 0.0

    def __str__(self) -> str:
        return str(self.out)

    def plan(self, paths: Sequence[Path], outputs: Callable[[str], list[str]]) -> list[Item]:
        """The items still to do, checked against the manifest and the files in ``out``.

        Raises:
            RunError: ``out`` is not a writable folder; its results have other settings
                (without ``overwrite``); or an output path holds a file this tool did not write.
        """
        check_writable(self.out)
        if self.out.is_dir():  # also when nothing is left to do
            remove_stale_temps(self.out)
        manifest = _read_manifest(self.out)
        section = manifest["commands"].setdefault(self.command, {"settings": None, "items": {}})
        old = section.get("settings")
        finished_any = old is not None and any(
            e.get("settings") == settings_id(old) for e in section["items"].values()
        )  # a run that wrote nothing locks nothing
        if finished_any and old != self.settings and not self.overwrite:
            raise RunError(
                f"'{self.out}' holds results of other settings "
                f"({describe_changes(old, self.settings)}); rerun with "
                "--overwrite to replace them, or choose another --out"
            )
        items_by_key: dict = section["items"]
        owned = {name.casefold(): key for key, e in items_by_key.items() for name in e["outputs"]}
        taken = {e["name"].casefold(): key for key, e in items_by_key.items()}

        base = output_names(paths)
        items = []
        used: set[str] = set()
        for index, (path, name) in enumerate(zip(paths, base)):
            key = _key(path)
            entry = items_by_key.get(key)
            if entry is not None:
                name = entry["name"]
            else:
                while name.casefold() in taken or name.casefold() in used:
                    name += f"_{index}"
            used.add(name.casefold())
            items.append(Item(index, path, name, list(outputs(name))))

        todo = []
        for item in items:
            entry = items_by_key.get(item.key)
            files = [self.out / f for f in item.outputs]
            for f in files:
                if not f.exists():
                    continue
                owner = owned.get(f.name.casefold())
                if owner is None:
                    raise RunError(
                        f"refusing to overwrite '{f}': this tool did not write it "
                        "(move it away or choose another --out)"
                    )
                if owner != item.key and not self.overwrite:
                    raise RunError(
                        f"refusing to overwrite '{f}': it was written for "
                        f"'{items_by_key[owner]['input']}', not '{item.path}' "
                        "(rerun with --overwrite, or choose another --out)"
                    )
            finished = (
                entry is not None
                and entry.get("settings") == self.settings_id
                and set(item.outputs) <= set(entry["outputs"])
                and all(f.is_file() for f in files)
            )
            if finished and not self.overwrite:
                self.skipped += 1
            else:
                todo.append(item)
        self._manifest, self._items = manifest, items_by_key
        return todo

    def start(self, todo: Sequence[Item]) -> None:
        """Create ``out``, remove stale temporary files, and record ``todo`` in the manifest
        as this tool's (unfinished) outputs, before any of them is written."""
        assert self._manifest is not None, "plan() first"
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunError(f"cannot create output folder '{self.out}': {first_line(exc)}") from None
        remove_stale_temps(self.out)
        section = self._manifest["commands"][self.command]
        section["settings"] = self.settings
        for item in todo:
            entry = self._items.get(item.key)
            outputs = list(dict.fromkeys((entry["outputs"] if entry else []) + item.outputs))
            self._items[item.key] = {
                "input": str(Path(item.path).absolute()),
                "name": item.name,
                "outputs": outputs,
                "settings": None,  # unfinished until its outputs are written
            }
        self._started = True
        self.flush()

    def flush(self) -> None:
        """Write the manifest (atomically)."""
        if not self._started:
            return
        text = json.dumps(self._manifest, indent=1, ensure_ascii=False) + "\n"
        save_atomic(lambda f: f.write(text.encode()), self.out / MANIFEST)
        self._last_flush = time.monotonic()

    def write(self, item: Item, files: dict[str, Save]) -> None:
        """Write ``item``'s files (``{file name: save}``) atomically and mark it finished."""
        for name, save in files.items():
            if name not in item.outputs:
                raise ValueError(f"{name!r} is not one of {item.name}'s outputs {item.outputs}")
            save_atomic(save, self.out / name)
        entry = self._items[item.key]
        entry["settings"] = self.settings_id
        entry.pop("error", None)
        if time.monotonic() - self._last_flush > 2.0:  # at most every 2 s: O(1) per image
            self.flush()

    def fail(self, item: Item, message: str) -> None:
        if item.key in self._items:
            self._items[item.key]["error"] = message


LINES_MANIFEST_SUFFIX = ".iseg-manifest.json"
"""The sidecar of a :class:`LinesFile`: ``<file>.iseg-manifest.json`` beside it."""


class LinesFile:
    """One text file holding a line per input, ``<id> ...`` (what ``iseg tag`` writes): the
    ids present are the inputs done, so the file is its own resume state. Its settings live in
    a sidecar ``<file>.iseg-manifest.json`` (``{"command", "settings"}``) rather than in a
    folder's manifest, because the file may sit in any folder (the current one, beside other
    files) that is no iseg output folder; without the sidecar the file is never overwritten.
    The file is rewritten atomically every ``flush_every`` lines or ``flush_seconds`` seconds
    and at the end, so it is always complete up to some input. A file that holds no line yet
    locks no settings."""

    def __init__(self, path: str | os.PathLike[str], command: str, settings: dict, *,
                 overwrite: bool = False, what: str = "lines", flush_every: int = 25,
                 flush_seconds: float = 30.0):  # fmt: skip
        self.path = Path(path)
        self.sidecar = self.path.with_name(self.path.name + LINES_MANIFEST_SUFFIX)
        self.command = command
        self.settings = json.loads(json.dumps(settings, default=str))
        self.overwrite = overwrite
        self.what = what
        self.flush_every, self.flush_seconds = flush_every, flush_seconds
        self.skipped = 0
        self.lines: dict[str, str] = {}
        self._written = 0
        self._last_flush = time.monotonic()
        self._started = False

    def __str__(self) -> str:
        return str(self.path)

    def plan(self, ids: dict[str, Path]) -> list[Item]:
        """The ids (``{id: input path}``, ids without whitespace) whose line is missing; the
        lines kept are those of the file when it was written with these settings.

        Raises:
            RunError: the path is a folder (code 2), a file this tool did not write (no
                sidecar), unreadable, or holding lines of other settings (without
                ``overwrite``).
        """
        self.lines = self._read_existing()
        todo = [Item(index, path, name, [], id=name)
                for index, (name, path) in enumerate(ids.items()) if name not in self.lines]  # fmt: skip
        self.skipped = len(ids) - len(todo)
        return todo

    def _read_existing(self) -> dict[str, str]:
        out, sidecar = self.path, self.sidecar
        if out.is_dir():
            raise RunError(f"--out '{out}' is a folder; give a file name such as tags.txt", code=2)
        if not out.exists():
            return {}
        try:
            recorded = json.loads(sidecar.read_text(encoding="utf-8"))
            if not isinstance(recorded, dict) or recorded.get("command") != self.command:
                raise ValueError
        except (OSError, ValueError, RecursionError):
            raise RunError(
                f"refusing to overwrite '{out}': this tool did not write it (no {sidecar.name} "
                "beside it); move it away or choose another --out"
            ) from None
        old = recorded.get("settings")
        if not isinstance(old, dict):
            raise RunError(
                f"'{sidecar}' is not an iseg manifest: its settings are not an object; remove "
                f"both files or choose another --out"
            )
        lines = self._read_lines()
        if old == self.settings:
            return lines
        if self.overwrite or not lines:
            return {}
        raise RunError(
            f"'{out}' holds {self.what} of other settings ({describe_changes(old, self.settings)}); "
            "rerun with --overwrite to replace them, or choose another --out"
        )

    def _read_lines(self) -> dict[str, str]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, ValueError) as exc:  # ValueError: not UTF-8
            raise RunError(f"cannot read '{self.path}': {first_line(exc)}; move it away or "
                           "choose another --out") from None  # fmt: skip
        lines: dict[str, str] = {}
        for line in text.splitlines():
            if line.strip():
                lines.setdefault(line.split()[0], line.strip())
        return lines

    def start(self, todo: Sequence[Item]) -> None:
        """Write the kept lines (none after ``overwrite``), then the sidecar: in this order a
        kill in between never leaves old lines under new settings."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunError(f"cannot write '{self.path}': {first_line(exc)}") from None
        remove_stale_temps(self.path.parent)
        self._save()
        sidecar = json.dumps({"command": self.command, "settings": self.settings}, indent=1) + "\n"
        save_atomic(lambda f: f.write(sidecar.encode("utf-8")), self.sidecar)
        self._started = True

    def _save(self) -> None:
        text = "".join(line + "\n" for line in self.lines.values())
        save_atomic(lambda f: f.write(text.encode("utf-8")), self.path)
        self._written, self._last_flush = len(self.lines), time.monotonic()

    def write(self, item: Item, line: str) -> None:
        """Add ``item``'s line (it starts with its id)."""
        if line.split(maxsplit=1)[:1] != [item.key]:
            raise ValueError(f"the line {line!r} does not start with the id {item.key!r}")
        self.lines[item.key] = line
        if (len(self.lines) - self._written >= self.flush_every
                or time.monotonic() - self._last_flush > self.flush_seconds):  # fmt: skip
            self._save()

    def fail(self, item: Item, message: str) -> None:
        pass  # a missing line is what the next run retries

    def flush(self) -> None:
        if self._started and len(self.lines) != self._written:
            self._save()


class MissingFiles:
    """Files per input in a folder, for results that depend on the input alone (``iseg data``'s
    label conversions): an input is done when its file exists, whoever wrote it, so a stopped
    conversion resumes and a file already there is never rewritten; there are no settings and
    nothing is recorded. ``plan`` takes ``(input, output file name)`` pairs."""

    def __init__(self, out: str | os.PathLike[str]):
        self.out = Path(out)
        self.skipped = 0

    def __str__(self) -> str:
        return str(self.out)

    def plan(self, pairs: Iterable[tuple[object, str]]) -> list[Item]:
        todo = []
        for index, (source, name) in enumerate(pairs):
            check_plain_name(name, "output name")
            if (self.out / name).is_file():
                self.skipped += 1
            else:
                todo.append(Item(index, Path(str(source)), Path(name).stem, [name], id=name))
        return todo

    def start(self, todo: Sequence[Item]) -> None:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunError(f"cannot create output folder '{self.out}': {first_line(exc)}") from None
        remove_stale_temps(self.out)

    def write(self, item: Item, save: Save) -> None:
        save_atomic(save, self.out / item.outputs[0])

    def fail(self, item: Item, message: str) -> None:
        pass  # its file is missing: the next run tries it again

    def flush(self) -> None:
        pass


class Runner:
    """A resumable run over a :class:`Store`: load, process in batches, write, report.

    ``Runner(out, command, settings)`` runs into a :class:`FolderStore`; ``Runner.using(store)``
    into any store. Options: ``noun`` (``"image"``: progress and summary), ``progress_every``
    (lines when stderr is no terminal), ``quiet``, ``desc`` (the bar's label), ``report``
    (called with each failure's line; ``None`` to only collect them in ``failed``),
    ``failure_message(item, exc)`` (the line of an input that failed inside ``process``),
    ``give_up_after`` (end the run with :class:`GaveUp` when that many inputs
    failed inside ``process`` before any succeeded: a broken model, not bad inputs),
    ``writers`` (threads that write results while the next batch is processed; 0 writes in
    line) and ``fatal`` (more exception types that end the run rather than fail their input:
    a malformed dataset file in ``iseg data``).
    """

    def __init__(self, out: str | os.PathLike[str], command: str, settings: dict, *,
                 overwrite: bool = False, **options: Any):  # fmt: skip
        self._setup(FolderStore(out, command, settings, overwrite=overwrite), **options)

    @classmethod
    def using(cls, store: Store, **options: Any) -> Runner:
        """A runner over ``store`` (see the class docstring for ``options``)."""
        runner = cls.__new__(cls)
        runner._setup(store, **options)
        return runner

    def _setup(
        self,
        store: Store,
        *,
        noun: str = "image",
        progress_every: int | None = None,
        quiet: bool = False,
        desc: str | None = None,
        report: Callable[[str], object] | None = report_error,
        failure_message: Callable[[Item, BaseException], str] | None = None,
        give_up_after: int | None = None,
        writers: int = 0,
        fatal: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.store = store
        self.fatal = _FATAL + tuple(fatal)
        self.noun = noun
        self.progress_every = progress_every
        self.quiet = quiet
        self.desc = desc
        self.report = report
        self.failure_message = failure_message or (lambda item, exc: f"'{item.path}': {first_line(exc)}")
        self.give_up_after = give_up_after
        self.writers = writers
        self.done = 0
        self.failed: list[tuple[Item, str]] = []
        self._started = False
        self._produced = 0  # results ``process`` returned (``None``: nothing to write, not counted)
        self._model_failures = 0
        self._progress: _Progress | None = None
        self._lock = threading.Lock()

    @property
    def skipped(self) -> int:
        """Inputs found done by :meth:`plan`."""
        return self.store.skipped

    # --- before the model loads ------------------------------------------------------------

    def plan(self, *args: Any, **kwargs: Any) -> list[Item]:
        """The store's ``plan``: the items still to do (nothing is created)."""
        return self.store.plan(*args, **kwargs)  # type: ignore[attr-defined]

    # --- the run --------------------------------------------------------------------------

    def start(self, todo: Sequence[Item]) -> None:
        """The store's ``start`` (called by :meth:`run` when not called before)."""
        self.store.start(todo)
        self._started = True

    def write(self, item: Item, result: Any) -> None:
        """Write ``item``'s result through the store and count it done."""
        self.store.write(item, result)
        with self._lock:
            self.done += 1

    def fail(self, item: Item, message: str) -> None:
        """Report ``item`` as failed in one line; the run goes on."""
        if self.report is not None:
            self.report(message)
        self.failed.append((item, message))
        self.store.fail(item, message)

    def flush(self) -> None:
        self.store.flush()

    def status(self, text: str) -> None:
        """Show ``text`` beside the progress bar (e.g. a running score); no-op without one."""
        if self._progress is not None:
            self._progress.status(text)

    def restart_clock(self) -> None:
        """Count the rate and ETA from now (after a model load that the first batch waited for)."""
        if self._progress is not None:
            self._progress.restart()

    def run(
        self,
        todo: Sequence[Item],
        load: Callable[[Path], object],
        process: Callable[[list[Item], list[object]], list[Any]],
        batch_size: int = 1,
    ) -> None:
        """Load each item's input in this process, then :meth:`run_batches`."""

        def batches():
            for start in range(0, len(todo), batch_size):
                batch = []
                for item in todo[start : start + batch_size]:
                    try:
                        batch.append((item, load(item.path)))
                    except self.fatal:
                        raise
                    except Exception as exc:
                        batch.append((item, LoadFailed(f"cannot read image '{item.path}': {first_line(exc)}")))
                yield batch

        self.run_batches(todo, batches(), process)

    def run_batches(
        self,
        todo: Sequence[Item],
        batches: Iterable[list[tuple[Item, object]]],
        process: Callable[[list[Item], list[object]], list[Any]],
    ) -> None:
        """Process ``batches`` (lists of ``(item, loaded input | LoadFailed)`` covering
        ``todo``, e.g. from DataLoader workers) and write each result through the store. A
        :class:`LoadFailed` input fails its item; ``process(items, loaded)`` returns one result
        per item (``None``: nothing to write). A batch that raises is retried one item at a
        time, so that only the items that fail alone fail; :class:`~iseg.errors.RunError`,
        ``KeyboardInterrupt`` and ``MemoryError`` end the run. The store is flushed however the
        run ends (finished outputs are kept)."""
        if not self._started:
            self.start(todo)
        self._progress = progress = _Progress(len(todo), self.noun, self.progress_every, self.quiet, self.desc)
        pool = ThreadPoolExecutor(max_workers=self.writers) if self.writers else None
        pending: deque[Future] = deque()
        try:
            for batch in batches:
                items, loaded = [], []
                for item, value in batch:
                    if isinstance(value, LoadFailed):
                        self.fail(item, value.message)
                        progress.update(1)
                    else:
                        items.append(item)
                        loaded.append(value)
                if items:
                    self._process(items, loaded, process, progress, pool, pending)
                while len(pending) > 16:  # bounded: results wait in memory for their writer
                    pending.popleft().result()
            while pending:
                pending.popleft().result()
        except BaseException:
            for future in pending:
                future.cancel()
            if pool is not None:
                pool.shutdown(wait=True)  # writes in flight finish: their files are whole
            with contextlib.suppress(RunError, OSError):  # the first error is the one to report
                self.flush()
            raise
        else:
            if pool is not None:
                pool.shutdown(wait=True)
            self.flush()
        finally:
            progress.close()
            self._progress = None

    def _process(self, batch: list[Item], loaded: list, process, progress: _Progress, pool, pending) -> None:
        """``process`` one batch and write its results; a batch that fails is retried one item
        at a time, so that only the items that fail alone are reported."""
        try:
            results = process(batch, loaded)
        except self.fatal:
            raise
        except Exception as exc:
            if len(batch) > 1:
                for item, one in zip(batch, loaded):
                    self._process([item], [one], process, progress, pool, pending)
                return
            self.fail(batch[0], self.failure_message(batch[0], exc))
            progress.update(1)
            self._model_failures += 1
            if self.give_up_after and self._model_failures >= self.give_up_after and not self._produced:
                raise GaveUp(
                    f"the model failed on the first {self._model_failures} {self.noun}s "
                    f"(last: {type(exc).__name__}: {first_line(exc)})"
                ) from exc
            return
        self._produced += sum(result is not None for result in results)
        for item, result in zip(batch, results):
            if result is not None:
                if pool is None:
                    self.write(item, result)
                else:
                    pending.append(pool.submit(self.write, item, result))
            progress.update(1)

    def finish(self, verb: str = "processed") -> int:
        """Print the summary line; the exit status: 0, or 1 when an input failed."""
        nouns = lambda n: f"{n} {self.noun}{'s' * (n != 1)}"  # noqa: E731
        line = f"{PROG}: {verb} {nouns(self.done)}, skipped {self.skipped} already done"
        if self.failed:
            line += f", {len(self.failed)} failed"
        if not self.quiet:
            print(f"{line}; outputs in {self.store}", file=sys.stderr)
        return 1 if self.failed else 0


class _Progress:
    """A tqdm bar on a terminal; otherwise ``iseg: 20/100 images`` every ``every`` images
    (default: about every 10 %, at most every 100); nothing when ``quiet``."""

    def __init__(self, total: int, noun: str, every: int | None, quiet: bool = False,
                 desc: str | None = None):  # fmt: skip
        self.total, self.noun, self.count = total, noun, 0
        self.tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        if quiet:
            total = self.total = 0  # no bar, and no line is ever due
        self.every = every or max(1, min(100, math.ceil(total / 10)))
        self.bar = None
        self.start = time.monotonic()
        self.counted_from = 0
        if self.tty and total:
            from tqdm import tqdm  # only on a terminal

            self.bar = tqdm(total=total, unit="img" if noun == "image" else noun, desc=desc or PROG, file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int) -> None:
        before, self.count = self.count, self.count + n
        if self.bar is not None:
            self.bar.update(n)
        elif self.count < self.total and self.count // self.every > before // self.every:
            rate = (time.monotonic() - self.start) / max(1, self.count - self.counted_from)
            print(f"{PROG}: {self.count}/{self.total} {self.noun}s ({rate:.2f} s each)",
                  file=sys.stderr, flush=True)  # fmt: skip

    def status(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def restart(self) -> None:
        self.start, self.counted_from = time.monotonic(), self.count
        if self.bar is not None:
            self.bar.reset()
            self.bar.update(self.count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
