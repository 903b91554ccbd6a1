"""The training loop: batching, accumulation, schedule, evaluation, checkpoints, signals, NaN stop.

Data order is a pure function of (seed, epoch): each epoch draws a seeded permutation and step
``s`` consumes rows ``perm[s*G:(s+1)*G]`` with ``G = batch_size * grad_accum * processes``. That
global batch is cut into ``grad_accum * processes`` contiguous chunks; process ``r`` runs chunks
``m * processes + r``. The position in the data is therefore just the step counter, which makes
resume exact, and one process with batch 2B sees the same rows per step as two with batch B.

The task supplies the model-specific parts (:class:`~lorafit.train.trainable.Trainable`):
``collate``, ``count`` (how many loss items a batch holds), ``loss_sum`` (the summed, not averaged, loss) and
``evaluate``. Dividing summed losses by the global item count of the step is what makes
gradient accumulation and several processes exact for token-level losses too.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable

import torch

from lorafit import distributed as fsdp
from lorafit.optim import param_groups
from lorafit.common import files
from lorafit.train import checkpoint as ckpt
from lorafit.train.distributed import Dist
from lorafit.common.errors import Interrupted, LorafitError, TrainingDiverged
from lorafit.train.progress import MetricsLog, Progress, plot_loss
from lorafit.train.tracking import TrackedLog, parse_report_to
from lorafit.train.trainable import Trainable


def lr_lambda(total: int, warmup: float) -> Callable[[int], float]:
    """Linear warmup then linear decay to 0, as a LambdaLR factor of step ``s`` (0-based).

    ``warmup`` < 1 is a fraction of ``total`` steps, else a number of steps (the anchor's rule).
    """
    warm = warmup * total if warmup < 1 else warmup

    def factor(s: int) -> float:
        up = min(1.0, (s + 1) / warm) if warm > 0 else 1.0
        return up * max(0.0, 1.0 - s / total)

    return factor


def split_batch(indices: list[int], pieces: int) -> list[list[int]]:
    """Cut ``indices`` into ``pieces`` contiguous chunks whose sizes differ by at most one."""
    base, extra = divmod(len(indices), pieces)
    out, start = [], 0
    for i in range(pieces):
        end = start + base + (1 if i < extra else 0)
        out.append(indices[start:end])
        start = end
    return out


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
    }


class Trainer:
    """Runs one training job on one process of the group.

    Args:
        model: the model with its trainable parameters marked (adapter + head, or everything).
        task: what the loop trains (:class:`~lorafit.train.trainable.Trainable`).
        train_rows / eval_rows: examples as the task's ``collate`` and ``evaluate`` expect.
        opts: resolved options (see :mod:`lorafit.train.options`).
        dist: the process group.
        run_dir: where rank 0 writes (None: write nothing, e.g. other ranks or benchmarks).
        save_model: ``save_model(model, directory)`` writes the adapter (used for ``best/``).
        on_step: called with the step number after each optimizer step (tests send signals here).
        tty: force the progress bar on/off.
        compiled: ``torch.compile(model)`` to run the training forward/backward with (``--compile``);
            everything else (parameters, checkpoints, evaluation) uses ``model`` itself.
    """

    def __init__(
        self,
        model,
        task: Trainable,
        train_rows: list,
        eval_rows: list | None,
        opts: dict[str, Any],
        dist: Dist,
        run_dir: Path | None = None,
        save_model: Callable | None = None,
        on_step: Callable[[int], None] | None = None,
        tty: bool | None = None,
        compiled: torch.nn.Module | None = None,
    ):
        self.model, self.task, self.opts, self.dist = model, task, opts, dist
        self.run_model = compiled if compiled is not None else model
        self.train_rows, self.eval_rows = train_rows, eval_rows or []
        self.run_dir = run_dir if dist.is_main else None
        self.out_dir = run_dir  # every rank: the sharded best/ save is collective
        self.sharded = fsdp.is_sharded(model)  # --fsdp: FSDP2 reduces the gradients, every rank evaluates
        self.stopped = False
        self.save_model, self.on_step, self.tty = save_model, on_step, tty
        self.params = [p for p in model.parameters() if p.requires_grad]
        per_step = opts["batch_size"] * opts["grad_accum"] * dist.world
        self.global_batch = min(per_step, len(train_rows))
        self.steps_per_epoch = max(1, len(train_rows) // per_step)
        self.total_steps = self.steps_per_epoch * opts["epochs"]
        self.optimizer = torch.optim.AdamW(
            param_groups(model, opts["lr"], opts["lr_b_ratio"], opts["weight_decay"]), lr=opts["lr"]
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.total_steps, opts["warmup"])
        )
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=opts["precision"] == "fp16")
        self.step = 0
        self.evals: list[dict[str, Any]] = []
        self.before: dict[str, float] | None = None
        self.best: dict[str, Any] | None = None
        self.train_time = 0.0
        self._signal: int | None = None
        self._stop = False
        self._epoch, self._epoch_perm = -1, []
        self._ckpt_step: int | None = None
        every = opts["eval_every"]
        self.eval_steps = (
            set(range(every, self.total_steps + 1, every)) | {self.total_steps}
            if every
            else {self.steps_per_epoch * (e + 1) for e in range(opts["epochs"])}
        )
        self.save_every = opts["save_every"] or max(1, self.total_steps // 10)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs (collective: every rank must call it)."""
        rngs = self.dist.gather_objects(ckpt.rng_state())
        return {
            "step": self.step,
            "world": self.dist.world,
            "trainable": (fsdp.full_state(self.model, trainable_only=True) if self.sharded
                          else ckpt.trainable_state(self.model)),
            "optimizer": (fsdp.optimizer_state(self.model, self.optimizer) if self.sharded
                          else self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rngs,
            "evals": self.evals,
            "before": self.before,
            "best": self.best,
            "train_time": self.train_time,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; everything is checked before the model is touched.

        Raises:
            LorafitError: keys missing (not a checkpoint of this loop: detect's differ), another
                number of processes (the rows of a step and the per-rank RNG states depend on it),
                or tensors that do not fit the model.
        """
        where = self.run_dir / ckpt.CHECKPOINT if self.run_dir is not None else ckpt.CHECKPOINT
        missing = sorted({"step", "trainable", "optimizer", "scheduler", "scaler", "rng"} - set(state))
        if missing:
            raise LorafitError(f"{where}: not a checkpoint of this task (no {', '.join(missing)})")
        if state.get("world", self.dist.world) != self.dist.world:
            raise LorafitError(
                f"{where}: the run was trained on {state['world']} process(es), this is {self.dist.world}; "
                "resume it with the same number (each step's rows and RNG states are per process)"
            )
        ckpt.restore_trainable(self.model, state["trainable"])
        if self.sharded:  # full state by parameter name -> re-sharded (torch.distributed.checkpoint)
            fsdp.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]
        ckpt.set_rng_state(rngs[self.dist.rank] if self.dist.rank < len(rngs) else rngs[0])
        self.step, self.evals, self.before = state["step"], state["evals"], state["before"]
        self.best, self.train_time = state["best"], state["train_time"]

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoint.pt`` (rank 0); collective, so every rank calls it at the same step."""
        state = self.state_dict()
        self._ckpt_step = self.step
        return ckpt.save_checkpoint(self.run_dir, state) if self.run_dir is not None else None

    # ------------------------------------------------------------- plumbing
    def _autocast(self):
        prec = self.opts["precision"]
        if prec == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if prec == "bf16" else torch.float16
        return torch.autocast(self.dist.device.type, dtype=dtype)

    def _handle_signal(self, signum, frame) -> None:
        if self._signal is not None:  # second Ctrl-C: stop now, the last checkpoint stays valid
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self._signal = signum

    def _step_chunks(self, epoch_perm: list[int], index: int) -> list[list[int]]:
        rows = epoch_perm[index * self.global_batch : (index + 1) * self.global_batch]
        pieces = split_batch(rows, self.opts["grad_accum"] * self.dist.world)
        return [c for m, c in enumerate(pieces) if m % self.dist.world == self.dist.rank]

    def _perm(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.opts["seed"] * 100_003 + epoch)
        return torch.randperm(len(self.train_rows), generator=gen).tolist()

    def evaluate(self) -> dict[str, float]:
        """Evaluate on rank 0 (others wait; sharded: every rank runs the forward); {} without eval rows."""
        metrics: dict[str, float] = {}
        if self.eval_rows and (self.dist.is_main or self.sharded):
            was_training = self.model.training
            self.model.eval()
            with torch.no_grad(), self._autocast():
                metrics = self.task.evaluate(
                    self.model, self.eval_rows, self.opts["eval_batch_size"], self.dist.device
                )
            self.model.train(was_training)
        self.dist.barrier()
        return metrics

    # ------------------------------------------------------------------ loop
    def train_step(self, chunks: list[list[int]]) -> tuple[float, float]:
        """One optimizer step on this rank's chunks; returns (global mean loss, global tokens)."""
        batches = [self.task.collate([self.train_rows[i] for i in c]) for c in chunks if c]
        counts = [float(self.task.count(b)) for b in batches]
        tokens = sum(float(self.task.num_tokens(b)) for b in batches)
        total = self.dist.all_reduce_sum(torch.tensor([sum(counts), tokens], dtype=torch.float64))
        global_count, global_tokens = max(float(total[0]), 1.0), float(total[1])
        loss_sum = 0.0
        for batch in batches:
            batch = to_device(batch, self.dist.device)
            with self._autocast():
                loss = self.task.loss_sum(self.run_model, batch)
            self.scaler.scale(loss.float() / global_count).backward()
            loss_sum += float(loss.detach())
        stop = 1.0 if self._signal is not None else 0.0
        reduced = self.dist.all_reduce_sum(torch.tensor([loss_sum, stop], dtype=torch.float64))
        mean_loss = float(reduced[0]) / global_count
        # Decide from the reduced flag only, so every rank stops after the same step.
        self._stop = bool(reduced[1] > 0)
        if not math.isfinite(mean_loss):
            self.optimizer.zero_grad(set_to_none=True)
            return mean_loss, global_tokens
        if not self.sharded:  # FSDP2 reduce-scattered them in backward already
            self.dist.reduce_grads(self.params)
        if self.opts["max_grad_norm"] > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.opts["max_grad_norm"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean_loss, global_tokens

    def fit(self, resume: dict[str, Any] | None = None) -> dict[str, Any]:
        """Train to the end (or until a signal / NaN). Returns the run's results dict.

        Raises:
            Interrupted: after a signal; a resumable checkpoint was written.
            TrainingDiverged: the loss was NaN/inf; that step was not applied and the last
                checkpoint on disk (if any) is kept as it was.
        """
        metrics_path = self.run_dir / "metrics.jsonl" if self.run_dir is not None else None
        if resume is not None:
            self.load_state_dict(resume)
            self._ckpt_step = self.step
        resume_step = self.step if resume is not None else None
        log = TrackedLog(MetricsLog(metrics_path, resume_step=resume_step),
                         parse_report_to(self.opts.get("report_to"), check_installed=False), self.run_dir, self.opts,
                         resume_step)
        progress = Progress(self.total_steps, self.step, self.dist.is_main, self.opts["log_every"], self.tty)
        old_handlers = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            if resume is None and self.opts["eval_before"]:
                self.before = self.evaluate()
                if self.before:
                    log.log({"kind": "eval", "step": 0, **self.before})
            self.model.train()
            while self.step < self.total_steps:
                epoch, index = divmod(self.step, self.steps_per_epoch)
                if self._epoch != epoch:
                    self._epoch, self._epoch_perm = epoch, self._perm(epoch)
                lr = self.optimizer.param_groups[0]["lr"]
                t0 = time.perf_counter()
                loss, tokens = self.train_step(self._step_chunks(self._epoch_perm, index))
                if not math.isfinite(loss):
                    raise self._diverged(loss, log)
                elapsed = time.perf_counter() - t0
                self.train_time += elapsed
                self.step += 1
                tok_s = tokens / elapsed if elapsed > 0 else 0.0
                log.log(
                    {
                        "kind": "train",
                        "step": self.step,
                        "epoch": round(self.step / self.steps_per_epoch, 4),
                        "loss": loss,
                        "lr": lr,
                        "tokens_per_s": round(tok_s, 1),
                        "step_time_s": round(elapsed, 4),
                    }
                )
                progress.update(self.step, loss, lr, tok_s)
                if self.on_step is not None:
                    self.on_step(self.step)
                if self.step in self.eval_steps:
                    self._run_eval(log, progress)
                if self._stop or (self._signal is not None and not self.dist.enabled):
                    raise self._interrupt(log, progress)
                if self.step == self.opts.get("stop_at_step") and self.step < self.total_steps:
                    self.save_checkpoint()  # --stop-at-step: a pause, continued with --resume
                    self.stopped = True
                    break
                if self.step % self.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        finally:
            progress.close()
            log.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
        if self.run_dir is not None:
            plot_loss(log.records, self.run_dir / "loss.png", self.opts.get("title", ""))
        final = self.evals[-1] if self.evals else {}
        return {
            "before": self.before,
            "final": final,
            "evals": self.evals,
            "best": self.best,
            "train_time_s": self.train_time,
            "steps": self.step,
            "resumed": resume is not None,
            "stopped": self.stopped,
            "records": log.records,
        }

    def _run_eval(self, log: TrackedLog, progress: Progress) -> None:
        metrics = self.evaluate()
        if not metrics:
            return
        record = {"step": self.step, **metrics}
        self.evals.append(record)
        log.log({"kind": "eval", **record})
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        progress.write(f"eval @ step {self.step}: {shown}")
        key = self.task.primary_metric
        value = metrics.get(key)
        if value is None or len(self.eval_steps) < 2:
            return
        better = self.best is None or (
            value > self.best[key] if self.task.greater_is_better else value < self.best[key]
        )
        if better:
            self.best = {"step": self.step, key: value}
            if self.run_dir is not None and self.save_model is not None:
                files.replace_dir(self.run_dir / "best", lambda d: self.save_model(self.model, d))
            elif self.sharded and self.save_model is not None and self.out_dir is not None:
                self.save_model(self.model, self.out_dir / "best")  # collective; only rank 0 writes

    def _interrupt(self, log: TrackedLog, progress: Progress) -> Interrupted:
        path = self.save_checkpoint()
        if self.run_dir is not None:
            plot_loss(log.records, self.run_dir / "loss.png", self.opts.get("title", ""))
        signum = self._signal or signal.SIGTERM  # another rank may have been the one signalled
        name = signal.Signals(signum).name
        where = f"; resume with: lorafit train --resume {self.run_dir}" if path is not None else ""
        return Interrupted(
            f"{name} at step {self.step}/{self.total_steps}: checkpoint saved{where}", int(signum)
        )

    def _diverged(self, loss: float, log: TrackedLog) -> TrainingDiverged:
        if self._ckpt_step is not None and self.run_dir is not None:
            keep = f"; last good checkpoint: {self.run_dir / ckpt.CHECKPOINT} (step {self._ckpt_step})"
        else:
            keep = "; no checkpoint had been written (a lower --lr may help)"
        log.log({"kind": "diverged", "step": self.step + 1, "loss": str(loss)})
        return TrainingDiverged(
            f"loss became {loss} at step {self.step + 1}/{self.total_steps}, stopped before applying it{keep}"
        )
