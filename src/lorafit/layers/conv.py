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
from .batched import can_share, repoint

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class ConvLora(LoraLayer):
    """Shapes: x [N, in, *S]; A [r, in / a_groups, *k]; B [out, r / groups, 1...]; y [N, out, *S']."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.nd = base_layer.weight.dim() - 2
        self.groups = base_layer.groups
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self._fn = _CONV_FN[self.nd]

    # ------------------------------------------------------------------ declarations
    @classmethod
    def handles(cls, module: nn.Module) -> bool:
        return isinstance(module, CONVS)

    @classmethod
    def skip_reason(cls, module: nn.Module) -> str | None:
        if module.groups > 1 and module.groups == module.in_channels:
            return "depthwise conv (groups == in_channels)"
        return None

    @classmethod
    def form_from_file(cls, base, tensors, where):
        """PEFT's form (A reads all input channels) or lorafit's grouped form, from A's shape."""
        a = tensors.get(cls.KEY_A)
        if a is None or a.dim() < 3:
            return {}
        if a.shape[1] == base.in_channels:
            return {"a_groups": 1}  # PEFT's form
        if base.groups > 1 and a.shape[1] == base.in_channels // base.groups:
            return {"a_groups": base.groups}
        raise ValueError(f"{where} has shape {tuple(a.shape)}, which does not fit conv {tuple(base.weight.shape)}")

    def make_adapter(self, name, r, alpha, use_rslora, dropout, a_groups=None, **form):
        base = self.base_layer
        g = self.groups if a_groups is None else a_groups
        if r % self.groups:
            raise ValueError(f"rank {r} is not a multiple of groups={self.groups} for this conv "
                             f"({type(base).__name__} {tuple(base.weight.shape)}); choose r divisible by groups")
        ones = (1,) * self.nd
        return LoraAdapter((r, self.in_features // g, *base.kernel_size), (self.out_features, r // self.groups, *ones),
                           r, alpha, use_rslora, dropout, master_dtype(base.weight.dtype), base.weight.device,
                           groups=self.groups, a_groups=g)

    def merge_blocker(self, ad):
        if ad.a_groups != self.groups:
            return (f"adapter uses PEFT's conv form on a grouped conv (groups={self.groups}): its update mixes "
                    "groups and cannot be merged into the grouped weight")
        return None

    def peft_incompatibility(self, ad):
        if ad.a_groups > 1:
            return "lorafit's group-respecting conv form on a grouped conv: lorafit loads it, PEFT cannot"
        return None

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
        blocker = self.merge_blocker(adapter)
        if blocker:
            raise ValueError(f"this {blocker}")
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

    # ------------------------------------------------------------------ batches: one A conv for all adapters
    def build_stacks(self, adapters, dtype, device):
        """(A [g * n * rg, *a_shape] for one conv, B [n + 1, g, out/g, rg], scale [n + 1], a_groups, n, rg)."""
        present = [a for a in adapters if a is not None]
        if len({a.a_groups for a in present}) > 1:
            raise ValueError("adapter_batch: adapters of one conv layer use different conv forms (PEFT's and grouped)")
        groups = self.groups
        rg = max(a.r for a in present) // groups
        a_shape = present[0].lora_A.shape[1:]
        out = self.out_features
        a_stack = torch.zeros(groups, len(adapters), rg, *a_shape, dtype=dtype, device=device)
        b_stack = torch.zeros(len(adapters) + 1, groups, out // groups, rg, dtype=dtype, device=device)
        scale = torch.zeros(len(adapters) + 1, dtype=dtype, device=device)
        for i, ad in enumerate(adapters):
            if ad is not None:
                k = ad.r // groups
                a_stack[:, i, :k] = ad.lora_A.to(dtype).view(groups, k, *a_shape)
                b_stack[i, :, :, :k] = ad.lora_B.to(dtype).view(groups, out // groups, k)
                scale[i] = ad.scaling
        return a_stack.view(-1, *a_shape), b_stack, scale, present[0].a_groups, len(adapters), rg

    def share_stacks(self, adapters, stacks):
        """B [out, r/g, 1...] becomes a view of its slot; A too when groups == 1 (a grouped A's blocks are
        not adjacent in the stack, so it keeps its own storage)."""
        a_all, b_stack, _, _, n_ad, rg = stacks
        a_stack = a_all.view(self.groups, n_ad, rg, *a_all.shape[1:])
        for i, ad in enumerate(adapters):
            if can_share(ad, b_stack):
                k = ad.r // self.groups
                repoint(ad.lora_B, b_stack[i, :, :, :k].reshape(self.out_features, k).view(ad.lora_B.shape))
                if self.groups == 1:
                    repoint(ad.lora_A, a_stack[0, i, :k])

    def batched_delta(self, y, x, rows, stacks):
        """y [N, out, *S] += per-row conv-LoRA delta; one A conv for all adapters, then a gather."""
        a_all, b_stack, scale, a_groups, n_ad, rg = stacks
        xa = self.conv_a(x.to(y.dtype), a_all, a_groups)  # [N, g * n_ad * rg, *S]
        n, g = x.shape[0], b_stack.shape[1]
        xa = xa.view(n, g, n_ad, rg, -1)
        pick = rows.clamp(max=n_ad - 1)
        xa = xa[torch.arange(n, device=x.device), :, pick] * scale[rows].view(n, 1, 1, 1)  # [N, g, rg, S]
        delta = torch.einsum("ngrs,ngor->ngos", xa, b_stack[rows])  # [N, g, out/g, S]
        return y.add_(delta.reshape(y.shape))

    # ------------------------------------------------------------------ DoRA: groups=1 or the grouped form
    def dora_layout(self, ad, weight):
        g = self.groups
        if ad.a_groups != g:
            raise ValueError(f"DoRA needs the update in the conv weight's layout; this grouped conv "
                             f"(groups={g}) uses PEFT's form, whose update mixes groups")
        out, rg = self.out_features, ad.lora_A.shape[0] // g
        return weight.reshape(g, out // g, -1), ad.lora_A.reshape(g, rg, -1), ad.lora_B.reshape(g, out // g, rg)

    def dora_factor_view(self):
        return (-1,) + (1,) * (self.nd + 1)

    def dora_magnitude_shape(self):
        return (1, self.out_features) + (1,) * self.nd

    def dora_forward(self, ad, factor, x):
        base = self.base_layer
        z = self.conv_a(x, base.weight, base.groups)  # the base conv without its bias
        z = z.add_(self._delta(x, ad))
        view = (1, -1) + (1,) * self.nd
        g = factor.to(z.dtype).view(view)
        return z * g if base.bias is None else torch.addcmul(base.bias.to(z.dtype).view(view), z, g)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._batch is not None and not self.disabled:
            return self.batched(self.base_layer(x), x)
        live = self._live
        if self.disabled or not live:
            return self._base_only(x)
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
