"""Managing several adapters on one base: activate, delete, disable, mix per batch row."""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn as nn

from .common.modules import count_parameters
from .config import check_adapter_name
from .layers import LoraLayer
from .tree import activate, active_names, adapter_names, lora_layers, model_state, saved_modules


def active_adapters(model: nn.Module) -> list[str]:
    return list(active_names(model))


def set_adapter(model: nn.Module, name_or_names, _train_only_active: bool = True) -> None:
    """Activate one adapter or several (their updates add up).

    As in PEFT, the active adapters' weights become trainable and the others are frozen.
    """
    names = (name_or_names,) if isinstance(name_or_names, str) else tuple(name_or_names)
    known = adapter_names(model)
    for n in names:
        check_adapter_name(n)
        if n not in known:
            raise ValueError(f"unknown adapter {n!r}; the model has {known}")
    activate(model, names, train_only_active=_train_only_active)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove an adapter everywhere (unmerging it first where it was merged).

    The active set afterwards is PEFT's (0.21, ``BaseTunerLayer.delete_adapter``): deleting an
    inactive adapter changes nothing; deleting one of several active adapters leaves the others
    active; deleting the only active adapter activates the first remaining adapter in sorted
    order, with a warning, and leaves none active only when no adapter remains. So the model
    never runs as the bare base while `active_adapters` is empty and adapters remain, unnoticed.
    As with `set_adapter`, the new active adapters become trainable and the others frozen.
    (PEFT refuses to delete a merged adapter; lorafit unmerges it first.)
    """
    known = adapter_names(model)
    if name not in known:
        raise ValueError(f"unknown adapter {name!r}; the model has {known}")
    active = active_adapters(model)
    for _, layer in lora_layers(model):
        if name in layer.adapters:
            layer.detach(name)
    for _, mod in saved_modules(model):
        if name in mod.modules_to_save:
            mod.detach(name)
    model_state(model).configs.pop(name, None)
    if name not in active:
        return
    remaining = [n for n in known if n != name]
    still_active = [n for n in active if n != name]
    if still_active:
        set_adapter(model, still_active)
    elif remaining:
        new = sorted(remaining)[0]
        warnings.warn(f"adapter {name!r} was active and is now deleted; adapter {new!r} is active now",
                      stacklevel=2)
        set_adapter(model, new)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(number of trainable parameters, total number of parameters), as PEFT counts them
    (the untouched originals of `modules_to_save` included)."""
    return count_parameters(model, originals=True)


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Run the base model only (saved modules fall back to their originals)."""
    layers = [m for _, m in lora_layers(model)] + [m for _, m in saved_modules(model)]
    if any(isinstance(m, LoraLayer) and m.merged for m in layers):
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
def adapter_batch(model: nn.Module, names, slots=None, share_weights: bool = False):
    """Within the block, batch row i uses adapter ``names[i]`` (``None`` = base only).

    One batched pass: each layer gathers per-row A/B from weights stacked once per block.
    Rows are the first dimension of each layer's input (batch-first models). ``slots`` (optional,
    a superset of the names, in a fixed order) is the stacking order: the layers' stacked weights
    are cached per order, so a server passing the same slots for every batch re-stacks only when
    that set changes, not whenever the mix of adapters in a batch does. ``share_weights=True``
    then makes the stacks the adapters' storage (their A and B become views of it), so a server
    holding many adapters keeps each one once instead of twice; a view still has its parameter's
    version counter, so writing a parameter in place (a training step, a reload) re-stacks.
    Adapters whose dtype differs from the forward's (fp32 masters on a bf16 base) keep their own copy.
    """
    names = list(names)
    known = adapter_names(model)
    for n in [*names, *(slots or ())]:
        if n is not None and n not in known:
            raise ValueError(f"adapter_batch: unknown adapter {n!r}; the model has {known}")
    distinct = tuple(dict.fromkeys(n for n in names if n is not None))
    if slots is not None:
        missing = [n for n in distinct if n not in slots]
        if missing:
            raise ValueError(f"adapter_batch: {missing[0]!r} is in names but not in slots")
        distinct = tuple(dict.fromkeys(slots))
    layers = [m for _, m in lora_layers(model)] + [m for _, m in saved_modules(model)]
    if any(isinstance(m, LoraLayer) and m.merged for m in layers):
        raise RuntimeError("adapter_batch needs unmerged adapters; call lorafit.unmerge(model) first")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    rows = torch.tensor([distinct.index(n) if n is not None else len(distinct) for n in names], device=device)
    state = {"names": distinct, "rows": rows, "share": bool(share_weights)}
    for m in layers:
        m._batch = dict(state)
    try:
        yield model
    finally:
        for m in layers:
            m._batch = None
