"""Managing several adapters on one base: activate, delete, disable, mix per batch row."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from .inject import lora_layers, saved_modules


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name present in the model, in insertion order."""
    names: dict[str, None] = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.adapters.keys()))
    for _, mod in saved_modules(model):
        names.update(dict.fromkeys(mod.modules_to_save.keys()))
    return list(names)


def active_adapters(model: nn.Module) -> list[str]:
    from .inject import active_names
    return list(active_names(model))


def set_adapter(model: nn.Module, name_or_names, _train_only_active: bool = True) -> None:
    """Activate one adapter or several (their updates add up).

    As in PEFT, the active adapters' weights become trainable and the others are frozen.
    """
    names = (name_or_names,) if isinstance(name_or_names, str) else tuple(name_or_names)
    known = adapter_names(model)
    for n in names:
        if n not in known:
            raise ValueError(f"unknown adapter {n!r}; the model has {known}")
    for _, layer in lora_layers(model):
        layer.set_active(names)
        if _train_only_active:
            for n, ad in layer.adapters.items():
                ad.requires_grad_(n in names)
    for _, mod in saved_modules(model):
        mod.set_active(names)
        if _train_only_active:
            for n, copy in mod.modules_to_save.items():
                copy.requires_grad_(n in names)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove an adapter everywhere (unmerging it first where it was merged)."""
    if name not in adapter_names(model):
        raise ValueError(f"unknown adapter {name!r}; the model has {adapter_names(model)}")
    for _, layer in lora_layers(model):
        if name in layer.adapters:
            layer.detach(name)
    for _, mod in saved_modules(model):
        if name in mod.modules_to_save:
            mod.detach(name)
    configs = getattr(model, "_lorafit_configs", {})
    configs.pop(name, None)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(number of trainable parameters, total number of parameters)."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Run the base model only (saved modules fall back to their originals)."""
    layers = [m for _, m in lora_layers(model)] + [m for _, m in saved_modules(model)]
    if any(getattr(m, "merged", None) for m in layers):
        raise RuntimeError("some adapters are merged into the base; call lorafit.unmerge(model) before disabled()")
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, b in zip(layers, before):
            m.disabled = b


@contextlib.contextmanager
def adapter_batch(model: nn.Module, names):
    """Within the block, batch row i uses adapter ``names[i]`` (``None`` = base only).

    One batched pass: each layer gathers per-row A/B from weights stacked once per block.
    Rows are the first dimension of each layer's input (batch-first models).
    """
    names = list(names)
    known = adapter_names(model)
    for n in names:
        if n is not None and n not in known:
            raise ValueError(f"adapter_batch: unknown adapter {n!r}; the model has {known}")
    distinct = tuple(dict.fromkeys(n for n in names if n is not None))
    layers = [m for _, m in lora_layers(model)] + [m for _, m in saved_modules(model)]
    if any(getattr(m, "merged", None) for m in layers):
        raise RuntimeError("adapter_batch needs unmerged adapters; call lorafit.unmerge(model) first")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    rows = torch.tensor([distinct.index(n) if n is not None else len(distinct) for n in names], device=device)
    state = {"names": distinct, "rows": rows}
    for m in layers:
        m._batch = dict(state)
    try:
        yield model
    finally:
        for m in layers:
            m._batch = None
