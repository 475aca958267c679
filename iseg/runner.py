"""A resumable per-image runner for the ``iseg`` subcommands that write files per input.

It keeps ``OUT/iseg-manifest.json``: per subcommand, the settings of the results in ``OUT`` and
each input (absolute path) with its output name and files. From it the runner

* skips inputs whose outputs exist and were written with the same settings (a stopped run is
  resumed by rerunning the same command);
* refuses, in one line and before the model loads, a rerun with other settings (unless
  ``--overwrite``) and any output path holding a file it did not write (never overwritten,
  even with ``--overwrite``);
* keeps output names stable: an input seen before keeps its name; a new one gets its stem,
  suffixed ``_<i>`` (its position in the input list) where stems clash (see
  :func:`output_names`).

Outputs are written atomically (:func:`iseg.files.write_atomic`: a hidden
``.NAME.HOST-PID-XXXXXXXX.iseg-tmp`` file in ``OUT``, then ``os.replace``); temporary files of a
run that was killed are removed by the next run. A write
that fails (a full disk) ends the run in one ``iseg: error:`` line: finished outputs stay, the
temporary file is removed, and the rerun resumes. Each input is loaded (fully decoded) inside
the run: one that fails is reported in one ``iseg: error:`` line and the run goes on; so is an
input that fails inside the model (a batch that fails is retried one input at a time, so one
bad image does not fail its batch); the exit status is 1 at the end if any failed, and the
next run retries only those. A folder whose results have other settings is refused only
when one of them was finished: a run that wrote nothing locks nothing.
Progress: a tqdm bar when stderr is a terminal, else a line every few images; none when
``quiet``.

How a subcommand uses it (``iseg/commands/segment.py`` is the full example)::

    runner = Runner(args.out, "segment", settings={"classes": [...], "seed": 0, ...},
                    overwrite=args.overwrite)
    todo = runner.plan(paths, lambda name: [f"{name}_labels.png"])  # before the model loads
    if todo:
        pipe = load_pipeline(...)            # may fail: nothing was created on disk yet
        runner.start()                       # creates OUT, cleans stale temp files
        runner.run(todo, load=load_image, process=segment_batch, batch_size=args.batch_size)
    return runner.finish("segmented")        # summary line; 0, or 1 if any input failed

``process(items, loaded)`` gets a batch of :class:`Item` and their loaded inputs and returns,
per item, ``{file name: save}`` where ``save(binary_file)`` writes the file's bytes. An
exception from ``process`` on a batch of several items retries them one at a time; on one item
it fails that item (reported, the run goes on), except
:class:`~iseg.errors.RunError`, ``KeyboardInterrupt`` and ``MemoryError``,
which end the run (the manifest is saved first, so finished outputs are kept).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import PROG, RunError, first_line, report_error, shorten
from .files import remove_stale_temps, write_atomic

MANIFEST = "iseg-manifest.json"
"""The file in an output folder that records what iseg wrote there, per subcommand."""
MANIFEST_VERSION = 1
Save = Callable[[BinaryIO], None]


@dataclass
class Item:
    """One input: ``index`` is its position in the input list (seeds use it), ``name`` the
    stem of its outputs, ``outputs`` their file names in the output folder."""

    index: int
    path: Path
    name: str
    outputs: list[str]

    @property
    def key(self) -> str:
        return _key(self.path)


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


class Runner:
    """Resumable per-input runs into one output folder; see the module docstring."""

    def __init__(
        self,
        out: str | os.PathLike[str],
        command: str,
        settings: dict,
        *,
        overwrite: bool = False,
        noun: str = "image",
        progress_every: int | None = None,
        quiet: bool = False,
    ):
        self.out = Path(out)
        self.command = command
        self.settings = json.loads(json.dumps(settings, default=str))  # as it is stored
        self.settings_id = settings_id(self.settings)
        self.overwrite = overwrite
        self.noun = noun
        self.progress_every = progress_every
        self.quiet = quiet
        self.done = 0
        self.skipped = 0
        self.failed: list[tuple[Item, str]] = []
        self._manifest: dict | None = None
        self._items: dict = {}
        self._started = False
        self._last_flush = 0.0

    # --- before the model loads ------------------------------------------------------------

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

    # --- the run --------------------------------------------------------------------------

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
        """Write ``item``'s files atomically and mark it finished."""
        for name, save in files.items():
            if name not in item.outputs:
                raise ValueError(f"{name!r} is not one of {item.name}'s outputs {item.outputs}")
            save_atomic(save, self.out / name)
        entry = self._items[item.key]
        entry["settings"] = self.settings_id
        entry.pop("error", None)
        self.done += 1
        if time.monotonic() - self._last_flush > 2.0:  # at most every 2 s: O(1) per image
            self.flush()

    def fail(self, item: Item, message: str) -> None:
        """Report ``item`` as failed in one line; the run goes on."""
        report_error(message)
        self.failed.append((item, message))
        if item.key in self._items:
            self._items[item.key]["error"] = message

    def run(
        self,
        todo: Sequence[Item],
        load: Callable[[Path], object],
        process: Callable[[list[Item], list[object]], list[dict[str, Save]]],
        batch_size: int = 1,
    ) -> None:
        """Load, process and write ``todo`` in batches of ``batch_size``; see the module
        docstring for how failures are handled. The manifest is saved however it ends."""
        if not self._started:
            self.start(todo)
        progress = _Progress(len(todo), self.noun, self.progress_every, self.quiet)
        try:
            for start in range(0, len(todo), batch_size):
                batch, loaded = [], []
                for item in todo[start : start + batch_size]:
                    try:
                        loaded.append(load(item.path))
                        batch.append(item)
                    except _FATAL:
                        raise
                    except Exception as exc:
                        self.fail(item, f"cannot read image '{item.path}': {first_line(exc)}")
                        progress.update(1)
                if batch:
                    self._process(batch, loaded, process, progress)
        except BaseException:
            with contextlib.suppress(RunError):  # the first error is the one to report
                self.flush()
            raise
        else:
            self.flush()
        finally:
            progress.close()

    def _process(self, batch: list[Item], loaded: list, process, progress: _Progress) -> None:
        """``process`` one batch and write its files; a batch that fails is retried one item
        at a time, so that only the items that fail alone are reported."""
        try:
            results = process(batch, loaded)
        except _FATAL:
            raise
        except Exception as exc:
            if len(batch) > 1:
                for item, one in zip(batch, loaded):
                    self._process([item], [one], process, progress)
                return
            self.fail(batch[0], f"'{batch[0].path}': {first_line(exc)}")
            progress.update(1)
            return
        for item, files in zip(batch, results):
            self.write(item, files)
            progress.update(1)

    def finish(self, verb: str = "processed") -> int:
        """Print the summary line; the exit status: 0, or 1 when an input failed."""
        nouns = lambda n: f"{n} {self.noun}{'s' * (n != 1)}"  # noqa: E731
        line = f"{PROG}: {verb} {nouns(self.done)}, skipped {self.skipped} already done"
        if self.failed:
            line += f", {len(self.failed)} failed"
        if not self.quiet:
            print(f"{line}; outputs in {self.out}", file=sys.stderr)
        return 1 if self.failed else 0


class _Progress:
    """A tqdm bar on a terminal; otherwise ``iseg: 20/100 images`` every ``every`` images
    (default: about every 10 %, at most every 100); nothing when ``quiet``."""

    def __init__(self, total: int, noun: str, every: int | None, quiet: bool = False):
        self.total, self.noun, self.count = total, noun, 0
        self.tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        if quiet:
            total = self.total = 0  # no bar, and no line is ever due
        self.every = every or max(1, min(100, math.ceil(total / 10)))
        self.bar = None
        self.start = time.monotonic()
        if self.tty and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=noun[:3], desc=PROG, file=sys.stderr)

    def update(self, n: int) -> None:
        before, self.count = self.count, self.count + n
        if self.bar is not None:
            self.bar.update(n)
        elif self.count < self.total and self.count // self.every > before // self.every:
            rate = (time.monotonic() - self.start) / self.count
            print(f"{PROG}: {self.count}/{self.total} {self.noun}s ({rate:.2f} s each)",
                  file=sys.stderr, flush=True)  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
