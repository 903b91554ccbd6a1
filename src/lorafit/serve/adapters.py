"""Adapters as files: ``DIR/<name>/`` loaded on first use, kept in an LRU of ``max_resident``.

A request names an adapter by its sub-directory name. The name is only ever matched against the
entries of ``DIR`` (never joined blindly), so ``..`` or ``a/b`` cannot reach outside it. Inside
the model each adapter gets an internal key (``serve_0``, ``serve_1``, ...): directory names may
hold characters an adapter name may not (``v1.2``), and a re-load after a file changed gets a
fresh key, so the layers' stacked-weight caches can never mix the old and new tensors.

Loading goes through :func:`lorafit.load_adapter`, which checks every key and shape and changes
the model only when everything fits; a base-fingerprint mismatch (an adapter trained on other
weights) is refused too, by deleting what was just loaded. Either way the model keeps serving
every other adapter, and the failure is a :class:`ServeError` 422 naming the file.

Every method that touches the model runs on the engine's one worker thread; the listing and
existence checks (``names``, ``exists``) only read the directory and are safe from the event loop.
"""

from __future__ import annotations

import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import lorafit
from lorafit.common.files import read_json
from lorafit.io import CONFIG_NAME, WEIGHTS_NAME
from lorafit.serve.metrics import Metrics
from lorafit.tree import lora_layers


class ServeError(Exception):
    """A request that cannot be served: an HTTP status and one line naming what is wrong.

    ``kind`` / ``param`` / ``code`` fill OpenAI's error object, so its client raises the matching
    exception (``NotFoundError`` for 404, ``BadRequestError`` for 400, ...).
    """

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Resident:
    """One adapter in the model: its internal key, the file's identity when loaded, extras (labels)."""

    key: str
    stamp: tuple[int, int]  # (mtime_ns, size) of adapter_model.safetensors: a rewrite reloads it
    info: dict[str, Any] = field(default_factory=dict)
    bytes: int = 0


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


