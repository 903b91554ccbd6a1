"""Where the LoRA modules of a model are: the model-level view every public function starts from.

`walk` is :func:`lorafit.common.modules.walk` with the wrappers as leaves: a wrapper is one
module (its base layer and adapters are its own business), so nothing ever wraps a wrapped
layer's insides.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch.nn as nn

from .common.modules import walk as walk_modules
from .config import LoraConfig
from .layers import LoraLayer, ModulesToSave, is_linear_like

WRAPPERS = (LoraLayer, ModulesToSave)
OUTPUT_NAMES = ("lm_head", "classifier", "score", "head")  # "all-linear" leaves these alone (PEFT's rule)
_STATE = "_lorafit_state"


@dataclasses.dataclass
class ModelState:
    """What lorafit knows about a model beyond its modules (one object per model, ``model._lorafit_state``).

    Attributes:
        configs: adapter name -> the `LoraConfig` it was injected / loaded / combined with.
        hotswap_rank: the rank `prepare_hotswap` padded every adapter to (None: not prepared).
        attributes: the instance attributes the `on_new_state` hooks set on the model (`drop_state`
            removes them).
    A ``deepcopy`` of the model copies it (configs are immutable); `merge_and_unload` and
    `unload` drop it with the wrappers.
    """

    configs: dict[str, LoraConfig] = dataclasses.field(default_factory=dict)
    hotswap_rank: int | None = None
    attributes: list[str] = dataclasses.field(default_factory=list)


_NEW_STATE_HOOKS: list[Callable[[nn.Module], dict]] = []


def on_new_state(hook: Callable[[nn.Module], dict]) -> Callable[[nn.Module], dict]:
    """Register ``hook(model) -> {attribute: value}``, called when a model gets its `ModelState` (its
    first adapter); the attributes are set on the model instance and removed again by `drop_state`.

    How a layer above gives an injected model more behaviour without this layer importing it
    (`lorafit.io` makes ``model.save_pretrained`` write the adapter).
    """
    _NEW_STATE_HOOKS.append(hook)
    return hook


def model_state(model: nn.Module) -> ModelState:
    """The model's state, created empty on first use (the `on_new_state` hooks run then)."""
    state = getattr(model, _STATE, None)
    if state is None:
        state = ModelState()
        setattr(model, _STATE, state)
        for hook in _NEW_STATE_HOOKS:
            for key, value in hook(model).items():
                setattr(model, key, value)
                state.attributes.append(key)
    return state


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """adapter name -> LoraConfig (a copy: change adapters through the API, not this dict)."""
    state = getattr(model, _STATE, None)
    return dict(state.configs) if state is not None else {}


def drop_state(model: nn.Module) -> None:
    """Forget the adapters' state and the attributes the `on_new_state` hooks set (the model is plain again)."""
    state = getattr(model, _STATE, None)
    if state is not None:
        delattr(model, _STATE)
        for key in state.attributes:
            if key in vars(model):
                delattr(model, key)


def walk(model: nn.Module):
    """Yield (name, module, parent, attr) in named_modules order, not descending into wrappers."""
    return walk_modules(model, leaves=WRAPPERS)


def unwrapped(module: nn.Module) -> nn.Module:
    """The module a wrapper stands for (LoRA: its base layer; modules_to_save: the original)."""
    if isinstance(module, LoraLayer):
        return module.base_layer
    if isinstance(module, ModulesToSave):
        return module.original_module
    return module


def base_walk(model: nn.Module):
    """`walk` seeing through wrappers: every base module under the name it had before injection."""
    return walk_modules(model, unwrap=unwrapped)


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


def output_layer_ids(model: nn.Module) -> set[int]:
    """Ids of the output layer that "all-linear" (and default quantization) leave alone.

    ``get_output_embeddings()`` where the model has one, else linear-like modules named
    lm_head / classifier / score / head.
    """
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


def full_tensor(t):
    """A DTensor (an FSDP2-sharded parameter) gathered whole, any other tensor as it is.

    Gathering is a collective: on a sharded model every rank must make the same calls in the same order.
    """
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def is_sharded(model: nn.Module) -> bool:
    """True when the model holds DTensor parameters (sharded by FSDP2, e.g. `lorafit.distributed.shard`)."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())
