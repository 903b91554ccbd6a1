"""LoRA on Ultralytics detectors, without training: targets, merge/fuse, EMA, pickling, BN freezing."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn

import lorafit
from lorafit.integrations.ultralytics import (
    class_conv_names,
    detector_config,
    inject_detector,
    load_detector,
    merged_copy,
    resolve_targets,
)
from lorafit.layers import ConvLora
from lorafit.common.errors import LorafitError


def raw(out) -> torch.Tensor:
    """Every tensor of a YOLO eval output (decoded boxes + raw head maps), flattened and concatenated.

    The raw maps matter on random-init detectors, whose decoded boxes are nearly constant.
    """
    if isinstance(out, torch.Tensor):
        return out.flatten()
    items = out.values() if isinstance(out, dict) else out
    return torch.cat([raw(o) for o in items])


def calibrate_bn(model) -> None:
    """Give a random-init detector healthy activations: BN running stats from a few random batches.

    With Ultralytics' init, eval-mode activations of a fresh model shrink to ~1e-10 by the head,
    which would make every comparison below trivially true.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(4, 3, 64, 64))
    model.eval()


def lora_model(spec="yolov8n.yaml", targets="all", nc=3, rank=4):
    """A detector with a non-zero LoRA update (random B), in eval mode."""
    torch.manual_seed(0)
    model = load_detector(spec, nc=nc)
    calibrate_bn(model)
    cfg = detector_config(model, rank=rank, targets=targets).replace(init=False)
    with torch.no_grad():  # a scaled-down update keeps activations in range; B random is the point
        inject_detector(model, cfg)
        for _, m in model.named_modules():
            if isinstance(m, ConvLora):
                m.adapters["default"].lora_B.mul_(0.05)
    return model.eval()


_CACHE: dict = {}


def cached(spec: str, lora: bool = True):
    """A fresh copy of a module-wide model (building and calibrating one costs seconds on a loaded CPU)."""
    key = (spec, lora)
    if key not in _CACHE:
        _CACHE[key] = lora_model(spec) if lora else load_detector(spec, nc=3)
    return copy.deepcopy(_CACHE[key])


@pytest.mark.parametrize("spec,dense", [("yolov8n.yaml", 63), ("yolo11n.yaml", 80)])
def test_presets_cover_dense_convs_except_dfl(spec, dense):
    model = cached(spec, lora=False)
    names = resolve_targets(model, "all")
    assert len(names) == dense
    assert not any(".dfl" in n for n in names)
    modules = dict(model.named_modules())
    assert all(modules[n].groups == 1 for n in names)  # depthwise convs are left out
    parts = [set(resolve_targets(model, p)) for p in ("backbone", "neck", "head")]
    assert set.union(*parts) == set(names) and sum(map(len, parts)) == len(names)
    last = len(model.model) - 1
    assert all(n.startswith(f"model.{last}.") for n in parts[2])
    assert resolve_targets(model, r"model\.22\.cv2\..*") == [n for n in names if n.startswith("model.22.cv2.")]
    with pytest.raises(LorafitError, match="matched no dense Conv2d"):
        resolve_targets(model, r"nothing\.here")


def test_new_classes_make_class_convs_modules_to_save():
    model = cached("yolov8n.yaml", lora=False)
    cfg = detector_config(model, rank=4, new_classes=True)
    assert list(cfg.modules_to_save) == class_conv_names(model) == [f"model.22.cv3.{i}.2" for i in range(3)]
    assert not set(cfg.target_modules) & set(cfg.modules_to_save)


@pytest.mark.parametrize("spec", ["yolov8n.yaml", "yolo11n.yaml"])
def test_fuse_merges_first_and_matches(spec):
    model = cached(spec)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = raw(model(x))
        with lorafit.disabled(model):
            base = raw(model(x))
    assert (ref - base).abs().max() > 1e-2  # the adapter does change the output
    fused = copy.deepcopy(model).fuse(verbose=False)  # Ultralytics' own fuse, on a copy
    assert not any(isinstance(m, ConvLora) for m in fused.modules())
    assert fused.is_fused()
    with torch.no_grad():
        out = raw(fused(x))
    assert (out - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    assert any(isinstance(m, ConvLora) for m in model.modules())  # the original keeps its adapters


def test_ema_keeps_frozen_weights_bit_identical_and_tracks_adapter():
    from ultralytics.utils.torch_utils import ModelEMA

    model = cached("yolov8n.yaml")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ema = ModelEMA(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    for _ in range(5):
        ema.update(model)
    ema_params = dict(ema.ema.named_parameters())
    for n, v in frozen.items():
        assert torch.equal(ema_params[n], v), n  # lerp of equal values is exact
    assert all(not torch.equal(ema_params[n], v) for n, v in start.items())  # the adapter is averaged
    scalings = {n: m.adapters["default"].scaling for n, m in ema.ema.named_modules() if isinstance(m, ConvLora)}
    assert scalings and set(scalings.values()) == {2.0}  # the EMA copy carries the scale (alpha / r = 8 / 4)


def test_lora_model_pickles_and_survives_torch_save():
    model = cached("yolov8n.yaml")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = raw(model(x))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False).eval()
    with torch.no_grad():
        assert torch.equal(raw(loaded(x)), ref)
    fused = loaded.fuse(verbose=False)  # the guard survived pickling
    with torch.no_grad():
        assert (raw(fused(x)) - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_merged_copy_is_plain_and_computes_the_adapter():
    base = cached("yolov8n.yaml", lora=False)
    model = cached("yolov8n.yaml")
    merged = merged_copy(model)
    assert set(merged.state_dict()) == set(base.state_dict())
    assert "fuse" not in merged.__dict__
    assert any(isinstance(m, ConvLora) for m in model.modules())  # a copy: the original keeps its adapters
    # the merged copy computes what base + adapter computes (keys alone would pass a copy with the adapters
    # dropped); bound as in test_fuse_merges_first_and_matches, meaningful since the adapter moves > 1e-2
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref, got = raw(model(x)), raw(merged.eval()(x))
        with lorafit.disabled(model):
            plain = raw(model(x))
    assert (ref - plain).abs().max() > 1e-2
    assert (got - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_trainer_keeps_batchnorm_in_eval_and_refreezes(shapes, tmp_path):
    """The trainer hooks, driven directly: refreeze after Ultralytics unfreezes, BN eval in train mode."""
    from lorafit.integrations.yolo_trainer import LoraDetectionTrainer, ultralytics_overrides

    args = ultralytics_overrides("yolov8n.yaml", shapes["B"], tmp_path / "t", imgsz=64, epochs=1, batch=8)
    trainer = LoraDetectionTrainer(overrides=args, lora={"rank": 4})
    trainer._setup_train()
    model = trainer.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == trainer._trainable
    assert all(".lora_" in n for n in trainable)
    trainer._model_train()
    assert model.training
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns)
    before = {n: b.clone() for n, b in model.named_buffers() if "running_" in n}
    batch = trainer.preprocess_batch(next(iter(trainer.train_loader)))
    loss, _ = model(batch)
    loss.sum().backward()
    after = dict(model.named_buffers())
    assert all(torch.equal(before[n], after[n]) for n in before)  # BN statistics did not move
    grads = [n for n, p in model.named_parameters() if p.grad is not None]
    assert grads and set(grads) <= trainable