class AdapterStore:
    """The adapters of ``directory`` as seen by the server, at most ``max_resident`` in the model.

    Args:
        model: the base (any model :func:`lorafit.load_adapter` takes).
        directory: ``DIR``; each sub-directory with an ``adapter_config.json`` is an adapter.
        max_resident: LRU size; the least recently used adapter not needed by the running batch
            is deleted from the model (:func:`lorafit.delete_adapter`) to make room.
        task: the server's task name; an adapter whose ``lorafit_job.json`` names another is refused.
        extras: ``(adapter_dir) -> dict`` read at load time (the classification labels).
    """

    def __init__(self, model: nn.Module, directory: str | Path, max_resident: int, metrics: Metrics,
                 task: str | None = None, extras=None):
        if max_resident < 1:
            raise ValueError(f"max_resident must be >= 1, got {max_resident}")
        self.model, self.dir, self.max_resident, self.metrics = model, Path(directory), max_resident, metrics
        self.task, self.extras = task, extras
        # the base's compute dtype: a bf16 / fp16 server keeps adapters in it (no fp32 masters to serve)
        self.dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self.resident: OrderedDict[str, Resident] = OrderedDict()  # name -> Resident, least recent first
        self._next_key = 0

    # ---------------------------------------------------------------- listing (any thread)
    def names(self) -> list[str]:
        """Sub-directories of DIR holding an adapter_config.json, sorted (rescanned every call)."""
        if not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.iterdir() if (p / CONFIG_NAME).is_file())

    def exists(self, name: str) -> bool:
        """Is ``name`` an adapter in DIR right now? Only entries of DIR count (no path is built from it)."""
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
                or "\0" in name:
            return False
        try:
            return (self.dir / name / CONFIG_NAME).is_file()
        except OSError:  # a name too long for the file system, ...
            return False

    def not_found(self, name: str) -> ServeError:
        return ServeError(404, f"model {name!r} not found: neither the base nor an adapter directory in {self.dir} "
                               "(GET /v1/models lists them)", "not_found_error", "model", "model_not_found")

    # ---------------------------------------------------------------- the model (worker thread)
    def ensure(self, names: list[str], keep: set[str]) -> dict[str, str | ServeError]:
        """Make ``names`` resident; returns name -> internal key, or the ServeError of a failed load.

        ``keep`` (the running batch's adapters) is never evicted. Names already resident move to
        the most-recent end. A resident adapter whose file changed on disk is reloaded.
        """
        out: dict[str, str | ServeError] = {}
        for name in names:
            try:
                out[name] = self._ensure_one(name, keep)
            except ServeError as exc:
                out[name] = exc
        return out

    def _ensure_one(self, name: str, keep: set[str]) -> str:
        if not self.exists(name):
            self.evict(name)
            raise self.not_found(name)
        directory = self.dir / name
        weights = directory / WEIGHTS_NAME
        try:
            stamp = _stamp(weights)
        except OSError:
            stamp = (0, 0)  # load_adapter names the missing file
        res = self.resident.get(name)
        if res is not None and res.stamp == stamp:
            self.resident.move_to_end(name)
            return res.key
        if res is not None:  # rewritten on disk: drop the old tensors, load the new file
            self.evict(name)
        while len(self.resident) >= self.max_resident:
            victim = next((n for n in self.resident if n not in keep), None)
            if victim is None:
                raise ServeError(503, f"cannot load adapter {name!r}: all {self.max_resident} resident adapters "
                                      "are in use by the running batch (raise --max-resident)", "server_error")
            self.evict(victim)
        return self._load(name, directory, stamp)

    def _load(self, name: str, directory: Path, stamp: tuple[int, int]) -> str:
        key = f"serve_{self._next_key}"
        self._next_key += 1
        try:
            info = read_json(directory / "lorafit_job.json")
        except Exception:  # noqa: BLE001 - unreadable job info: the load below reports the adapter itself
            info = {}
        if self.task and isinstance(info, dict) and info.get("task") not in (None, self.task):
            self.metrics.count("load_failures")
            raise ServeError(422, f"{directory / 'lorafit_job.json'}: adapter {name!r} was trained for task "
                                  f"{info.get('task')!r}; this server serves {self.task!r}",
                             param="model", code="adapter_invalid")
        t0 = time.perf_counter()
        # inference_mode(False): a load may be asked from inside a decode loop (a joining row), and
        # parameters made under inference mode would have no version counter (adapter_batch's cache reads it)
        with warnings.catch_warnings(record=True) as caught, torch.inference_mode(False):
            warnings.simplefilter("always")
            try:
                lorafit.load_adapter(self.model, directory, adapter=key)  # all-or-nothing
            except (ValueError, OSError, KeyError, RuntimeError) as exc:
                self.metrics.count("load_failures")
                raise ServeError(422, f"adapter {name!r}: {str(exc).splitlines()[0] if str(exc) else exc!r}",
                                 param="model", code="adapter_invalid") from None
        if any("fingerprint" in str(w.message) for w in caught):
            self._delete(key)
            self.metrics.count("load_failures")
            raise ServeError(422, f"adapter {name!r}: {directory / WEIGHTS_NAME}: the base weights differ from the "
                                  "ones this adapter was trained on (fingerprint mismatch)",
                             param="model", code="adapter_invalid")
        if self.dtype not in (torch.float32, torch.float64):
            self._cast(key)
        extra = {}
        if self.extras is not None:
            try:
                extra = self.extras(directory)
            except Exception as exc:  # noqa: BLE001 - labels.json broken: refuse this adapter only
                self._delete(key)
                self.metrics.count("load_failures")
                raise ServeError(422, f"adapter {name!r}: {str(exc).splitlines()[0]}", param="model",
                                 code="adapter_invalid") from None
        nbytes = sum(p.numel() * p.element_size() for ad in self._adapters_of(key) for p in ad.parameters())
        self.resident[name] = Resident(key, stamp, extra, nbytes)
        self.metrics.count("loads")
        self.load_seconds = time.perf_counter() - t0
        return key

    def _cast(self, key: str) -> None:
        """The adapter's A and B in the base's dtype: the batched forward computes in that dtype anyway,
        and stacks of the same dtype can be the adapters' storage (one copy, ``share_weights``)."""
        with torch.inference_mode(False), torch.no_grad():
            for ad in self._adapters_of(key):
                ad.to(self.dtype)

    def _adapters_of(self, key: str):
        """The adapter modules stored under ``key``, one per layer that has it."""
        for _, layer in lora_layers(self.model):
            if key in layer.adapters:
                yield layer.adapters[key]

    def evict(self, name: str) -> None:
        """Delete ``name`` from the model (if resident) and free the layers' stacked-weight caches."""
        res = self.resident.pop(name, None)
        if res is None:
            return
        self._delete(res.key)
        self.metrics.count("evictions")

    def _delete(self, key: str) -> None:
        with warnings.catch_warnings(), torch.inference_mode(False):
            warnings.simplefilter("ignore")  # "adapter ... is active now": the server never uses the active set
            lorafit.delete_adapter(self.model, key)
        for _, layer in lora_layers(self.model):
            layer.stack_cache.clear()  # the stacks may hold the deleted adapter's tensors

    def slots(self) -> tuple[str, ...]:
        """Every resident adapter's key in a fixed order: ``adapter_batch``'s ``slots`` (stacked once per set)."""
        return tuple(sorted(r.key for r in self.resident.values()))

    def info(self, name: str) -> dict[str, Any]:
        return self.resident[name].info
