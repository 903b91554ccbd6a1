"""A ``DetectionTrainer`` that trains LoRA adapters on a YOLO detector without Ultralytics undoing them.

The stock trainer defeats LoRA in five places; this subclass owns each of them:

1. ``model.train()`` / ``setup_model`` rebuild the model from its yaml: adapters are injected in
   :meth:`get_model`, after Ultralytics built the model and transferred the checkpoint weights.
2. ``_setup_train`` sets ``requires_grad=True`` on every frozen float parameter: the trainable set
   recorded at injection is restored before the optimizer is built (``_build_train_pipeline``) and
   checked again after setup.
3. ``_model_train`` puts BatchNorm in train mode, which would move the running statistics (buffers
   that are not part of the adapter): every BN stays in eval mode, so base checkpoint + adapter is
   exactly the trained model.
4. Checkpoints: ``last.pt`` / ``best.pt`` hold a *merged* copy of the EMA model (a plain
   ``DetectionModel`` that any Ultralytics tool can load, fuse and export); the adapter itself is
   written next to them in PEFT format (``weights/adapter_last``, ``weights/adapter_best``). The EMA
   averages the adapter weights like any other; frozen weights stay bit-identical (lerp of equal
   values), and the LoRA scale is a buffer, so the EMA copy computes what the adapter says.
5. ``final_eval`` / ``fuse`` / export: the final validation runs on the merged fp32 best model, and a
   LoRA'd model's ``fuse`` merges first (:class:`~lorafit.integrations.ultralytics.MergeBeforeFuse`).

Resume and multi-GPU DDP (which re-launches the stock trainer in a subprocess) are refused.
"""

from __future__ import annotations

import shutil
from copy import copy

import numpy as np
import torch
import torch.nn as nn

from lorafit.integrations.ultralytics import (
    configure_offline,
    detect_head,
    detector_config,
    inject_detector,
    merged_copy,
    save_detector_adapter,
)
from lorafit.train.errors import LorafitError, TrainingDiverged

configure_offline()

from ultralytics.models.yolo.detect import DetectionTrainer  # noqa: E402
from ultralytics.utils import DEFAULT_CFG  # noqa: E402
from ultralytics.utils.torch_utils import strip_optimizer, unwrap_model  # noqa: E402


