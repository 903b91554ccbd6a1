"""LoRA for nn.Conv1d / Conv2d / Conv3d that honours every argument of the base conv.

The update is two convs: A (in -> r) with the base's kernel, stride, padding (incl. 'same'),
dilation and padding_mode, then B, a 1x1 conv (r -> out) with the base's groups. Two forms:

* PEFT's form (``a_groups = 1``): A reads all input channels. On groups=1 it is exactly the
  grouped form below; on a grouped base its delta mixes groups and cannot be merged.
* lorafit's grouped form (``a_groups = groups``): A is grouped too, so group j's delta is
  ``B_j @ A_j`` [out/g, in/g, *k] - exactly the base weight's layout - and merges exactly.
  r must be a multiple of groups.

Because A uses the base's dilation and padding mode, the merged conv (W + s * B A) computes
exactly what the unmerged layer does (PEFT 0.21 ignores both).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import LoraAdapter, LoraLayer, check_shareable, master_dtype
from .batched import batched_conv_delta

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class ConvLora(LoraLayer):
    """Shapes: x [N, in, *S]; A [r, in / a_groups, *k]; B [out, r / groups, 1...]; y [N, out, *S']."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.nd = base_layer.weight.dim() - 2
        self.groups = base_layer.groups
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self._fn = _CONV_FN[self.nd]

    def make_adapter(self, name, r, alpha, use_rslora, dropout, a_groups=None):
        base = self.base_layer
        g = self.groups if a_groups is None else a_groups
        if r % self.groups:
            raise ValueError(f"rank {r} is not a multiple of groups={self.groups} for this conv "
                             f"({type(base).__name__} {tuple(base.weight.shape)}); choose r divisible by groups")
        ones = (1,) * self.nd
        adapter = LoraAdapter("conv", (r, self.in_features // g, *base.kernel_size),
                              (self.out_features, r // self.groups, *ones), r, alpha, use_rslora, dropout,
                              master_dtype(base.weight.dtype), base.weight.device, a_groups=g)
        adapter.groups = self.groups
        return adapter

    def conv_a(self, x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
        """The A conv with every geometric argument of the base (padding_mode included)."""
        base = self.base_layer
        padding = base.padding
        if base.padding_mode != "zeros":
            x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            padding = 0
        return self._fn(x, weight, None, base.stride, padding, base.dilation, groups)

    def delta_weight(self, adapter: LoraAdapter) -> torch.Tensor:
        base = self.base_layer
        g = self.groups
        if adapter.a_groups != g:
            raise ValueError(f"this adapter uses PEFT's conv form on a grouped conv (groups={g}): its update mixes "
                             "groups and cannot be merged into the grouped weight")
        rg = adapter.r // g
        a = adapter.lora_A.float().reshape(g, rg, -1)  # [g, r/g, in/g * k]
        b = adapter.lora_B.float().reshape(g, self.out_features // g, rg)  # [g, out/g, r/g]
        delta = torch.bmm(b, a).reshape(base.weight.shape) * adapter.scaling
        return delta.to(base.weight.dtype)

    def _delta(self, x: torch.Tensor, adapter: LoraAdapter) -> torch.Tensor:
        dtype = x.dtype
        if adapter.dropout > 0 and self.training:
            x = F.dropout(x, adapter.dropout, True)
        xa = self.conv_a(x, adapter.lora_A.to(dtype), adapter.a_groups)
        return self._fn(xa, (adapter.lora_B * adapter.scaling).to(dtype), None, 1, 0, 1, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._batch is not None and not self.disabled:
            return batched_conv_delta(self, self.base_layer(x), x)
        live = self._live
        if self.disabled or not live:
            if self.disabled and self.merged:
                raise RuntimeError("adapters are merged into this layer; unmerge before disabling them")
            return self.base_layer(x)
        if len(live) == 1 and live[0].variant is not None:  # DoRA (lorafit.variants.dora)
            return live[0].variant.forward(self, live[0], x)
        if len(live) > 1:
            check_shareable(live)
        y = self.base_layer(x)
        if len(live) == 1 or any(ad.dropout > 0 or ad.a_groups != live[0].a_groups for ad in live):
            for ad in live:  # one adapter (the usual case); or mixed forms / dropouts
                y = y.add_(self._delta(x, ad))
            return y
        # several adapters, one A conv and one B conv: concatenate per group chunk
        g = self.groups
        a = torch.cat([ad.lora_A.reshape(g, ad.r // g, *ad.lora_A.shape[1:]) for ad in live], 1)
        b = torch.cat([(ad.lora_B * ad.scaling).reshape(g, self.out_features // g, ad.r // g, *ad.lora_B.shape[2:])
                       for ad in live], 2)
        a = a.reshape(-1, *a.shape[2:]).to(x.dtype)
        b = b.reshape(self.out_features, -1, *b.shape[3:]).to(x.dtype)
        xa = self.conv_a(x, a, live[0].a_groups)
        return y.add_(self._fn(xa, b, None, 1, 0, 1, g))
