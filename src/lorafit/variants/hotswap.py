"""The hot-swap variant: a layer whose scaling is a 0-dim tensor, so swapping alpha never recompiles.

`lorafit.prepare_hotswap` turns every adapter's scaling into a buffer; kinds whose forward
multiplies by ``ad.scaling`` as a tensor (conv, embedding, MHA) need nothing more, while kinds
that pass it into the fused op as a Python float (``scaling_in_op``: linear) get this variant,
which folds the tensor into B first (``B * s``: out x r work, not tokens x out).
"""

from __future__ import annotations

import torch

from ..functional import lora_add_, lora_linear
from .base import Variant


class TensorScaling(Variant):
    """Linear forward for an adapter whose scaling is a 0-dim tensor (hot-swap ready).

    Not chosen by a config field: `lorafit.prepare_hotswap` sets it. Merging uses the plain
    merge, which handles a tensor scaling.
    """

    name = "hot-swap"

    def forward(self, layer, ad, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        b = ad.lora_B * ad.scaling  # [out, r]: the scaling stays a tensor, so no guard on its value
        plain = layer._plain()
        if plain is not None and not args and not kwargs:
            return lora_linear(x, plain[0], plain[1], ad.lora_A, b, 1.0, ad.dropout, layer.training)
        y = layer.base_layer(x, *args, **kwargs)
        return lora_add_(y, x, ad.lora_A, b, 1.0, ad.dropout, layer.training)


TENSOR_SCALING = TensorScaling()
