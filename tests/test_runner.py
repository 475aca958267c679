"""``iseg.runner``: the resumable per-input runner, without a model (fake load/process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from iseg.commands._io import expand_inputs
from iseg.errors import RunError
from iseg.files import HOST, remove_stale_temps
from iseg.runner import (
    MANIFEST,
    GaveUp,
    Item,
    LinesFile,
    LoadFailed,
    MissingFiles,
    Runner,
    check_writable,
    manifest_outputs,
    save_atomic,
)


def text_saver(text: str):
    return lambda f: f.write(text.encode())


def make_inputs(root: Path, names=("a.txt", "b.txt", "c.txt")) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / name for name in names]
    for path in paths:
        path.write_text(path.stem)
    return paths


def upper(items, loaded):
    """process: one output per item holding its input's text in upper case."""
    return [{item.outputs[0]: text_saver(text.upper())} for item, text in zip(items, loaded)]


def read(path: Path) -> str:
    return Path(path).read_text()


def outputs(name: str) -> list[str]:
    return [f"{name}.out"]


def test_a_full_run_then_a_resume(tmp_path, capsys):
    inputs = make_inputs(tmp_path / "in")
    runner = Runner(tmp_path / "out", "t", {"k": 1})
    todo = runner.plan(inputs, outputs)
    assert [(i.index, i.name, i.outputs) for i in todo] == [
        (0, "a", ["a.out"]), (1, "b", ["b.out"]), (2, "c", ["c.out"])
    ]  # fmt: skip
    assert not (tmp_path / "out").exists()  # planning creates nothing
    runner.run(todo, read, upper, batch_size=2)
    assert runner.finish("did") == 0
    assert [read(tmp_path / "out" / f"{n}.out") for n in "abc"] == ["A", "B", "C"]
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"iseg: did 3 images, skipped 0 already done; outputs in {tmp_path / 'out'}"
    )
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    section = manifest["commands"]["t"]
    assert section["settings"] == {"k": 1}
    assert {Path(e["input"]).name: e["outputs"] for e in section["items"].values()} == {
        "a.txt": ["a.out"], "b.txt": ["b.out"], "c.txt": ["c.out"]
    }  # fmt: skip

    again = Runner(tmp_path / "out", "t", {"k": 1})
    assert again.plan(inputs, outputs) == []
    assert again.skipped == 3


def test_per_item_failures_are_reported_and_the_run_goes_on(tmp_path, capsys):
    inputs = make_inputs(tmp_path / "in", ("a.txt", "bad.txt", "c.txt", "d.txt"))

    def load(path):
        if path.name == "bad.txt":
            raise OSError("image file is truncated")
        return read(path)

    def process(items, loaded):
        if any(item.name == "d" for item in items):
            raise RuntimeError("kernel exploded\nsecond line")
        return upper(items, loaded)

    runner = Runner(tmp_path / "out", "t", {})
    runner.run(runner.plan(inputs, outputs), load, process, batch_size=1)
    assert runner.finish("did") == 1
    err = capsys.readouterr().err.splitlines()
    assert f"iseg: error: cannot read image '{inputs[1]}': image file is truncated" in err
    assert f"iseg: error: '{inputs[3]}': kernel exploded" in err
    assert err[-1].startswith("iseg: did 2 images, skipped 0 already done, 2 failed; ")
    assert sorted(os.listdir(tmp_path / "out")) == ["a.out", "c.out", MANIFEST]
    # A rerun retries only the failed ones.
    again = Runner(tmp_path / "out", "t", {})
    assert [i.name for i in again.plan(inputs, outputs)] == ["bad", "d"]


@pytest.mark.parametrize("error", [RunError("out of memory"), KeyboardInterrupt(), MemoryError()])
def test_fatal_errors_end_the_run_and_keep_finished_outputs(error, tmp_path):
    inputs = make_inputs(tmp_path / "in")

    def process(items, loaded):
        if items[0].name == "b":
            raise error
        return upper(items, loaded)

    runner = Runner(tmp_path / "out", "t", {})
    with pytest.raises(type(error)):
        runner.run(runner.plan(inputs, outputs), read, process)
    # The manifest was saved on the way out: "a" is finished, "b" and "c" are not.
    again = Runner(tmp_path / "out", "t", {})
    assert [i.name for i in again.plan(inputs, outputs)] == ["b", "c"]


