"""Shared constants and helpers of the vision tests (imported by conftest and test modules)."""

from __future__ import annotations

VISION_MODULES = ("torchvision", "ultralytics", "timm", "onnx", "onnxruntime")
IMGSZ = 96  # small enough for CPU, large enough for three YOLO strides (96 / 32 = 3 cells)


def detect_opts(**flags) -> dict:
    """Resolved ``lorafit train`` options for --task detect (the common table + detect's own flags)."""
    from lorafit.jobs.options import resolve
    from lorafit.tasks import detect
    from lorafit.train.options import OPTIONS

    flags = {"task": "detect", "device": "cpu", **{k: str(v) for k, v in flags.items()}}
    return resolve(flags, OPTIONS + detect.OPTIONS, lambda _t: dict(detect.DEFAULTS))


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment of a child process (torchrun): this checkout's src first, one OpenMP thread each."""
    import os
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "src"
    return {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", **extra}


def record_eval_logits(patch) -> list[dict]:
    """Make every ``image_classification.Task.evaluate`` call also record the logits it scored.

    ``patch`` is a pytest MonkeyPatch. The wrapper observes, then calls the real ``evaluate``; each
    record holds ``rows``, ``batch_size`` and ``logits`` (float32, [len(rows), num_labels]) computed
    in the same batches, so a test can compare the trained model's logits with a reloaded model's.
    """

    from lorafit.tasks import image_classification as ic

    calls: list[dict] = []
    real = ic.Task.evaluate

    def evaluate(self, model, rows, batch_size, device):
        calls.append({"rows": list(rows), "batch_size": batch_size,
                      "logits": eval_logits(self, model, rows, batch_size, device)})
        return real(self, model, rows, batch_size, device)

    patch.setattr(ic.Task, "evaluate", evaluate)
    return calls


def eval_logits(task, model, rows, batch_size, device="cpu"):
    """Logits of ``model`` on ``rows`` in the batches ``Task.evaluate`` uses: [len(rows), num_labels] fp32."""
    import torch

    with torch.no_grad():
        return torch.cat([model(task.collate(rows[i: i + batch_size])["pixel_values"].to(device)).float().cpu()
                          for i in range(0, len(rows), batch_size)])
