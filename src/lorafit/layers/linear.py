"""LoRA for linear layers: nn.Linear, transformers Conv1D (fan_in_fan_out) and quantized bases."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..functional import lora_add_, lora_linear
from .base import LoraAdapter, LoraLayer, check_shareable, master_dtype
from .batched import batched_linear_delta


def is_conv1d_transformers(module: nn.Module) -> bool:
    """transformers' GPT-2 style Conv1D: weight [in, out], y = x @ W + b."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


class LinearLora(LoraLayer):
    """y = base(x) + sum_live s_i * dropout(x) A_i^T B_i^T.

    Shapes: x [..., in]; A [r, in]; B [out, r]; y [..., out].
    For an nn.Linear (or Conv1D) base the whole layer runs as one fused op (see
    `lorafit.functional`); other bases (quantized storage) run first and the LoRA term is
    then added in place.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d_transformers(base_layer)
        self.quantized = bool(getattr(base_layer, "lorafit_quantized", False))
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    def _dtype_device(self):
        if self.quantized:
            return self.base_layer.compute_dtype, next(self.base_layer.buffers()).device
        return self.base_layer.weight.dtype, self.base_layer.weight.device

    def make_adapter(self, name, r, alpha, use_rslora, dropout, a_groups=None):
        dtype, device = self._dtype_device()
        return LoraAdapter("linear", (r, self.in_features), (self.out_features, r), r, alpha, use_rslora,
                           dropout, master_dtype(dtype), device)

    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def delta_weight(self, adapter: LoraAdapter) -> torch.Tensor:
        delta = (adapter.lora_B.float() @ adapter.lora_A.float()) * adapter.scaling  # [out, in]
        if self.fan_in_fan_out:
            delta = delta.t()
        dtype = self._dtype_device()[0]
        return delta.to(dtype)

    def _plain(self):
        """(weight [out, in], bias) for the fused path, or None for a non-plain base."""
        base = self.base_layer
        if self.quantized:
            return None
        if self.fan_in_fan_out:
            return base.weight.t(), base.bias
        if type(base).forward is nn.Linear.forward:
            return base.weight, base.bias
        return None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._batch is not None and not self.disabled:
            return batched_linear_delta(self, self.base_layer(x, *args, **kwargs), x)
        live = self._live
        if self.disabled or not live:
            if self.disabled and self.merged:
                raise RuntimeError("adapters are merged into this layer; unmerge before disabling them")
            return self.base_layer(x, *args, **kwargs)
        if len(live) == 1:
            ad = live[0]
            if ad.variant is not None:  # DoRA / hot-swap (lorafit.variants); plain LoRA only reads the flag
                return ad.variant.forward(self, ad, x, *args, **kwargs)
            a, b, s, p = ad.lora_A, ad.lora_B, ad.scaling, ad.dropout
        elif check_shareable(live) or all(ad.dropout == 0 for ad in live):
            (a, b), s, p = self._cat_live(), 1.0, 0.0
        else:  # several active adapters with their own dropout: rare, and only in training
            y = self.base_layer(x, *args, **kwargs)
            for ad in live:
                y = lora_add_(y, x, ad.lora_A, ad.lora_B, ad.scaling, ad.dropout, self.training)
            return y
        plain = self._plain()
        if plain is not None and not args and not kwargs:
            return lora_linear(x, plain[0], plain[1], a, b, s, p, self.training)
        y = self.base_layer(x, *args, **kwargs)
        return lora_add_(y, x, a, b, s, p, self.training)
