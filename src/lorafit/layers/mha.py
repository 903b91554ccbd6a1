"""LoRA for nn.MultiheadAttention.

MHA's forward reads `in_proj_weight` and `out_proj.weight` directly (F.multi_head_attention_
forward), so wrapping `out_proj` in a LoRA layer would be silently bypassed. This wrapper
adapts both projections and calls the functional form with effective weights
``W + s * B @ A`` (materialised per call: E x 3E, the same cost as the attention's own
weight read). Keys follow PEFT: in-proj adapter at ``<path>.lora_A/B``, out-proj adapter at
``<path>.base_layer.out_proj.lora_A/B``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import LoraAdapter, LoraLayer, master_dtype


class MhaLora(LoraLayer):
    """Adapters: `adapters[name]` is the in-proj update (A [r, E], B [3E, r]); its submodule `out`
    the out-proj update (A [r, E], B [E, r]). Adapter dropout is not applied here (there is no
    separate adapter input to drop: the update acts through the effective weight)."""

    all_linear = True
    owns_children = True  # out_proj is read through its weight: a target naming it adapts the MHA
    OUT_A, OUT_B = "base_layer.out_proj.lora_A.weight", "base_layer.out_proj.lora_B.weight"

    def __init__(self, base_layer: nn.MultiheadAttention):
        if not base_layer._qkv_same_embed_dim:
            raise ValueError("LoRA on nn.MultiheadAttention needs kdim == vdim == embed_dim (one in_proj_weight)")
        super().__init__(base_layer)
        self.in_features = self.out_features = base_layer.embed_dim

    @classmethod
    def handles(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention)

    @classmethod
    def peft_suffixes(cls):
        return (cls.KEY_A, cls.KEY_B, cls.OUT_A, cls.OUT_B)

    def make_adapter(self, name, r, alpha, use_rslora, dropout, **form):
        w = self.base_layer.in_proj_weight
        e = self.in_features
        dtype = master_dtype(w.dtype)
        adapter = LoraAdapter((r, e), (3 * e, r), r, alpha, use_rslora, dropout, dtype, w.device)
        adapter.out = LoraAdapter((r, e), (e, r), r, alpha, use_rslora, dropout, dtype, w.device)
        return adapter

    def peft_parts(self, ad):
        return [(ad, self.KEY_A, self.KEY_B), (ad.out, self.OUT_A, self.OUT_B)]

    def base_weight(self) -> torch.Tensor:
        return self.base_layer.in_proj_weight

    def delta_weight(self, adapter: LoraAdapter) -> torch.Tensor:
        return ((adapter.lora_B.float() @ adapter.lora_A.float()) * adapter.scaling).to(
            self.base_layer.in_proj_weight.dtype)

    def _out_delta(self, name: str) -> torch.Tensor:
        ad = self.adapters[name].out
        return ((ad.lora_B.float() @ ad.lora_A.float()) * ad.scaling).to(self.base_layer.out_proj.weight.dtype)

    def merge_plain(self, name: str, safe: bool = False) -> None:
        base = self.base_layer
        with torch.no_grad():
            new_in = base.in_proj_weight + self.delta_weight(self.adapters[name])
            new_out = base.out_proj.weight + self._out_delta(name)
            if safe and not (torch.isfinite(new_in).all() and torch.isfinite(new_out).all()):
                raise ValueError(f"merging adapter {name!r} gives non-finite weights")
            base.in_proj_weight.copy_(new_in)
            base.out_proj.weight.copy_(new_out)

    def unmerge_plain(self, name: str) -> None:
        base = self.base_layer
        with torch.no_grad():
            base.in_proj_weight.sub_(self.delta_weight(self.adapters[name]))
            base.out_proj.weight.sub_(self._out_delta(name))

    def build_stacks(self, adapters, dtype, device):
        raise ValueError("adapter_batch is not supported for nn.MultiheadAttention layers")

    def _effective(self, weight: torch.Tensor, adapters) -> torch.Tensor:
        w = weight
        for ad in adapters:  # a weight-sized update per adapter; no activation-sized work here
            w = w + (ad.lora_B.to(w.dtype) @ ad.lora_A.to(w.dtype)) * ad.scaling
        return w

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        base = self.base_layer
        if self._batch is not None and not self.disabled:
            self.build_stacks([], None, None)  # refuses, naming the layer kind
        live = self._live
        if self.disabled or not live:
            return self._base_only(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        w_in = self._effective(base.in_proj_weight, live)
        w_out = self._effective(base.out_proj.weight, [ad.out for ad in live])
        if base.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, base.embed_dim, base.num_heads, w_in, base.in_proj_bias, base.bias_k, base.bias_v,
            base.add_zero_attn, base.dropout, w_out, base.out_proj.bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        if base.batch_first:
            out = out.transpose(0, 1)
        return out, weights
