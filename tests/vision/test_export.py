"""Export: merged ONNX / TorchScript with parity checks, int8 with the metric change, and failures."""

from __future__ import annotations

import onnx
import pytest
import torch

from lorafit.export.api import export_model
from lorafit.export.formats import ExportParityError, check_parity, op_histogram
from lorafit.common.errors import LorafitError


def test_detect_onnx_parity_int8_and_sizes(adapted, base_pt, shapes, tmp_path):
    adapter = adapted["run"] / "adapter"
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    out = tmp_path / "det.onnx"
    rep = export_model(str(base_pt), adapter, out, int8=True, data=shapes["B"], runs=3)
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before  # the adapter is never touched
    assert rep["parity"]["max_abs_diff"] <= rep["parity"]["tolerance"]
    assert rep["same_ops_as_base"] is True  # merged graph = base graph, no LoRA ops
    graph = onnx.load(str(out)).graph
    assert not any("lora" in n.name.lower() for n in list(graph.node) + list(graph.initializer))
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["task"] == "detect" and "names" in meta
    q = rep["int8"]
    assert q["method"] == "static QDQ" and (tmp_path / "det.int8.onnx").is_file()
    assert rep["sizes_bytes"]["int8"] < 0.5 * rep["sizes_bytes"]["merged"]
    assert set(q["metric_change"]) >= {"eval_mAP50", "eval_mAP50-95"}
    # the ONNX file, validated by Ultralytics (square letterbox), vs the training-time validation (rect batches)
    assert q["metrics_fp32"]["eval_mAP50"] == pytest.approx(adapted["metrics"]["eval_mAP50"], abs=0.05)
    assert q["metrics_int8"]["eval_mAP50"] > 0.5 * q["metrics_fp32"]["eval_mAP50"]  # int8 stays usable
    assert set(rep["latency_ms"]) == {"base_torch", "lora_unmerged_torch", "base_onnx", "merged_onnx", "int8_onnx"}


def test_detect_torchscript(adapted, base_pt, tmp_path):
    rep = export_model(str(base_pt), adapted["run"] / "adapter", tmp_path / "det.pt", fmt="torchscript", runs=2)
    assert rep["parity"]["max_abs_diff"] <= rep["parity"]["tolerance"]
    module = torch.jit.load(str(tmp_path / "det.pt"))
    assert not any("lora" in n for n, _ in module.named_parameters())


def test_parity_failure_is_loud(adapted, base_pt, tmp_path):
    from lorafit.export.loaders import load_pair

    pair = load_pair(str(base_pt), adapted["run"] / "adapter")
    with pytest.raises(ExportParityError, match="PARITY FAILED") as err:
        check_parity(pair.merged, lambda x: pair.merged(x).detach().numpy() + 1.0, pair.imgsz, tmp_path / "x.onnx")
    assert err.value.exit_code == 1


def test_classifier_export_onnx_int8(tmp_path):
    """A timm ViT adapter from `lorafit train`, exported: parity, same ops as the base, dynamic int8."""
    from lorafit.datasets.shapes import make_shapes_classification
    from tests.vision.test_image_classification import run_job

    folder = make_shapes_classification(tmp_path / "cls", n_per_class=4, imgsz=32)
    run_job(tmp_path, folder, "timm:vit_tiny_patch16_224")
    out = tmp_path / "vit.onnx"
    rep = export_model("timm:vit_tiny_patch16_224", tmp_path / "run" / "adapter", out, int8=True,
                       data=folder / "val", runs=2)
    assert rep["parity"]["max_abs_diff"] <= rep["parity"]["tolerance"]
    assert rep["same_ops_as_base"] is True
    assert rep["merge_max_abs_diff"] < 1e-3
    assert "eval_accuracy" in rep["int8"]["metric_change"]
    assert op_histogram(out)["MatMul"] > 0


def test_adapter_for_another_architecture(adapted, tmp_path):
    """A yolov8n adapter on yolo11n: one line naming the adapter file, the model untouched."""
    with pytest.raises(LorafitError) as err:
        export_model("yolo11n.yaml", adapted["run"] / "adapter", tmp_path / "x.onnx")
    msg = str(err.value)
    assert "\n" not in msg and "adapter_model.safetensors" in msg
    assert not (tmp_path / "x.onnx").exists()


def test_export_cli_exit_codes(adapted, base_pt, tmp_path, capsys):
    from lorafit.export.cli import EXPORT
    from lorafit.common.errors import LorafitError as LE

    import argparse

    p = argparse.ArgumentParser()
    EXPORT.add_arguments(p)
    args = p.parse_args(["--model", str(base_pt), "--adapter", str(adapted["run"] / "adapter"), "--out",
                         str(tmp_path / "m.onnx"), "--runs", "2"])
    assert EXPORT.run(args) == 0
    assert "parity onnx vs merged PyTorch" in capsys.readouterr().out
    bad = p.parse_args(["--model", str(base_pt), "--adapter", str(tmp_path), "--out", str(tmp_path / "n.onnx")])
    with pytest.raises(LE) as err:
        EXPORT.run(bad)
    assert err.value.exit_code == 2 and "adapter_config.json" in str(err.value)
