"""Write a merged model to ONNX / TorchScript, check it against PyTorch, quantize to int8.

ONNX goes through the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``): it
needs only ``onnx``, while the dynamo path pulls in onnxscript. The batch axis is dynamic.

Parity rule (fp32): ``max |exported - torch| <= 1e-4 * max(1, max |torch|)``, where torch is the
merged PyTorch module that was exported, on eval images when given (else a seeded [0, 1) batch).
A failure raises :class:`ExportParityError` (exit status 1) and leaves no output file behind. The
difference between that merged module and the *unmerged* LoRA model (what the adapter computes) is
reported next to it: it measures merging and Conv+BN fusion, i.e. fp32 rounding, and on a
detector it is amplified by the DFL box decoding (stride x bin expectation), so it is shown rather
than held to the export tolerance.

int8 is post-training quantization of the *merged* fp32 graph (merging into an already quantized
base would round the update away): static QDQ with per-channel weights when calibration images are
given, dynamic (weights only) otherwise. Only Conv / MatMul / Gemm are quantized: a detector's
output concatenates pixel-scale boxes with 0..1 class scores, which one int8 scale cannot hold.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from lorafit.common.errors import LorafitError

OPSET = 17


class ExportParityError(LorafitError):
    """The exported graph does not compute what the PyTorch model computes."""

    exit_code = 1


def example_input(imgsz: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Seeded input [batch, 3, imgsz, imgsz] in [0, 1) (a normalised image's range for YOLO)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, imgsz, imgsz, generator=g)


def to_onnx(model: nn.Module, imgsz: int, path, metadata: dict | None = None) -> Path:
    """Trace ``model`` to ONNX (opset 17, dynamic batch) and embed ``metadata`` as string props."""
    import onnx  # lazy: optional extra lorafit[export]

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = example_input(imgsz, batch=1)
    # dynamo=False is deliberate (no onnxscript); the tracer's constant-folding warnings are expected for a
    # fixed input size, and the parity check, not the warnings, is what vouches for the graph
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(model.eval(), (x,), str(path), dynamo=False, opset_version=OPSET, input_names=["images"],
                          output_names=["output0"], dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}},
                          do_constant_folding=True)
    if metadata:
        proto = onnx.load(str(path))
        for k, v in metadata.items():
            prop = proto.metadata_props.add()
            prop.key, prop.value = str(k), str(v)
        onnx.save(proto, str(path))
    return path


def to_torchscript(model: nn.Module, imgsz: int, path) -> Path:
    """``torch.jit.trace`` the model and save it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model.eval(), example_input(imgsz, batch=1), strict=False, check_trace=False)
    traced.save(str(path))
    return path


def op_histogram(path) -> Counter:
    """Node op types of an ONNX graph (used to show the merged graph has exactly the base's ops)."""
    import onnx  # lazy: optional extra lorafit[export]

    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def assert_no_lora(path) -> None:
    """No node or initializer named after an adapter: the LoRA branch was merged away."""
    import onnx  # lazy: optional extra lorafit[export]

    graph = onnx.load(str(path)).graph
    names = [n.name for n in graph.node] + [i.name for i in graph.initializer]
    bad = [n for n in names if "lora" in n.lower()]
    if bad:
        raise ExportParityError(f"{path}: the exported graph still contains LoRA ops ({bad[0]})")


def ort_session(path, threads: int | None = None):
    import onnxruntime as ort  # lazy: optional extra lorafit[export]

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(session, x: torch.Tensor) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def run_torchscript(path, x: torch.Tensor) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path))
    with torch.no_grad():
        return module(x).numpy()


def check_parity(reference: nn.Module, produced, imgsz: int, path, x: torch.Tensor | None = None) -> dict:
    """Compare the exported file's output with ``reference`` (PyTorch) on ``x``.

    Args:
        produced: a callable x -> np.ndarray running the exported file.
        x: input batch [N, 3, imgsz, imgsz] (default: the seeded example input, batch 2).

    Returns:
        ``{"max_abs_diff", "tolerance", "max_abs_output"}``.

    Raises:
        ExportParityError: over tolerance (the message gives both numbers and the file).
    """
    x = example_input(imgsz, batch=2) if x is None else x
    with torch.no_grad():
        ref = reference(x).float().numpy()
    out = produced(x)
    if out.shape != ref.shape:
        raise ExportParityError(f"{path}: exported output shape {out.shape} != PyTorch {ref.shape}")
    diff = float(np.abs(out - ref).max())
    scale = float(np.abs(ref).max())
    tol = 1e-4 * max(1.0, scale)
    if not np.isfinite(diff) or diff > tol:
        raise ExportParityError(f"{path}: PARITY FAILED: max |exported - PyTorch| = {diff:.3g} > tolerance "
                                f"{tol:.3g} (1e-4 x max(1, {scale:.3g})); the file is not trustworthy")
    return {"max_abs_diff": diff, "tolerance": tol, "max_abs_output": scale}


class _Calibration:
    """onnxruntime CalibrationDataReader over a list of [1, 3, H, W] float arrays."""

    def __init__(self, name: str, batches: list[np.ndarray]):
        self.name, self.items = name, iter(batches)

    def get_next(self):
        x = next(self.items, None)
        return None if x is None else {self.name: x}

    def rewind(self):  # pragma: no cover - onnxruntime calls it only for some methods
        pass


def quantize_int8(src, dst, calibration: list[np.ndarray] | None = None) -> Path:
    """Post-training int8 of an fp32 ONNX file: static QDQ if ``calibration`` is given, else dynamic."""
    # lazy: optional extra lorafit[export]
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    src, dst = Path(src), Path(dst)
    ops = ["Conv", "MatMul", "Gemm"]
    pre = dst.with_name(dst.stem + ".pre.onnx")
    try:  # onnxruntime's recommended pre-pass (shape inference + graph optimisation); optional
        # lazy: optional extra lorafit[export]
        from onnxruntime.quantization.shape_inference import quant_pre_process

        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)  # its failure path dumps files in CWD
        src = pre
    except Exception:  # noqa: BLE001 - the pre-pass is an optimisation; quantize the plain graph instead
        pre.unlink(missing_ok=True)
    if calibration:
        name = ort_session(src).get_inputs()[0].name
        quantize_static(str(src), str(dst), _Calibration(name, calibration), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        op_types_to_quantize=ops)
    else:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=ops)
    pre.unlink(missing_ok=True)
    return dst


def file_size(path) -> int:
    return os.path.getsize(path) if path and os.path.exists(path) else 0
