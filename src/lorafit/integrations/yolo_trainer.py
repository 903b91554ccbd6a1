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

``lorafit train`` flags (:class:`~lorafit.integrations.yolo_state.JobControls`) go where
Ultralytics has no argument for them: LoRA+ groups in :meth:`build_optimizer`, our accumulation and
``--max-grad-norm`` in :meth:`optimizer_step`, lorafit's warmup form, validation every N epochs,
the eval batch size, resume from ``RUN/checkpoint.pt`` (:mod:`~lorafit.integrations.yolo_state`).
``full_finetune`` runs the same hooks without an adapter, so every flag works there too.

Several processes (torchrun) follow :mod:`lorafit.train.distributed`, not Ultralytics' DDP: torchrun's
``RANK`` makes Ultralytics shard the data (``DistributedSampler``), validate shards and gather the
stats on rank 0, and write files on rank 0 only; ``world_size`` stays 1, so it neither wraps the
model in DDP nor relaunches itself. Rank 0's initial adapter is broadcast (Ultralytics seeds each rank
differently), and :meth:`optimizer_step` all-reduces (SUM) the trainable gradients once per step:
each rank's loss is its micro-batch *sum* (Ultralytics' loss is mean x batch), so the sum over ranks
is the gradient one process would get on the global batch. Ultralytics' own DDP relaunch
(``device=0,1``) is refused.
"""

from __future__ import annotations

import inspect
import shutil
from copy import copy, deepcopy
from pathlib import Path

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
from lorafit.common.errors import LorafitError, TrainingDiverged
from lorafit.integrations.yolo_state import EpochControl, JobControls, load_into, restore
from lorafit.optim import is_lora_b
from lorafit.train.distributed import Dist

configure_offline()

from ultralytics.models.yolo.detect import DetectionTrainer  # noqa: E402
from ultralytics.utils import DEFAULT_CFG, RANK  # noqa: E402
from ultralytics.utils.torch_utils import strip_optimizer, unwrap_model  # noqa: E402


class LoraDetectionTrainer(EpochControl, DetectionTrainer):
    """Ultralytics detection training of LoRA adapters (or of every weight with ``full_finetune``).

    Args:
        cfg / overrides / _callbacks: as for ``DetectionTrainer`` (``overrides["model"]`` is a model
            yaml or a local ``.pt``; ``overrides["data"]`` a data.yaml).
        lora: ``rank`` (8), ``alpha`` (2 x rank), ``targets`` ("all"), ``dropout`` (0.0) and
            ``base`` (name recorded as ``base_model_name_or_path``).
        controls: lorafit's flags (:class:`~lorafit.integrations.yolo_state.JobControls`).

    After :meth:`train`: ``lora_config`` (the LoraConfig used, None with ``full_finetune``),
    ``best_model`` (merged fp32 best EMA model), ``adapter_best`` / ``adapter_last`` (adapter
    directories), ``metrics`` (final validation, rank 0), ``before_metrics`` (rank 0),
    ``new_classes`` (whether the class convs were rebuilt and saved with the adapter).
    """

    def __init__(self, cfg=DEFAULT_CFG, overrides=None, _callbacks=None, lora: dict | None = None,
                 controls: JobControls | None = None):
        self.lora = {"rank": 8, "alpha": None, "targets": "all", "dropout": 0.0, "base": None, **(lora or {})}
        self.controls = controls or JobControls()
        self.dist = self.controls.dist or Dist()
        self.full = self.controls.full_finetune
        self.lora_config = None
        self.new_classes = False
        self.best_model = None
        self.before_metrics: dict = {}
        self.best_state: dict | None = None  # the best epoch's EMA tensors (state_keys), on every rank
        self.best_epoch = 0
        self.micro = 0  # micro-batches accumulated towards the next optimizer step
        self.checkpoint_epoch = None if self.controls.resume is None else self.controls.resume["epoch"] + 1
        self.restore_close_mosaic = None
        self._trainable: set[str] = set()
        self._pretrained = False
        self.validated = False
        self._signal: int | None = None
        if (RANK != -1) != self.dist.enabled:
            raise LorafitError("several processes (torchrun) need controls.dist = lorafit.train.distributed.setup() "
                               "in every process, and one process must not carry a process group")
        super().__init__(cfg, overrides, _callbacks)
        if self.args.resume:
            raise LorafitError("Ultralytics' resume cannot continue a LoRA run (last.pt is merged): use lorafit "
                               "train --resume RUN")
        if self.ddp:
            raise LorafitError(f"device={self.args.device}: Ultralytics' DDP relaunch is not used; run one process "
                               "per device with torchrun --nproc_per_node=N -m lorafit train --task detect ...")
        if self.dist.enabled:
            self.world_size = 1  # no DDP wrapper, no loss x world_size, no DDP-only reductions (see module doc)
        self.adapter_last, self.adapter_best = self.wdir / "adapter_last", self.wdir / "adapter_best"

    # ------------------------------------------------------------------ model
    def get_model(self, cfg=None, weights=None, verbose=True):
        """Build the detector as Ultralytics does (weights transferred), then inject LoRA."""
        model = super().get_model(cfg=cfg, weights=weights, verbose=verbose)
        src = weights.get("ema") or weights.get("model") if isinstance(weights, dict) else weights
        self._pretrained = src is not None
        self.new_classes = src is not None and int(detect_head(src).nc) != int(self.data["nc"])
        if self.full:  # Ultralytics trains every float weight but the fixed DFL conv
            self._trainable = {n for n, p in model.named_parameters() if p.is_floating_point() and ".dfl" not in n}
        else:
            self.lora_config = detector_config(model, rank=self.lora["rank"], alpha=self.lora["alpha"],
                                               targets=self.lora["targets"], dropout=self.lora["dropout"],
                                               new_classes=self.new_classes)
            inject_detector(model, self.lora_config)
            self._trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        # Ultralytics seeds rank r with seed + 1 + r, so each rank drew its own init: start from rank 0's.
        self.dist.broadcast_params([p for n, p in model.named_parameters() if n in self._trainable])
        return model

    def unwrapped(self) -> nn.Module:
        return unwrap_model(self.model)

    def state_keys(self) -> list[str]:
        """The state_dict entries a checkpoint holds: the trainable tensors, plus buffers (BN statistics) when
        every weight trains."""
        model = self.unwrapped()
        params = {n for n, _ in model.named_parameters()}
        return [k for k in model.state_dict() if k in self._trainable or (self.full and k not in params)]

    def _refreeze(self) -> None:
        """Restore the trainable set recorded at injection (Ultralytics unfreezes everything)."""
        if self.full:
            return
        for name, p in unwrap_model(self.model).named_parameters():
            p.requires_grad_(name in self._trainable)

    def _build_train_pipeline(self):
        self._refreeze()  # before the optimizer is built from the model's parameters
        super()._build_train_pipeline()
        # Accumulation is counted in optimizer_step: Ultralytics keeps its cadence in a local variable of
        # its loop (last_opt_step) that a resumed run cannot restore. Its weight-decay scaling above
        # (weight_decay x batch x accumulate / nbs) already used the nominal value.
        k = self.controls.grad_accum or self.accumulate
        self.accum = max(1, min(k, len(self.train_loader) * self.epochs))
        self.accumulate = 1

    def get_dataloader(self, dataset_path, batch_size=16, rank=0, mode="train"):
        """``--eval-batch-size`` for validation; a training order that is a function of (seed, epoch).

        Ultralytics' single-process loader shuffles with a ``RandomSampler`` on a generator it keeps
        drawing from, and how many draws fall before an epoch's permutation depends on the sampler's
        internals (whether the data size divides into batches), so no saved generator state can put a
        resumed run back on the same order. A one-replica ``DistributedSampler`` (seeded by ``seed``,
        ``set_epoch`` at each epoch start) gives that order directly, as it already does for torchrun.
        """
        if mode == "val" and self.controls.eval_batch_size:
            batch_size = self.controls.eval_batch_size
        loader = super().get_dataloader(dataset_path, batch_size=batch_size, rank=rank, mode=mode)
        if mode != "train" or not isinstance(loader.sampler, torch.utils.data.RandomSampler):
            return loader
        sampler = torch.utils.data.DistributedSampler(loader.dataset, num_replicas=1, rank=0, shuffle=True,
                                                      seed=int(self.args.seed))
        kwargs = {"prefetch_factor": loader.prefetch_factor} if loader.num_workers > 0 else {}
        return type(loader)(dataset=loader.dataset, batch_size=loader.batch_size, shuffle=False, sampler=sampler,
                            num_workers=loader.num_workers, pin_memory=loader.pin_memory, collate_fn=loader.collate_fn,
                            worker_init_fn=loader.worker_init_fn, generator=loader.generator,
                            drop_last=loader.drop_last, **kwargs)

    def _get_warmup_iterations(self, num_batches):
        """lorafit's ``--warmup``: < 1 a fraction of all batches, >= 1 optimizer steps (x accumulation)."""
        w = self.controls.warmup
        if w is None:
            return super()._get_warmup_iterations(num_batches)
        total = num_batches * self.epochs
        return min(round(w * total) if w < 1 else round(w) * self.accum, total)

    def build_optimizer(self, model, name="auto", lr=0.001, momentum=0.9, decay=1e-5, iterations=1e5):
        """Ultralytics' groups (decay / no-decay / bias); with LoRA+ each is split, B matrices at lr x ratio.

        The scheduler and the warmup set ``lr`` from each group's ``initial_lr``, so the ratio holds
        throughout."""
        opt = super().build_optimizer(model, name=name, lr=lr, momentum=momentum, decay=decay, iterations=iterations)
        ratio = self.controls.lr_b_ratio
        if ratio == 1.0:
            return opt
        names = {id(p): n for n, p in unwrap_model(model).named_parameters()}
        groups = []
        for g in opt.param_groups:
            extra = {k: v for k, v in g.items() if k != "params"}
            b = [p for p in g["params"] if is_lora_b(names.get(id(p), ""))]
            groups.append({**extra, "params": [p for p in g["params"] if not is_lora_b(names.get(id(p), ""))]})
            if b:
                groups.append({**extra, "params": b, "lr": g["lr"] * ratio, "lora_b": True})
        accepted = inspect.signature(type(opt).__init__).parameters
        return type(opt)(groups, **{k: v for k, v in opt.defaults.items() if k in accepted})

    def _setup_train(self):
        super()._setup_train()
        self._refreeze()
        trainable = {n for n, p in unwrap_model(self.model).named_parameters() if p.requires_grad}
        if trainable != self._trainable:  # pragma: no cover - a guard against Ultralytics changes
            raise RuntimeError("Ultralytics changed the trainable parameters after LoRA injection")
        self.epoch = self.start_epoch
        if self.controls.before and self.controls.resume is None and self._pretrained and not self.new_classes:
            self.before_metrics = self._validate_before()

    def resume_training(self, ckpt):
        """Precision, then our checkpoint (never Ultralytics' ``ckpt``, the base .pt's or a merged last.pt)."""
        if self.controls.precision == "fp16" and self.device.type != "cpu":
            # AMP on without check_amp(), which downloads yolo26n.pt; the args said amp=False to skip it.
            self.amp = True
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=True)
        if self.controls.resume is not None:
            restore(self, self.controls.resume)

    def train(self):
        self.add_callback("on_train_epoch_start", self._epoch_start)
        self.add_callback("on_train_batch_end", self._batch_end)
        self.add_callback("on_fit_epoch_end", self._epoch_end)  # after the caller's callbacks (its log first)
        return super().train()

    def _model_train(self):
        """Train mode, but every BatchNorm in eval mode: running statistics stay the checkpoint's."""
        super()._model_train()
        if self.full:
            return
        for m in unwrap_model(self.model).modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    # ------------------------------------------------------------------ step, validation
    def optimizer_step(self):
        """Every ``accum`` micro-batches: all-reduce, unscale, clip at ``max_grad_norm``, step, EMA."""
        self.micro += 1
        if self.micro < self.accum:
            return
        self.micro = 0
        params = [p for p in self.unwrapped().parameters() if p.requires_grad]
        self.dist.reduce_grads(params)  # before unscale_, so every rank sees the same inf check
        self.scaler.unscale_(self.optimizer)
        if self.controls.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_norm=self.controls.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        if self.ema:
            self.ema.update(self.model)

    def validate(self):
        """Ultralytics' validation every ``eval_every`` epochs (and the last); fitness None in between."""
        every = max(1, self.controls.eval_every)
        if self.epoch + 1 < self.epochs and (self.epoch + 1) % every:
            self.validated = False
            return ({k: float("nan") for k in self.metrics} if self.metrics is not None else None), None
        self.validated = True
        metrics = self._run_validator()
        if metrics is None:
            return None, None
        fitness = float(metrics.pop("fitness", -float(self.loss.detach().cpu())))
        if self.best_fitness is None or self.best_fitness < fitness:
            self.best_fitness = fitness
        return metrics, fitness

    def _run_validator(self) -> dict | None:
        """The training-mode validator on ``ema.ema`` (every rank validates its shard; rank 0 gets the dict)."""
        if self.dist.enabled:
            for buffer in self.ema.ema.buffers():  # BN statistics of a full fine-tune differ per rank
                torch.distributed.broadcast(buffer, src=0)
        metrics = self.validator(self)
        if self.dist.enabled:  # Ultralytics averages the val loss only under its own DDP (world_size > 1)
            v = self.validator
            sums = [x.detach().double().cpu().reshape(()) for x in v.loss.values()]
            total = self.dist.all_reduce_sum(torch.stack([*sums, torch.tensor(float(len(v.dataloader)))]))
            if metrics is not None:
                for k, s in zip(v.loss, total[:-1]):
                    metrics[f"val/{k}"] = round(float(s / total[-1]), 5)
        return metrics

    def _validate_before(self) -> dict:
        """The starting model (= the base: LoRA B starts at 0) through the same validator."""
        model = self.unwrapped()
        crit = getattr(model, "criterion", None) or model.init_criterion()
        names = getattr(crit, "loss_names", None) or crit.one2one.loss_names
        self.loss_items = {n: torch.zeros((), device=self.device) for n in names}
        try:
            metrics = self._run_validator()
        finally:
            self.loss_items = None
        return {k: v for k, v in (metrics or {}).items() if k != "fitness"}

    def _handle_nan_recovery(self, epoch):
        """Stop on a non-finite loss (lorafit's rule) instead of reloading a merged checkpoint."""
        loss_bad = self.loss is not None and not bool(torch.isfinite(self.loss).all())
        fit_bad = self.fitness is not None and not np.isfinite(self.fitness)
        if self.dist.enabled:  # every rank must take the same branch
            flags = self.dist.all_reduce_sum(torch.tensor([float(loss_bad), float(fit_bad)], dtype=torch.float64))
            loss_bad, fit_bad = bool(flags[0] > 0), bool(flags[1] > 0)
        if loss_bad or fit_bad:
            raise TrainingDiverged(f"detection training diverged at epoch {epoch + 1} (non-finite "
                                   f"{'loss' if loss_bad else 'fitness'}); lower --lr")
        return False

    def save_model(self):
        """Write last.pt / best.pt with the merged EMA model, and the adapter beside them (rank 0)."""
        if self.full:
            return super().save_model()
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
        if self.validated and self.best_fitness == self.fitness:
            if self.adapter_best.exists():
                shutil.rmtree(self.adapter_best)
            shutil.copytree(self.adapter_last, self.adapter_best)
        return saved

    def build_best_model(self) -> nn.Module | None:
        """The best epoch's EMA model, merged (a plain fp32 DetectionModel)."""
        if self.best_state is None:
            return None
        model = deepcopy(self.ema.ema)
        load_into(model, self.best_state)
        return model if self.full else merged_copy(model)

    def final_eval(self):
        """Validate the merged fp32 best model (exactly base + adapter) on every rank; strip the checkpoints."""
        if self.dist.is_main:
            for f in (self.last, self.best):
                if f.exists():
                    strip_optimizer(f)
        self.best_model = self.build_best_model()
        if self.best_model is None:
            return
        self.validator.args.plots = self.args.plots
        self.validator.args.compile = False
        live_ema = self.ema.ema
        self.ema.ema = self.best_model
        try:
            metrics = self._run_validator()
        finally:
            self.ema.ema = live_ema
        if metrics is not None:
            metrics.pop("fitness", None)
        self.metrics = metrics
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
