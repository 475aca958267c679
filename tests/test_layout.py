"""The package's import arrows point one way (CONTRIBUTING.md, issue 20): the library never
imports the CLI, the commands or the demo, the demo never imports the CLI or the commands, and
nothing in ``iseg`` imports a private ``iseg_ops._…`` name (only what ``iseg_ops`` exports)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "iseg"
UPWARD = ("iseg.cli", "iseg.commands", "iseg.demo")


def _all_imports(path: Path, source: str | None = None) -> set[str]:
    """The absolute names that ``path`` imports anywhere in it: modules, and ``module.name``
    for each name a ``from`` import takes."""
    module = "iseg." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8") if source is None else source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def _imports(path: Path) -> set[str]:
    """The absolute names of the ``iseg`` modules that ``path`` imports, anywhere in it."""
    return {name for name in _all_imports(path) if name == "iseg" or name.startswith("iseg.")}


LIBRARY = sorted(
    p for p in PACKAGE.rglob("*.py")
    if p.parts[len(PACKAGE.parts)] not in ("commands", "cli.py", "demo.py", "__main__.py")
)  # fmt: skip


def test_the_walk_finds_the_library():
    names = {p.relative_to(PACKAGE).as_posix() for p in LIBRARY}
    assert {"runner.py", "pipeline.py", "evaluate/running.py", "files.py"} <= names


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_the_library_never_imports_the_cli_or_the_demo(path):
    upward = sorted(n for n in _imports(path) if n.startswith(UPWARD))
    assert upward == [], f"{path.relative_to(PACKAGE)} imports {upward}"


def test_the_demo_never_imports_the_cli():
    upward = sorted(n for n in _imports(PACKAGE / "demo.py") if n.startswith(("iseg.cli", "iseg.commands")))
    assert upward == [], f"demo.py imports {upward}"


def test_the_import_reader_resolves_relative_imports():
    # One and two leading dots, checked against the files' own import lines.
    assert {"iseg.files", "iseg.errors"} <= _imports(PACKAGE / "runner.py")
    assert {"iseg.files", "iseg.files.write_atomic", "iseg.evaluate.metrics"} <= _imports(
        PACKAGE / "evaluate" / "running.py"
    )


def _private_ops(path: Path, source: str | None = None) -> list[str]:
    """The ``iseg_ops`` names that ``path`` imports with a private (``_``) part."""
    return sorted(
        name for name in _all_imports(path, source)
        if name.split(".")[0] == "iseg_ops" and any(part.startswith("_") for part in name.split(".")[1:])
    )  # fmt: skip


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_iseg_imports_only_what_iseg_ops_exports(path):
    private = _private_ops(path)
    assert private == [], f"{path.relative_to(PACKAGE)} imports {private}"


def test_the_private_ops_reader_sees_both_import_forms():
    probe = PACKAGE / "probe.py"  # never written: only its name places the relative imports
    source = (
        "import iseg_ops._dispatch\nfrom iseg_ops import _model, refine\n"
        "from iseg_ops._triton import INTERPRETED\nfrom iseg_ops import value_checks\n"
    )
    assert _private_ops(probe, source) == [
        "iseg_ops._dispatch", "iseg_ops._model", "iseg_ops._triton", "iseg_ops._triton.INTERPRETED"
    ]


PER_INPUT_WRITERS = ["commands/segment.py", "commands/regions.py", "commands/refine_masks.py",
                     "commands/unsupervised.py", "commands/tag.py", "evaluate/running.py",
                     "data/convert.py"]  # fmt: skip


@pytest.mark.parametrize("name", PER_INPUT_WRITERS)
def test_every_run_that_writes_per_input_goes_through_the_one_runner(name):
    assert "iseg.runner.Runner" in _all_imports(PACKAGE / name), f"{name} does not use iseg.runner.Runner"


def _renames(path: Path) -> list[str]:
    """The ``os.replace``/``os.rename``/``shutil.move`` calls in ``path`` (the atomic step)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if isinstance(owner, ast.Name) and f"{owner.id}.{node.func.attr}" in ("os.replace", "os.rename", "shutil.move"):
                found.append(f"{owner.id}.{node.func.attr} (line {node.lineno})")
    return found


def test_one_atomic_writer():
    assert _renames(PACKAGE / "files.py") == ["os.replace (line %d)" % next(
        i for i, line in enumerate((PACKAGE / "files.py").read_text().splitlines(), 1) if "os.replace(tmp" in line
    )]  # the reader sees the one there is
    others = {p.relative_to(PACKAGE).as_posix(): _renames(p) for p in PACKAGE.rglob("*.py") if p.name != "files.py"}
    assert {k: v for k, v in others.items() if v} == {}
