"""LoRA for linear layers: nn.Linear, transformers Conv1D (fan_in_fan_out) and quantized bases."""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn as nn

from ..functional import lora_add_, lora_linear
from .base import LoraAdapter, LoraLayer, check_shareable, master_dtype
from .batched import fill_slots, share_slots, zero_slots
from .quantized import QuantizedBase

log = logging.getLogger("lorafit")


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

    all_linear = True
    scaling_in_op = True

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d_transformers(base_layer)
        self.quantized = isinstance(base_layer, QuantizedBase)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    @classmethod
    def handles(cls, module: nn.Module) -> bool:
        return isinstance(module, (nn.Linear, QuantizedBase)) or is_conv1d_transformers(module)

    def check_config(self, config, name: str) -> None:
        if config.fan_in_fan_out is not None and bool(config.fan_in_fan_out) != self.fan_in_fan_out \
                and not self.quantized:
            warnings.warn(f"fan_in_fan_out={config.fan_in_fan_out} does not fit {name} "
                          f"({type(self.base_layer).__name__}); using {self.fan_in_fan_out}", stacklevel=4)

    def _dtype_device(self):
        if self.quantized:
            return self.base_layer.compute_dtype, self.base_layer.storage_device()
        return self.base_layer.weight.dtype, self.base_layer.weight.device

    def make_adapter(self, name, r, alpha, use_rslora, dropout, **form):
        dtype, device = self._dtype_device()
        return LoraAdapter((r, self.in_features), (self.out_features, r), r, alpha, use_rslora, dropout,
                           master_dtype(dtype), device)

    def base_weight(self) -> torch.Tensor:
        if self.quantized:
            raise ValueError("a quantized base stores no weight tensor (DoRA on a quantized base is not supported "
                             "yet)")
        return self.base_layer.weight

    def delta_weight(self, adapter: LoraAdapter) -> torch.Tensor:
        delta = (adapter.lora_B.float() @ adapter.lora_A.float()) * adapter.scaling  # [out, in]
        if self.fan_in_fan_out:
            delta = delta.t()
        return delta.to(self._dtype_device()[0])

    def fingerprint_weight(self):
        return None if self.quantized else self.base_weight()

    def dense_weight(self):
        if self.quantized:
            return None
        w = self.base_weight().detach().float()
        return w.t() if self.fan_in_fan_out else w

    def from_dense(self, weight):
        weight = weight.t() if self.fan_in_fan_out else weight
        return weight.to(self.base_weight().dtype).contiguous()

    # ------------------------------------------------------------------ merge
    def merge_plain(self, name, safe=False):
        if not self.quantized:
            return super().merge_plain(name, safe)
        # re-quantizing loses precision: report the error it added (merge_and_unload avoids this)
        self.merge_error = float(self.base_layer.merge_delta_(self.delta_weight(self.adapters[name])))
        log.info("merged %r into a quantized base: max abs error added %.3g", name, self.merge_error)

    def unmerge_plain(self, name):
        if not self.quantized:
            return super().unmerge_plain(name)
        self.base_layer.merge_delta_(-self.delta_weight(self.adapters[name]))

    def unloaded(self, dtype=None):
        if not self.quantized:
            return super().unloaded(dtype)
        linear = self.base_layer.to_linear(dtype)  # the update is merged in full precision
        with torch.no_grad():
            for n in self.active:
                if n in self.adapters and n not in self.merged:
                    linear.weight += self.delta_weight(self.adapters[n]).to(linear.weight.dtype)
        return linear

    # ------------------------------------------------------------------ batches: BGMV over rows
    def build_stacks(self, adapters, dtype, device):
        """(A [n + 1, r_max, in], B [n + 1, out, r_max], scale [n + 1]); slot n (the base) stays zero."""
        a_stack, b_stack, scale = zero_slots(adapters, (self.in_features,), (self.out_features,), dtype, device)
        fill_slots(adapters, lambda i, r: a_stack[i, :r], b_stack, scale)
        return a_stack, b_stack, scale

    def share_stacks(self, adapters, stacks):
        """Each adapter's A [r, in] and B [out, r] become views of its slot (``share_weights``)."""
        a_stack, b_stack, _ = stacks
        share_slots(adapters, lambda i, r: a_stack[i, :r], a_stack, b_stack)

    def batched_delta(self, y, x, rows, stacks):
        """y [N, ..., out] += per-row s_i (x A_i^T) B_i^T, with x [N, ..., in]."""
        a_stack, b_stack, scale = stacks
        n = x.shape[0]
        x3 = x.reshape(n, -1, x.shape[-1]).to(y.dtype)
        xa = torch.bmm(x3, a_stack[rows].transpose(1, 2)).mul_(scale[rows].view(n, 1, 1))  # [N, T, r], scaled
        delta = torch.bmm(xa, b_stack[rows].transpose(1, 2))  # [N, T, out]
        return y.add_(delta.view(y.shape))

    # ------------------------------------------------------------------ DoRA
    def dora_layout(self, ad, weight):
        w = weight.t() if self.fan_in_fan_out else weight  # [out, in] view, no copy
        return w[None], ad.lora_A[None], ad.lora_B[None]

    def dora_factor_view(self):
        return (1, -1) if self.fan_in_fan_out else (-1, 1)

    def dora_forward(self, ad, factor, x, *args, **kwargs):
        plain = self._plain()
        if plain is not None and not args and not kwargs:
            weight, bias = plain
            z = lora_linear(x, weight, None, ad.lora_A, ad.lora_B, ad.scaling, ad.dropout, self.training)
        else:  # custom base forward: its output minus the bias is W x
            y = self.base_layer(x, *args, **kwargs)
            bias = getattr(self.base_layer, "bias", None)
            z = y - bias if bias is not None else y
            z = lora_add_(z, x, ad.lora_A, ad.lora_B, ad.scaling, ad.dropout, self.training)
        g = factor.to(z.dtype)
        return z * g if bias is None else torch.addcmul(bias.to(z.dtype), z, g)

    # ------------------------------------------------------------------ forward
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
            return self.batched(self.base_layer(x, *args, **kwargs), x)
        live = self._live
        if self.disabled or not live:
            return self._base_only(x, *args, **kwargs)
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
