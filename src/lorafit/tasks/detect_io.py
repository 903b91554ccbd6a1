"""``lorafit eval`` / ``merge`` / ``export`` for ``--task detect``: the detector I/O of the detect task.

Training a detector goes through Ultralytics' own trainer (:meth:`lorafit.tasks.detect.Task.run`);
evaluating, merging or exporting a finished adapter does not, so it uses the generic paths of
:mod:`lorafit.jobs.reload` and :mod:`lorafit.export` with the hooks below, mixed into the detect
``Task`` (this module imports nothing of :mod:`lorafit.tasks.detect`):

* ``restore`` reads ``lorafit_job.json`` / ``lorafit_detect.json`` (classes) beside the adapter,
  ``build_model`` loads the base (``load_detector``: a local ``.pt`` or a yaml, never a download),
  ``load_adapter`` is :func:`~lorafit.integrations.ultralytics.load_detector_adapter`, which
  rebuilds new class convs before the weights go in (``lorafit.load_adapter`` alone would not).
* ``read_eval`` takes a data.yaml (``lorafit eval --data``, default the one the run recorded):
  checked like training data, and refused when its classes are not the adapter's: mAP on another
  label set would be a number about nothing.
* ``export_merged`` writes ``model.pt``, a plain Ultralytics checkpoint (``YOLO(path)`` loads it,
  no lorafit import needed), in the dtype of ``lorafit merge --dtype`` (default fp32: exactly base +
  adapter; ``fp16`` is what Ultralytics itself writes for ``best.pt``, half the size).
* export: :meth:`DetectReload.load_for_export` rebuilds base / LoRA / merged (fused) detectors,
  calibration and the int8 metric read the data.yaml's val images.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorafit.common.errors import LorafitError
from lorafit.common.files import read_json, write_json
from lorafit.datasets.yolo_format import _images, check_detect_data, write_normalised_yaml
from lorafit.integrations.ultralytics import (
    FirstOutput,
    configure_offline,
    detect_head,
    load_detector,
    load_detector_adapter,
    merged_copy,
)
from lorafit.tasks.base import ExportPair, load_checked, run_seed
from lorafit.tree import lora_layers, saved_modules

JOB_FILE = "lorafit_job.json"
DEFAULT_IMGSZ = 320
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
METRIC_KEYS = {"metrics/mAP50(B)": "eval_mAP50", "metrics/mAP50-95(B)": "eval_mAP50-95",
               "metrics/precision(B)": "eval_precision", "metrics/recall(B)": "eval_recall"}


def rename_metrics(raw: dict[str, Any]) -> dict[str, float]:
    """Ultralytics' result keys -> lorafit's ``eval_*`` keys (only the box metrics)."""
    return {new: round(float(raw[old]), 6) for old, new in METRIC_KEYS.items() if old in raw}


def evaluate_detector(model, data_yaml, imgsz: int, batch: int = 32, device: str = "cpu",
                      rect: bool = True) -> dict[str, float]:
    """mAP50 / mAP50-95 / precision / recall of ``model`` on the data's val split.

    Args:
        model: a DetectionModel (LoRA adapters allowed) or a path Ultralytics loads (.pt, .onnx).
        rect: rectangular val batches, as the trainer's own validation (and ``model.val()``) use:
            the letterbox pads each batch to a stride multiple, so a 96 px image becomes a 128 px
            input. Numbers compare only between runs with the same setting, so everything lorafit
            reports before/after training validates this way; ``rect=False`` (square inputs) is for
            a fixed-shape exported graph (ONNX), which cannot take another input size.

    The validator fuses Conv+BN in the model it is given (and a LoRA'd model's fuse merges the
    adapters first), so an ``nn.Module`` is validated as a deep copy: the caller's model is untouched.
    """
    configure_offline()
    from ultralytics.models.yolo.detect import DetectionValidator  # lazy: optional extra lorafit[yolo]

    if not isinstance(model, (str, Path)):
        model = copy.deepcopy(model)
    args = dict(data=str(data_yaml), imgsz=imgsz, batch=batch, device=device, plots=False, verbose=False,
                split="val", save_json=False, rect=rect, workers=0)
    return rename_metrics(DetectionValidator(args=args)(model=model))


def _names(raw) -> dict[int, str] | None:
    """JSON turns ``{0: "a"}`` into ``{"0": "a"}``; lists are accepted too."""
    if not raw:
        return None
    items = raw.items() if isinstance(raw, dict) else enumerate(raw)
    return {int(k): str(v) for k, v in items}


def ultralytics_device_of(device) -> str:
    """A ``torch.device`` -> Ultralytics' device string ("cpu", "0", ...)."""
    if getattr(device, "type", str(device)) == "cuda":
        return str(device.index or 0)
    return "cpu"


