"""Save and reload a quantized base so it need not be re-quantized each run.

File format: one safetensors file with the whole base model's state (quantized buffers plus
every full-precision parameter and buffer) and a metadata entry ``lorafit_quant``: JSON with
``version``, ``modules`` (name -> layer config, see ``QuantizedLinear.quant_config``) and
``aliases`` (tied tensors stored once: alias key -> stored key). LoRA adapters are never
written here (they go through ``lorafit.save_adapter``); if the model already has adapters
injected, only the base under them is saved, under the original module names.
"""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..tree import WRAPPERS, base_walk
from .api import _set_module
from .layers import LAYER_TYPES, QuantizedLinear

_META_KEY = "lorafit_quant"
_VERSION = 1


def _has_wrappers(model: nn.Module) -> bool:
    return any(isinstance(m, WRAPPERS) for m in model.modules())


def _walk(model: nn.Module):
    """(base_name, module) like ``named_modules``, seeing through LoRA wrappers."""
    return ((name, mod) for name, mod, _, _ in base_walk(model))


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict, under the names it had before ``lorafit.inject``."""
    if not _has_wrappers(model):
        return model.state_dict()
    out = {}
    for name, mod in _walk(model):
        pre = f"{name}." if name else ""
        for n, p in mod._parameters.items():
            if p is not None:
                out[pre + n] = p.detach()
        for n, b in mod._buffers.items():
            if b is not None and n not in mod._non_persistent_buffers_set:
                out[pre + n] = b
    return out


def save_quantized(model: nn.Module, file) -> None:
    """Write a quantized model's base weights to one safetensors file.

    Args:
        model: a model with at least one layer from ``lorafit.quantize`` (adapters, if
            injected, are skipped).
        file: path of the ``.safetensors`` file to write.

    Raises:
        ValueError: the model has no quantized layer.
    """
    modules = {n: m.quant_config() for n, m in _walk(model) if isinstance(m, QuantizedLinear)}
    if not modules:
        raise ValueError("save_quantized: the model has no quantized layer (call lorafit.quantize first)")
    tensors, aliases, by_storage = {}, {}, {}
    for key, t in _base_state(model).items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        sig = (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        first = by_storage.get(ptr)
        if first is not None and first[0] == sig:
            aliases[key] = first[1]  # tied weight: store once
            continue
        if first is not None:  # a different view of a shared storage: store a copy
            t = t.clone()
        elif ptr is not None:
            by_storage[ptr] = (sig, key)
        tensors[key] = t.contiguous().cpu()
    meta = {"version": _VERSION, "modules": modules, "aliases": aliases}
    save_file(tensors, str(file), metadata={"format": "pt", _META_KEY: json.dumps(meta)})


def read_quantized_config(file) -> dict:
    """The ``lorafit_quant`` metadata of a file written by :func:`save_quantized`."""
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
    if _META_KEY not in meta:
        raise ValueError(f"{file} was not written by lorafit.save_quantized (no {_META_KEY!r} metadata)")
    info = json.loads(meta[_META_KEY])
    if info.get("version") != _VERSION:
        raise ValueError(f"{file}: unsupported lorafit_quant version {info.get('version')!r}")
    return info


def _empty_layer(name: str, cfg: dict, current: nn.Module) -> nn.Module:
    fmt = cfg.get("format")
    if fmt not in LAYER_TYPES:
        raise ValueError(f"load_quantized: module {name!r} has unknown format {fmt!r}")
    if not isinstance(current, nn.Linear):
        raise ValueError(f"load_quantized: module {name!r} is a {type(current).__name__}, expected nn.Linear")
    if (current.in_features, current.out_features) != (cfg["in_features"], cfg["out_features"]):
        raise ValueError(
            f"load_quantized: module {name!r} is {current.out_features}x{current.in_features}, "
            f"the file has {cfg['out_features']}x{cfg['in_features']}"
        )
    extra = {"block_size": cfg["block_size"], "double_quant": cfg["double_quant"]} if fmt == "nf4" else {}
    return LAYER_TYPES[fmt](
        cfg["in_features"], cfg["out_features"], bias=cfg["bias"],
        compute_dtype=getattr(torch, cfg["compute_dtype"]), device=current.weight.device, **extra,
    )  # fmt: skip


def load_quantized(model: nn.Module, file) -> nn.Module:
    """Load a file from :func:`save_quantized` into a freshly constructed (unquantized) model.

    The Linear layers named in the file are replaced by empty quantized layers, then the whole
    state is loaded strictly. A skeleton built on the meta device works too (its tensors are
    assigned from the file, on CPU), which avoids allocating full-precision weights at all.

    Args:
        model: the model skeleton from its usual constructor, without adapters.
        file: a ``.safetensors`` file written by :func:`save_quantized`.

    Returns:
        ``model`` (the same object), quantized and loaded.

    Raises:
        ValueError: the file was not written by save_quantized, or does not fit the model.
    """
    if _has_wrappers(model):
        raise ValueError("load_quantized: load into the base model before lorafit.inject / load_adapter")
    info = read_quantized_config(file)
    meta_device = any(t.is_meta for t in model.state_dict().values())
    done: dict[int, nn.Module] = {}
    for name, cfg in info["modules"].items():
        try:
            cur = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"load_quantized: the model has no module {name!r}") from None
        q = done.get(id(cur))
        if q is None:
            q = done[id(cur)] = _empty_layer(name, cfg, cur)
        _set_module(model, name, q)
    state = load_file(str(file))
    for alias, key in info["aliases"].items():
        state[alias] = state[key]
    try:
        model.load_state_dict(state, strict=True, assign=meta_device)
    except RuntimeError as e:
        raise ValueError(f"load_quantized: {file} does not fit this model: {e}") from None
    if meta_device:  # assign made one Parameter per key: tie the aliases back to one object
        for alias, key in info["aliases"].items():
            owner, _, attr = alias.rpartition(".")
            src_owner, _, src_attr = key.rpartition(".")
            mod = model.get_submodule(owner)
            if attr in mod._parameters:
                setattr(mod, attr, getattr(model.get_submodule(src_owner), src_attr))
    return model
