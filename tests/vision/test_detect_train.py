"""End to end: a tiny base pretrained on domain A, adapted with LoRA r=4 to domain B (session fixtures)."""

from __future__ import annotations

import json

import torch

import lorafit
from lorafit.integrations.ultralytics import configure_offline, load_detector, load_detector_adapter
from lorafit.layers import ConvLora

from tests.vision.vision_helpers import IMGSZ, detect_opts


def test_adaptation_raises_map_on_new_domain(adapted):
    m = adapted["metrics"]
    before, after = m["before_eval_mAP50"], m["eval_mAP50"]
    assert after > before + 0.1 and after > 3 * before, (before, after)
    assert m["eval_mAP50-95"] > m["before_eval_mAP50-95"]


def test_adapter_is_small(adapted, base_pt):
    m = adapted["metrics"]
    base_params = sum(p.numel() for p in load_detector(base_pt).parameters())
    assert m["trainable_params"] <= 0.10 * base_params
    assert m["adapter_bytes"] <= 0.15 * base_pt.stat().st_size  # fp32 adapter vs the fp16 .pt
    assert m["adapter_bytes"] <= 0.06 * 4 * base_params  # vs fp32 weights


def test_run_directory_layout(adapted):
    run = adapted["run"]
    for name in ("config.yaml", "data.yaml", "metrics.json", "metrics.jsonl", "loss.png",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/lorafit_detect.json",
                 "adapter/lorafit_job.json", "ultralytics/weights/best.pt"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"eval_mAP50", "eval_mAP50-95", "trainable_params", "adapter_bytes"} <= set(metrics)
    cfg = json.loads((run / "adapter/adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    assert not any(".dfl" in t for t in cfg["target_modules"])
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 8  # one train + one eval record per epoch


def test_base_plus_adapter_reproduces_the_trained_model(adapted, base_pt):
    """load_adapter(YOLO(path).model, adapter) + merge_and_unload == the model the trainer validated."""
    configure_offline()
    from ultralytics import YOLO

    trained = adapted["task"].trainer.best_model.eval()  # merged fp32 best EMA model
    model = YOLO(str(base_pt)).model.float()
    load_detector_adapter(model, adapted["run"] / "adapter")
    assert any(isinstance(m, ConvLora) for m in model.modules())
    x = torch.rand(2, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        unmerged = model.eval()(x)[0]
        merged = lorafit.merge_and_unload(model).eval()(x)[0]
        ref = trained(x)[0]
    tol = 1e-4 * max(1.0, ref.abs().max().item())
    assert (merged - ref).abs().max() <= tol
    assert (unmerged - ref).abs().max() <= tol
    # the literal form: plain lorafit.load_adapter (same classes: nothing to rebuild)
    plain = lorafit.load_adapter(YOLO(str(base_pt)).model.float(), adapted["run"] / "adapter")
    with torch.no_grad():
        out = lorafit.merge_and_unload(plain).eval()(x)[0]
    assert (out - ref).abs().max() <= tol


def test_frozen_weights_and_bn_stats_equal_the_checkpoint(adapted, base_pt):
    """Base weights and BN running statistics in the trained EMA are bit-identical to the checkpoint's."""
    trainer = adapted["task"].trainer
    base = load_detector(base_pt).state_dict()
    ema = trainer.ema.ema.state_dict()
    checked = 0
    for key, value in ema.items():
        plain = key.replace(".base_layer.", ".")
        if ".lora_" in key or ".adapters." in key or plain not in base or not value.is_floating_point():
            continue
        assert torch.equal(value, base[plain].to(value.dtype)), key
        checked += 1
    assert checked > 200


def test_checkpoints_are_plain_yolo_files_that_validate_and_fuse(adapted, shapes):
    """best.pt holds the merged model: stock YOLO loads it, fuses it and validates it."""
    configure_offline()
    from ultralytics import YOLO

    best = adapted["run"] / "ultralytics" / "weights" / "best.pt"
    yolo = YOLO(str(best))
    assert not any(isinstance(m, ConvLora) for m in yolo.model.modules())
    res = yolo.val(data=str(shapes["B"]), imgsz=IMGSZ, batch=16, device="cpu", plots=False, verbose=False)
    assert abs(res.box.map50 - adapted["metrics"]["eval_mAP50"]) < 0.05  # fp16 checkpoint vs fp32 model


def test_new_classes_rebuilt_and_saved_with_adapter(shapes, base_pt, tmp_path):
    """A 4-class dataset on a 3-class base: class convs become modules_to_save and reload exactly."""
    from ultralytics import YOLO

    from lorafit.tasks.detect import Task

    opts = detect_opts(model=base_pt, data=shapes["B4"], imgsz=IMGSZ, rank=4, epochs=1, out=tmp_path / "r",
                       eval_before="false")
    task = Task(opts)
    metrics = task.run(say=lambda *_: None)
    assert metrics["new_classes"] is True
    cfg = json.loads((tmp_path / "r/adapter/adapter_config.json").read_text())
    assert cfg["modules_to_save"] == [f"model.22.cv3.{i}.2" for i in range(3)]
    model = YOLO(str(base_pt)).model.float()
    assert model.nc == 3
    load_detector_adapter(model, tmp_path / "r" / "adapter")
    merged = lorafit.merge_and_unload(model).eval()
    assert merged.nc == 4 and merged.names[3] == "cross"
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        out, ref = merged(x)[0], task.trainer.best_model.eval()(x)[0]
    assert out.shape == ref.shape == (1, 4 + 4, out.shape[-1])  # 4 box values + 4 classes
    assert (out - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_full_finetune_baseline_writes_a_plain_model(shapes, tmp_path):
    """--full-finetune: the stock trainer, same run layout, model/model.pt instead of adapter/."""
    from lorafit.tasks.detect import Task

    opts = detect_opts(model="yolov8n.yaml", data=shapes["B4"], imgsz=64, epochs=1, out=tmp_path / "f",
                       full_finetune="true")
    metrics = Task(opts).run(say=lambda *_: None)
    assert metrics["full_finetune"] is True and metrics["trainable_params"] == metrics["total_params"]
    assert (tmp_path / "f" / "model" / "model.pt").is_file() and not (tmp_path / "f" / "adapter").exists()


def test_overwrite_takes_every_entry_of_a_real_detect_run(adapted, tmp_path):
    """``--out OLD --overwrite`` on a detect run: refused without the flag, cleared whole with it.

    The run directory's entries come from the real detect run (not a list written here), so a new
    file the detect task starts writing must be known to ``rundir.RUN_ENTRIES`` or this fails.
    """
    import shutil

    import pytest

    from lorafit.jobs import rundir
    from lorafit.common.errors import LorafitError

    old = tmp_path / "old"
    shutil.copytree(adapted["run"], old)
    with pytest.raises(LorafitError, match="holds a run .*add --overwrite"):
        rundir.check_new_run(old, overwrite=False)
    rundir.check_new_run(old, overwrite=True)  # nothing in it is foreign to a lorafit run
    rundir.clear_old_run(old)
    assert sorted(p.name for p in old.iterdir()) == []
