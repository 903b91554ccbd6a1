"""Image classification: timm ViT (fused qkv), torchvision ViT (nn.MultiheadAttention), a CNN; job runs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

import lorafit
from lorafit.layers import ConvLora, MhaLora
from lorafit.tasks.image_classification import classifier_name, create_model, preset_targets, scan_image_folder
from lorafit.common.errors import LorafitError
from tests.vision.vision_helpers import eval_logits, record_eval_logits


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from lorafit.datasets.shapes import make_shapes_classification

    return make_shapes_classification(tmp_path_factory.mktemp("cls"), n_per_class=6, imgsz=32)


def inject_random(model, targets, head):
    cfg = lorafit.LoraConfig(r=4, alpha=8, target_modules=targets, init=False, modules_to_save=[head],
                             exclude_modules=[head])
    return lorafit.inject(model, cfg)


def test_timm_vit_preset_targets_fused_qkv_not_patch_embed():
    model = create_model("timm:vit_tiny_patch16_224", 3, 32)
    head = classifier_name(model, 3)
    targets = preset_targets(model, "auto", head)
    inject_random(model, targets, head)
    wrapped = {n for n, m in model.named_modules() if isinstance(m, lorafit.layers.LoraLayer)}
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == {"qkv", "proj", "fc1", "fc2"}
    assert "patch_embed.proj" not in wrapped and head == "head"
    trainable, total = lorafit.trainable_parameters(model)
    assert trainable < 0.2 * total


def test_torchvision_vit_multihead_attention_is_adapted_not_bypassed():
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=3).eval()
    head = classifier_name(model, 3)
    nn.init.normal_(model.get_submodule(head).weight, std=0.5)  # torchvision zero-inits the head
    targets = preset_targets(model, "qkv,proj", head)
    inject_random(model, targets, head)
    mha = [m for m in model.modules() if isinstance(m, MhaLora)]
    assert len(mha) == 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        on = model(x)
        with lorafit.disabled(model):
            off = model(x)
    assert (on - off).abs().max() > 1e-4
    with torch.no_grad():  # the adapter's effect is in the attention, not only in the saved head
        for m in model.modules():
            if isinstance(m, lorafit.layers.ModulesToSave):
                m.modules_to_save["default"].load_state_dict(m.original_module.state_dict())
        only_attn = model(x)
    assert (only_attn - off).abs().max() > 1e-4
    merged = lorafit.merge_and_unload(copy.deepcopy(model)).eval()
    assert not any(isinstance(m, MhaLora) for m in merged.modules())
    with torch.no_grad():
        assert torch.allclose(merged(x), only_attn, atol=1e-5)


def test_cnn_preset_targets_dense_convs():
    model = create_model("timm:resnet18", 3, 32)
    head = classifier_name(model, 3)
    inject_random(model, preset_targets(model, "auto", head), head)
    convs = [m for m in model.modules() if isinstance(m, ConvLora)]
    assert len(convs) == sum(1 for m in create_model("timm:resnet18", 3, 32).modules() if isinstance(m, nn.Conv2d))


def test_vision_tasks_are_registered():
    """``--task image-classification`` / ``detect`` route through the real registry (nothing patched in)."""
    from lorafit.tasks import TASKS, task_class

    assert TASKS["image-classification"] == "lorafit.tasks.image_classification"
    assert TASKS["detect"] == "lorafit.tasks.detect"
    assert task_class("image-classification") and task_class("detect")


def run_job(tmp_path, folder, model, **extra):
    from lorafit.jobs.train import run_train

    flags = {"task": "image-classification", "model": model, "train": str(folder / "train"),
             "eval": str(folder / "val"), "imgsz": "32", "epochs": "1", "batch_size": "6", "out": str(tmp_path / "run"),
             "device": "cpu", "eval_before": False, **extra}
    return run_train(flags, say=lambda *_: None)


@pytest.mark.parametrize("model", ["timm:vit_tiny_patch16_224", "torchvision:vit_b_32", "timm:resnet18"])
def test_train_job_then_reload_reproduces(monkeypatch, tmp_path, folder, model):
    evals = record_eval_logits(monkeypatch)
    metrics = run_job(tmp_path, folder, model)
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    adapter = tmp_path / "run" / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] and json.loads((adapter / "labels.json").read_text()) == ["circle", "square",
                                                                                             "triangle"]
    # rebuild the random-weight base with the run's seed and load the adapter: the trained model comes back
    from lorafit.tasks.image_classification import Task

    task = Task({"model": model, "imgsz": 32, "targets": "auto", "train": None, "seed": 0})
    task.restore(adapter)
    torch.manual_seed(0)
    base = task.build_model()
    lorafit.load_adapter(base, adapter).eval()
    trained = evals[-1]  # the final evaluation, on the model in memory at the end of training
    _, rows = scan_image_folder(folder / "val", task.labels)
    assert trained["rows"] == rows and len(rows) == 18
    got = eval_logits(task, base, rows, trained["batch_size"])
    # Same base weights (seeded), the adapter's fp32 tensors stored exactly, the same unmerged modules,
    # the same batches and threads: the same float operations, so the logits are equal bit for bit. No
    # tolerance to tune; a wrong key, scaling, head or base seed changes them by far more than rounding.
    assert torch.equal(got, trained["logits"]), (got - trained["logits"]).abs().max().item()
    assert trained["logits"].std() > 1e-3  # not a constant output
    acc = task.evaluate(base, rows, 32, torch.device("cpu"))["eval_accuracy"]
    assert acc == metrics["eval_accuracy"]


def test_bad_image_folder(tmp_path):
    with pytest.raises(LorafitError, match="not a directory"):
        scan_image_folder(tmp_path / "missing")
    (tmp_path / "a").mkdir()
    with pytest.raises(LorafitError, match="holds no images"):
        scan_image_folder(tmp_path)
    with pytest.raises(LorafitError, match="expected timm"):
        create_model("resnet18", 3, 32)
