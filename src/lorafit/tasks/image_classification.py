"""Image classification: ``lorafit train --task image-classification --model timm:NAME --train DIR``.

Models: ``timm:<name>`` or ``torchvision:<name>`` built with random weights (offline), optionally
``...@FILE`` to load a local checkpoint (a state dict in .safetensors / .pt / .pth; the classifier
rows are dropped when the class count differs). Data: ImageFolder directories (one sub-directory
per class) for ``--train`` and the optional ``--eval``; images are resized to ``--imgsz`` (default
224) and normalised with ImageNet statistics.

Targets (``--targets``, default ``auto``):

* ``vit`` = ``qkv`` + ``proj`` + ``mlp``: timm's fused ``attn.qkv`` Linear, ``attn.proj`` and
  ``mlp.fc1/fc2`` (regexes anchored on ``blocks.N`` so ``patch_embed.proj``, a Conv2d, is not
  hit); for torchvision's ViT, ``qkv``/``proj`` mean the ``nn.MultiheadAttention`` module itself,
  which the core adapts as a whole (its forward reads ``out_proj.weight`` directly, so wrapping
  ``out_proj`` alone would be silently bypassed), and ``mlp`` the MLP block's Linear layers.
* ``convs``: every dense Conv2d (groups == 1; depthwise convs are skipped by the core's rule).
* ``auto``: ``vit`` when the model has attention blocks, else ``convs``.
* anything else: the usual ``--targets`` forms (comma list of names / suffixes, or a regex).

The classifier (the last Linear with ``num_classes`` outputs) is new, so it is trained fully and
saved with the adapter (``modules_to_save``). The chosen preset is written back into
``opts["targets"]`` as the explicit regex (so ``config.yaml`` records what was adapted).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from copy import deepcopy
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import lorafit
from lorafit.common.errors import LorafitError
from lorafit.common.files import read_json
from lorafit.tasks import ExportPair, LabelFiles, LoopTask
from lorafit.tasks.base import load_checked, run_seed
from lorafit.train.data import take_samples
from lorafit.train.options import parse_targets

DEFAULTS = {"model": "timm:vit_tiny_patch16_224", "targets": "auto", "batch_size": 32, "lr_lora": 2e-3,
            "lr_full": 1e-4, "imgsz": 224, "eval_batch_size": 64}
NOT_APPLICABLE = {
    "text_column": "--train / --eval are ImageFolder directories, not tables",
    "label_column": "labels are the ImageFolder sub-directory names",
    "max_length": "a token count; this task reads images (see --imgsz)",
    "packing": "packing joins causal-lm texts",
    "attn_implementation": "a transformers setting; timm / torchvision models bring their own attention",
    "data": "--data is a detection data.yaml; give ImageFolder --train / --eval directories",
}
IMG_SUFFIXES = {".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp"}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PRESET_WORDS = ("auto", "vit", "qkv", "proj", "mlp", "convs")


def parse_model_spec(spec: str) -> tuple[str, str, str | None]:
    """``timm:vit_small_patch16_224@/w.safetensors`` -> ("timm", "vit_small_patch16_224", "/w.safetensors")."""
    lib, _, rest = str(spec).partition(":")
    if lib not in ("timm", "torchvision") or not rest:
        raise LorafitError(f"--model {spec}: expected timm:<name> or torchvision:<name> (optionally @CHECKPOINT)")
    name, _, ckpt = rest.partition("@")
    return lib, name, ckpt or None


def create_model(spec: str, num_classes: int, imgsz: int) -> nn.Module:
    """Build the model with random weights (never downloads), then load the optional local checkpoint."""
    lib, name, ckpt = parse_model_spec(spec)
    try:
        if lib == "timm":
            import timm  # lazy: optional extra lorafit[vision]

            try:
                model = timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=imgsz)
            except TypeError:  # CNNs take any size and no img_size argument
                model = timm.create_model(name, pretrained=False, num_classes=num_classes)
        else:
            import torchvision  # lazy: optional extra lorafit[vision]

            try:
                model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, image_size=imgsz)
            except TypeError:
                model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise LorafitError(f"--model {spec}: unknown or unbuildable {lib} model ({str(exc).splitlines()[0]})") from None
    if ckpt:
        load_local_weights(model, Path(ckpt), classifier_name(model, num_classes))
    return model


def load_local_weights(model: nn.Module, path: Path, head: str) -> None:
    """Load a local state dict; classifier tensors of another shape are skipped (new classes)."""
    if not path.is_file():
        raise LorafitError(f"{path}: checkpoint file not found")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    except Exception as exc:  # noqa: BLE001 - safetensors / torch raise many types for a bad file
        raise LorafitError(f"{path}: not a readable state dict ({type(exc).__name__})") from None
    own = model.state_dict()
    keep = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    bad = [k for k in state if k in own and k not in keep and not k.startswith(head + ".")]
    if bad or not keep:
        first = bad[0] if bad else next(iter(state), "(empty)")
        raise LorafitError(f"{path}: does not fit this architecture (key {first!r})")
    model.load_state_dict(keep, strict=False)


def classifier_name(model: nn.Module, num_classes: int) -> str:
    """Name of the classification head: the last Linear with ``num_classes`` outputs."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not names:
        raise LorafitError(f"{type(model).__name__}: no Linear classifier with {num_classes} outputs found")
    return names[-1]


