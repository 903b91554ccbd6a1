"""Export: merge an adapter into a copy of its base -> ONNX / TorchScript, parity check, int8, latency.

Entry points: :func:`lorafit.export.api.export_model` and ``lorafit export`` (:mod:`lorafit.export.cli`).
Needs the extra ``lorafit[export]`` (onnx, onnxruntime), imported only when used.
"""

__all__ = ["export_model"]


def __getattr__(name):
    if name == "export_model":
        from lorafit.export.api import export_model

        return export_model
    raise AttributeError(name)
