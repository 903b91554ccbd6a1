"""Crash-safe files: atomic writes, JSON beside a run, atomic directory swaps, stale temp clean-up.

Every file goes to a temporary name in the same directory and is then ``os.replace``-d onto its
final name (atomic on POSIX), so a kill at any moment leaves either the old file or the new one.
Temporary names are ``.<name>.<8 random chars>.tmp`` (mkstemp), so :func:`clean_stale_temps` can
remove exactly what a killed writer left. Directories (``adapter/``) are built under a temporary
name and swapped in with one atomic ``renameat2(RENAME_EXCHANGE)`` on Linux, so a complete
directory is at its name at every instant (the old copy ends under the temporary name and is
deleted). Where the exchange is unavailable (another OS, a filesystem without it) two renames
are used: the old copy is moved to ``<name>.old`` before the new one takes its name, and a kill
between the two leaves a complete ``<name>.old`` that :func:`lorafit.jobs.rundir.clean_leftovers`
renames back at the next start.

This module is the bottom of the application: it imports nothing of lorafit but
:mod:`lorafit.common.errors`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorafit.common.errors import LorafitError

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` then rename ``tmp_path`` onto ``path``.

    mkstemp creates files 0600; they get the usual umask-derived mode instead, as ``open`` would.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Atomically write ``text`` (UTF-8)."""
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def read_json(path: str | Path) -> Any:
    """A JSON file written beside an adapter or run (``{}`` when absent).

    Raises:
        LorafitError: the file exists but is not valid JSON (one line naming it).
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LorafitError(f"{path}: not valid JSON") from None


def write_json(path: str | Path, data: Any) -> None:
    """Atomically write ``data`` as indented JSON."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
_renameat2: Any = None  # resolved on first use; False where libc has none


def exchange(a: str | Path, b: str | Path) -> bool:
    """Swap the directory entries ``a`` and ``b`` in one atomic step (Linux ``renameat2``).

    Returns False, having changed nothing, where that is not possible: not Linux, a libc without
    ``renameat2`` (glibc < 2.28, musl), or a filesystem refusing ``RENAME_EXCHANGE`` (EINVAL).

    Raises:
        OSError: any other failure (a missing path, permissions), with errno set.
    """
    global _renameat2
    if _renameat2 is None:
        func = None
        if sys.platform.startswith("linux"):
            func = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
        if func is not None:
            func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            func.restype = ctypes.c_int
        _renameat2 = func or False
    if _renameat2 is False:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def replace_dir(final: str | Path, build: Callable[[Path], None]) -> None:
    """Build a directory with ``build(tmp_dir)`` and swap it in place of ``final``.

    ``final`` holds a complete copy at every instant: the old one until an atomic exchange puts the
    new one there (see the module docstring for the fallback). A failing ``build`` leaves ``final``
    untouched.

    Raises:
        LorafitError: ``final`` exists and is not a directory (a file is never replaced by a tree).
    """
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise LorafitError(f"{final}: exists and is not a directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    old = final.with_name(final.name + ".old")
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        build(tmp)
        if final.exists() and exchange(tmp, final):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old copy
            return
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists() and old.exists():
            os.replace(old, final)
        raise


def dir_bytes(path: str | Path) -> int:
    """Total size of the regular files under ``path`` (0 if missing)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _temp_pattern(name: str) -> re.Pattern:
    """What :func:`atomic_write` names its temporary file for ``name``: ``.<name>.<8 mkstemp chars>.tmp``."""
    return re.compile(rf"\.{re.escape(name)}\.[A-Za-z0-9_]{{8}}\.tmp")


def clean_stale_temps(directory: str | Path, names) -> list[Path]:
    """Delete the temporary files a killed :func:`atomic_write` of ``names`` left in ``directory``.

    A write in progress never leaves them (it renames or deletes its file), so any still there
    come from a process that died mid-write. Two processes writing one file at once are not
    supported anyway (the last rename wins), so there is no live writer to protect.
    """
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    patterns = [_temp_pattern(n) for n in names]
    for entry in directory.iterdir():
        if any(p.fullmatch(entry.name) for p in patterns) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
