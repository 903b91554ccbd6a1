"""``export_model``: base + adapter -> merged ONNX / TorchScript (+ int8), checked, measured.

Steps: rebuild base and LoRA model (the adapter directory is only read), merge a *copy*, export
it, check parity against the unmerged LoRA model (ExportParityError otherwise; the bad file is
deleted), optionally quantize the merged ONNX to int8 and evaluate fp32 vs int8 on ``data``
(accuracy for classifiers, mAP for detectors), then time batch-1 CPU latency of the base
(PyTorch), the unmerged LoRA model (PyTorch), the merged export and the int8 export.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lorafit.export.formats import (
    assert_no_lora,
    check_parity,
    example_input,
    file_size,
    op_histogram,
    ort_session,
    quantize_int8,
    run_onnx,
    run_torchscript,
    to_onnx,
    to_torchscript,
)
from lorafit.common.errors import LorafitError
from lorafit.export.loaders import load_pair
from lorafit.tasks import task_class


def interleaved_ms(runners: dict, x, warmup: int = 3, runs: int = 20) -> dict[str, float]:
    """Median wall time (ms) of each ``runner(x)``, timed round-robin.

    Round-robin rather than one runner after another: on a shared CPU, load drifts over seconds,
    and interleaving spreads that drift evenly over the runners being compared.
    """
    for fn in runners.values():
        for _ in range(warmup):
            fn(x)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(runs):
        for k, fn in runners.items():
            t0 = time.perf_counter()
            fn(x)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def torch_runner(model):
    def run(x):
        with torch.inference_mode():
            return model(x)
    return run


def onnx_predictor(path: Path):
    """``predict(x) -> logits`` running the ONNX file ``path`` (its session opened on first use)."""
    session = None

    def predict(x):
        nonlocal session
        session = session or ort_session(path)
        return run_onnx(session, x)

    return predict


def export_model(model: str, adapter, out, fmt: str = "onnx", int8: bool = False, imgsz: int | None = None,
                 data=None, runs: int = 20) -> dict:
    """Export ``model`` + ``adapter`` merged to ``out``; returns the report (see module docstring).

    Raises:
        LorafitError: bad inputs (one line naming the file); ExportParityError on a parity failure.
    """
    if fmt not in ("onnx", "torchscript"):
        raise LorafitError(f"--format {fmt}: choose onnx or torchscript")
    if int8 and fmt != "onnx":
        raise LorafitError("--int8 needs --format onnx (int8 is onnxruntime quantization)")
    out = Path(out)
    pair = load_pair(model, adapter, imgsz)
    task = task_class(pair.task)
    report: dict = {"task": pair.task, "format": fmt, "out": str(out), "imgsz": pair.imgsz}
    calib = task.calibration_inputs(data, pair.imgsz) if data is not None else []
    x = torch.from_numpy(np.concatenate(calib[:8])) if calib else example_input(pair.imgsz, batch=2)
    with torch.no_grad():
        merge_diff = float((pair.lora(x) - pair.merged(x)).abs().max())
    report["merge_max_abs_diff"] = merge_diff
    report["parity_input"] = f"{len(x)} eval images" if calib else "seeded uniform [0, 1) batch of 2"
    with tempfile.TemporaryDirectory(prefix="lorafit-export-") as tmp:
        tmp = Path(tmp)
        written = tmp / out.name
        if fmt == "onnx":
            to_onnx(pair.merged, pair.imgsz, written, pair.metadata)
            assert_no_lora(written)
            session = ort_session(written)
            report["parity"] = check_parity(pair.merged, lambda t: run_onnx(session, t), pair.imgsz, out, x)
            base_onnx = to_onnx(pair.base, pair.imgsz, tmp / "base.onnx")
            same = op_histogram(written) == op_histogram(base_onnx)
            if not same and pair.same_ops:
                raise LorafitError(f"{out}: the merged graph's ops differ from the base model's")
            report["same_ops_as_base"] = same
        else:
            to_torchscript(pair.merged, pair.imgsz, written)
            report["parity"] = check_parity(pair.merged, lambda t: run_torchscript(written, t), pair.imgsz, out, x)
        out.parent.mkdir(parents=True, exist_ok=True)
        written.replace(out)  # only a checked file reaches the destination
        sizes = {"adapter": sum(p.stat().st_size for p in Path(adapter).glob("*.safetensors")),
                 "merged": file_size(out)}
        runners = {"base_torch": torch_runner(pair.base), "lora_unmerged_torch": torch_runner(pair.lora)}
        if fmt == "onnx":
            merged_s, base_s = ort_session(out), ort_session(base_onnx)
            runners["base_onnx"] = lambda t: run_onnx(base_s, t)
            runners["merged_onnx"] = lambda t: run_onnx(merged_s, t)
            sizes["base_onnx"] = file_size(base_onnx)
        else:
            runners["merged_torchscript"] = torch_runner(torch.jit.load(str(out)))
        if int8:
            q = out.with_name(out.stem + ".int8.onnx")
            quantize_int8(out, q, calib or None)
            assert_no_lora(q)
            qs = ort_session(q)
            runners["int8_onnx"] = lambda t: run_onnx(qs, t)
            sizes["int8"] = file_size(q)
            report["int8"] = {"file": str(q), "method": "static QDQ" if calib else "dynamic"}
            if data is not None:
                labels = pair.info.get("labels")
                fp32 = task.evaluate_export(out, onnx_predictor(out), data, pair.imgsz, labels)
                i8 = task.evaluate_export(q, onnx_predictor(q), data, pair.imgsz, labels)
                report["int8"]["metrics_fp32"], report["int8"]["metrics_int8"] = fp32, i8
                report["int8"]["metric_change"] = {k: round(i8[k] - fp32[k], 6) for k in fp32 if k in i8}
        lat = interleaved_ms(runners, example_input(pair.imgsz, batch=1), runs=runs)
    report["sizes_bytes"], report["latency_ms"] = sizes, {k: round(v, 3) for k, v in lat.items()}
    return report


def format_report(r: dict) -> str:
    """The printed table: parity, sizes, latency, int8 metric change."""
    lines = [f"exported {r['task']} model ({r['format']}, {r['imgsz']}px) -> {r['out']}",
             f"parity {r['format']} vs merged PyTorch ({r['parity_input']}): max |diff| "
             f"{r['parity']['max_abs_diff']:.3g} <= tolerance {r['parity']['tolerance']:.3g}  OK",
             f"merged vs unmerged LoRA in PyTorch: max |diff| {r['merge_max_abs_diff']:.3g} "
             f"(max |output| {r['parity']['max_abs_output']:.3g})"]
    if "same_ops_as_base" in r:
        lines.append(f"graph ops identical to the base model's: {'yes' if r['same_ops_as_base'] else 'no'}")
    lines.append("size:    " + "  ".join(f"{k} {v / 1e6:.2f} MB" for k, v in r["sizes_bytes"].items()))
    lines.append("latency (CPU, batch 1, median ms):")
    for k, v in r["latency_ms"].items():
        lines.append(f"  {k:<22} {v:9.2f}")
    q = r.get("int8")
    if q:
        lines.append(f"int8: {q['method']} -> {q['file']}")
        if "metric_change" in q:
            for k, d in q["metric_change"].items():
                lines.append(f"  {k}: fp32 {q['metrics_fp32'][k]:.4f} -> int8 {q['metrics_int8'][k]:.4f} ({d:+.4f})")
        else:
            lines.append("  (no --data given: metric change not measured)")
    return "\n".join(lines)
