"""Rebuild the (base, LoRA, merged) models of an adapter for export, through its task.

The adapter on disk is only read. The task is taken from the adapter's ``lorafit_job.json`` when
present, else from the model spec (the task whose :meth:`~lorafit.tasks.base.Task.recognizes_model`
claims it: ``*.pt`` / ``*.yaml`` for detection, ``timm:`` / ``torchvision:`` for image
classification); the task's :meth:`~lorafit.tasks.base.Task.load_for_export` builds the pair. A
random-weight base is rebuilt with the run's seed (``config.yaml`` beside the adapter, else 0), the
way ``lorafit train`` built it; the core's base fingerprint then confirms it is the same base, and
a mismatch is an error (exporting an adapter onto other base weights gives a wrong model).
"""

from __future__ import annotations

from pathlib import Path

from lorafit.common.errors import LorafitError
from lorafit.common.files import read_json
from lorafit.tasks import ExportPair, Task, task_class, task_for_model, task_names

__all__ = ["ExportPair", "export_task", "load_pair"]


def export_task(model_spec: str, adapter_dir: Path) -> type[Task]:
    """The task class that exports ``adapter_dir`` (from its job info, else from ``model_spec``).

    Raises:
        LorafitError: the task cannot be told, or it has no export.
    """
    name = read_json(adapter_dir / "lorafit_job.json").get("task") or task_for_model(str(model_spec))
    if name is None:
        raise LorafitError(f"--model {model_spec}: cannot tell the task (no lorafit_job.json in {adapter_dir})")
    cls = task_class(name)
    if not cls.exports:
        supported = " and ".join(task_names(lambda c: c.exports))
        raise LorafitError(f"{adapter_dir}: export supports {supported} adapters, not {name!r}")
    return cls


def load_pair(model_spec: str, adapter_dir, imgsz: int | None = None) -> ExportPair:
    """Build the base, the LoRA model and the merged copy for ``model_spec`` + ``adapter_dir``."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise LorafitError(f"{adapter_dir}: not an adapter directory (no adapter_config.json)")
    return export_task(model_spec, adapter_dir).load_for_export(model_spec, adapter_dir, imgsz)
