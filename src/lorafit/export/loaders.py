"""Rebuild (base, LoRA) model pairs for export, for detectors and image classifiers.

The adapter on disk is only read. The task is taken from the adapter's ``lorafit_job.json`` when
present, else from the model spec (``*.pt`` / ``*.yaml`` = detect, ``timm:`` / ``torchvision:`` =
image-classification). A random-weight base (a yaml, or timm/torchvision without ``@CHECKPOINT``) is
rebuilt with the run's seed (``config.yaml`` beside the adapter, else 0), the way ``lorafit train``
built it; the core's base fingerprint then confirms it is the same base, and a mismatch is an
error here (exporting an adapter onto other base weights gives a wrong model, not a warning).
"""

from __future__ import annotations

import warnings
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from lorafit.common.files import read_json
from lorafit.common.errors import LorafitError


class FirstOutput(nn.Module):
    """Export wrapper: YOLO's eval forward returns (predictions [N, 4 + nc, anchors], features)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)
        return y[0] if isinstance(y, (list, tuple)) else y


@dataclass
class ExportPair:
    """What the exporter needs.

    Attributes:
        task: "detect" or "image-classification".
        base: the base model (eval mode; detectors Conv+BN fused), plain modules.
        lora: the base with the adapter loaded, unmerged (eval mode).
        merged: a merged copy of ``lora`` (plain modules; detectors fused), what gets exported.
        imgsz: input side; inputs are [N, 3, imgsz, imgsz].
        metadata: strings embedded in the ONNX file (Ultralytics' keys for detectors).
        info: the job info (classes, head, ...).
    """

    task: str
    base: nn.Module
    lora: nn.Module
    merged: nn.Module
    imgsz: int
    metadata: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def run_seed(adapter_dir: Path) -> int:
    cfg = adapter_dir.parent / "config.yaml"
    if cfg.is_file():
        import yaml

        try:
            return int((yaml.safe_load(cfg.read_text()) or {}).get("seed") or 0)
        except (yaml.YAMLError, ValueError, TypeError, AttributeError):
            return 0
    return 0


def _load_checked(load, adapter_dir: Path):
    """Run a loader; core ValueErrors and a base-fingerprint mismatch become one-line LorafitErrors."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = load()
        except ValueError as exc:
            raise LorafitError(str(exc).splitlines()[0]) from None
    for w in caught:
        if "fingerprint" in str(w.message):
            raise LorafitError(f"{adapter_dir}: the base weights differ from the ones this adapter was trained on "
                               "(wrong --model, or another seed for a random-weight base)")
    return out


def task_of(model_spec: str, adapter_dir: Path) -> str:
    job = read_json(adapter_dir / "lorafit_job.json")
    if job.get("task"):
        return job["task"]
    if str(model_spec).startswith(("timm:", "torchvision:")):
        return "image-classification"
    if str(model_spec).endswith((".pt", ".yaml", ".yml")):
        return "detect"
    raise LorafitError(f"--model {model_spec}: cannot tell the task (no lorafit_job.json in {adapter_dir})")


def load_pair(model_spec: str, adapter_dir, imgsz: int | None = None) -> ExportPair:
    """Build the base, the LoRA model and the merged copy for ``model_spec`` + ``adapter_dir``."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise LorafitError(f"{adapter_dir}: not an adapter directory (no adapter_config.json)")
    task = task_of(model_spec, adapter_dir)
    if task == "detect":
        return _detect_pair(model_spec, adapter_dir, imgsz)
    if task == "image-classification":
        return _classify_pair(model_spec, adapter_dir, imgsz)
    raise LorafitError(f"{adapter_dir}: export supports detect and image-classification adapters, not {task!r}")


def _detect_pair(model_spec: str, adapter_dir: Path, imgsz: int | None) -> ExportPair:
    from lorafit.integrations.ultralytics import detect_head, load_detector, load_detector_adapter, merged_copy

    job = read_json(adapter_dir / "lorafit_job.json")
    meta = read_json(adapter_dir / "lorafit_detect.json")
    imgsz = int(imgsz or job.get("imgsz") or meta.get("imgsz") or 320)
    torch.manual_seed(run_seed(adapter_dir))
    base = load_detector(model_spec, nc=meta.get("nc") if str(model_spec).endswith((".yaml", ".yml")) else None)
    lora = _load_checked(lambda: load_detector_adapter(deepcopy(base), adapter_dir), adapter_dir).eval()
    merged = merged_copy(lora).fuse(verbose=False).eval()
    base = deepcopy(base).fuse(verbose=False).eval()
    for m in (base, merged):
        head = detect_head(m)
        head.export, head.format, head.dynamic = True, "onnx", False
    stride = int(max(merged.stride)) if hasattr(merged, "stride") else 32
    names = {int(k): str(v) for k, v in dict(merged.names).items()}
    metadata = {"description": "lorafit merged YOLO detector", "author": "lorafit", "stride": stride,
                "task": "detect", "batch": 1, "imgsz": [imgsz, imgsz], "names": names, "channels": 3,
                "args": {"batch": 1, "dynamic": True, "nms": False, "half": False, "int8": False},
                "end2end": False}
    return ExportPair("detect", FirstOutput(base).eval(), FirstOutput(lora).eval(), FirstOutput(merged).eval(),
                      imgsz, metadata, {"names": names, "nc": int(detect_head(merged).nc)})


def _classify_pair(model_spec: str, adapter_dir: Path, imgsz: int | None) -> ExportPair:
    import lorafit
    from lorafit.tasks.image_classification import create_model

    job = read_json(adapter_dir / "lorafit_job.json")
    labels = read_json(adapter_dir / "labels.json")
    if not labels:
        raise LorafitError(f"{adapter_dir / 'labels.json'}: missing (an image-classification adapter needs it)")
    imgsz = int(imgsz or job.get("imgsz") or 224)
    torch.manual_seed(run_seed(adapter_dir))
    base = create_model(model_spec, len(labels), int(job.get("imgsz") or imgsz)).eval()
    lora = _load_checked(lambda: lorafit.load_adapter(deepcopy(base), adapter_dir), adapter_dir).eval()
    merged = lorafit.merge_and_unload(deepcopy(lora)).eval()
    metadata = {"description": "lorafit merged image classifier", "task": "classify", "imgsz": [imgsz, imgsz],
                "names": dict(enumerate(labels))}
    return ExportPair("image-classification", base, lora, merged, imgsz, metadata, {"labels": labels})