def preset_targets(model: nn.Module, text: str, head: str) -> str | list[str]:
    """``--targets`` -> what LoraConfig takes; presets become one explicit regex."""
    words = [w.strip() for w in str(text).split(",") if w.strip()]
    if not words or not all(w in PRESET_WORDS for w in words):
        return parse_targets(text)
    has_mha = any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    has_qkv = any(n.endswith(".attn.qkv") for n, _ in model.named_modules())
    if "auto" in words:
        words = ["vit"] if (has_mha or has_qkv) else ["convs"]
    if "vit" in words:
        words = ["qkv", "proj", "mlp"]
    parts = []
    if "convs" in words:
        convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
                 and m.groups == 1 and n != head]
        parts += [re.escape(n) for n in convs]
    if has_mha and ({"qkv", "proj"} & set(words)):
        parts.append(r".*\.self_attention")  # torchvision: the MHA module (in- and out-projection)
    elif "qkv" in words or "proj" in words:
        sub = "|".join(w for w in ("qkv", "proj") if w in words)
        parts.append(rf".*blocks\.\d+\.attn\.({sub})")
    if "mlp" in words:
        parts.append(r".*blocks\.\d+\.mlp\.fc[12]" if not has_mha else r".*encoder_layer_\d+\.mlp\.[03]")
    if not parts:
        raise LorafitError(f"--targets {text}: the preset matched nothing in this model")
    return "(" + "|".join(parts) + ")"


