"""The table of layer kinds: which wrapper class adapts which module.

A layer kind is a `LoraLayer` subclass that declares everything the rest of lorafit needs to
know about it (PEFT keys, parts, batched stacks, DoRA layout, merge, load form; see
`lorafit.layers.base`). Kinds are looked up here, first match wins, so adding a kind is its own
file plus one `register_kind` call - from user code too::

    @lorafit.layers.register_kind
    class BilinearLora(LoraLayer):
        @classmethod
        def handles(cls, module): return isinstance(module, nn.Bilinear)
        ...
"""

from __future__ import annotations

import torch.nn as nn

from .base import LoraLayer

_KINDS: list[type] = []  # user kinds first (they may refine a built-in), then the built-ins in order
_BUILTIN: set[type] = set()


def register_kind(wrapper: type, *, builtin: bool = False) -> type:
    """Add a wrapper class to the table (before the built-in kinds unless ``builtin``); returns it.

    Raises:
        TypeError: ``wrapper`` is not a LoraLayer subclass with a ``handles`` classmethod.
    """
    if not (isinstance(wrapper, type) and issubclass(wrapper, LoraLayer)) or wrapper.handles is LoraLayer.handles:
        raise TypeError(f"register_kind needs a LoraLayer subclass that defines handles(), got {wrapper!r}")
    if wrapper in _KINDS:
        return wrapper
    if builtin:
        _KINDS.append(wrapper)
        _BUILTIN.add(wrapper)
    else:
        _KINDS.insert(next((i for i, k in enumerate(_KINDS) if k in _BUILTIN), len(_KINDS)), wrapper)
    return wrapper


def unregister_kind(wrapper: type) -> None:
    """Remove a kind added with `register_kind` (tests, plugins that unload)."""
    if wrapper in _KINDS and wrapper not in _BUILTIN:
        _KINDS.remove(wrapper)


def kinds() -> tuple[type, ...]:
    """The registered wrapper classes, in lookup order."""
    return tuple(_KINDS)


def wrapper_for(module: nn.Module) -> type | None:
    """The wrapper class for ``module`` (first match in the table), or None when LoRA does not fit it."""
    for kind in _KINDS:
        if kind.handles(module):
            return kind
    return None


def peft_suffixes() -> set[str]:
    """Every key suffix that some kind writes (``lora_A.weight``, ``lora_embedding_B``, ...)."""
    return {s for kind in _KINDS for s in kind.peft_suffixes()}
