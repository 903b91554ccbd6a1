"""Where the LoRA modules of a model are: the model-level view every public function starts from.

`walk` is :func:`lorafit.common.modules.walk` with the wrappers as leaves: a wrapper is one
module (its base layer and adapters are its own business), so nothing ever wraps a wrapped
layer's insides.
"""

from __future__ import annotations

import torch.nn as nn

from .common.modules import walk as walk_modules
from .layers import LoraLayer, ModulesToSave

WRAPPERS = (LoraLayer, ModulesToSave)


def walk(model: nn.Module):
    """Yield (name, module, parent, attr) in named_modules order, not descending into wrappers."""
    return walk_modules(model, leaves=WRAPPERS)


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """(name, wrapper) for every LoRA wrapper in the model."""
    return [(n, m) for n, m, _, _ in walk(model) if isinstance(m, LoraLayer)]


def saved_modules(model: nn.Module) -> list[tuple[str, ModulesToSave]]:
    """(name, wrapper) for every `modules_to_save` wrapper in the model."""
    return [(n, m) for n, m, _, _ in walk(model) if isinstance(m, ModulesToSave)]


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name present in the model, in insertion order."""
    names: dict[str, None] = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.adapters.keys()))
    for _, mod in saved_modules(model):
        names.update(dict.fromkeys(mod.modules_to_save.keys()))
    return list(names)


def active_names(model: nn.Module) -> tuple[str, ...]:
    """The active adapters (the same on every layer that has them)."""
    for _, layer in lora_layers(model):
        if layer.active:
            return layer.active
    for _, mod in saved_modules(model):
        if mod.active:
            return mod.active
    return ()


def activate(model: nn.Module, names: tuple[str, ...], train_only_active: bool = True) -> None:
    """Make `names` the active adapters of every layer; with `train_only_active` (PEFT's rule) their
    weights become trainable and every other adapter's frozen. Names are not checked here."""
    for _, layer in lora_layers(model):
        layer.set_active(names)
        if train_only_active:
            for n, ad in layer.adapters.items():
                ad.requires_grad_(n in names)
    for _, mod in saved_modules(model):
        mod.set_active(names)
        if train_only_active:
            for n, copy in mod.modules_to_save.items():
                copy.requires_grad_(n in names)


def base_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters that belong to the base model (not adapters, not saved copies)."""
    skip = set()
    for _, layer in lora_layers(model):
        skip.update(id(p) for p in layer.adapters.parameters())
    for _, mod in saved_modules(model):
        skip.update(id(p) for p in mod.modules_to_save.parameters())
    return [(n, p) for n, p in model.named_parameters() if id(p) not in skip]


def base_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, p in base_named_parameters(model)]
