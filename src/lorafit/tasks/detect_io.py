"""``lorafit eval`` / ``lorafit merge`` for ``--task detect``: the reload hooks of the detect task.

Training a detector goes through Ultralytics' own trainer (:meth:`lorafit.tasks.detect.Task.run`);
evaluating or merging a finished adapter does not, so it uses the generic reload path of
:mod:`lorafit.train.reload` with the hooks below, mixed into the detect ``Task``:

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
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from lorafit.common.files import read_json
from lorafit.common.errors import LorafitError

JOB_FILE = "lorafit_job.json"


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
    from datetime import datetime

    import torch

    from lorafit.tree import lora_layers, saved_modules
    from lorafit.integrations.ultralytics import configure_offline

    if lora_layers(model) or saved_modules(model) or "fuse" in model.__dict__:
        raise LorafitError("save_detector_checkpoint: merge the adapters first (merged_copy)")
    configure_offline()
    from ultralytics import __version__
    from ultralytics.utils import DEFAULT_CFG_KEYS

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
    """Hooks of :mod:`lorafit.tasks` used by ``lorafit eval`` / ``merge`` (mixed into the detect ``Task``).

    Expects ``self.opts`` and ``self.model_path`` (set by the task's ``__init__``).
    """

    eval_data_option = "data"  # `lorafit eval --data FILE.yaml`, not --eval
    needs_job_info = True  # without lorafit_job.json the base is unknown: the default yaml is never it
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
        from lorafit.integrations.ultralytics import detect_head, load_detector

        yaml = str(self.model_path).endswith((".yaml", ".yml"))
        model = load_detector(self.model_path, nc=self.nc if yaml else None)
        if self.names is None:  # a plain or merged checkpoint: its own classes
            self.names = _names(getattr(model, "names", None))
            self.nc = int(detect_head(model).nc)
        return model

    def load_adapter(self, model, directory):
        from lorafit.integrations.ultralytics import load_detector_adapter

        return load_detector_adapter(model, directory)

    def merge_model(self, model):
        """A plain DetectionModel: adapters merged, wrappers and the merge-before-fuse guard gone."""
        from lorafit.integrations.ultralytics import merged_copy

        return merged_copy(model)

    def read_eval(self, path) -> list[str]:
        """Check ``path`` (a data.yaml) and return its val images; the classes must be the model's."""
        from lorafit.datasets.yolo_format import _images, check_detect_data, write_normalised_yaml

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
        from lorafit.tasks.detect import DEFAULTS, evaluate_detector

        imgsz = int(self.opts.get("imgsz") or self.job.get("imgsz") or DEFAULTS["imgsz"])
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
        import torch

        from lorafit.common.files import write_json

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
