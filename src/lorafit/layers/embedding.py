"""LoRA for nn.Embedding, in PEFT's layout (A [r, vocab], B [dim, r]; A starts at zero)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import LoraAdapter, LoraLayer, check_shareable, master_dtype
from .batched import batched_embedding_delta


class EmbeddingLora(LoraLayer):
    """y = base(ids) + s * A[:, ids]^T B^T.  Shapes: ids [...]; y [..., dim]."""

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim

    def make_adapter(self, name, r, alpha, use_rslora, dropout, a_groups=None):
        w = self.base_layer.weight
        return LoraAdapter("embedding", (r, self.in_features), (self.out_features, r), r, alpha, use_rslora,
                           dropout, master_dtype(w.dtype), w.device)

    def delta_weight(self, adapter: LoraAdapter) -> torch.Tensor:
        delta = (adapter.lora_B.float() @ adapter.lora_A.float()).t() * adapter.scaling  # [vocab, dim]
        return delta.to(self.base_layer.weight.dtype)

    def _lookup(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(ids, table, padding_idx=base.padding_idx, scale_grad_by_freq=base.scale_grad_by_freq)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self._batch is not None and not self.disabled:
            return batched_embedding_delta(self, self.base_layer(ids), ids)
        live = self._live
        if self.disabled or not live:
            if self.disabled and self.merged:
                raise RuntimeError("adapters are merged into this layer; unmerge before disabling them")
            return self.base_layer(ids)
        if len(live) == 1 and live[0].variant is not None:  # DoRA (lorafit.variants.dora)
            return live[0].variant.forward(self, live[0], ids)
        y = self.base_layer(ids)
        if len(live) == 1:
            ad = live[0]
            a, b = ad.lora_A, ad.lora_B * ad.scaling
        else:
            check_shareable(live)
            a, b = self._cat_live()
        # dropout is not applied to token ids (PEFT does the same for embeddings)
        xa = self._lookup(ids, a.t().to(y.dtype))  # [..., r]
        return y.add_(xa @ b.t().to(y.dtype))
