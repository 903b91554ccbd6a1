"""Target matching and injection: wrap matched layers, freeze the base, add adapters.

Injection is planned first (every wrapper and adapter built, every check done) and only then
committed, so a failure leaves the model exactly as it was.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import warnings

import torch.nn as nn

from .config import LoraConfig
from .layers import LoraAdapter, LoraLayer, ModulesToSave, is_linear_like, wrapper_for
from .layers.linear import is_conv1d_transformers
from .tree import activate, active_names, base_named_parameters, base_parameters, walk

log = logging.getLogger("lorafit")
OUTPUT_NAMES = ("lm_head", "classifier", "score", "head")


def output_layer_ids(model: nn.Module) -> set[int]:
    """Ids of the output layer that "all-linear" leaves alone."""
    get = getattr(model, "get_output_embeddings", None)
    out = None
    if callable(get):
        try:
            out = get()
        except Exception:  # some models raise NotImplementedError
            out = None
    if isinstance(out, LoraLayer):
        out = out.base_layer
    if isinstance(out, nn.Module):
        return {id(out)}
    return {id(m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in OUTPUT_NAMES and is_linear_like(m)}


def name_matches(targets, name: str) -> bool:
    """list/tuple: exact name or dotted suffix; str: regex full match."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def check_adapter_name(name) -> str:
    """Refuse an adapter name that would fail half-way through a commit or escape a directory.

    The name becomes a key of ``nn.ModuleDict`` (which refuses "", "." and its own attribute
    names such as "keys" or "training" with a KeyError - after earlier layers were already
    wrapped) and, in `load_adapter`, a sub-directory name (so no separator, no "..", no drive).

    Raises:
        ValueError: one line naming the bad name.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
    bad = [c for c in (".", "/", "\\", os.sep, os.altsep or "/", "\0", ":") if c in name]
    if bad:
        raise ValueError(f"adapter name {name!r} contains {bad[0]!r}: it is used as a module key and a "
                         "directory name, so it may not contain '.', '/', '\\' or ':'")
    if hasattr(nn.ModuleDict(), name):
        raise ValueError(f"adapter name {name!r} is an attribute of nn.ModuleDict; choose another name")
    return name


@dataclasses.dataclass
class PlanItem:
    name: str
    parent: nn.Module
    attr: str
    wrapper: LoraLayer
    is_new: bool
    adapter: LoraAdapter


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups > 1 \
        and module.groups == module.in_channels


def plan_injection(model: nn.Module, config: LoraConfig, adapter: str, only: dict | None = None) -> list[PlanItem]:
    """Build (without touching the model) the wrappers and adapters that `config` asks for.

    Args:
        only: when loading a file, {module name: {"a_groups": int | None}} - adapt exactly these.
    Raises:
        ValueError: nothing matched (lists up to 20 candidate names), or a layer cannot take it.
    """
    targets = config.target_modules if config.target_modules is not None else "all-linear"
    out_ids = output_layer_ids(model) if targets == "all-linear" else set()
    infos = {name: (mod, parent, attr) for name, mod, parent, attr in walk(model) if name}
    candidates, chosen, skipped = [], {}, []
    for name, (mod, parent, attr) in infos.items():
        if isinstance(mod, ModulesToSave):
            continue
        base = mod.base_layer if isinstance(mod, LoraLayer) else mod
        if isinstance(parent, nn.MultiheadAttention) and is_linear_like(base):
            # MHA's forward reads out_proj.weight directly: adapt the MHA itself
            pname = name.rsplit(".", 1)[0]
            if only is None and targets != "all-linear" and name_matches(targets, name):
                chosen.setdefault(pname, infos[pname])
            continue
        if wrapper_for(base) is None:
            continue
        candidates.append(name)
        if only is not None:
            hit = name in only
        elif targets == "all-linear":
            hit = (is_linear_like(base) or isinstance(base, nn.MultiheadAttention)) and id(base) not in out_ids
        else:
            hit = name_matches(targets, name)
        if not hit or (only is None and name_matches(config.exclude_modules, name)):
            continue
        if only is None and _is_depthwise(base):
            skipped.append(name)
            continue
        chosen[name] = (mod, parent, attr)
    if skipped:
        log.info("lorafit: skipped %d depthwise conv(s) (groups == in_channels): %s", len(skipped),
                 ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
    if not chosen:
        shown = ", ".join(candidates[:20]) + (" ..." if len(candidates) > 20 else "")
        raise ValueError(f"target_modules={targets!r} matched no supported layer; candidates: {shown or '(none)'}")
    plan = []
    for name, (mod, parent, attr) in chosen.items():
        is_new = not isinstance(mod, LoraLayer)
        if not is_new and adapter in mod.adapters:
            raise ValueError(f"adapter {adapter!r} already exists on {name}")
        wrapper = wrapper_for(mod)(mod) if is_new else mod
        _check_fan_in_fan_out(config, wrapper.base_layer, name)
        a_groups = (only or {}).get(name, {}).get("a_groups")
        try:
            ad = wrapper.make_adapter(adapter, config.rank_for(name), config.alpha_for(name), config.use_rslora,
                                      config.dropout, a_groups=a_groups)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        ad.reset(config.init)
        if config.use_dora or (isinstance(config.init, str) and config.init.startswith(("pissa", "olora"))):
            from .variants import setup_adapter  # DoRA magnitude, PiSSA/OLoRA: planned, applied on commit
            setup_adapter(name, wrapper, ad, config)
        plan.append(PlanItem(name, parent, attr, wrapper, is_new, ad))
    return plan


def _check_fan_in_fan_out(config: LoraConfig, base: nn.Module, name: str) -> None:
    if config.fan_in_fan_out is None:
        return
    actual = is_conv1d_transformers(base)
    if isinstance(base, nn.Linear) or actual:
        if bool(config.fan_in_fan_out) != actual:
            warnings.warn(f"fan_in_fan_out={config.fan_in_fan_out} does not fit {name} "
                          f"({type(base).__name__}); using {actual}", stacklevel=3)


def plan_saved(model: nn.Module, config: LoraConfig, adapter: str, lora_names=()) -> list:
    """(name, parent, attr, ModulesToSave wrapper, is_new) for `modules_to_save`."""
    if not config.modules_to_save:
        return []
    found = []
    for name, mod, parent, attr in walk(model):
        if not name or not name_matches(config.modules_to_save, name):
            continue
        if name in lora_names or isinstance(mod, LoraLayer):
            raise ValueError(f"module {name} is both a LoRA target and in modules_to_save")
        if isinstance(mod, ModulesToSave):
            if adapter in mod.modules_to_save:
                raise ValueError(f"adapter {adapter!r} already has a saved copy of {name}")
            found.append((name, parent, attr, mod, False))
        else:
            found.append((name, parent, attr, ModulesToSave(mod), True))
    missing = [m for m in config.modules_to_save if not any(name_matches([m], f[0]) for f in found)]
    if missing:
        raise ValueError(f"modules_to_save: no module named {missing[0]!r} in the model")
    return found


def commit(model: nn.Module, config: LoraConfig, adapter: str, plan: list[PlanItem], saved: list) -> None:
    """Apply a plan: swap wrappers in, attach adapters, freeze the base, set trainability."""
    current = active_names(model)
    # New modules start in training mode; a model in eval mode must stay there (else adapter
    # dropout, and MultiheadAttention's own attention dropout, would run at inference).
    for item in plan:
        if item.is_new:
            item.wrapper.train(item.wrapper.base_layer.training)
            setattr(item.parent, item.attr, item.wrapper)
        item.adapter.train(item.wrapper.training)
        item.wrapper.attach(adapter, item.adapter)
    for _name, parent, attr, wrapper, is_new, *loaded in saved:
        if is_new:
            wrapper.train(wrapper.original_module.training)
            setattr(parent, attr, wrapper)
        wrapper.add_copy(adapter, loaded[0] if loaded else None)
    for p in base_parameters(model):
        p.requires_grad_(False)
    if config.bias == "all":
        for n, p in base_named_parameters(model):
            if n.rsplit(".", 1)[-1] == "bias":
                p.requires_grad_(True)
    elif config.bias == "lora_only":
        for item in plan:
            bias = getattr(item.wrapper.base_layer, "bias", None)
            if isinstance(bias, nn.Parameter):
                bias.requires_grad_(True)
    for item in plan:
        item.adapter.requires_grad_(True)
    activate(model, current or (adapter,), train_only_active=False)


def inject(model: nn.Module, config: LoraConfig, adapter: str = "default") -> nn.Module:
    """Add LoRA adapter `adapter` to the layers `config` targets, in place.

    Every base parameter is frozen; the new adapter (and `modules_to_save` copies, and biases
    per `config.bias`) are trainable. The first adapter becomes active; later ones are added
    inactive, as in PEFT - switch with `lorafit.set_adapter`.

    Returns:
        the same model object.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a lorafit.LoraConfig, got {type(config).__name__}")
    check_adapter_name(adapter)
    plan = plan_injection(model, config, adapter)
    saved = plan_saved(model, config, adapter, {item.name for item in plan})
    commit(model, config, adapter, plan, saved)
    model._lorafit_configs = {**getattr(model, "_lorafit_configs", {}), adapter: config}
    return model