def save_detector_checkpoint(model, path, train_args: dict | None = None, extra: dict | None = None) -> Path:
    """Write ``model`` (a plain, merged DetectionModel) as a final Ultralytics checkpoint.

    The layout is that of Ultralytics' ``strip_optimizer`` output (``model`` set, ``ema`` /
    ``optimizer`` empty, ``epoch`` -1, ``train_args`` limited to Ultralytics' own keys), so
    ``YOLO(path)``, ``yolo val model=path`` and a later ``lorafit train --model path`` all read it.
    Unlike ``strip_optimizer`` the weights keep the dtype they have (Ultralytics always halves):
    ``lorafit merge --dtype`` decides. ``extra`` goes under the key ``lorafit`` (plain strings).

    Raises:
        LorafitError: the model still holds lorafit modules (it would need lorafit to unpickle).
    """
    if lora_layers(model) or saved_modules(model) or "fuse" in model.__dict__:
        raise LorafitError("save_detector_checkpoint: merge the adapters first (merged_copy)")
    configure_offline()
    from ultralytics import __version__  # lazy: optional extra lorafit[yolo] (after configure_offline)
    from ultralytics.utils import DEFAULT_CFG_KEYS  # lazy: optional extra lorafit[yolo]

    args = {k: v for k, v in dict(getattr(model, "args", None) or {}).items() if k in DEFAULT_CFG_KEYS}
    args.update({k: v for k, v in (train_args or {}).items() if k in DEFAULT_CFG_KEYS})
    model.args = args
    if hasattr(model, "criterion"):
        model.criterion = None
    for p in model.parameters():
        p.requires_grad_(False)
    ckpt = {"date": datetime.now().astimezone().isoformat(), "version": __version__,
            "license": "AGPL-3.0 License (https://ultralytics.com/license)", "docs": "https://docs.ultralytics.com",
            "epoch": -1, "best_fitness": None, "model": model, "ema": None, "updates": None, "optimizer": None,
            "train_args": args, "lorafit": dict(extra or {})}
    path = Path(path)
    torch.save(ckpt, path)
    return path


