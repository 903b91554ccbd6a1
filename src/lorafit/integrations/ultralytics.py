"""LoRA for Ultralytics YOLO detectors (``DetectionModel``): targets, offline setup, merge, load.

Ultralytics has no LoRA, and its machinery defeats a naive one (see ``docs/vision.md``). This module
holds the model-level pieces; :mod:`lorafit.integrations.yolo_trainer` owns the training loop.

* **Targets.** ``all`` = every dense (groups == 1) ``nn.Conv2d`` except the fixed ``dfl`` conv;
  ``backbone`` / ``neck`` / ``head`` split the layer list where the model's yaml does (so yolov8 and
  yolo11 both work); anything else is a regex matched (full match) against module names. Depthwise
  and grouped convs are left out: a rank-r update is as large as the depthwise weight itself.
* **New classes.** When the dataset's class count differs from the checkpoint's, Ultralytics
  rebuilds the class-output convs (``cv3[i][-1]``) with fresh weights; they are trained fully as
  ``modules_to_save`` and saved with the adapter, and :func:`load_detector_adapter` rebuilds them
  (plus ``nc`` / ``no`` / ``names``) before loading, so base checkpoint + adapter = trained model.
* **Fusion.** ``DetectionModel.fuse`` assigns ``conv.weight`` on every Conv+BN pair, which a LoRA
  wrapper cannot take. :func:`inject_detector` installs a per-instance ``fuse`` that merges the
  adapters first (``lorafit.merge_and_unload``); validators and exporters fuse a deep copy, so the
  adapter in training stays intact.
* **Offline.** :func:`configure_offline` must run before ``import ultralytics``: it sets
  ``YOLO_OFFLINE=1``, ``YOLO_AUTOINSTALL=false``, a private ``YOLO_CONFIG_DIR``, places a TTF font
  where the dataset check looks for ``Arial.ttf`` (matplotlib's DejaVuSans) and turns off analytics
  sync and logger integrations in Ultralytics' settings file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from copy import deepcopy
from pathlib import Path

import torch
import torch.nn as nn

import lorafit
from lorafit.common.errors import LorafitError
from lorafit.common.matching import name_matches
from lorafit.common.files import write_json
from lorafit.layers import LoraLayer
from lorafit.tree import lora_layers, saved_modules

PRESETS = ("all", "backbone", "neck", "head")
DETECT_META = "lorafit_detect.json"
_SETTINGS_OFF = ("sync", "clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb", "hub")


def default_config_dir() -> Path:
    """The private Ultralytics config dir lorafit uses when ``YOLO_CONFIG_DIR`` is unset."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lorafit" / "ultralytics"


def _place_fonts(user_dir: Path) -> None:
    """Copy matplotlib's DejaVuSans.ttf to the names Ultralytics looks up (it downloads them otherwise)."""
    import matplotlib  # lazy: only its font file is needed, and only when Ultralytics is set up

    src = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    user_dir.mkdir(parents=True, exist_ok=True)
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        dst = user_dir / name
        if not dst.exists() and src.exists():
            shutil.copyfile(src, dst)


def configure_offline(config_dir: str | Path | None = None):
    """Make Ultralytics work with no network, then import and return the ``ultralytics`` module.

    Environment variables are only set when unset (``setdefault``), so a user's own choice wins;
    they take effect only if ``ultralytics`` was not imported yet (it reads them at import).

    Raises:
        LorafitError: ultralytics is not installed.
    """
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(config_dir or default_config_dir()))
    cfg = Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics"
    _place_fonts(cfg)
    try:  # lazy: optional extra lorafit[yolo]; the environment above must be set first
        import ultralytics
        from ultralytics.utils import SETTINGS, USER_CONFIG_DIR  # lazy: as above
    except ImportError as exc:
        raise LorafitError(f"detection needs Ultralytics ({exc.name or exc}): pip install 'lorafit[yolo]' "
                           "(see scripts/setup_vision_env.sh)") from None
    _place_fonts(Path(USER_CONFIG_DIR))  # in case ultralytics was imported before with another dir
    off = {k: False for k in _SETTINGS_OFF if k in SETTINGS and SETTINGS[k] is not False}
    if off:
        SETTINGS.update(off)
    return ultralytics


# ----------------------------------------------------------------------------------------- structure
def detect_head(model: nn.Module) -> nn.Module:
    """The ``Detect`` module (last layer of ``model.model``)."""
    head = model.model[-1]
    if not hasattr(head, "cv3") or not hasattr(head, "nc"):
        raise LorafitError(f"{type(model).__name__}: last layer {type(head).__name__} is not a YOLO Detect head")
    return head


