"""Export: merge an adapter into a copy of its base -> ONNX / TorchScript, parity check, int8, latency.

Entry points: :func:`lorafit.export.api.export_model` and ``lorafit export`` (:mod:`lorafit.export.cli`).
Needs the extra ``lorafit[export]`` (onnx, onnxruntime), imported only when used. The task-specific
parts (rebuilding the models, calibration data, the metric) are the task's export hooks
(:class:`lorafit.tasks.base.Task`), found through the task registry.
"""

from lorafit.export.api import export_model

__all__ = ["export_model"]
