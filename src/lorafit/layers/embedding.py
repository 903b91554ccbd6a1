"""LoRA for nn.Embedding, in PEFT's layout (A [r, vocab], B [dim, r]; A starts at zero)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import LoraAdapter, LoraLayer, check_shareable, master_dtype
from .batched import fill_slots, share_slots


class EmbeddingLora(LoraLayer):
    """y = base(ids) + s * A[:, ids]^T B^T.  Shapes: ids [...]; y [..., dim]."""

    KEY_A, KEY_B = "lora_embedding_A", "lora_embedding_B"  # PEFT's names (no ".weight")
    param_group = "lora_embedding"  # LoRA+: both factors at the embedding learning rate
    zero_factor = "A"  # PEFT's embedding init: A = 0, B random

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim

    @classmethod
    def handles(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    def make_adapter(self, name, r, alpha, use_rslora, dropout, **form):
        w = self.base_layer.weight
        return LoraAdapter((r, self.in_features), (self.out_features, r), r, alpha, use_rslora, dropout,
                           master_dtype(w.dtype), w.device)

    def init_adapter(self, ad: LoraAdapter, init) -> None:
        """PEFT's embedding init: A = 0, B ~ N(0, 1) (A random too with ``init=False``)."""
        with torch.no_grad():
            nn.init.zeros_(ad.lora_A)
            nn.init.normal_(ad.lora_B)
            if init is False:
                nn.init.normal_(ad.lora_A)

    def delta_weight(self, adapter: LoraAdapter) -> torch.Tensor:
        delta = (adapter.lora_B.float() @ adapter.lora_A.float()).t() * adapter.scaling  # [vocab, dim]
        return delta.to(self.base_layer.weight.dtype)

    def _lookup(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(ids, table, padding_idx=base.padding_idx, scale_grad_by_freq=base.scale_grad_by_freq)

    # ------------------------------------------------------------------ batches
    def build_stacks(self, adapters, dtype, device):
        """(A^T [n + 1, vocab, r_max], B [n + 1, dim, r_max], scale [n + 1]); slot n (the base) stays zero."""
        r, n = max(a.r for a in adapters if a is not None), len(adapters) + 1
        a_stack = torch.zeros(n, self.in_features, r, dtype=dtype, device=device)  # [n + 1, vocab, r]
        b_stack = torch.zeros(n, self.out_features, r, dtype=dtype, device=device)
        scale = torch.zeros(n, dtype=dtype, device=device)
        fill_slots(adapters, lambda i, k: a_stack[i, :, :k].t(), b_stack, scale)
        return a_stack, b_stack, scale

    def share_stacks(self, adapters, stacks):
        """Each adapter's A [r, vocab] and B [dim, r] become views of its slot (``share_weights``)."""
        a_stack, b_stack, _ = stacks
        share_slots(adapters, lambda i, k: a_stack[i, :, :k].t(), a_stack, b_stack)

    def batched_delta(self, y, ids, rows, stacks):
        """y [N, ..., dim] += per-row s_i A_i[:, ids]^T B_i^T, with ids [N, ...]."""
        a_stack, b_stack, scale = stacks
        n = ids.shape[0]
        xa = a_stack[rows.view(n, *([1] * (ids.dim() - 1))), ids]  # [N, ..., r]
        xa = xa.reshape(n, -1, xa.shape[-1]).mul_(scale[rows].view(n, 1, 1))
        delta = torch.bmm(xa, b_stack[rows].transpose(1, 2))
        return y.add_(delta.view(y.shape))

    # ------------------------------------------------------------------ DoRA: norm per embedding dimension
    def dora_layout(self, ad, weight):
        # W^T [dim, vocab], A [r, vocab], B [dim, r]: a column of W per output, as PEFT
        return weight.t()[None], ad.lora_A[None], ad.lora_B[None]

    def dora_factor_view(self):
        return (1, -1)

    def dora_forward(self, ad, factor, ids):
        y = self.base_layer(ids)
        xa = self._lookup(ids, ad.lora_A.t().to(y.dtype))  # [..., r]
        z = y.add_(xa @ (ad.lora_B * ad.scaling).t().to(y.dtype))
        return z * factor.to(z.dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self._batch is not None and not self.disabled:
            return self.batched(self.base_layer(ids), ids)
        live = self._live
        if self.disabled or not live:
            return self._base_only(ids)
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
