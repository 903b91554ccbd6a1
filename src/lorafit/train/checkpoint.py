"""Crash-safe files: atomic writes, directory swaps and the resumable training checkpoint.

Every file goes to a temporary name in the same directory and is then ``os.replace``-d onto its
final name (atomic on POSIX), so a kill at any moment leaves either the old file or the new one.
Directories (``adapter/``) are built under a temporary name and swapped in with two renames; the
old copy stays as ``<name>.old`` until the new one is in place, so a complete adapter exists at
every instant.

The checkpoint (``checkpoint.pt``) holds what an exact resume needs: the trainable tensors, the
optimizer, scheduler and grad-scaler states, the step counter and evaluation history, and the
RNG state of every process (python, numpy, torch CPU and CUDA). It is loaded with
``weights_only=True``: numpy's RNG array is stored as a tensor to keep the file free of pickled
objects.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
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


def replace_dir(final: str | Path, build: Callable[[Path], None]) -> None:
    """Build a directory with ``build(tmp_dir)`` and swap it in place of ``final``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    old = final.with_name(final.name + ".old")
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        build(tmp)
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


def load_checkpoint(run_dir: str | Path) -> dict[str, Any] | None:
    """Read ``<run_dir>/checkpoint.pt``; None when there is none."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def restore_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy checkpointed trainable tensors back into ``model`` (names must match exactly)."""
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    unknown = [n for n in tensors if n not in params]
    if missing or unknown:
        raise RuntimeError(
            f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unknown[:3]}"
        )
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
