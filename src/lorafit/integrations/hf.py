"""transformers' `Trainer` and TRL's `SFTTrainer` on a lorafit-injected model.

Passing the model needs no code either: an injected transformers model carries transformers' own
"adapters attached" flag (``_hf_peft_config_loaded``, set by `lorafit.io`), so the Trainer accepts a
bitsandbytes-quantized base (QLoRA) it would refuse as "purely quantized".

Saving needs no code: an injected transformers model's ``save_pretrained`` writes its adapters in
PEFT's format (`lorafit.io.save_pretrained`), and that is what ``Trainer._save`` calls for every
checkpoint and for ``save_model``. A checkpoint is then ``adapter_config.json`` +
``adapter_model.safetensors`` + ``README.md`` beside the trainer's own optimizer / scheduler / RNG
state, and it loads with ``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM`` and
`lorafit.load_adapter`.

Reading a checkpoint back is the trainer's decision, and transformers decides on the class: only a
``peft.PeftModel`` has its adapter files read (``_load_from_checkpoint``, ``_load_best_model``);
any other model must have ``model.safetensors`` (the whole model) there, and an adapter checkpoint
fails with "Can't find a checkpoint index". `adapter_trainer` is the one line that makes both
readers take adapter checkpoints: ``resume_from_checkpoint`` and ``load_best_model_at_end`` then
copy the saved adapters into the model's existing ones (`lorafit.reload_adapter`: the optimizer's
parameters stay the same objects, so its restored state applies). Nothing here imports
transformers or trl: the trainer is duck typed, and checkpoints that are not lorafit adapters
(a model that was not injected, FSDP or DeepSpeed directories) go to the trainer's own reader.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch.nn as nn

from lorafit.io import CONFIG_NAME, reload_adapter
from lorafit.tree import adapter_configs

log = logging.getLogger("lorafit")


def _unwrap(model: nn.Module) -> nn.Module:
    """The model under DDP's ``.module`` and torch.compile's ``._orig_mod`` wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _adapter_dirs(model: nn.Module, checkpoint) -> dict[str, Path] | None:
    """{adapter: its directory in the checkpoint} in `lorafit.io.save_pretrained`'s layout ("default" at
    the top, others in sub-directories), or None when the checkpoint holds no lorafit adapter."""
    root = Path(checkpoint)
    dirs = {name: root if name == "default" else root / name for name in adapter_configs(model)}
    if not dirs or not any((d / CONFIG_NAME).is_file() for d in dirs.values()):
        return None
    return dirs


def reload_checkpoint(model: nn.Module, checkpoint) -> list[str]:
    """Copy every adapter saved in a trainer checkpoint into `model`'s adapter of the same name.

    Every adapter the model has must be in the checkpoint (all are saved with it); each is checked
    completely before it is copied (`lorafit.reload_adapter`).

    Returns:
        the names reloaded.
    Raises:
        ValueError: one line naming the file (missing adapter, key or shape that does not fit).
    """
    model = _unwrap(model)
    dirs = _adapter_dirs(model, checkpoint) or {}
    for name, directory in dirs.items():
        if not (directory / CONFIG_NAME).is_file():
            raise ValueError(f"{directory}: no {CONFIG_NAME}: the checkpoint lacks adapter {name!r}")
    for name, directory in dirs.items():
        reload_adapter(model, directory, name)
    return list(dirs)


def adapter_trainer(trainer):
    """Make a transformers `Trainer` (or TRL `SFTTrainer`, or any subclass) resume from, and load its
    best model out of, the adapter checkpoints a lorafit-injected model writes.

    Replaces the instance's ``_load_from_checkpoint`` and ``_load_best_model`` by versions that reload
    lorafit adapter checkpoints (`reload_checkpoint`) and hand anything else to the originals.

    Returns:
        the same trainer (``trainer = adapter_trainer(SFTTrainer(...))`` reads as one line).
    Raises:
        ValueError: ``trainer.model`` has no lorafit adapter (inject before building the trainer).
    """
    if not adapter_configs(_unwrap(trainer.model)):
        raise ValueError("adapter_trainer: trainer.model has no lorafit adapter; lorafit.inject it first")
    resume, best = trainer._load_from_checkpoint, trainer._load_best_model

    def load_from_checkpoint(resume_from_checkpoint, model=None):
        target = _unwrap(model if model is not None else trainer.model)
        if _adapter_dirs(target, resume_from_checkpoint) is None:
            return resume(resume_from_checkpoint, model)
        names = reload_checkpoint(target, resume_from_checkpoint)
        log.info("resumed adapter(s) %s from %s", ", ".join(names), resume_from_checkpoint)
        return None

    def load_best_model():
        checkpoint = trainer.state.best_model_checkpoint
        target = _unwrap(trainer.model)
        if checkpoint is None or _adapter_dirs(target, checkpoint) is None:
            return best()
        names = reload_checkpoint(target, checkpoint)
        log.info("loaded the best adapter(s) %s from %s", ", ".join(names), checkpoint)
        return None

    trainer._load_from_checkpoint = load_from_checkpoint
    trainer._load_best_model = load_best_model
    return trainer
