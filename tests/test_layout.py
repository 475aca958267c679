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
