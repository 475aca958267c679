"""The one atomic writer and the one temporary-name scheme of every file iseg writes (the
runner's outputs and manifest, ``iseg tag``'s files, ``iseg eval``'s predictions, shard markers,
records and scores).

A file is written to a hidden ``.NAME.HOST-PID-XXXXXXXX.iseg-tmp`` next to it, then
``os.replace``-d: readers see the old file or the whole new one. The host and process id in the
name let the next run remove what a killed writer left, while runs on other machines sharing the
folder (``iseg eval`` shards) keep their own. Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".iseg-tmp"
"""The name ending of a temporary file being written."""


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40] or "host"


HOST = _host()
"""This machine's name as it appears in temporary names (letters, digits and ``_``)."""

_TEMP = re.compile(r"^\..+\.([A-Za-z0-9_]+)-(\d+)-[0-9a-f]{8}" + re.escape(TEMP_SUFFIX) + "$")


def temp_path(path: Path) -> Path:
    """A fresh temporary name for writing ``path``, in the same folder."""
    return path.with_name(f".{path.name}.{HOST}-{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")


def write_atomic(path: str | os.PathLike[str], save: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` with ``save(binary_file)`` through a temporary file and ``os.replace``:
    ``path`` is then either absent, the old file or the complete new one.

    Raises:
        OSError: the write failed (a full disk, ...); its ``filename`` is ``path``, never the
            temporary name, and the temporary file is removed.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as f:  # not mkstemp: its files are 0600, these follow the umask
            save(f)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno is not None:  # name the file, not the temp
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (assumed where it cannot be told)."""
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: assume alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs under another user
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike[str], recursive: bool = False) -> int:
    """Remove the temporary files in ``folder`` (and its subfolders if ``recursive``) that
    writers on this machine left when killed (their process is gone) or that this process
    left; another machine's are kept. Returns how many were removed."""
    folder = Path(folder)
    try:
        paths = list(folder.rglob(f"*{TEMP_SUFFIX}") if recursive else folder.glob(f"*{TEMP_SUFFIX}"))
    except OSError:
        return 0
    removed = 0
    for path in paths:
        match = _TEMP.match(path.name)
        if not match or match.group(1) != HOST:
            continue
        pid = int(match.group(2))
        if pid == os.getpid() or not pid_alive(pid):
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
    return removed