class DetectReload:
    """The eval / merge / export methods of the detect ``Task`` (see :class:`lorafit.tasks.base.Task`).

    Expects ``self.opts`` and ``self.model_path`` (set by the task's ``__init__``).
    """

    eval_data_option = "data"  # `lorafit eval --data FILE.yaml`, not --eval
    needs_job_info = True  # without lorafit_job.json the base is unknown: the default yaml is never it
    exports = True
    names: dict[int, str] | None = None
    nc: int | None = None

    def restore(self, directory) -> None:
        """Classes and run info from the adapter (or from beside a merged ``model.pt``)."""
        d = Path(directory)
        if d.is_file():
            d = d.parent
        self.reload_dir = d
        self.job = read_json(d / JOB_FILE)
        meta = read_json(d / "lorafit_detect.json")
        try:
            self.names = _names(meta.get("names") or self.job.get("names"))
            nc = meta.get("nc") or self.job.get("nc")
            self.nc = int(nc) if nc else (len(self.names) if self.names else None)
        except (TypeError, ValueError, AttributeError) as exc:
            raise LorafitError(f"{d}: invalid class metadata in {JOB_FILE} / lorafit_detect.json ({exc})") from None

    def build_model(self):
        """The base detector, fp32, unfused (a yaml is built with the adapter's class count)."""
        yaml = str(self.model_path).endswith((".yaml", ".yml"))
        model = load_detector(self.model_path, nc=self.nc if yaml else None)
        if self.names is None:  # a plain or merged checkpoint: its own classes
            self.names = _names(getattr(model, "names", None))
            self.nc = int(detect_head(model).nc)
        return model

    def load_adapter(self, model, directory):
        """:func:`~lorafit.integrations.ultralytics.load_detector_adapter`: new class convs rebuilt first."""
        return load_detector_adapter(model, directory)

    def merge_model(self, model):
        """A plain DetectionModel: adapters merged, wrappers and the merge-before-fuse guard gone."""
        return merged_copy(model)

    def read_eval(self, path) -> list[str]:
        """Check ``path`` (a data.yaml) and return its val images; the classes must be the model's."""
        checked = check_detect_data(path, splits=("val",))
        got = checked["names"]
        if self.names is not None and got != self.names:
            def show(n: dict) -> str:
                return f"{len(n)} classes ({', '.join(list(n.values())[:6])}{', ...' if len(n) > 6 else ''})"

            raise LorafitError(f"--data {path}: {show(got)} differ from the model's {show(self.names)}")
        self._tmp = tempfile.TemporaryDirectory(prefix="lorafit-eval-")  # removed with the task
        self.eval_yaml = write_normalised_yaml({**checked, "train": checked["val"]}, Path(self._tmp.name) / "data.yaml")
        return [str(p) for p in _images(checked["val"], Path(checked["path"]), "val", Path(path))]

    def evaluate(self, model, rows, batch_size: int, device) -> dict[str, float]:
        """mAP50 / mAP50-95 / precision / recall, validated as the run's own numbers were (rectangular batches)."""
        imgsz = int(self.opts.get("imgsz") or self.job.get("imgsz") or DEFAULT_IMGSZ)
        return evaluate_detector(model, self.eval_yaml, imgsz, batch_size, ultralytics_device_of(device))

    def reload_info(self) -> dict[str, Any]:
        """lorafit_job.json of a merged output: the run's info, with the classes actually in the model."""
        info = dict(self.job) or {"task": "detect", "model": str(self.model_path)}
        info.update(nc=self.nc, names=self.names)
        if self.opts.get("data"):
            info["data"] = str(self.opts["data"])
        return info

    def export_merged(self, model, directory) -> None:
        """``model.pt`` (plain Ultralytics checkpoint, the dtype ``model`` has) + ``lorafit_job.json``."""
        info = self.reload_info()
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        info.update(merged_from=str(self.reload_dir), dtype=dtype)
        imgsz = int(self.opts.get("imgsz") or info.get("imgsz") or 0) or None
        model.names = dict(self.names or {})
        args = {"task": "detect", **({"imgsz": imgsz} if imgsz else {}),
                **({"data": info["data"]} if info.get("data") else {})}
        with torch.no_grad():
            save_detector_checkpoint(model, Path(directory) / "model.pt", args,
                                     {"base_model": str(info.get("model")), "adapter": str(self.reload_dir),
                                      "dtype": dtype})
        write_json(Path(directory) / JOB_FILE, info)

    # ------------------------------------------------------------------ export
    @classmethod
    def recognizes_model(cls, spec: str) -> bool:
        return str(spec).endswith((".pt", ".yaml", ".yml"))

    @classmethod
    def load_for_export(cls, model_spec: str, adapter_dir: Path, imgsz: int | None) -> ExportPair:
        """Base and merged detectors Conv+BN fused, heads in export mode, wrapped to return the predictions."""
        job = read_json(adapter_dir / JOB_FILE)
        meta = read_json(adapter_dir / "lorafit_detect.json")
        imgsz = int(imgsz or job.get("imgsz") or meta.get("imgsz") or DEFAULT_IMGSZ)
        torch.manual_seed(run_seed(adapter_dir))
        base = load_detector(model_spec, nc=meta.get("nc") if str(model_spec).endswith((".yaml", ".yml")) else None)
        lora = load_checked(lambda: load_detector_adapter(copy.deepcopy(base), adapter_dir), adapter_dir).eval()
        merged = merged_copy(lora).fuse(verbose=False).eval()
        base = copy.deepcopy(base).fuse(verbose=False).eval()
        for m in (base, merged):
            head = detect_head(m)
            head.export, head.format, head.dynamic = True, "onnx", False
        stride = int(max(merged.stride)) if hasattr(merged, "stride") else 32
        names = {int(k): str(v) for k, v in dict(merged.names).items()}
        metadata = {"description": "lorafit merged YOLO detector", "author": "lorafit", "stride": stride,
                    "task": "detect", "batch": 1, "imgsz": [imgsz, imgsz], "names": names, "channels": 3,
                    "args": {"batch": 1, "dynamic": True, "nms": False, "half": False, "int8": False},
                    "end2end": False}
        return ExportPair("detect", FirstOutput(base).eval(), FirstOutput(lora).eval(), FirstOutput(merged).eval(),
                          imgsz, metadata, {"names": names, "nc": int(detect_head(merged).nc)})

    @classmethod
    def calibration_inputs(cls, data, imgsz: int, limit: int = 32) -> list[np.ndarray]:
        """The first ``limit`` val images of the data.yaml ``data``, resized to ``imgsz``, in [0, 1]."""
        from PIL import Image  # lazy: PIL is needed only to read images

        checked = check_detect_data(data)
        files = []
        for entry in checked["val"]:
            files += sorted(q for q in Path(entry).rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
        out = []
        for f in files[:limit]:
            with Image.open(f) as im:
                arr = np.asarray(im.convert("RGB").resize((imgsz, imgsz)), dtype=np.float32) / 255.0
            out.append(arr.transpose(2, 0, 1)[None].copy())
        return out

    @classmethod
    def evaluate_export(cls, path: Path, predict: Callable[[torch.Tensor], np.ndarray], data, imgsz: int,
                        labels: list | None = None) -> dict[str, float]:
        """mAP of the exported file through Ultralytics (which runs it itself), square inputs."""
        return evaluate_detector(str(path), data, imgsz, batch=8, device="cpu", rect=False)  # fixed-shape graph
