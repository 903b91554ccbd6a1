"""Object detection with Ultralytics YOLO: ``lorafit train --task detect --data data.yaml``.

Unlike the other tasks, detection does not use lorafit's own loop: the YOLO loss, its target
assignment, mosaic augmentation and mAP evaluation belong to Ultralytics, so the task *owns its
loop* (``Task.run``) and drives :class:`~lorafit.integrations.yolo_trainer.LoraDetectionTrainer`,
which keeps the adapter intact through Ultralytics' EMA, checkpoints, validation and fusion.
The flags and the run directory follow ``lorafit train``::

    config.yaml      resolved options            data.yaml      the checked data, absolute paths
    adapter/         PEFT adapter of the best epoch + lorafit_detect.json (classes) + lorafit_job.json
    metrics.json     eval_mAP50, eval_mAP50-95, precision, recall, before_*, sizes, times
    metrics.jsonl    one line per epoch           loss.png       train / val loss per epoch
    ultralytics/     Ultralytics' run: results.csv, weights/{last,best}.pt (merged, plain YOLO files)
    checkpoint.pt    after each epoch while running (removed when the run completes): --resume reads it
    train_subset.txt with --max-samples: the seeded choice of training images

Every ``lorafit train`` flag applies (epoch-counted where Ultralytics works per epoch: --eval-every,
--save-every, --log-every) or is refused through ``NOT_APPLICABLE``; ``torchrun`` runs several
processes. See docs/vision.md for the mapping and :mod:`lorafit.integrations.yolo_state` for resume.

``lorafit.integrations.ultralytics.load_detector_adapter(YOLO(base).model, run/"adapter")`` then
``lorafit.merge_and_unload`` gives back exactly the validated model. Only light imports at module
level: ultralytics is imported when the task runs.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from lorafit.common.errors import LorafitError
from lorafit.common.files import replace_dir, write_json, write_text
from lorafit.common.modules import count_parameters
from lorafit.datasets.yolo_format import _images, check_detect_data, check_label_file, label_path, write_normalised_yaml
from lorafit.integrations.ultralytics import configure_offline
from lorafit.integrations.yolo_state import JobControls, StopOnSignals, read_results
from lorafit.tasks import base
from lorafit.tasks.detect_io import DEFAULT_IMGSZ, DetectReload, rename_metrics, ultralytics_device_of
from lorafit.train import distributed
from lorafit.train.checkpoint import CHECKPOINT, load_checkpoint
from lorafit.train.data import take_samples
from lorafit.train.options import Option
from lorafit.train.progress import MetricsLog, plot_loss

DEFAULTS = {"model": "yolov8n.yaml", "targets": "all", "batch_size": 16, "epochs": 10, "lr_lora": 1e-2,
            "lr_full": 1e-3, "imgsz": DEFAULT_IMGSZ, "eval_batch_size": 32,
            "max_grad_norm": 10.0}  # Ultralytics' own clipping value; 0 turns it off
# Flags of ``lorafit train`` that cannot mean anything for detection: setting one is refused (jobs.options).
NOT_APPLICABLE = {
    "train": "the splits come from --data data.yaml",
    "eval": "the splits come from --data data.yaml",
    "text_column": "YOLO labels are .txt files beside the images",
    "label_column": "YOLO labels are .txt files beside the images",
    "max_length": "images have no tokens; --imgsz sets the input size",
    "quantize": "it quantizes linear layers; a YOLO detector is convolutions",
    "grad_checkpointing": "Ultralytics' detection model has no activation checkpointing",
    "packing": "packing joins token sequences (causal-lm)",
    "compile": "Ultralytics' own trainer runs the detector; lorafit cannot compile its loop",
    "report_to": "Ultralytics' own trainer runs the detector and has its own loggers (yolo settings)",
    "attn_implementation": "a transformers setting; a YOLO detector has no such attention",
    "fsdp": "it shards transformer blocks under lorafit's loop (causal-lm, text-classification); Ultralytics' "
            "trainer runs the detector",
    "stop_at_step": "it stops lorafit's own loop; Ultralytics' trainer runs the detector (stop it with Ctrl-C, "
                    "then --resume)",
}
OPTIONS = [
    Option("data", "path", None, "detect: a YOLO data.yaml (path / train / val / names).", metavar="FILE.yaml",
           group="data"),
    Option("imgsz", "int", None, "detect / image-classification: input image size in pixels (detect "
           "default 320; a multiple of 32).", minimum=32, metavar="N", group="data"),
]


class Task(DetectReload, base.Task):
    """``--task detect``: see the module docstring. The task runs its own loop (:meth:`run`)."""

    name = "detect"
    primary_metric = "eval_mAP50-95"
    greater_is_better = True
    owns_loop = True
    DEFAULTS = DEFAULTS
    OPTIONS = OPTIONS
    NOT_APPLICABLE = NOT_APPLICABLE

    def __init__(self, opts: dict[str, Any]):
        self.opts = opts
        if not opts.get("data"):
            raise LorafitError("--data is required for --task detect (a YOLO data.yaml)")
        model = str(opts["model"])
        if not model.endswith((".yaml", ".yml", ".pt")):
            raise LorafitError(f"--model {model}: give a model yaml (yolov8n.yaml, yolo11n.yaml) or a local .pt")
        if model.endswith(".pt") and not Path(model).is_file():
            raise LorafitError(f"--model {model}: no such file (weights are never downloaded; give a local .pt)")
        self.model_path = model
        self.data: dict | None = None
        self.trainer = None  # the finished Ultralytics trainer, after run()
        self.callbacks: dict[str, list] = {}  # extra Ultralytics callbacks (event -> functions) for run()

    def describe(self) -> str:
        c = self.data["counts"]
        return (f"{c['train'][0]} train / {c['val'][0]} val images, {c['train'][1]} / {c['val'][1]} boxes, "
                f"{self.data['nc']} classes ({', '.join(list(self.data['names'].values())[:6])})")

    def load_data(self) -> dict:
        """Check data.yaml and every label; raises LorafitError naming the bad file."""
        self.data = check_detect_data(self.opts["data"])
        return self.data

    # ------------------------------------------------------------------ the job
    def run(self, say=print, resume: str | Path | None = None) -> dict[str, Any]:
        """Train (LoRA or ``--full-finetune``), then write the run directory; returns metrics.json.

        Args:
            say: where the summary lines go (rank 0; other ranks print nothing).
            resume: the run directory whose ``checkpoint.pt`` to continue from (``lorafit train --resume``).

        Under torchrun every process calls this: they join the process group here
        (:func:`lorafit.train.distributed.setup`), rank 0 alone writes files, and every rank returns
        rank 0's metrics.

        Raises:
            LorafitError (Interrupted, TrainingDiverged): reported by the CLI.
        """
        wall0 = time.perf_counter()
        dist = distributed.setup(self.opts.get("device", "auto"))
        try:
            if not dist.is_main:
                say = lambda *_: None  # noqa: E731
            metrics = self._run(say, dist, resume, wall0)
            dist.barrier()
            return metrics
        finally:
            dist.close()

    def _run(self, say, dist, resume, wall0: float) -> dict[str, Any]:
        opts = self.opts
        self.load_data()
        configure_offline()
        if opts["precision"] != "fp32" and dist.device.type != "cuda":
            raise LorafitError(f"--precision {opts['precision']}: detection autocasts on CUDA only (Ultralytics' "
                               "training loop refuses it on CPU); use --precision fp32")
        stamp = dist.gather_objects(time.strftime("%Y%m%d-%H%M%S"))[0]
        run_dir = Path(opts.get("out") or f"runs/detect-{stamp}").resolve()
        opts["out"] = str(run_dir)
        state = load_checkpoint(run_dir) if resume is not None else None
        if resume is not None and state is None:
            raise LorafitError(f"--resume {run_dir}: no {CHECKPOINT} to resume from")
        subset = self._train_subset(run_dir)
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            saved = {k: v for k, v in opts.items() if k != "title" and k not in NOT_APPLICABLE}
            write_text(run_dir / "config.yaml", yaml.safe_dump(saved, sort_keys=False))
            if subset is not None:
                write_text(run_dir / "train_subset.txt", "".join(f"{p}\n" for p in subset))
            write_normalised_yaml(self.data, run_dir / "data.yaml")
        dist.barrier()
        data_yaml = run_dir / "data.yaml"
        device = ultralytics_device_of(dist.device)
        imgsz = int(opts.get("imgsz") or DEFAULT_IMGSZ)
        what = "full fine-tuning" if opts.get("full_finetune") else f"LoRA r={opts['rank']} alpha={opts['alpha']:g}"
        procs = f" on {dist.world} processes" if dist.enabled else ""
        say(f"lorafit train: detect on {self.model_path} ({what}), {self.describe()}{procs}")
        job = state["job"] if state is not None else {}
        if state is not None:
            say(f"resuming {run_dir} after epoch {state['epoch'] + 1}/{opts['epochs']}")
        log = _EpochLog(run_dir, opts["epochs"], opts.get("log_every") or 0, say,
                        None if state is None else state["epoch"] + 1) if dist.is_main else None
        try:
            trainer = self.trainer = self._train(data_yaml, imgsz, device, run_dir, log, dist, state)
        finally:
            if log is not None:
                log.close()
        before = job.get("before") or rename_metrics(trainer.before_metrics)
        final = rename_metrics(trainer.metrics or {})
        trainable, total = _count(trainer)
        out_name = "model" if opts.get("full_finetune") else "adapter"
        metrics = {**final, "train_time_s": round(trainer.train_seconds, 3), "trainable_params": trainable,
                   "total_params": total, "adapter_bytes": 0,
                   "base_model_bytes": _base_bytes(self.model_path, total - trainable),
                   "wall_time_s": 0.0, "epochs": opts["epochs"], "best_epoch": trainer.best_epoch, "imgsz": imgsz,
                   "world_size": dist.world, "new_classes": bool(getattr(trainer, "new_classes", False)),
                   "full_finetune": bool(opts.get("full_finetune"))}
        metrics.update({f"before_{k}": v for k, v in before.items()})
        if dist.is_main:
            self._save_output(trainer, run_dir / out_name)
            files = list((run_dir / out_name).glob("*.safetensors")) + list((run_dir / out_name).glob("*.pt"))
            metrics["adapter_bytes"] = sum(p.stat().st_size for p in files)
            metrics["wall_time_s"] = round(time.perf_counter() - wall0, 3)
            write_json(run_dir / "metrics.json", metrics)
            (run_dir / CHECKPOINT).unlink(missing_ok=True)
            if before:
                say(f"before: mAP50 {before['eval_mAP50']:.4f}  mAP50-95 {before['eval_mAP50-95']:.4f}")
            say(f"after:  mAP50 {final.get('eval_mAP50', 0):.4f}  mAP50-95 {final.get('eval_mAP50-95', 0):.4f}")
            say(f"trainable params: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)")
            say(f"{out_name} size: {metrics['adapter_bytes'] / 1e6:.2f} MB vs base model "
                f"{metrics['base_model_bytes'] / 1e6:.2f} MB")
            say(f"run directory: {run_dir}")
        return dist.gather_objects(metrics)[0]

    def _train_subset(self, run_dir: Path) -> list[Path] | None:
        """``--max-samples N``: a seeded shuffle of the training images, then the first N (as the other tasks).

        Ultralytics' own ``fraction`` keeps the first files in name order, so the subset goes to the
        trainer as a list file, ``RUN/train_subset.txt``, which ``data.yaml`` names as its train split.
        """
        n = self.opts.get("max_samples")
        if not n:
            return None
        images = _images(self.data["train"], Path(self.data["path"]), "train", Path(self.opts["data"]))
        chosen = sorted(take_samples(images, n, self.opts["seed"]))
        self.data["train"] = [str(run_dir / "train_subset.txt")]
        self.data["counts"]["train"] = (len(chosen), sum(check_label_file(label_path(p), self.data["nc"])
                                                         for p in chosen))
        return chosen

    def _train(self, data_yaml: Path, imgsz: int, device: str, run_dir: Path, log, dist, state):
        """Map the options onto Ultralytics' args and :class:`JobControls`, then train (see docs/vision.md)."""
        # lazy: imports ultralytics (optional extra lorafit[yolo]), after configure_offline
        from lorafit.integrations.yolo_trainer import LoraDetectionTrainer, ultralytics_overrides

        o = self.opts
        batch, accum = o["batch_size"], o["grad_accum"]
        # nbs = batch x accum: Ultralytics' weight-decay scaling (weight_decay x batch x accumulate / nbs) is then
        # exactly --weight-decay, and its nominal accumulation is --grad-accum.
        args = ultralytics_overrides(self.model_path, data_yaml, run_dir / "ultralytics", imgsz=imgsz,
                                     epochs=o["epochs"], batch=batch, lr=o["lr"], seed=o["seed"], device=device,
                                     weight_decay=o.get("weight_decay") or 0.0, warmup_epochs=0.0, nbs=batch * accum,
                                     amp="bf16" if o["precision"] == "bf16" else False)
        prior = (state or {}).get("job", {})
        t0 = time.perf_counter()
        holder: dict[str, Any] = {}

        def job_state() -> dict[str, Any]:
            before = prior.get("before") or rename_metrics(holder["trainer"].before_metrics)
            return {"before": before, "train_seconds": prior.get("train_seconds", 0.0) + time.perf_counter() - t0}

        controls = JobControls(grad_accum=accum, max_grad_norm=o["max_grad_norm"], lr_b_ratio=o["lr_b_ratio"],
                               precision=o["precision"], eval_every=o["eval_every"] or 1,
                               eval_batch_size=o["eval_batch_size"], warmup=o["warmup"], checkpoint_dir=run_dir,
                               save_every=o["save_every"] or 1, resume=state, before=bool(o["eval_before"]), dist=dist,
                               full_finetune=bool(o.get("full_finetune")), job_state=job_state)
        lora = dict(rank=o["rank"], alpha=o["alpha"], targets=o["targets"], dropout=o.get("dropout") or 0.0,
                    base=self.model_path)
        kept = read_results(run_dir / "ultralytics" / "results.csv", state["epoch"] + 1) if state else None
        try:
            trainer = LoraDetectionTrainer(overrides=args, lora=lora, controls=controls)
        except (FileNotFoundError, SyntaxError, RuntimeError) as exc:
            raise LorafitError(f"--data {o['data']}: {str(exc).splitlines()[0]}") from None
        holder["trainer"] = trainer
        dist.barrier()  # every rank's trainer unlinked results.csv (no Ultralytics resume) before it is restored
        if kept and dist.is_main:
            write_text(trainer.csv, kept)
        if log is not None:
            trainer.add_callback("on_fit_epoch_end", log.on_epoch)
        for event, fns in self.callbacks.items():
            for fn in fns:
                trainer.add_callback(event, fn)
        with StopOnSignals(trainer):
            trainer.train()
        trainer.train_seconds = prior.get("train_seconds", 0.0) + time.perf_counter() - t0
        return trainer

    def _save_output(self, trainer, directory: Path) -> None:
        def build(tmp: Path) -> None:
            if self.opts.get("full_finetune"):
                shutil.copyfile(trainer.best if trainer.best.exists() else trainer.last, tmp / "model.pt")
            else:
                shutil.copytree(trainer.adapter_best, tmp, dirs_exist_ok=True)
            write_json(tmp / "lorafit_job.json", self.job_info())

        replace_dir(directory, build)

    def job_info(self) -> dict[str, Any]:
        return {"task": self.name, "model": self.model_path, "data": str(self.opts["data"]),
                "imgsz": int(self.opts.get("imgsz") or DEFAULT_IMGSZ), "nc": self.data["nc"],
                "names": self.data["names"]}


