"""`lorafit serve`: one base model, many adapters, mixed requests batched into one forward (issue 14).

``Server(model, tokenizer, adapters_dir, task=...)`` serves every adapter directory of
``adapters_dir`` (loaded on first use, an LRU of ``max_resident``); ``Server.app()`` is its ASGI
app (Starlette), ``Background(app)`` runs it under uvicorn in a thread. The command line is
``lorafit serve`` (:mod:`lorafit.serve.cli`). The parts: ``adapters`` (files -> resident adapters),
``engine`` (the one model thread, batching across adapters), ``generate`` (batched decoding with
per-row adapters, rows joining a running batch), ``backends`` (causal LM, text classifier),
``images`` / ``detect`` (image classifier, YOLO detector), ``requests`` (field checks), ``api``
(routes), ``metrics`` (Prometheus text). Nothing here imports Starlette or uvicorn at import time.
"""

from lorafit.serve.adapters import AdapterStore, ServeError
from lorafit.serve.server import Background, Limits, Server

__all__ = ["AdapterStore", "Background", "Limits", "ServeError", "Server"]
