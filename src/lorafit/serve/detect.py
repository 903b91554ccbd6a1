"""``--task detect``: ``/v1/detect`` (an image -> boxes with class, label and confidence) on a YOLO detector.

Images come as in ``/v1/classify-image`` (base64 JSON, or a raw upload with ``?model=``). Each
is letterboxed to the task's ``imgsz`` square (aspect kept, grey 114 padding split evenly, as
Ultralytics pads), so images of any size share one batch; the batch runs once with per-row
adapters, then Ultralytics' NMS runs per image and the boxes are mapped back to the image's
own pixels (``ops.scale_boxes``). Every adapter must have the class count the base was built
with (the first adapter's): a detector's class convs are shared shapes.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import lorafit
from lorafit.common.files import read_json
from lorafit.serve.adapters import AdapterStore, ServeError
from lorafit.serve.engine import Job


def letterbox(data: bytes, size: int, field: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """Encoded image -> (RGB float [3, size, size] in [0, 1], (height, width) of the original); 400 if unreadable."""
    from PIL import Image  # lazy: only image endpoints need PIL

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            w, h = im.size
            r = min(size / h, size / w)
            nw, nh = max(1, round(w * r)), max(1, round(h * r))
            canvas = Image.new("RGB", (size, size), (114, 114, 114))
            dw, dh = (size - nw) / 2, (size - nh) / 2
            canvas.paste(im.resize((nw, nh), Image.BILINEAR), (round(dw - 0.1), round(dh - 0.1)))
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, ValueError, DecompressionBombError...
        raise ServeError(400, f"field {field!r}: {len(data)} bytes that are not an image PIL can read "
                              f"({type(exc).__name__})", param=field) from None
    x = torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return x.permute(2, 0, 1).float() / 255.0, (h, w)


def read_names(directory: Path) -> dict[str, Any]:
    """A detect adapter's class names (``lorafit_detect.json``, as ``save_detector_adapter`` wrote them)."""
    meta = read_json(directory / "lorafit_detect.json")
    names = meta.get("names") if isinstance(meta, dict) else None
    if not isinstance(names, dict) or not names:
        raise ValueError(f"{directory / 'lorafit_detect.json'}: missing or without class names")
    return {"names": {int(k): str(v) for k, v in names.items()}}


class Detector:
    """Batches of letterboxed images through a YOLO ``DetectionModel`` with per-row adapters.

    Args:
        model: the base detector (eval mode, unfused: the adapters wrap its convs).
        imgsz: the square input side.
        store: each adapter's class names (read at load time).
        conf, iou, max_det: NMS defaults (a request may set ``conf`` / ``iou`` / ``max_det``).
    """

    endpoints = ("detect",)

    def __init__(self, model: nn.Module, imgsz: int, store: AdapterStore, conf: float = 0.25, iou: float = 0.7,
                 max_det: int = 300):
        self.model, self.imgsz, self.store = model, imgsz, store
        self.conf, self.iou, self.max_det = conf, iou, max_det
        self.device = next(model.parameters()).device
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())  # --dtype: pixels follow
        names = getattr(model, "names", None) or {}
        self.base_names = {int(k): str(v) for k, v in (names.items() if isinstance(names, dict) else enumerate(names))}

    def encode(self, data: bytes, field: str) -> tuple[torch.Tensor, tuple[int, int]]:
        return letterbox(data, self.imgsz, field)

    @torch.inference_mode()
    def run(self, kind: str, jobs: list[Job], keys: list[str | None], admit=None) -> None:
        """pixels [N, 3, S, S] -> predictions [N, 4 + nc, anchors] in one pass -> NMS and boxes per image."""
        from ultralytics.utils import ops  # lazy: optional extra lorafit[yolo]
        from ultralytics.utils.nms import non_max_suppression

        pixels = torch.stack([job.work["pixels"] for job in jobs]).to(self.device, self.dtype)
        with lorafit.adapter_batch(self.model, keys, slots=self.store.slots(), share_weights=True):
            preds = self.model(pixels)
        preds = (preds[0] if isinstance(preds, (list, tuple)) else preds).float()  # NMS in fp32 whatever --dtype
        for i, job in enumerate(jobs):
            w = job.work
            conf = self.conf if w.get("conf") is None else w["conf"]
            iou = self.iou if w.get("iou") is None else w["iou"]
            max_det = self.max_det if w.get("max_det") is None else w["max_det"]
            det = non_max_suppression(preds[i:i + 1], conf, iou, max_det=max_det, max_time_img=60.0)[0]
            boxes = ops.scale_boxes(pixels.shape[2:], det[:, :4].clone(), w["shape"]).cpu()
            names = self.store.info(job.adapter).get("names", {}) if job.adapter is not None else self.base_names
            job.finish({"boxes": [{"box": [round(float(v), 2) for v in box], "confidence": float(c),
                                   "class": int(k), "label": names.get(int(k), str(int(k)))}
                                  for box, c, k in zip(boxes, det[:, 4].tolist(), det[:, 5].tolist())]})