class _EpochLog:
    """metrics.jsonl (one train and one eval record per epoch), a progress line and loss.png (rank 0).

    Fed by an Ultralytics ``on_fit_epoch_end`` callback. On resume, records of epochs past the
    checkpoint are dropped (they are trained again). Epochs skipped by ``--eval-every`` have no
    eval record. A line is printed every ``--log-every`` epochs (0: about 20 per run) and at the end.
    """

    def __init__(self, run_dir: Path, epochs: int, log_every: int, say, resume_epoch: int | None = None):
        self.run_dir = run_dir
        self.say = say
        self.every = log_every or max(1, epochs // 20)
        self.log = MetricsLog(run_dir / "metrics.jsonl", resume_step=resume_epoch)

    def on_epoch(self, trainer) -> None:
        if trainer.tloss is None or trainer.epoch >= trainer.epochs:  # the final re-validation reports epochs + 1
            return
        step = trainer.epoch + 1
        loss = float(sum(float(v) for v in trainer.tloss.values()))
        self.log.log({"kind": "train", "step": step, "epoch": step, "loss": round(loss, 6),
                      "lr": round(float(trainer.optimizer.param_groups[0]["lr"]), 8)})
        line = f"epoch {step}/{trainer.epochs}: loss {loss:.4f}"
        if getattr(trainer, "validated", True):
            metrics = trainer.metrics or {}
            val_loss = sum(float(v) for k, v in metrics.items() if k.startswith("val/"))
            boxes = rename_metrics(metrics)
            self.log.log({"kind": "eval", "step": step, "eval_loss": round(val_loss, 6), **boxes})
            line += f"  val loss {val_loss:.4f}  mAP50 {boxes.get('eval_mAP50', 0):.4f}"
        if step % self.every == 0 or step == trainer.epochs:
            self.say(line)

    def close(self) -> None:
        self.log.close()
        if self.log.records:
            plot_loss(self.log.records, self.run_dir / "loss.png", title="detect: loss per epoch")


def _count(trainer) -> tuple[int, int]:
    """(trainable, total) parameters of the trained (EMA) model, not counting a modules_to_save original.

    The EMA copy's ``requires_grad`` flags are off, so the trained names come from the trainer."""
    model = trainer.ema.ema if trainer.ema else trainer.model
    full = getattr(trainer, "lora_config", None) is None
    names = getattr(trainer, "_trainable", ())
    return count_parameters(model, originals=False, trainable=lambda name, _p: full or name in names)


def _base_bytes(model_path: str, base_params: int) -> int:
    """The base checkpoint's file size, or fp32 parameter bytes for a yaml-built model."""
    p = Path(model_path)
    return p.stat().st_size if p.suffix == ".pt" and p.is_file() else 4 * base_params
