"""The resumable training checkpoint (``checkpoint.pt``) and the RNG state it carries.

It holds what an exact resume needs: the trainable tensors, the optimizer, scheduler and
grad-scaler states, the step counter and evaluation history, and the RNG state of every process
(python, numpy, torch CPU and CUDA). It is written atomically (:mod:`lorafit.common.files`) and
loaded with ``weights_only=True``: numpy's RNG array is stored as a tensor to keep the file free
of pickled objects.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from lorafit.common.errors import LorafitError
from lorafit.common.files import atomic_write

CHECKPOINT = "checkpoint.pt"


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as tensors and plain values only (``weights_only``-loadable)."""
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

    Everything is checked before the first copy, so a mismatch leaves the model as it was. On a
    sharded model (``--fsdp``) every rank passes the full tensors and keeps its own shard.

    Raises:
        LorafitError: a name or a shape differs (the checkpoint is from another configuration).
    """

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
            param = params[name]
            if isinstance(param, DTensor):  # --fsdp: this rank keeps its shard of the full tensor
                value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
            param.copy_(value)
