"""Layer wrappers: one class per layer kind, each holding `base_layer` and its `adapters`.

The kinds are registered in `lorafit.layers.kinds` (first match wins; user kinds come first).
"""

from __future__ import annotations

import torch.nn as nn

from .base import LoraAdapter, LoraLayer, check_shareable, master_dtype
from .bnb import BnbLora
from .conv import ConvLora
from .embedding import EmbeddingLora
from .kinds import kinds, peft_suffixes, register_kind, unregister_kind, wrapper_for
from .linear import LinearLora, is_conv1d_transformers
from .mha import MhaLora
from .quantized import QuantizedBase
from .saved import ModulesToSave

# BnbLora before LinearLora: bitsandbytes layers subclass nn.Linear
for _kind in (MhaLora, BnbLora, LinearLora, ConvLora, EmbeddingLora):
    register_kind(_kind, builtin=True)


def is_linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear``-like module (Linear, transformers Conv1D, a quantized linear)."""
    return LinearLora.handles(module)


__all__ = ["LoraAdapter", "LoraLayer", "LinearLora", "BnbLora", "ConvLora", "EmbeddingLora", "MhaLora",
           "ModulesToSave",
           "QuantizedBase", "register_kind", "unregister_kind", "kinds", "wrapper_for", "peft_suffixes",
           "is_linear_like", "is_conv1d_transformers", "check_shareable", "master_dtype"]