def scan_image_folder(directory, classes: list[str] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """ImageFolder layout -> (class names, [(image path, class index)]). Errors name the directory."""
    root = Path(directory)
    if not root.is_dir():
        raise LorafitError(f"{root}: not a directory (expected an ImageFolder: one sub-directory per class)")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise LorafitError(f"{root}: no class sub-directories (expected ROOT/<class>/<image>)")
    classes = classes or found
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise LorafitError(f"{root / unknown[0]}: class {unknown[0]!r} was never seen in training")
    rows = []
    for c in found:
        files = sorted(p for p in (root / c).rglob("*") if p.suffix.lower() in IMG_SUFFIXES)
        if not files:
            raise LorafitError(f"{root / c}: class directory holds no images")
        rows += [(str(p), classes.index(c)) for p in files]
    return classes, rows


def load_image(path: str, size: int) -> torch.Tensor:
    """RGB image -> normalised float tensor [3, size, size]."""
    from PIL import Image  # lazy: PIL is needed only to read images

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, ValueError, even ImportError (format plugins)
        raise LorafitError(f"{path}: cannot read image ({type(exc).__name__})") from None
    x = torch.from_numpy(arr).permute(2, 0, 1)
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def freeze_batchnorm_stats(model: nn.Module) -> None:
    """Put every BatchNorm in eval mode (the loop's ``model.train()`` put them in train mode).

    Why: in train mode BN normalises with the batch's statistics and moves its running statistics,
    buffers of the frozen base that the adapter does not carry; base + adapter would then not be
    the trained model (a ResNet's logits moved by 0.1 on reload). In eval mode the base's statistics
    stay as loaded, and the result no longer depends on how a batch is cut into micro-batches or
    processes. Same rule as the detect task (``integrations.yolo_trainer``); a full fine-tune saves
    the whole state dict, buffers included, so it trains BN as usual.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            m.eval()


def saved_model_spec(model: str) -> tuple[str, str]:
    """``--model``: a spec, or a directory written by ``lorafit merge`` / ``--full-finetune``.

    Such a directory holds ``model.safetensors`` and ``lorafit_job.json`` (whose ``model`` is the
    spec it was built from), so it is rebuilt as ``<that spec>@DIR/model.safetensors``: the same
    architecture with the saved weights. Returns (the base spec to record, the spec to build).
    """
    d = Path(model)
    if not d.is_dir():
        return model, model
    job, weights = d / "lorafit_job.json", d / "model.safetensors"
    if not weights.is_file():
        raise LorafitError(f"--model {model}: no model.safetensors in this directory (expected a `lorafit merge` "
                           "or --full-finetune output, or timm:<name> / torchvision:<name>)")
    try:
        base = str(json.loads(job.read_text(encoding="utf-8"))["model"])
    except FileNotFoundError:
        raise LorafitError(f"{job}: missing (it names the architecture of {weights})") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise LorafitError(f"{job}: not valid JSON with a 'model' key") from None
    lib, name, _ = parse_model_spec(base)
    return base, f"{lib}:{name}@{weights}"


class Task(LabelFiles, LoopTask):
    """``--task image-classification`` (see :class:`lorafit.tasks.base.Task` for the contract)."""

    labels_needed_by = "an image-classification adapter"

    name = "image-classification"
    primary_metric = "eval_accuracy"
    greater_is_better = True
    DEFAULTS = DEFAULTS
    NOT_APPLICABLE = NOT_APPLICABLE
    compile_fullgraph = False  # timm / torchvision models vary; a graph break must not fail the run
    exports = True

    def __init__(self, opts: dict[str, Any]):
        self.opts = opts
        self.model_path = str(opts["model"])
        self.base_spec, self.spec = saved_model_spec(self.model_path)
        parse_model_spec(self.spec)
        self.imgsz = int(opts.get("imgsz") or DEFAULTS["imgsz"])
        self.labels: list[str] | None = None
        self.head: str | None = None
        self.n_train = self.n_eval = 0

    def load_data(self):
        if not self.opts.get("train"):
            raise LorafitError("--train is required for image-classification (an ImageFolder directory)")
        self.labels, train = scan_image_folder(self.opts["train"])
        if len(self.labels) < 2:
            raise LorafitError(f"{self.opts['train']}: needs at least 2 class sub-directories")
        train = take_samples(train, self.opts.get("max_samples"), self.opts["seed"])
        evaluation = scan_image_folder(self.opts["eval"], self.labels)[1] if self.opts.get("eval") else []
        self.n_train, self.n_eval = len(train), len(evaluation)
        return train, evaluation

    def describe(self) -> str:
        return (f"{self.n_train} train / {self.n_eval} eval images at {self.imgsz}px, {len(self.labels)} classes "
                f"({', '.join(self.labels[:8])}{', ...' if len(self.labels) > 8 else ''})")

    def build_model(self) -> nn.Module:
        model = create_model(self.spec, len(self.labels), self.imgsz)
        self.head = classifier_name(model, len(self.labels))
        if not self.opts.get("full_finetune"):
            targets = preset_targets(model, self.opts["targets"], self.head)
            self.opts["targets"] = targets if isinstance(targets, str) else ",".join(targets)
        return model

    def lora_kwargs(self) -> dict[str, Any]:
        return {"modules_to_save": [self.head], "exclude_modules": [self.head]}

    def enable_grad_checkpointing(self, model: nn.Module) -> None:
        setter = getattr(model, "set_grad_checkpointing", None)
        if setter is None:
            raise LorafitError(f"--grad-checkpointing: {self.model_path} does not support it")
        setter(True)

    # ------------------------------------------------------------------ loop
    def collate(self, rows) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.stack([load_image(p, self.imgsz) for p, _ in rows]),
                "labels": torch.tensor([y for _, y in rows])}

    def count(self, batch) -> int:
        return int(batch["labels"].numel())

    def loss_sum(self, model: nn.Module, batch) -> torch.Tensor:
        if not self.opts.get("full_finetune"):
            freeze_batchnorm_stats(model)
        logits = model(batch["pixel_values"])
        return nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum")

    def read_eval(self, path) -> list[tuple[str, int]]:
        """``lorafit eval --eval DIR``: an ImageFolder whose classes are among the restored labels."""
        return scan_image_folder(path, self.labels)[1]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, rows, batch_size: int, device: torch.device) -> dict[str, float]:
        correct, loss = 0, 0.0
        for i in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in self.collate(rows[i: i + batch_size]).items()}
            logits = model(batch["pixel_values"]).float()
            loss += float(nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
        return {"eval_accuracy": correct / len(rows), "eval_loss": loss / len(rows)}

    # --------------------------------------------------------------- files
    def job_info(self) -> dict[str, Any]:
        return {"task": self.name, "model": self.base_spec, "imgsz": self.imgsz, "num_labels": len(self.labels),
                "head": self.head, "seed": self.opts.get("seed")}

    def save_full(self, model: nn.Module, directory: Path) -> None:
        """``model.safetensors`` (the whole state dict) plus labels and job info."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
        self.save_extras(directory)

    export_merged = save_full

    # --------------------------------------------------------------- export
    @classmethod
    def recognizes_model(cls, spec: str) -> bool:
        return str(spec).startswith(("timm:", "torchvision:"))

    @classmethod
    def load_for_export(cls, model_spec: str, adapter_dir: Path, imgsz: int | None) -> ExportPair:
        job = read_json(adapter_dir / "lorafit_job.json")
        labels = read_json(adapter_dir / "labels.json")
        if not labels:
            raise LorafitError(f"{adapter_dir / 'labels.json'}: missing (an image-classification adapter needs it)")
        imgsz = int(imgsz or job.get("imgsz") or 224)
        torch.manual_seed(run_seed(adapter_dir))
        base = create_model(model_spec, len(labels), int(job.get("imgsz") or imgsz)).eval()
        lora = load_checked(lambda: lorafit.load_adapter(deepcopy(base), adapter_dir), adapter_dir).eval()
        merged = lorafit.merge_and_unload(deepcopy(lora)).eval()
        metadata = {"description": "lorafit merged image classifier", "task": "classify", "imgsz": [imgsz, imgsz],
                    "names": dict(enumerate(labels))}
        return ExportPair(cls.name, base, lora, merged, imgsz, metadata, {"labels": labels}, same_ops=True)

    @classmethod
    def calibration_inputs(cls, data, imgsz: int, limit: int = 32) -> list[np.ndarray]:
        """Every n-th image of the ImageFolder ``data`` (up to ``limit``), preprocessed as in training."""
        _, rows = scan_image_folder(data)
        step = max(1, len(rows) // limit)
        return [load_image(p, imgsz)[None].numpy() for p, _ in rows[::step][:limit]]

    @classmethod
    def evaluate_export(cls, path: Path, predict: Callable[[torch.Tensor], np.ndarray], data, imgsz: int,
                        labels: list | None = None) -> dict[str, float]:
        """Accuracy of the exported model on the ImageFolder ``data``."""
        _, rows = scan_image_folder(data, labels)
        correct = 0
        for i in range(0, len(rows), 32):
            chunk = rows[i: i + 32]
            x = torch.stack([load_image(p, imgsz) for p, _ in chunk])
            pred = predict(x).argmax(-1)
            correct += int((pred == np.array([y for _, y in chunk])).sum())
        return {"eval_accuracy": correct / max(len(rows), 1)}