def test_changed_settings_are_refused_unless_overwrite(tmp_path):
    inputs = make_inputs(tmp_path / "in")
    first = Runner(tmp_path / "out", "t", {"seed": 0, "classes": ["cat"]})
    first.run(first.plan(inputs, outputs), read, upper)
    with pytest.raises(RunError) as info:
        Runner(tmp_path / "out", "t", {"seed": 1, "classes": ["cat"]}).plan(inputs, outputs)
    assert str(info.value) == (
        f"'{tmp_path / 'out'}' holds results of other settings (seed: 0 → 1); rerun with "
        "--overwrite to replace them, or choose another --out"
    )
    # Another subcommand's settings in the same folder are its own.
    assert len(Runner(tmp_path / "out", "other", {"x": 1}).plan(inputs, lambda n: [f"{n}.o2"])) == 3
    redo = Runner(tmp_path / "out", "t", {"seed": 1, "classes": ["cat"]}, overwrite=True)
    todo = redo.plan(inputs, outputs)
    assert len(todo) == 3
    # Killed right after start(): the old outputs are not taken as the new settings' results.
    redo.start(todo)
    assert len(Runner(tmp_path / "out", "t", {"seed": 1, "classes": ["cat"]}).plan(inputs, outputs)) == 3


def test_files_it_did_not_write_are_never_overwritten(tmp_path):
    inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.out").write_text("ground truth")
    for overwrite in (False, True):
        with pytest.raises(RunError, match=r"refusing to overwrite '.*b.out': this tool did not write it"):
            Runner(out, "t", {}, overwrite=overwrite).plan(inputs, outputs)
    assert read(out / "b.out") == "ground truth"
    # Nor one written by another subcommand.
    (out / "b.out").unlink()
    other = Runner(out, "other", {})
    other.run(other.plan(inputs, outputs), read, upper)
    with pytest.raises(RunError, match="this tool did not write it"):
        Runner(out, "t", {}).plan(inputs, outputs)


def test_names_are_stable_across_runs(tmp_path):
    c1, c2 = make_inputs(tmp_path / "c1", ("x.txt",)), make_inputs(tmp_path / "c2", ("x.txt",))
    out = tmp_path / "out"
    runner = Runner(out, "t", {})
    todo = runner.plan(c1 + c2, outputs)
    assert [i.name for i in todo] == ["x_0", "x_1"]
    runner.run(todo, read, upper)
    # Alone, c2/x.txt keeps x_1; a new input named x does not take a recorded name.
    assert Runner(out, "t", {}).plan(c2, outputs) == []
    c3 = make_inputs(tmp_path / "c3", ("x_1.txt",))
    (item,) = Runner(out, "t", {}).plan(c3, outputs)
    assert item.name == "x_1_0"


def test_progress_lines_when_redirected(tmp_path, capsys):
    inputs = make_inputs(tmp_path / "in", [f"{i}.txt" for i in range(7)])
    runner = Runner(tmp_path / "out", "t", {}, progress_every=3)
    runner.run(runner.plan(inputs, outputs), read, upper)
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in err] == ["iseg: 3/7 images", "iseg: 6/7 images"]


def test_save_atomic_leaves_no_partial_file(tmp_path):
    target = tmp_path / "x_labels.png"
    save_atomic(text_saver("old"), target)

    def broken(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(RunError, match=r"cannot write '.*x_labels.png': disk full$"):
        save_atomic(broken, target)
    assert read(target) == "old"  # the old file, whole
    assert os.listdir(tmp_path) == ["x_labels.png"]  # no temporary file left


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "dead": f".a.png.{HOST}-{2**22 + 7}-00c0ffee.iseg-tmp",  # above the default pid_max
            "live": f".b.png.{HOST}-{live.pid}-00c0ffee.iseg-tmp",  # a run still writing
            "mine": f".c.png.{HOST}-{os.getpid()}-00c0ffee.iseg-tmp",
            "other": ".d.png.tmp",  # not this tool's
            "remote": f".e.png.otherhost-{2**22 + 7}-00c0ffee.iseg-tmp",  # another machine's
        }
        for name in names.values():
            (tmp_path / name).write_text("")
        assert remove_stale_temps(tmp_path) == 2
        assert sorted(os.listdir(tmp_path)) == sorted([names["live"], names["other"], names["remote"]])
    finally:
        live.kill()
        live.wait()


