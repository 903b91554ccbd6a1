"""A serving process's parts put together: base model, adapter store, backend, engine, metrics.

``Server(model, tokenizer, adapters_dir, task=...)`` is the library entry point (``lorafit
serve`` builds the model from the adapters' job files, then calls it); ``server.app()`` is the
ASGI app and :class:`Background` runs it under uvicorn in a thread on a free loopback port (the
tests and the load benchmark use it).
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from lorafit.common.files import read_json
from lorafit.serve.adapters import AdapterStore, ServeError
from lorafit.serve.api import build_app
from lorafit.serve.backends import CausalLM, TextClassifier
from lorafit.serve.detect import Detector, read_names
from lorafit.serve.engine import Engine
from lorafit.serve.images import ImageClassifier
from lorafit.serve.metrics import Metrics


SERVED_TASKS = ("causal-lm", "text-classification", "image-classification", "detect")


@dataclass
class Limits:
    """What one request may ask for (beyond them: a 4xx naming the limit).

    Attributes:
        max_tokens: ``max_tokens`` at most (and the chat default): bounds how long a row decodes.
        max_inputs: prompts / texts / chat messages per request at most.
        max_request_bytes: request body size at most (413 beyond).
    """

    max_tokens: int = 256
    max_inputs: int = 32
    max_request_bytes: int = 1 << 20


def read_labels(directory: Path) -> dict[str, Any]:
    """A classification adapter's ``labels.json`` (its head's output order)."""
    labels = read_json(directory / "labels.json")
    if not isinstance(labels, list) or not labels:
        raise ValueError(f"{directory / 'labels.json'}: missing or not a non-empty list of labels")
    return {"labels": labels}


class Server:
    """One base model serving the adapters of a directory.

    Args:
        model: the base, eval mode, on its device; adapters already in it are not served (only DIR's).
        tokenizer: its tokenizer.
        adapters: DIR; each sub-directory with ``adapter_config.json`` is served under its name.
        task: "causal-lm" (OpenAI routes), "text-classification" (``/v1/classify``),
            "image-classification" (``/v1/classify-image``) or "detect" (``/v1/detect``); the image
            tasks take no tokenizer (None).
        base_name: the ``model`` value that selects the base itself.
        max_resident: adapters kept in the model at once (LRU).
        max_batch: rows per forward batch; window_ms: how long a batch waits to fill.
        max_length: text-classification: tokens per text (as trained); imgsz: the image tasks' input side.
        extra_routes: (path, metrics name, async handler(request)) POST routes a caller adds.
    """

    def __init__(self, model: nn.Module, tokenizer, adapters: str | Path, task: str = "causal-lm",
                 base_name: str = "base", max_resident: int = 8, max_batch: int = 16, window_ms: float = 5.0,
                 max_queue: int = 1024, limits: Limits | None = None, max_length: int = 512, imgsz: int = 224,
                 extra_routes: list | None = None):
        if task not in SERVED_TASKS:
            raise ValueError(f"lorafit serve has no endpoints for task {task!r} ({', '.join(SERVED_TASKS)})")
        self.model, self.task, self.base_name = model, task, base_name
        self.limits = limits or Limits()
        self.metrics = Metrics()
        extras = {"causal-lm": None, "detect": read_names}.get(task, read_labels)
        self.store = AdapterStore(model, adapters, max_resident, self.metrics, task, extras=extras)
        if task == "causal-lm":
            self.backend = CausalLM(model, tokenizer, self.metrics, self.store)
        elif task == "text-classification":
            self.backend = TextClassifier(model, tokenizer, max_length, self.store)
        elif task == "image-classification":
            self.backend = ImageClassifier(model, imgsz, self.store)
        else:
            self.backend = Detector(model, imgsz, self.store)
        self.engine = Engine(self.backend, self.store, self.metrics, max_batch, window_ms / 1000.0, max_queue)
        self.extra_routes = list(extra_routes or [])
        self.started = int(time.time())

    def resolve(self, name: str) -> str | None:
        """A request's ``model``: None for the base, the adapter name if DIR has it, else a 404."""
        if name == self.base_name:
            return None
        if not self.store.exists(name):
            raise self.store.not_found(name)
        return name

    def model_list(self) -> list[dict[str, Any]]:
        """``/v1/models``'s data: the base, then every adapter on disk (vLLM: ``parent`` = the base)."""
        resident = set(self.store.resident)
        base = {"id": self.base_name, "object": "model", "created": self.started, "owned_by": "lorafit",
                "root": self.base_name, "parent": None}
        return [base] + [{"id": n, "object": "model", "created": self.started, "owned_by": "lorafit", "root": n,
                          "parent": self.base_name, "resident": n in resident}
                         for n in self.store.names() if n != self.base_name]

    def health(self) -> dict[str, Any]:
        busy = self.engine.busy_since
        return {"status": "ok" if self.engine.thread is not None and self.engine.thread.is_alive() else "stopped",
                "task": self.task, "base": self.base_name, "resident_adapters": list(self.store.resident),
                "max_resident": self.store.max_resident, "queued": self.engine.queued(),
                "batch_running_s": None if busy is None else round(time.monotonic() - busy, 3)}

    def app(self):
        return build_app(self)


class Background:
    """uvicorn serving ``app`` in a daemon thread on a free port of ``host``; ``url``; ``close()``.

    The socket is bound here (port 0: the OS picks a free one) and handed to uvicorn, so there is
    no race between choosing a port and listening on it.
    """

    def __init__(self, app, host: str = "127.0.0.1", timeout: float = 60.0):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["Background", "Limits", "Server", "ServeError"]
