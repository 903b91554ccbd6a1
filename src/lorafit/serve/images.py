"""``--task image-classification``: ``/v1/classify-image`` (image bytes -> label, score, every label's score).

An image comes as base64 in a JSON body (``{"model": ADAPTER, "image": "<base64>" or [...]}``)
or as the raw body of an upload (``Content-Type: image/...`` or ``application/octet-stream``,
the adapter in ``?model=``), so ``curl --data-binary @cat.jpg`` works without a multipart parser.
Images are decoded and preprocessed on the event loop exactly as training read them
(:func:`lorafit.tasks.image_classification.load_image`: RGB, resized to the task's ``imgsz``,
ImageNet-normalised); bytes that PIL cannot read are a 400 naming the field.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import torch
import torch.nn as nn

import lorafit
from lorafit.common.errors import LorafitError
from lorafit.serve.adapters import AdapterStore, ServeError
from lorafit.serve.engine import Job
from lorafit.tasks.image_classification import load_image


def image_from_bytes(data: bytes, size: int, field: str) -> torch.Tensor:
    """Encoded image bytes -> [3, size, size] as training preprocessed it; 400 when unreadable."""
    if not data:
        raise ServeError(400, f"field {field!r}: empty image", param=field)
    try:
        return load_image(io.BytesIO(data), size)
    except LorafitError as exc:
        why = str(exc).rsplit("(", 1)[-1].rstrip(")")
        raise ServeError(400, f"field {field!r}: {len(data)} bytes that are not an image PIL can read ({why})",
                         param=field) from None


def decode_base64(value: Any, field: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise ServeError(400, f"field {field!r}: must be a non-empty base64 string", param=field)
    if value.startswith("data:") and "," in value:  # a data URL: data:image/png;base64,....
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ServeError(400, f"field {field!r}: not valid base64", param=field) from None


class ImageClassifier:
    """Batches of images through a timm / torchvision classifier with per-row adapters.

    Args:
        model: the task's model (eval mode: BatchNorm uses the base's statistics, as in training).
        imgsz: input side (the adapter's job ``imgsz``).
        store: each adapter's ``labels.json`` (read at load time).
    """

    endpoints = ("classify-image",)

    def __init__(self, model: nn.Module, imgsz: int, store: AdapterStore):
        self.model, self.imgsz, self.store = model, imgsz, store
        self.device = next(model.parameters()).device
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())  # --dtype: pixels follow

    def encode(self, data: bytes, field: str) -> torch.Tensor:
        return image_from_bytes(data, self.imgsz, field)

    @torch.inference_mode()
    def run(self, kind: str, jobs: list[Job], keys: list[str | None], admit=None) -> None:
        """One forward for the batch: pixels [N, 3, imgsz, imgsz] -> probabilities [N, labels]."""
        pixels = torch.stack([job.work for job in jobs]).to(self.device, self.dtype)
        with lorafit.adapter_batch(self.model, keys, slots=self.store.slots(), share_weights=True):
            probs = torch.softmax(self.model(pixels).float(), -1).cpu()
        for job, p in zip(jobs, probs):
            labels = self.store.info(job.adapter).get("labels") or list(range(p.numel()))
            best = int(p.argmax())
            job.finish({"label": labels[best], "score": float(p[best]),
                        "scores": {str(lab): float(v) for lab, v in zip(labels, p.tolist())}})