def layer_index(name: str) -> int | None:
    """``model.12.cv1.conv`` -> 12 (the index in ``DetectionModel.model``), else None."""
    m = re.match(r"model\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def dense_convs(model: nn.Module) -> list[str]:
    """Names of every dense Conv2d (groups == 1) except the fixed DFL projection, in module order."""
    out = []
    for name, mod in model.named_modules():
        base = mod.base_layer if isinstance(mod, LoraLayer) else mod
        if ".base_layer" in name or ".original_module" in name or ".modules_to_save." in name:
            continue
        if isinstance(base, nn.Conv2d) and base.groups == 1 and ".dfl" not in f".{name}":
            out.append(name)
    return out


def class_conv_names(model: nn.Module) -> list[str]:
    """The class-output convs of the Detect head (``cv3[i][-1]``, and ``one2one_cv3`` when present)."""
    head = detect_head(model)
    idx = len(model.model) - 1
    names = []
    for attr in ("cv3", "one2one_cv3"):
        branches = getattr(head, attr, None)
        if branches is None:
            continue
        for i, seq in enumerate(branches):
            names.append(f"model.{idx}.{attr}.{i}.{len(seq) - 1}")
    return names


def resolve_targets(model: nn.Module, targets: str | list[str] = "all", exclude=()) -> list[str]:
    """Turn ``--targets`` into the explicit list of conv names to adapt.

    Args:
        model: a DetectionModel.
        targets: comma list of presets (``all``, ``backbone``, ``neck``, ``head``), or a regex
            matched (full match) against module names; a list is joined with commas.
        exclude: names never adapted (the class convs when they are ``modules_to_save``).

    Raises:
        LorafitError: the text matched no dense conv (the message shows a few names to pick from).
    """
    text = ",".join(targets) if isinstance(targets, (list, tuple)) else str(targets).strip()
    convs = [n for n in dense_convs(model) if n not in set(exclude)]
    n_backbone = len(model.yaml.get("backbone", [])) if isinstance(getattr(model, "yaml", None), dict) else None
    last = len(model.model) - 1
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if parts and all(p in PRESETS for p in parts):
        if n_backbone is None and any(p in ("backbone", "neck") for p in parts):
            raise LorafitError("--targets backbone/neck need the model's yaml (model.yaml) to split the layers")

        def section(name: str) -> str:
            i = layer_index(name)
            return "head" if i == last else ("backbone" if i is not None and i < n_backbone else "neck")

        chosen = [n for n in convs if "all" in parts or section(n) in parts]
    else:
        try:
            rx = re.compile(text)
        except re.error as exc:
            raise LorafitError(f"--targets: {text!r} is neither a preset ({', '.join(PRESETS)}) nor a valid "
                               f"regex ({exc})") from None
        chosen = [n for n in convs if name_matches(rx.pattern, n)]  # the rule inject uses for a regex
    if not chosen:
        raise LorafitError(f"--targets {text!r} matched no dense Conv2d of the detector (e.g. {', '.join(convs[:3])})")
    return chosen


def detector_config(model: nn.Module, rank: int = 8, alpha: float | None = None, targets="all",
                    dropout: float = 0.0, new_classes: bool = False):
    """The LoraConfig for a detector: explicit target names, class convs as modules_to_save if new."""
    saved = class_conv_names(model) if new_classes else None
    names = resolve_targets(model, targets, exclude=saved or ())
    return lorafit.LoraConfig(r=rank, alpha=2.0 * rank if alpha is None else alpha, dropout=dropout,
                      target_modules=names, modules_to_save=saved)


class FirstOutput(nn.Module):
    """Export wrapper: YOLO's eval forward returns (predictions [N, 4 + nc, anchors], features)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)
        return y[0] if isinstance(y, (list, tuple)) else y


# ----------------------------------------------------------------------------------------- inject / merge
class MergeBeforeFuse:
    """Per-instance replacement of ``DetectionModel.fuse``: merge the LoRA adapters, then fuse.

    A callable object rather than a bound method so it survives ``deepcopy`` (EMA, validators,
    exporters copy the model; the copy's guard points at the copy) and pickling.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        model = self.model
        if lora_layers(model) or saved_modules(model):
            lorafit.merge_and_unload(model)
        model.__dict__.pop("fuse", None)
        return type(model).fuse(model, *args, **kwargs)


def inject_detector(model: nn.Module, config, adapter: str = "default") -> nn.Module:
    """``lorafit.inject`` plus the merge-before-fuse guard. Returns the same model."""
    if getattr(model, "is_fused", lambda: False)():
        raise LorafitError("the detector is already fused (Conv+BN folded): LoRA needs the unfused checkpoint")
    lorafit.inject(model, config, adapter=adapter)
    model.fuse = MergeBeforeFuse(model)
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A deep copy with the adapters merged and every wrapper unloaded: a plain DetectionModel."""
    copy = deepcopy(model)
    lorafit.merge_and_unload(copy)
    copy.__dict__.pop("fuse", None)
    return copy


# ----------------------------------------------------------------------------------------- save / load
def save_detector_adapter(model: nn.Module, directory, base: str | None = None, adapter: str = "default",
                          imgsz: int | None = None) -> Path:
    """Save the adapter (PEFT format) plus ``lorafit_detect.json`` (classes, count, train size) beside it."""
    directory = Path(directory)
    lorafit.save_adapter(model, directory, adapter=adapter, base_model_name_or_path=base)
    names = getattr(model, "names", None) or {}
    names = {int(k): str(v) for k, v in (names.items() if isinstance(names, dict) else enumerate(names))}
    meta = {"nc": int(detect_head(model).nc), "names": names, "base_model": base, "imgsz": imgsz}
    write_json(directory / DETECT_META, meta)
    return directory


def rebuild_class_convs(model: nn.Module, nc: int, names: dict | None = None) -> None:
    """Give the Detect head ``nc`` classes: fresh class-output convs, and ``nc`` / ``no`` / names.

    The hidden widths of the class branch only depend on ``nc`` above the P3 width (min(nc, 100)
    vs ch[0]); a change there cannot be expressed by an adapter and is refused.
    """
    head = detect_head(model)
    for name in class_conv_names(model):
        *path, last = name.split(".")
        parent = model.get_submodule(".".join(path))
        old = getattr(parent, last) if not last.isdigit() else parent[int(last)]
        new = nn.Conv2d(old.in_channels, nc, 1).to(old.weight.device, old.weight.dtype)
        parent[int(last)] = new
    head.nc, head.no = nc, nc + head.reg_max * 4
    model.nc = nc
    if isinstance(getattr(model, "yaml", None), dict):
        model.yaml["nc"] = nc
    model.names = dict(names) if names else {i: str(i) for i in range(nc)}


def load_detector_adapter(model: nn.Module, directory, adapter: str = "default") -> nn.Module:
    """Load a detect adapter into ``model`` (e.g. ``YOLO(path).model``), rebuilding new class convs.

    Raises:
        LorafitError: one line naming the file when the adapter does not fit this architecture.
    """
    directory = Path(directory)
    meta_file = directory / DETECT_META
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
            nc, names = int(meta["nc"]), {int(k): v for k, v in meta.get("names", {}).items()}
        except (ValueError, KeyError, TypeError) as exc:
            raise LorafitError(f"{meta_file}: invalid detect metadata ({exc})") from None
        if nc != detect_head(model).nc:
            rebuild_class_convs(model, nc, names)
        elif names:
            model.names = names
    try:
        lorafit.load_adapter(model, directory, adapter=adapter)
    except ValueError as exc:
        raise LorafitError(str(exc).splitlines()[0]) from None
    model.fuse = MergeBeforeFuse(model)
    return model


def load_detector(spec: str | Path, nc: int | None = None, verbose: bool = False) -> nn.Module:
    """A DetectionModel from ``yolov8n.yaml`` / ``yolo11n.yaml`` (random weights) or a local ``.pt``.

    Never downloads: a ``.pt`` that is not a local file is an error (Ultralytics would fetch it).

    Raises:
        LorafitError: missing file, unreadable checkpoint, or not a detection model.
    """
    configure_offline()
    from ultralytics.nn.tasks import DetectionModel, load_checkpoint  # lazy: optional extra lorafit[yolo]

    text = str(spec)
    if text.endswith((".yaml", ".yml")):
        try:
            return DetectionModel(text, nc=nc, verbose=verbose)
        except (FileNotFoundError, OSError) as exc:
            raise LorafitError(f"{text}: model yaml not found ({exc})") from None
    path = Path(text)
    if not path.is_file():
        raise LorafitError(f"{text}: no such model file (lorafit never downloads weights offline; pass a local "
                           ".pt or a model yaml such as yolov8n.yaml)")
    try:
        model, _ = load_checkpoint(str(path))
    except Exception as exc:  # noqa: BLE001 - torch/pickle raise many types for a bad file
        raise LorafitError(f"{path}: not a readable Ultralytics checkpoint ({type(exc).__name__})") from None
    if not isinstance(model, DetectionModel):
        raise LorafitError(f"{path}: holds a {type(model).__name__}, not a YOLO DetectionModel")
    return model.float()
