"""Target matching and injection: wrap matched layers, freeze the base, add adapters.

Injection is planned first (every wrapper and adapter built, every check done) and only then
committed, so a failure leaves the model exactly as it was. Everything layer-specific comes from
the layer kinds (`lorafit.layers.kinds`) and the variants (`lorafit.variants`); this module
only decides which modules are adapted and in which order things happen.
"""

from __future__ import annotations

import dataclasses
import logging

import torch.nn as nn

from .common.matching import name_matches
from .config import LoraConfig, as_lora_config, check_adapter_name
from .layers import LoraAdapter, LoraLayer, ModulesToSave, wrapper_for
from .tree import (activate, active_names, base_named_parameters, base_parameters, is_sharded, model_state,
                   output_layer_ids, walk)
from .variants import plan_variants

log = logging.getLogger("lorafit")


@dataclasses.dataclass
class PlanItem:
    name: str
    parent: nn.Module
    attr: str
    wrapper: LoraLayer
    is_new: bool
    adapter: LoraAdapter


def _choose(model: nn.Module, config: LoraConfig, only: dict | None):
    """{name: (module, parent, attr)} of the modules to adapt, plus the candidate names (for errors)."""
    targets = config.target_modules if config.target_modules is not None else "all-linear"
    out_ids = output_layer_ids(model) if targets == "all-linear" else set()
    infos = {name: (mod, parent, attr) for name, mod, parent, attr in walk(model) if name}
    candidates, chosen, skipped = [], {}, {}
    for name, (mod, parent, attr) in infos.items():
        if isinstance(mod, ModulesToSave):
            continue
        parent_base = parent.base_layer if isinstance(parent, LoraLayer) else parent
        owner = wrapper_for(parent_base) if parent_base is not None else None
        if owner is not None and owner.owns_children:
            # the parent's forward reads this child's weight (MHA's out_proj): adapt the parent
            if only is None and targets != "all-linear" and name_matches(targets, name):
                pname = name.rsplit(".", 1)[0]
                chosen.setdefault(pname, infos[pname])
            continue
        base = mod.base_layer if isinstance(mod, LoraLayer) else mod
        kind = wrapper_for(base)
        if kind is None:
            continue
        candidates.append(name)
        if only is not None:
            hit = name in only
        elif targets == "all-linear":
            hit = kind.all_linear and id(base) not in out_ids
        else:
            hit = name_matches(targets, name)
        if not hit or (only is None and name_matches(config.exclude_modules, name)):
            continue
        reason = kind.skip_reason(base) if only is None else None
        if reason:
            skipped.setdefault(reason, []).append(name)
            continue
        chosen[name] = (mod, parent, attr)
    for reason, names in skipped.items():
        log.info("lorafit: skipped %d layer(s), %s: %s", len(names), reason,
                 ", ".join(names[:10]) + (" ..." if len(names) > 10 else ""))
    if not chosen:
        shown = ", ".join(candidates[:20]) + (" ..." if len(candidates) > 20 else "")
        raise ValueError(f"target_modules={targets!r} matched no supported layer; candidates: {shown or '(none)'}")
    return chosen


def plan_injection(model: nn.Module, config: LoraConfig, adapter: str, only: dict | None = None) -> list[PlanItem]:
    """Build (without touching the model) the wrappers and adapters that `config` asks for.

    Args:
        only: when loading a file, {module name: make_adapter form arguments} - adapt exactly these.
    Raises:
        ValueError: nothing matched (lists up to 20 candidate names), or a layer cannot take it.
    """
    if is_sharded(model):  # new modules would stay outside FSDP2's units, replicated on every rank
        raise ValueError("the model is sharded (FSDP2): inject and load adapters before lorafit.distributed.shard")
    plan = []
    for name, (mod, parent, attr) in _choose(model, config, only).items():
        is_new = not isinstance(mod, LoraLayer)
        if not is_new and adapter in mod.adapters:
            raise ValueError(f"adapter {adapter!r} already exists on {name}")
        wrapper = wrapper_for(mod)(mod) if is_new else mod
        wrapper.check_config(config, name)
        try:
            ad = wrapper.make_adapter(adapter, config.rank_for(name), config.alpha_for(name), config.use_rslora,
                                      config.dropout, **(only or {}).get(name, {}))
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        wrapper.init_adapter(ad, config.init)
        plan_variants(name, wrapper, ad, config)  # DoRA magnitude, PiSSA/OLoRA: planned, applied on commit
        plan.append(PlanItem(name, parent, attr, wrapper, is_new, ad))
    return plan


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
    """Apply a plan: swap wrappers in, attach adapters, freeze the base, set trainability, record the config."""
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
    model_state(model).configs[adapter] = config


def inject(model: nn.Module, config: LoraConfig, adapter: str = "default") -> nn.Module:
    """Add LoRA adapter `adapter` to the layers `config` targets, in place.

    Every base parameter is frozen; the new adapter (and `modules_to_save` copies, and biases
    per `config.bias`) are trainable. The first adapter becomes active; later ones are added
    inactive, as in PEFT - switch with `lorafit.set_adapter`.

    Returns:
        the same model object.
    """
    config = as_lora_config(config)  # a peft.LoraConfig or a PEFT dict works too; anything else: TypeError
    check_adapter_name(adapter)
    plan = plan_injection(model, config, adapter)
    saved = plan_saved(model, config, adapter, {item.name for item in plan})
    commit(model, config, adapter, plan, saved)
    return model
