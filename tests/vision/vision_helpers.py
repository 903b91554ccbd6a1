"""Shared constants and helpers of the vision tests (imported by conftest and test modules)."""

from __future__ import annotations

VISION_MODULES = ("torchvision", "ultralytics", "timm", "onnx", "onnxruntime")
IMGSZ = 96  # small enough for CPU, large enough for three YOLO strides (96 / 32 = 3 cells)


def detect_opts(**flags) -> dict:
    """Resolved ``lorafit train`` options for --task detect (the common table + detect's own flags)."""
    from lorafit.tasks import detect
    from lorafit.train import options

    flags = {"task": "detect", "device": "cpu", **{k: str(v) for k, v in flags.items()}}
    return options.resolve(flags, options.OPTIONS + detect.OPTIONS, lambda _t: dict(detect.DEFAULTS))


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment of a child process (torchrun): this checkout's src first, one OpenMP thread each."""
    import os
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "src"
    return {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", **extra}
