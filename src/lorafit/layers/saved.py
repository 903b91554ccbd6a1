"""`modules_to_save`: modules trained fully (e.g. a new classification head) per adapter.

As in PEFT, the original module is kept untouched and each adapter gets its own trainable
copy, so switching adapters switches heads and `disabled()` gives the original module back.
"""

from __future__ import annotations

import copy

import torch.nn as nn

from .batched import batched_modules


class ModulesToSave(nn.Module):
    """Holds `original_module` and `modules_to_save` (ModuleDict adapter name -> trainable copy)."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.disabled = False
        self._batch = None

    def add_copy(self, name: str, module: nn.Module | None = None) -> nn.Module:
        """Add a trainable copy of the original (or the given, already loaded, module)."""
        module = copy.deepcopy(self.original_module) if module is None else module
        for p in module.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = module
        return module

    def set_active(self, names) -> None:
        self.active = tuple(n for n in names if n in self.modules_to_save)

    def detach(self, name: str) -> None:
        del self.modules_to_save[name]
        self.set_active(self.active)

    def current(self) -> nn.Module:
        if self.disabled or not self.active:
            return self.original_module
        return self.modules_to_save[self.active[0]]

    def forward(self, *args, **kwargs):
        if self._batch is not None and not self.disabled:
            names = self._batch["names"]
            mods = [self.modules_to_save[n] if n in self.modules_to_save else self.original_module for n in names]
            return batched_modules(mods + [self.original_module], self._batch["rows"], *args, **kwargs)
        return self.current()(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"active={list(self.active)}"


def unwrap_saved(module: ModulesToSave, name: str | None = None) -> nn.Module:
    """The module that replaces the wrapper on unload: the named (or active) copy."""
    if name is not None and name in module.modules_to_save:
        return module.modules_to_save[name]
    return module.current()
