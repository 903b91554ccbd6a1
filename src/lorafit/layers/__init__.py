"""Layer wrappers: one class per layer kind, each holding `base_layer` and its `adapters`."""

from __future__ import annotations

import torch.nn as nn

from .base import LoraAdapter, LoraLayer
from .conv import ConvLora
from .embedding import EmbeddingLora
from .linear import LinearLora, is_conv1d_transformers
from .mha import MhaLora
from .saved import ModulesToSave


def wrapper_for(module: nn.Module):
    """First-match dispatch: layer type -> wrapper class, or None when not supported."""
    if isinstance(module, nn.MultiheadAttention):
        return MhaLora
    if getattr(module, "lorafit_quantized", False) or isinstance(module, nn.Linear) or is_conv1d_transformers(module):
        return LinearLora
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return ConvLora
    if isinstance(module, nn.Embedding):
        return EmbeddingLora
    return None


def is_linear_like(module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) or is_conv1d_transformers(module)
            or bool(getattr(module, "lorafit_quantized", False)))


__all__ = ["LoraAdapter", "LoraLayer", "LinearLora", "ConvLora", "EmbeddingLora", "MhaLora", "ModulesToSave",
           "wrapper_for", "is_linear_like"]
