"""Merging adapters into the base weights, and unloading the wrappers.

Merging is explicit (never a side effect of train()/eval()). `merge_and_unload` returns the
model with every lorafit module replaced by a plain module of the original type, so the
state-dict keys are the original model's: export, BN fusion and `from_pretrained` just work.
`merge_state_dict` does the same arithmetic on a plain state dict, without the model.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .layers import LoraLayer, ModulesToSave
from .tree import drop_state, is_sharded, lora_layers, walk


def merge(model: nn.Module, adapter: str | list[str] | None = None, safe: bool = False) -> nn.Module:
    """Add adapter updates into the base weights (default: the active adapters).

    Args:
        safe: check each merged weight for inf/NaN before writing it.
    Raises:
        ValueError: on an FSDP2-sharded model (see `_refuse_sharded`).
    """
    _refuse_sharded(model, "merge")
    work = []
    for name, layer in lora_layers(model):
        names = layer.active if adapter is None else ([adapter] if isinstance(adapter, str) else adapter)
        for n in names:
            if n in layer.adapters:
                _check_mergeable(name, layer, n)  # all before changing any
                work.append((name, layer, n))
    done = []
    for name, layer, n in work:
        try:
            layer.merge_adapter(n, safe=safe)
        except ValueError as exc:
            for _, dl, dn in reversed(done):  # leave the model as it was
                dl.unmerge_adapter(dn)
            raise ValueError(f"{name}: {exc}") from None
        done.append((name, layer, n))
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract every merged update again (exact up to floating-point rounding)."""
    for _, layer in lora_layers(model):
        for n in list(reversed(layer.merged)):
            layer.unmerge_adapter(n)
    return model


def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Merge the active adapters and replace every wrapper by its base module.

    Args:
        dtype: for quantized bases (lorafit's NF4 / int8, bitsandbytes ``Linear4bit`` /
            ``Linear8bitLt``): the dtype of the dequantized nn.Linear that replaces them (default:
            the dtype the base was quantized from; fp32 for bitsandbytes 8-bit); the update is
            merged into the decoded weight in fp32, so the result is a plain model.
    Returns:
        the same model object, with no lorafit module left.
    Raises:
        ValueError: on an FSDP2-sharded model (see `_refuse_sharded`); nothing is changed then.
    """
    _refuse_sharded(model, "merge_and_unload")
    # check all merges can happen before changing anything
    for name, layer in lora_layers(model):
        for n in layer.active:
            if n in layer.adapters and n not in layer.merged:
                _check_mergeable(name, layer, n)
    for _, mod, parent, attr in list(walk(model)):
        if isinstance(mod, LoraLayer):
            setattr(parent, attr, mod.unloaded(dtype))
        elif isinstance(mod, ModulesToSave):
            setattr(parent, attr, mod.current())
    drop_state(model)
    return model


def _refuse_sharded(model: nn.Module, what: str) -> None:
    """Refuse to merge into FSDP2-sharded (DTensor) base weights.

    Each rank holds a slice of every weight and FSDP2 owns the parameters, so an in-place merge
    or a module swap would leave FSDP2's bookkeeping and the other ranks inconsistent. The
    honest path is the one PEFT users take: save the adapter (collective), load it into an
    unsharded base, merge there.
    """
    if is_sharded(model):
        raise ValueError(f"{what}: the model is sharded (FSDP2); save the adapter with lorafit.save_adapter "
                         "(on every rank), load it into an unsharded base and merge there")


def _check_mergeable(name: str, layer: LoraLayer, adapter: str) -> None:
    blocker = layer.merge_blocker(layer.adapters[adapter])
    if blocker:
        raise ValueError(f"{name}: adapter {adapter!r}: {blocker}")


def unload(model: nn.Module) -> nn.Module:
    """Remove all wrappers without merging (unmerging first where needed): the original model."""
    unmerge(model)
    for _, mod, parent, attr in list(walk(model)):
        if isinstance(mod, LoraLayer):
            setattr(parent, attr, mod.base_layer)
        elif isinstance(mod, ModulesToSave):
            setattr(parent, attr, mod.original_module)
    drop_state(model)
    return model


def merge_state_dict(state: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], scalings: dict[str, float],
                     fan_in_fan_out: bool = False) -> dict[str, torch.Tensor]:
    """Merge PEFT-format LoRA tensors into a plain state dict, without building the model.

    Args:
        state: the base model's state dict (``<path>.weight`` keys).
        adapter: PEFT-format tensors with the ``base_model.model.`` prefix stripped
            (``<path>.lora_A.weight`` [r, in, *k], ``<path>.lora_B.weight`` [out, r, 1...]).
        scalings: ``<path>`` -> alpha / r (or alpha / sqrt(r)).
    Returns:
        a new dict; the input dicts are not modified. Linear/conv (groups=1) layers only.
    """
    dora = [k for k in adapter if k.endswith("lora_magnitude_vector")]
    if dora:
        raise ValueError(f"merge_state_dict does not merge DoRA adapters (key {dora[0]!r}); "
                         "load the adapter into the model and use merge_and_unload")
    out = dict(state)
    for key, a in adapter.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key[: -len(".lora_A.weight")]
        b = adapter[f"{path}.lora_B.weight"]
        w = out[f"{path}.weight"]
        delta = (b.float().flatten(1) @ a.float().flatten(1)) * scalings[path]
        if fan_in_fan_out:
            delta = delta.t()
        out[f"{path}.weight"] = (w.float() + delta.view(w.shape)).to(w.dtype)
    return out
