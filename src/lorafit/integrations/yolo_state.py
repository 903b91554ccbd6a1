"""What :class:`~lorafit.integrations.yolo_trainer.LoraDetectionTrainer` needs beyond Ultralytics' args.

* :class:`JobControls`: the ``lorafit train`` flags that Ultralytics' own arguments cannot express
  (LoRA+, our gradient clipping and accumulation, lorafit's warmup form, eval cadence, resume,
  several processes).
* :func:`capture` / :func:`restore`: the resumable state written to ``RUN/checkpoint.pt`` after an
  epoch. Ultralytics' own resume reloads ``last.pt``, which holds a *merged* fp16 model, so it
  cannot continue a LoRA run; ours holds the trainable tensors only (adapter and
  ``modules_to_save``, or everything with ``--full-finetune``) of the live and the EMA model, the
  optimizer, GradScaler, EMA counter, best fitness and early-stopping state, the gradients of a
  half-done accumulation, and every rank's RNG states (python, numpy, torch) and mosaic buffer. The
  training order needs no state: it is a function of (seed, epoch) (see ``get_dataloader``).
  Tensors and plain values only: the file loads with ``torch.load(weights_only=True)``
  (:func:`lorafit.train.checkpoint.load_checkpoint`).

Bit-exact resume holds for ``workers=0`` (lorafit's CPU setting): with worker processes the
augmentation RNG lives in the workers, whose state a checkpoint cannot reach.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lorafit.train.checkpoint import rng_state, save_checkpoint, set_rng_state
from lorafit.train.distributed import Dist
from lorafit.common.errors import Interrupted, LorafitError

FORMAT = "lorafit-detect-1"


@dataclasses.dataclass
class JobControls:
    """lorafit's side of a detection run; the defaults keep Ultralytics' behaviour.

    Attributes:
        grad_accum: micro-batches per optimizer step; None = Ultralytics' ``round(nbs / batch)``.
        max_grad_norm: clip the trainable gradients' norm (0 = off); Ultralytics hard-codes 10.0.
        lr_b_ratio: LoRA+: the B matrices train at lr x ratio.
        precision: "fp16" turns AMP on without Ultralytics' AMP check (which downloads a model);
            "bf16" goes through ``amp="bf16"`` in the args; None/"fp32" = as the args say.
        eval_every: validate every N epochs (the last epoch always).
        eval_batch_size: validation batch size; None = Ultralytics' 2 x batch.
        warmup: lorafit's form, < 1 a fraction of all batches, >= 1 a count of optimizer steps;
            None = Ultralytics' ``warmup_epochs``.
        checkpoint_dir: where ``checkpoint.pt`` goes after each epoch (None = no checkpoint).
        save_every: write it every N epochs.
        resume: a loaded checkpoint to continue from.
        before: validate the starting model before training (``before_*`` metrics).
        dist: the process group (torchrun); None or world 1 = one process.
        full_finetune: train every weight (no adapter).
        job_state: returns extra plain data stored in the checkpoint (the task's own counters).
    """

    grad_accum: int | None = None
    max_grad_norm: float = 10.0
    lr_b_ratio: float = 1.0
    precision: str | None = None
    eval_every: int = 1
    eval_batch_size: int | None = None
    warmup: float | None = None
    checkpoint_dir: Path | None = None
    save_every: int = 1
    resume: dict[str, Any] | None = None
    before: bool = False
    dist: Dist | None = None
    full_finetune: bool = False
    job_state: Callable[[], dict[str, Any]] | None = None


def snapshot(model: nn.Module, keys: list[str]) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the named state_dict entries."""
    sd = model.state_dict()
    return {k: sd[k].detach().to("cpu", copy=True) for k in keys}


def load_into(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy tensors into the model's state in place (names must exist)."""
    sd = model.state_dict()
    unknown = [k for k in tensors if k not in sd]
    if unknown:
        raise LorafitError(f"checkpoint does not match the model (unexpected {unknown[:3]}): resume with the run's "
                           "own config.yaml")
    with torch.no_grad():
        for k, v in tensors.items():
            sd[k].copy_(v)


def _num(x) -> float | None:
    return None if x is None else float(x)


def capture(trainer) -> dict[str, Any]:
    """The resumable state after epoch ``trainer.epoch`` (collective: every rank calls it)."""
    dist = trainer.controls.dist or Dist()
    keys = trainer.state_keys()
    model = trainer.unwrapped()
    pending = {n: p.grad.detach().to("cpu", copy=True) for n, p in model.named_parameters()
               if p.grad is not None}
    dataset = trainer.train_loader.dataset
    mine = {"rng": rng_state(), "pending": pending,
            "buffer": [int(i) for i in getattr(dataset, "buffer", [])]}
    ranks = dist.gather_objects(mine)
    stopper = trainer.stopper
    return {
        "format": FORMAT, "epoch": int(trainer.epoch), "epochs": int(trainer.epochs), "world": dist.world,
        "model": snapshot(model, keys), "ema": snapshot(trainer.ema.ema, keys), "ema_updates": int(trainer.ema.updates),
        "optimizer": trainer.optimizer.state_dict(), "scaler": trainer.scaler.state_dict(), "micro": trainer.micro,
        "best_fitness": _num(trainer.best_fitness), "best_state": trainer.best_state, "best_epoch": trainer.best_epoch,
        "stopper": {"best_fitness": _num(stopper.best_fitness), "best_epoch": int(stopper.best_epoch),
                    "possible_stop": bool(stopper.possible_stop)},
        "metrics": {k: float(v) for k, v in (trainer.metrics or {}).items()},
        "ranks": ranks, "job": trainer.controls.job_state() if trainer.controls.job_state else {},
    }


def restore(trainer, state: dict[str, Any]) -> None:
    """Load what :func:`capture` wrote; the RNG part waits for :func:`restore_epoch_start`."""
    dist = trainer.controls.dist or Dist()
    if state.get("format") != FORMAT:
        raise LorafitError(f"{trainer.controls.checkpoint_dir}: checkpoint.pt is not a detect checkpoint")
    if state["world"] != dist.world:
        raise LorafitError(f"--resume: the run was trained on {state['world']} process(es), this is {dist.world}; "
                           "resume it with the same number (the data shards and RNG states are per process)")
    load_into(trainer.unwrapped(), state["model"])
    load_into(trainer.ema.ema, state["ema"])
    trainer.ema.updates = state["ema_updates"]
    opt = state["optimizer"]
    for saved, group in zip(opt["param_groups"], trainer.optimizer.param_groups):
        saved["fused"] = group.get("fused")  # the runtime device picks the kernel, not the checkpoint
    trainer.optimizer.load_state_dict(opt)
    if state["scaler"]:
        trainer.scaler.load_state_dict(state["scaler"])
    trainer.best_fitness = state["best_fitness"]
    trainer.stopper.__dict__.update(state["stopper"])
    trainer.best_state, trainer.best_epoch = state["best_state"], state["best_epoch"]
    if trainer.metrics is not None and state["metrics"]:
        trainer.metrics = dict(state["metrics"])
    trainer.micro = state["micro"]
    trainer.start_epoch = state["epoch"] + 1
    head = trainer.unwrapped().model[-1]
    if getattr(head, "one2one_cv2", None) is not None:  # end-to-end heads: the loss weights follow the epoch
        model = trainer.unwrapped()
        model.criterion = model.init_criterion()
        model.criterion.updates = trainer.start_epoch - 1
        model.criterion.update()
    close = trainer.args.close_mosaic
    if close and trainer.start_epoch > trainer.epochs - close:
        # The interrupted run closed mosaic at an earlier epoch: close it now, as the loop only does it at
        # that epoch (the loop reads args.close_mosaic = 0 as "closed"; restored at the first epoch start).
        trainer._close_dataloader_mosaic()
        trainer.restore_close_mosaic = close
        trainer.args.close_mosaic = 0


def restore_epoch_start(trainer, state: dict[str, Any]) -> None:
    """At the first resumed epoch's start: pending gradients, mosaic buffer, then every RNG state.

    Runs after Ultralytics' ``optimizer.zero_grad()`` at the start of its loop (which would drop the
    gradients) and right before the first batch, so nothing draws random numbers in between.
    """
    dist = trainer.controls.dist or Dist()
    mine = state["ranks"][dist.rank]
    params = dict(trainer.unwrapped().named_parameters())
    for name, grad in mine["pending"].items():
        params[name].grad = grad.to(params[name].device)
    dataset = trainer.train_loader.dataset
    if hasattr(dataset, "buffer") and isinstance(dataset.buffer, list):
        dataset.buffer = []
        for i in mine["buffer"]:  # reload the images the mosaic buffer held (load_image re-appends them)
            dataset.load_image(i)
        dataset.buffer = list(mine["buffer"])
    set_rng_state(mine["rng"])


def read_results(path: Path, epochs_done: int) -> str | None:
    """Ultralytics' results.csv up to ``epochs_done`` (its trainer deletes the file when it does not resume)."""
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    keep = lines[:1] + [ln for ln in lines[1:] if ln.split(",")[0].strip() and float(ln.split(",")[0]) <= epochs_done]
    return "".join(f"{ln}\n" for ln in keep)


class StopOnSignals:
    """Ctrl-C / SIGTERM ask the trainer to stop after the current batch (a second one kills at once).

    The run then ends with :class:`~lorafit.common.errors.Interrupted`; the checkpoint of the last
    finished epoch (``RUN/checkpoint.pt``) is what ``--resume`` continues from.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.old: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.trainer._signal is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.trainer.request_stop(signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


class EpochControl:
    """The per-epoch hooks of :class:`~lorafit.integrations.yolo_trainer.LoraDetectionTrainer`.

    Ctrl-C / SIGTERM (:meth:`request_stop`) stop every rank after the current batch; the first
    resumed epoch restores the RNG and the pending gradients; each finished epoch records the best
    EMA tensors and writes ``checkpoint.pt`` (rank 0). Registered as Ultralytics callbacks in
    ``train``.
    """

    def request_stop(self, signum: int) -> None:
        """Signal handler body: stop after the current batch (every rank, see :meth:`_batch_end`)."""
        self._signal = signum

    def _epoch_start(self, _trainer) -> None:
        sampler = self.train_loader.sampler
        if isinstance(sampler, torch.utils.data.DistributedSampler):
            sampler.set_epoch(self.epoch)  # Ultralytics only does it under torchrun
        if self.controls.resume is not None and self.epoch == self.start_epoch:
            if self.restore_close_mosaic is not None:
                self.args.close_mosaic = self.restore_close_mosaic
            restore_epoch_start(self, self.controls.resume)

    def _batch_end(self, _trainer) -> None:
        stop = self._signal is not None
        if self.dist.enabled:
            stop = self.dist.any(stop)
        if not stop:
            return
        name = signal.Signals(self._signal or signal.SIGTERM).name
        where = self.controls.checkpoint_dir
        if self.checkpoint_epoch is not None and where is not None:
            then = f"resume with: lorafit train --resume {where} (continues after epoch {self.checkpoint_epoch})"
        else:
            then = "no checkpoint yet (one is written after each epoch): start the run again"
        raise Interrupted(f"{name} during epoch {self.epoch + 1}/{self.epochs}: {then}", int(self._signal or 15))

    def _epoch_end(self, _trainer) -> None:
        """Track the best epoch's EMA tensors on every rank, then write the checkpoint (rank 0)."""
        if self.epoch >= self.epochs:  # final_eval reports as epoch + 1
            return
        best = self.validated and self.fitness is not None and self.best_fitness == self.fitness
        if self.dist.enabled:
            best = self.dist.any(best)  # rank 0 alone holds the fitness
        if best:
            self.best_state, self.best_epoch = snapshot(self.ema.ema, self.state_keys()), self.epoch + 1
        c = self.controls
        done = self.epoch + 1
        if c.checkpoint_dir is not None and done < self.epochs and done % max(1, c.save_every) == 0:
            state = capture(self)
            if self.dist.is_main:
                save_checkpoint(c.checkpoint_dir, state)
            self.checkpoint_epoch = done
