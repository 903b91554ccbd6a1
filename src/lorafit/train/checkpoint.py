"""Crash-safe files: atomic writes, directory swaps and the resumable training checkpoint.

Every file goes to a temporary name in the same directory and is then ``os.replace``-d onto its
final name (atomic on POSIX), so a kill at any moment leaves either the old file or the new one.
Directories (``adapter/``) are built under a temporary name and swapped in with one atomic
``renameat2(RENAME_EXCHANGE)`` on Linux, so a complete adapter is at ``adapter/`` at every instant
(the old copy ends under the temporary name and is deleted). Where the exchange is unavailable
(another OS, a filesystem without it) two renames are used: the old copy is moved to
``<name>.old`` before the new one takes its name, and a kill between the two leaves a complete
``<name>.old`` that :func:`lorafit.train.rundir.clean_leftovers` renames back at the next start.

The checkpoint (``checkpoint.pt``) holds what an exact resume needs: the trainable tensors, the
optimizer, scheduler and grad-scaler states, the step counter and evaluation history, and the
RNG state of every process (python, numpy, torch CPU and CUDA). It is loaded with
``weights_only=True``: numpy's RNG array is stored as a tensor to keep the file free of pickled
objects.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any
from collections.abc import Callable

import torch

CHECKPOINT = "checkpoint.pt"


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
    from lorafit.train.errors import LorafitError

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
    from lorafit.train.errors import LorafitError

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


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as tensors and plain values only (``weights_only``-loadable)."""
    import numpy as np

    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype("int64")), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    import numpy as np

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors by name, detached CPU copies (the adapter and any trained head)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` to ``<run_dir>/checkpoint.pt``; returns the path."""
    path = Path(run_dir) / CHECKPOINT
    atomic_write(path, lambda p: torch.save(state, p))
    return path


def load_checkpoint(run_dir: str | Path, mmap: bool = False) -> dict[str, Any] | None:
    """Read ``<run_dir>/checkpoint.pt``; None when there is none.

    ``mmap=True`` maps the tensors instead of reading them: a cheap check that the file is whole
    (a truncated zip has lost its central directory, which is at the end) before a model is loaded.

    Raises:
        LorafitError: the file is empty, truncated, not a checkpoint or not loadable without
            unpickling code; one line naming it (the file is left as it is).
    """
    from lorafit.train.errors import LorafitError

    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    if path.is_file() and path.stat().st_size == 0:
        raise LorafitError(f"{path}: empty file, not a checkpoint (the run directory was not changed)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - zip, pickle, EOF, OS errors: all mean "cannot use this file"
        reason = " ".join(str(exc).split())[:120] or exc.__class__.__name__
        raise LorafitError(
            f"{path}: cannot read the checkpoint, truncated or corrupt ({reason}); the run directory was not changed"
        ) from None
    if not isinstance(state, dict):
        raise LorafitError(f"{path}: not a lorafit checkpoint (holds a {type(state).__name__}, not a dict)")
    return state


def restore_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy checkpointed trainable tensors back into ``model`` (names and shapes must match exactly).

    Everything is checked before the first copy, so a mismatch leaves the model as it was.

    Raises:
        LorafitError: a name or a shape differs (the checkpoint is from another configuration).
    """
    from lorafit.train.errors import LorafitError

    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    unknown = [n for n in tensors if n not in params]
    shapes = [
        f"{n} {tuple(v.shape)} vs {tuple(params[n].shape)}"
        for n, v in tensors.items()
        if n in params and v.shape != params[n].shape
    ]
    if missing or unknown or shapes:
        raise LorafitError(
            f"{CHECKPOINT} does not match the model (missing {missing[:3]}, unexpected {unknown[:3]}, "
            f"shapes {shapes[:3]}): resume with the run's own options"
        )
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
