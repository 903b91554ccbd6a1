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

``lorafit.integrations.ultralytics.load_detector_adapter(YOLO(base).model, run/"adapter")`` then
``lorafit.merge_and_unload`` gives back exactly the validated model. Only light imports at module
level: ultralytics is imported when the task runs.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from lorafit.train.errors import LorafitError
from lorafit.train.options import Option

DEFAULTS = {"model": "yolov8n.yaml", "targets": "all", "batch_size": 16, "epochs": 10, "lr_lora": 1e-2,
            "lr_full": 1e-3, "imgsz": 320, "eval_batch_size": 32}
OPTIONS = [
    Option("data", "path", None, "detect: a YOLO data.yaml (path / train / val / names).", metavar="FILE.yaml",
           group="data"),
    Option("imgsz", "int", None, "detect / image-classification: input image size in pixels (detect "
           "default 320; a multiple of 32).", minimum=32, metavar="N", group="data"),
]
METRIC_KEYS = {"metrics/mAP50(B)": "eval_mAP50", "metrics/mAP50-95(B)": "eval_mAP50-95",
               "metrics/precision(B)": "eval_precision", "metrics/recall(B)": "eval_recall"}


def ultralytics_device(device: str) -> str:
    """lorafit's auto/cpu/cuda -> Ultralytics' device string."""
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise LorafitError("--device cuda: CUDA is not available")
        return "0"
    return "cpu"


def rename_metrics(raw: dict[str, Any]) -> dict[str, float]:
    """Ultralytics' result keys -> lorafit's ``eval_*`` keys (only the box metrics)."""
    return {new: round(float(raw[old]), 6) for old, new in METRIC_KEYS.items() if old in raw}


def evaluate_detector(model, data_yaml, imgsz: int, batch: int = 32, device: str = "cpu") -> dict[str, float]:
    """mAP50 / mAP50-95 / precision / recall of ``model`` on the data's val split.

    ``model`` may carry LoRA adapters: Ultralytics' validator fuses a deep copy, whose fuse merges
    the adapters first; the caller's model is untouched.
    """
    from lorafit.integrations.ultralytics import configure_offline

    configure_offline()
    from ultralytics.models.yolo.detect import DetectionValidator

    args = dict(data=str(data_yaml), imgsz=imgsz, batch=batch, device=device, plots=False, verbose=False,
                split="val", save_json=False, rect=False, workers=0)
    validator = DetectionValidator(args=args)
    return rename_metrics(validator(model=model))


