"""Export: merge an adapter into a copy of its base -> ONNX / TorchScript, parity check, int8, latency;
or a causal-LM adapter -> GGUF for llama.cpp (merged, or the adapter alone as a llama.cpp LoRA).

Entry points: :func:`lorafit.export.api.export_model`, :func:`lorafit.export.gguf.export_gguf`,
:func:`lorafit.export.gguf_lora.export_gguf_lora` and ``lorafit export`` (:mod:`lorafit.export.cli`).
ONNX needs the extra ``lorafit[export]`` (onnx, onnxruntime), GGUF the extra ``lorafit[gguf]``,
imported only when used. The task-specific parts of the ONNX path (rebuilding the models,
calibration data, the metric) are the task's export hooks (:class:`lorafit.tasks.base.Task`),
found through the task registry.
"""

from lorafit.export.api import export_model
from lorafit.export.gguf import export_gguf
from lorafit.export.gguf_lora import export_gguf_lora

__all__ = ["export_gguf", "export_gguf_lora", "export_model"]