def test_stale_temp_files_go_even_when_all_is_done(tmp_path):
    inputs = make_inputs(tmp_path / "in")
    runner = Runner(tmp_path / "out", "t", {})
    runner.run(runner.plan(inputs, outputs), read, upper)
    stale = tmp_path / "out" / f".a.out.{HOST}-{2**22 + 9}-00c0ffee.iseg-tmp"
    stale.write_text("half")
    assert Runner(tmp_path / "out", "t", {}).plan(inputs, outputs) == []
    assert not stale.exists()


def test_check_writable_creates_nothing(tmp_path):
    check_writable(tmp_path / "new" / "deeper")  # its parent chain is writable
    assert os.listdir(tmp_path) == []
    (tmp_path / "f").write_text("")
    with pytest.raises(RunError, match="is not a folder"):
        check_writable(tmp_path / "f" / "out")
    with pytest.raises(RunError, match="is not a folder"):
        check_writable(tmp_path / "f")


def test_a_broken_manifest_is_one_clear_error(tmp_path):
    (tmp_path / MANIFEST).write_text("{half")
    with pytest.raises(RunError, match=r"cannot read '.*iseg-manifest.json'.*remove it"):
        Runner(tmp_path, "t", {}).plan([], outputs)
    assert manifest_outputs(tmp_path) == set()