class Task:
    """``--task detect``: see the module docstring. The task runs its own loop (:meth:`run`)."""

    name = "detect"
    primary_metric = "eval_mAP50-95"
    greater_is_better = True
    owns_loop = True

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

    def describe(self) -> str:
        c = self.data["counts"]
        return (f"{c['train'][0]} train / {c['val'][0]} val images, {c['train'][1]} / {c['val'][1]} boxes, "
                f"{self.data['nc']} classes ({', '.join(list(self.data['names'].values())[:6])})")

    def load_data(self) -> dict:
        """Check data.yaml and every label; raises LorafitError naming the bad file."""
        from lorafit.datasets.yolo_format import check_detect_data

        self.data = check_detect_data(self.opts["data"])
        return self.data

    # ------------------------------------------------------------------ the job
    def run(self, say=print) -> dict[str, Any]:
        """Train (LoRA or ``--full-finetune``), then write the run directory; returns metrics.json."""
        import yaml

        from lorafit.datasets.yolo_format import write_normalised_yaml
        from lorafit.integrations.ultralytics import configure_offline
        from lorafit.train.checkpoint import write_json, write_text

        wall0 = time.perf_counter()
        opts = self.opts
        self.load_data()
        configure_offline()
        run_dir = Path(opts.get("out") or f"runs/detect-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
        opts["out"] = str(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "config.yaml", yaml.safe_dump({k: v for k, v in opts.items() if k != "title"},
                                                          sort_keys=False))
        data_yaml = write_normalised_yaml(self.data, run_dir / "data.yaml")
        device = ultralytics_device(opts.get("device", "auto"))
        imgsz = int(opts.get("imgsz") or DEFAULTS["imgsz"])
        what = "full fine-tuning" if opts.get("full_finetune") else f"LoRA r={opts['rank']} alpha={opts['alpha']:g}"
        say(f"lorafit train: detect on {self.model_path} ({what}), {self.describe()}")
        before = self._before(data_yaml, imgsz, device) if opts.get("eval_before", True) else {}
        log = _EpochLog(run_dir)
        trainer = self.trainer = self._train(data_yaml, imgsz, device, run_dir, log)
        log.close()
        final = rename_metrics(trainer.metrics or {})
        trainable, total = _count(trainer)
        out_name = "model" if opts.get("full_finetune") else "adapter"
        self._save_output(trainer, run_dir / out_name)
        files = list((run_dir / out_name).glob("*.safetensors")) + list((run_dir / out_name).glob("*.pt"))
        metrics = {**final, "train_time_s": round(trainer.train_seconds, 3), "trainable_params": trainable,
                   "total_params": total, "adapter_bytes": sum(p.stat().st_size for p in files),
                   "base_model_bytes": _base_bytes(self.model_path, total - trainable),
                   "wall_time_s": round(time.perf_counter() - wall0, 3), "epochs": opts["epochs"], "imgsz": imgsz,
                   "new_classes": bool(getattr(trainer, "new_classes", False)),
                   "full_finetune": bool(opts.get("full_finetune"))}
        metrics.update({f"before_{k}": v for k, v in before.items()})
        write_json(run_dir / "metrics.json", metrics)
        if before:
            say(f"before: mAP50 {before['eval_mAP50']:.4f}  mAP50-95 {before['eval_mAP50-95']:.4f}")
        say(f"after:  mAP50 {final.get('eval_mAP50', 0):.4f}  mAP50-95 {final.get('eval_mAP50-95', 0):.4f}")
        say(f"trainable params: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)")
        say(f"{out_name} size: {metrics['adapter_bytes'] / 1e6:.2f} MB vs base model "
            f"{metrics['base_model_bytes'] / 1e6:.2f} MB")
        say(f"run directory: {run_dir}")
        return metrics

    def _before(self, data_yaml: Path, imgsz: int, device: str) -> dict[str, float]:
        """The base checkpoint's metrics (only for a .pt whose classes match the data)."""
        if not self.model_path.endswith(".pt"):
            return {}
        from lorafit.integrations.ultralytics import detect_head, load_detector

        base = load_detector(self.model_path)
        if int(detect_head(base).nc) != self.data["nc"]:
            return {}
        return evaluate_detector(base, data_yaml, imgsz, self.opts.get("eval_batch_size") or 32, device)

    def _train(self, data_yaml: Path, imgsz: int, device: str, run_dir: Path, log):
        from lorafit.integrations.yolo_trainer import LoraDetectionTrainer, ultralytics_overrides

        o = self.opts
        warmup = float(o.get("warmup") or 0.0)
        warmup_epochs = warmup * o["epochs"] if warmup < 1 else 0.0
        args = ultralytics_overrides(self.model_path, data_yaml, run_dir / "ultralytics", imgsz=imgsz,
                                     epochs=o["epochs"], batch=o["batch_size"], lr=o["lr"], seed=o["seed"],
                                     device=device, weight_decay=o.get("weight_decay") or 0.0,
                                     warmup_epochs=warmup_epochs)
        t0 = time.perf_counter()
        if o.get("full_finetune"):
            from ultralytics.models.yolo.detect import DetectionTrainer

            trainer = DetectionTrainer(overrides=args)
        else:
            lora = dict(rank=o["rank"], alpha=o["alpha"], targets=o["targets"], dropout=o.get("dropout") or 0.0,
                        base=self.model_path)
            try:
                trainer = LoraDetectionTrainer(overrides=args, lora=lora)
            except (FileNotFoundError, SyntaxError, RuntimeError) as exc:
                raise LorafitError(f"--data {o['data']}: {str(exc).splitlines()[0]}") from None
        trainer.add_callback("on_fit_epoch_end", log.on_epoch)
        trainer.train()
        trainer.train_seconds = time.perf_counter() - t0
        return trainer

    def _save_output(self, trainer, directory: Path) -> None:
        from lorafit.train.checkpoint import replace_dir, write_json

        def build(tmp: Path) -> None:
            if self.opts.get("full_finetune"):
                shutil.copyfile(trainer.best if trainer.best.exists() else trainer.last, tmp / "model.pt")
            else:
                shutil.copytree(trainer.adapter_best, tmp, dirs_exist_ok=True)
            write_json(tmp / "lorafit_job.json", self.job_info())

        replace_dir(directory, build)

    def job_info(self) -> dict[str, Any]:
        return {"task": self.name, "model": self.model_path, "data": str(self.opts["data"]),
                "imgsz": int(self.opts.get("imgsz") or DEFAULTS["imgsz"]), "nc": self.data["nc"],
                "names": self.data["names"]}


class _EpochLog:
    """metrics.jsonl (one train and one eval record per epoch) and loss.png, fed by an Ultralytics callback."""

    def __init__(self, run_dir: Path):
        from lorafit.train.progress import MetricsLog

        self.run_dir = run_dir
        self.log = MetricsLog(run_dir / "metrics.jsonl")

    def on_epoch(self, trainer) -> None:
        if trainer.tloss is None or trainer.epoch >= trainer.epochs:  # the final re-validation reports epochs + 1
            return
        step = trainer.epoch + 1
        loss = float(sum(float(v) for v in trainer.tloss.values()))
        self.log.log({"kind": "train", "step": step, "epoch": step, "loss": round(loss, 6)})
        metrics = trainer.metrics or {}
        val_loss = sum(float(v) for k, v in metrics.items() if k.startswith("val/"))
        self.log.log({"kind": "eval", "step": step, "eval_loss": round(val_loss, 6), **rename_metrics(metrics)})

    def close(self) -> None:
        from lorafit.train.progress import plot_loss

        self.log.close()
        if self.log.records:
            plot_loss(self.log.records, self.run_dir / "loss.png", title="detect: loss per epoch")


def _count(trainer) -> tuple[int, int]:
    """(trainable, total) parameters of the trained model, not counting a modules_to_save original."""
    model = trainer.ema.ema if trainer.ema else trainer.model
    trainable = total = 0
    for name, p in model.named_parameters():
        if ".original_module." in f".{name}":
            continue
        total += p.numel()
        if getattr(trainer, "lora_config", None) is None or name in getattr(trainer, "_trainable", ()):
            trainable += p.numel()
    return trainable, total


def _base_bytes(model_path: str, base_params: int) -> int:
    """The base checkpoint's file size, or fp32 parameter bytes for a yaml-built model."""
    p = Path(model_path)
    return p.stat().st_size if p.suffix == ".pt" and p.is_file() else 4 * base_params


def read_job(directory: str | Path) -> dict:
    path = Path(directory) / "lorafit_job.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LorafitError(f"{path}: missing (not a detect adapter directory)") from None