class LoraDetectionTrainer(DetectionTrainer):
    """Ultralytics detection training of LoRA adapters.

    Args:
        cfg / overrides / _callbacks: as for ``DetectionTrainer`` (``overrides["model"]`` is a model
            yaml or a local ``.pt``; ``overrides["data"]`` a data.yaml).
        lora: ``rank`` (8), ``alpha`` (2 x rank), ``targets`` ("all"), ``dropout`` (0.0) and
            ``base`` (name recorded as ``base_model_name_or_path``).

    After :meth:`train`: ``lora_config`` (the LoraConfig used), ``best_model`` (merged fp32 best EMA
    model), ``adapter_best`` / ``adapter_last`` (adapter directories), ``metrics`` (final validation),
    ``new_classes`` (whether the class convs were rebuilt and saved with the adapter).
    """

    def __init__(self, cfg=DEFAULT_CFG, overrides=None, _callbacks=None, lora: dict | None = None):
        self.lora = {"rank": 8, "alpha": None, "targets": "all", "dropout": 0.0, "base": None, **(lora or {})}
        self.lora_config = None
        self.new_classes = False
        self.best_model = None
        self._trainable: set[str] = set()
        super().__init__(cfg, overrides, _callbacks)
        if self.args.resume:
            raise LorafitError("resume of a LoRA detection run is not supported: start a new run")
        if self.ddp:
            raise LorafitError("LoRA detection training runs on one device (multi-GPU DDP is not supported)")
        self.adapter_last, self.adapter_best = self.wdir / "adapter_last", self.wdir / "adapter_best"

    # ------------------------------------------------------------------ model
    def get_model(self, cfg=None, weights=None, verbose=True):
        """Build the detector as Ultralytics does (weights transferred), then inject LoRA."""
        model = super().get_model(cfg=cfg, weights=weights, verbose=verbose)
        src = weights.get("ema") or weights.get("model") if isinstance(weights, dict) else weights
        self.new_classes = src is not None and int(detect_head(src).nc) != int(self.data["nc"])
        self.lora_config = detector_config(model, rank=self.lora["rank"], alpha=self.lora["alpha"],
                                           targets=self.lora["targets"], dropout=self.lora["dropout"],
                                           new_classes=self.new_classes)
        inject_detector(model, self.lora_config)
        self._trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        return model

    def _refreeze(self) -> None:
        """Restore the trainable set recorded at injection (Ultralytics unfreezes everything)."""
        for name, p in unwrap_model(self.model).named_parameters():
            p.requires_grad_(name in self._trainable)

    def _build_train_pipeline(self):
        self._refreeze()  # before the optimizer is built from the model's parameters
        super()._build_train_pipeline()

    def _setup_train(self):
        super()._setup_train()
        self._refreeze()
        trainable = [n for n, p in unwrap_model(self.model).named_parameters() if p.requires_grad]
        if set(trainable) != self._trainable:  # pragma: no cover - a guard against Ultralytics changes
            raise RuntimeError("Ultralytics changed the trainable parameters after LoRA injection")

    def _model_train(self):
        """Train mode, but every BatchNorm in eval mode: running statistics stay the checkpoint's."""
        super()._model_train()
        for m in unwrap_model(self.model).modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    def _handle_nan_recovery(self, epoch):
        """Stop on a non-finite loss (lorafit's rule) instead of reloading a merged checkpoint."""
        loss_bad = self.loss is not None and not bool(torch.isfinite(self.loss).all())
        fit_bad = self.fitness is not None and not np.isfinite(self.fitness)
        if loss_bad or fit_bad:
            raise TrainingDiverged(f"detection training diverged at epoch {epoch + 1} (non-finite "
                                   f"{'loss' if loss_bad else 'fitness'}); lower --lr")
        return False

    # ------------------------------------------------------------------ checkpoints
    def save_model(self):
        """Write last.pt / best.pt with the merged EMA model, and the adapter beside them."""
        lora_ema = self.ema.ema
        with torch.no_grad():  # a transient NaN in the EMA: resync from the live model (as Ultralytics does)
            live = unwrap_model(self.model).state_dict()
            for k, v in lora_ema.state_dict().items():
                if v.is_floating_point() and not torch.isfinite(v).all() and torch.isfinite(live[k]).all():
                    v.copy_(live[k])
        merged = merged_copy(lora_ema)
        self.ema.ema = merged
        try:
            saved = super().save_model()
        finally:
            self.ema.ema = lora_ema
        save_detector_adapter(lora_ema, self.adapter_last, base=self.lora["base"], imgsz=int(self.args.imgsz))
        if self.best_fitness == self.fitness:
            if self.adapter_best.exists():
                shutil.rmtree(self.adapter_best)
            shutil.copytree(self.adapter_last, self.adapter_best)
            self.best_model = merged
        return saved

    def final_eval(self):
        """Validate the merged fp32 best model (exactly base + adapter) and strip the checkpoints."""
        for f in (self.last, self.best):
            if f.exists():
                strip_optimizer(f)
        if self.best_model is None:
            return
        self.validator.args.plots = self.args.plots
        self.validator.args.compile = False
        self.metrics = self.validator(model=self.best_model)
        self.metrics.pop("fitness", None)
        self.epoch += 1
        self.run_callbacks("on_fit_epoch_end")
        self.epoch -= 1


def ultralytics_overrides(model: str, data: str, out_dir, imgsz: int = 320, epochs: int = 10, batch: int = 16,
                          lr: float | None = None, seed: int = 0, device: str = "cpu", weight_decay: float = 0.0,
                          warmup_epochs: float = 0.0, verbose: bool = False, **extra) -> dict:
    """The Ultralytics argument dict for a LoRA run: offline-safe and CPU-friendly.

    ``amp=False`` (the AMP check downloads a model), ``plots=False`` (needs fonts, costs time),
    ``workers=0`` on CPU; ``lr`` given means AdamW at that rate, else Ultralytics' automatic choice.
    ``out_dir`` becomes the Ultralytics save_dir exactly (project/name, exist_ok).
    """
    from pathlib import Path

    out_dir = Path(out_dir).resolve()
    args = dict(model=str(model), data=str(data), imgsz=imgsz, epochs=epochs, batch=batch, seed=seed,
                device=device, amp=False, plots=False, workers=0 if device == "cpu" else 2, project=str(out_dir.parent),
                name=out_dir.name, exist_ok=True, verbose=verbose, deterministic=True, val=True,
                weight_decay=weight_decay, warmup_epochs=warmup_epochs, patience=max(epochs, 100))
    if lr is not None:
        args.update(optimizer="AdamW", lr0=lr)
    args.update(extra)
    return args


def train_lora_detector(overrides: dict, lora: dict | None = None, callbacks: dict | None = None):
    """Run a LoRA detection training; returns the finished :class:`LoraDetectionTrainer`."""
    trainer = LoraDetectionTrainer(overrides=copy(overrides), lora=lora, _callbacks=callbacks)
    trainer.train()
    return trainer
