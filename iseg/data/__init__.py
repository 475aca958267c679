"""Dataset facts shipped with iseg: split lists, class tables and published tags.

Plain text and JSON copied from ``shared/data`` (see ``README.md`` in this folder); read them
with :func:`data_path`.
"""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent


def data_path(*parts: str) -> Path:
    """The path of a shipped data file, e.g. ``data_path("voc", "class_names.json")``.

    Raises:
        FileNotFoundError: no such file ships with iseg.
    """
    path = DATA_DIR.joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"iseg ships no data file {'/'.join(parts)!r} (looked in {DATA_DIR})")
    return path