def test_expand_inputs(tmp_path):
    from PIL import Image

    folder = tmp_path / "ds"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.png", "a.jpg", "a_labels.png", "a_overlay.jpg", ".hidden.png", "sub/c.png"):
        Image.new("RGB", (2, 2)).save(folder / name)
    (folder / "notes.txt").write_text("")
    (folder / "mine.png").write_text("")  # recorded in the folder's manifest below
    (folder / MANIFEST).write_text(json.dumps(
        {"iseg_manifest": 1, "commands": {"t": {"settings": {}, "items": {
            "/x/mine.png": {"input": "/x/mine", "name": "mine", "outputs": ["mine.png"]}}}}}
    ))  # fmt: skip
    assert expand_inputs([str(folder)]) == [folder / "a.jpg", folder / "b.png"]
    assert expand_inputs([f"{folder}/*.png"]) == [folder / "b.png"]
    assert expand_inputs([f"{folder}/**/*.png"]) == [folder / "b.png", folder / "sub" / "c.png"]
    # A file named explicitly is taken as given; duplicates are dropped.
    explicit = folder / "a_labels.png"
    assert expand_inputs([str(explicit), str(folder / "b.png"), str(folder)]) == [
        explicit, folder / "b.png", folder / "a.jpg"
    ]  # fmt: skip
    with pytest.raises(RunError, match="no images match"):
        expand_inputs([f"{folder}/*.tif"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="no images in folder"):
        expand_inputs([str(tmp_path / "empty")])


# --- the loop over any store ---------------------------------------------------------------------


class ListStore:
    """A store that keeps results in memory and logs what the runner asked of it."""

    def __init__(self, ids):
        self.ids, self.skipped = ids, 0
        self.results, self.calls = {}, []

    def plan(self):
        return [Item(i, Path(f"{name}.in"), name, [], id=name) for i, name in enumerate(self.ids)]

    def start(self, todo):
        self.calls.append(("start", [i.id for i in todo]))

    def write(self, item, result):
        self.results[item.id] = result

    def fail(self, item, message):
        self.calls.append(("fail", item.id))

    def flush(self):
        self.calls.append(("flush",))


def test_run_batches_takes_loaded_batches_failed_loads_and_nothing_to_write():
    store = ListStore(["a", "b", "c", "d", "e"])
    reported = []
    runner = Runner.using(store, report=reported.append, quiet=True)
    todo = runner.plan()
    items = {i.id: i for i in todo}
    batches = [[(items["a"], 1), (items["b"], LoadFailed("b: unreadable"))], [(items["c"], 3), (items["d"], 4)],
               [(items["e"], 5)]]  # fmt: skip
    seen = []

    def process(batch, loaded):
        seen.append([i.id for i in batch])
        if "d" in [i.id for i in batch]:
            if len(batch) > 1:
                raise RuntimeError("the batch fails")
            raise RuntimeError("d fails alone\nsecond line")
        return [None if value == 5 else value * 10 for value in loaded]

    runner.run_batches(todo, iter(batches), process)
    # b never reaches process; the failed batch [c, d] is retried one at a time; e: nothing to write
    assert seen == [["a"], ["c", "d"], ["c"], ["d"], ["e"]]
    assert store.results == {"a": 10, "c": 30}
    assert runner.done == 2
    assert [(i.id, m) for i, m in runner.failed] == [("b", "b: unreadable"), ("d", "'d.in': d fails alone")]
    assert reported == ["b: unreadable", "'d.in': d fails alone"]
    assert store.calls == [("start", list("abcde")), ("fail", "b"), ("fail", "d"), ("flush",)]


def test_give_up_after_the_first_failures_only_when_none_succeeded():
    def failing(batch, loaded):
        raise ValueError("broken model")

    store = ListStore(list("abcde"))
    runner = Runner.using(store, report=None, quiet=True, give_up_after=3)
    todo = runner.plan()
    with pytest.raises(GaveUp, match=r"^the model failed on the first 3 images \(last: ValueError: broken model\)$"):
        runner.run_batches(todo, ([(i, 0)] for i in todo), failing)
    assert len(runner.failed) == 3 and store.calls[-1] == ("flush",)  # flushed on the way out

    # one success first: later failures are the inputs' own, the run goes on
    store = ListStore(list("abcde"))
    runner = Runner.using(store, report=None, quiet=True, give_up_after=3)
    todo = runner.plan()
    runner.run_batches(todo, ([(i, 0)] for i in todo),
                       lambda batch, loaded: [1] if batch[0].id == "a" else failing(batch, loaded))  # fmt: skip
    assert runner.done == 1 and len(runner.failed) == 4

    # an input with nothing to write (``None``) is no success: a broken model still ends the run
    store = ListStore(list("abcde"))
    runner = Runner.using(store, report=None, quiet=True, give_up_after=3)
    todo = runner.plan()
    with pytest.raises(GaveUp):
        runner.run_batches(todo, ([(i, 0)] for i in todo),
                           lambda batch, loaded: [None] if batch[0].id == "b" else failing(batch, loaded))  # fmt: skip
    assert [i.id for i, _ in runner.failed] == ["a", "c", "d"]


def test_writer_threads_write_every_result_and_finish_before_the_run_ends():
    import threading

    class SlowStore(ListStore):
        def write(self, item, result):
            threading.Event().wait(0.002)  # a disk that lags behind the model
            self.results[item.id] = (result, threading.current_thread() is threading.main_thread())

    ids = [f"x{i}" for i in range(40)]
    store = SlowStore(ids)
    runner = Runner.using(store, quiet=True, writers=2)
    todo = runner.plan()
    runner.run_batches(todo, ([(i, n)] for n, i in enumerate(todo)), lambda batch, loaded: loaded)
    assert store.results == {f"x{n}": (n, False) for n in range(40)}  # all written, off the main thread
    assert runner.done == 40 and store.calls[-1] == ("flush",)


def test_a_failed_write_in_a_writer_thread_ends_the_run():
    class FullDisk(ListStore):
        def write(self, item, result):
            if item.id == "c":
                raise RunError("cannot write 'c': no space left on device")
            super().write(item, result)

    store = FullDisk(list("abcdef"))
    runner = Runner.using(store, quiet=True, writers=2)
    todo = runner.plan()
    with pytest.raises(RunError, match="no space left"):
        runner.run_batches(todo, ([(i, 1)] for i in todo), lambda batch, loaded: loaded)
    assert {"a", "b"} <= set(store.results) and "c" not in store.results
    assert store.calls[-1] == ("flush",)


# --- LinesFile: one file, a line per id ----------------------------------------------------------


def run_lines(path, ids, settings, process=None, **options):
    runner = Runner.using(LinesFile(path, "t", settings, what="tags", **options), quiet=True)
    todo = runner.plan({i: Path(f"{i}.png") for i in ids})
    if todo:
        runner.run(todo, lambda p: p.stem, process or (lambda items, loaded: [f"{x} 1 2" for x in loaded]))
    return runner, todo


def test_lines_file_writes_resumes_and_keeps_its_settings_beside_it(tmp_path):
    out = tmp_path / "sub" / "tags.txt"
    runner, todo = run_lines(out, ["a", "b"], {"k": 1})
    assert [i.id for i in todo] == ["a", "b"] and runner.done == 2
    assert out.read_text() == "a 1 2\nb 1 2\n"
    sidecar = tmp_path / "sub" / "tags.txt.iseg-manifest.json"
    assert json.loads(sidecar.read_text()) == {"command": "t", "settings": {"k": 1}}
    runner, todo = run_lines(out, ["a", "b", "c"], {"k": 1})
    assert [i.id for i in todo] == ["c"] and runner.skipped == 2
    assert out.read_text() == "a 1 2\nb 1 2\nc 1 2\n"


def test_lines_file_refuses_foreign_files_and_other_settings(tmp_path):
    foreign = tmp_path / "foreign.txt"
    foreign.write_text("mine\n")
    with pytest.raises(RunError, match=r"refusing to overwrite .*foreign.txt.*no foreign.txt.iseg-manifest.json"):
        run_lines(foreign, ["a"], {"k": 1})
    assert foreign.read_text() == "mine\n"
    out = tmp_path / "tags.txt"
    run_lines(out, ["a"], {"k": 1})
    with pytest.raises(RunError) as info:
        run_lines(out, ["a"], {"k": 2})
    assert str(info.value) == (f"'{out}' holds tags of other settings (k: 1 → 2); rerun with --overwrite to "
                               "replace them, or choose another --out")  # fmt: skip
    runner, todo = run_lines(out, ["a"], {"k": 2}, overwrite=True)
    assert len(todo) == 1 and out.read_text() == "a 1 2\n"
    with pytest.raises(RunError, match="is a folder") as info:
        run_lines(tmp_path, ["a"], {"k": 1})
    assert info.value.code == 2


def test_lines_file_with_no_line_locks_nothing_and_failed_ids_are_retried(tmp_path):
    out = tmp_path / "tags.txt"

    def fail_b(items, loaded):
        if items[0].id == "b":
            raise ValueError("no")
        return [f"{x} 7" for x in loaded]

    runner, _ = run_lines(out, ["b"], {"k": 1}, process=fail_b)
    assert out.read_text() == "" and len(runner.failed) == 1
    run_lines(out, ["a", "b"], {"k": 2}, process=fail_b)  # other settings: nothing was locked
    assert out.read_text() == "a 7\n"
    runner, todo = run_lines(out, ["a", "b"], {"k": 2})
    assert [i.id for i in todo] == ["b"] and out.read_text() == "a 7\nb 1 2\n"


def test_lines_file_is_complete_up_to_some_line_when_killed(tmp_path):
    out = tmp_path / "tags.txt"
    seen = []

    def interrupted(items, loaded):
        seen.append(items[0].id)
        if items[0].id == "d":
            # the file on disk now: rewritten every 2 lines, never half a line
            seen.append(out.read_text())
            raise KeyboardInterrupt
        return [f"{x} 0" for x in loaded]

    with pytest.raises(KeyboardInterrupt):
        run_lines(out, list("abcdef"), {"k": 1}, process=interrupted, flush_every=2)
    assert seen[-1] == "a 0\nb 0\n"
    assert out.read_text() == "a 0\nb 0\nc 0\n"  # c: flushed on the way out
    assert not list(tmp_path.glob(".*.iseg-tmp"))
    _, todo = run_lines(out, list("abcdef"), {"k": 1})
    assert [i.id for i in todo] == ["d", "e", "f"]


# --- MissingFiles: results of the input alone ----------------------------------------------------


def test_missing_files_keeps_what_exists_and_a_fatal_error_keeps_what_was_written(tmp_path):
    out = tmp_path / "labels"
    out.mkdir()
    (out / "b.png").write_text("converted by someone else")
    pairs = [(n, f"{n}.png") for n in "abcd"]

    def convert(items, loaded):
        if loaded[0] == "c":
            raise ValueError("c.mat: no LabelMap")
        return [text_saver(x.upper()) for x in loaded]

    runner = Runner.using(MissingFiles(out), quiet=True, fatal=(ValueError,))
    todo = runner.plan(pairs)
    assert [i.id for i in todo] == ["a.png", "c.png", "d.png"] and runner.skipped == 1
    with pytest.raises(ValueError, match="no LabelMap"):  # fatal: not one failed input among others
        runner.run_batches(todo, ([(i, i.path.name)] for i in todo), convert)
    assert sorted(os.listdir(out)) == ["a.png", "b.png"]
    assert read(out / "b.png") == "converted by someone else"
    again = Runner.using(MissingFiles(out), quiet=True)
    todo = again.plan(pairs)
    again.run_batches(todo, ([(i, i.path.name)] for i in todo), lambda items, loaded: [text_saver("x")])
    assert again.done == 2 and again.failed == [] and read(out / "d.png") == "x"  # c and d now
    with pytest.raises(ValueError, match="not a plain file name"):
        MissingFiles(out).plan([("x", "../x.png")])
