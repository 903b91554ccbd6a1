"""The contract a quantized frozen linear layer meets so that LoRA can wrap it (QLoRA).

lorafit's own NF4 / int8 layers (:mod:`lorafit.quant`) subclass :class:`QuantizedBase`, and so can
any other storage format: `LinearLora` then wraps it like an ``nn.Linear`` (``y = base(x)``, then
the LoRA term is added in place), `merge_and_unload` replaces it by the dequantized
``nn.Linear`` plus the update, and DoRA / PiSSA refuse it with a reason. Being a class (not an
attribute that code tests with ``getattr``), the type checker and every reader see which layers
are quantized.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class QuantizedBase(nn.Module):
    """A frozen linear layer whose weight is stored quantized.

    Attributes a subclass sets: ``in_features``, ``out_features``, ``bias`` (Parameter or None,
    full precision), ``compute_dtype`` (what ``dequantize`` returns and the layer computes in).
    """

    in_features: int
    out_features: int
    compute_dtype: torch.dtype

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The decoded weight [out, in] (a new tensor)."""
        raise NotImplementedError

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """An ordinary ``nn.Linear`` holding the decoded weight (export, merge_and_unload)."""
        raise NotImplementedError

    def merge_delta_(self, delta: torch.Tensor) -> float:
        """Add a full-precision ``delta`` [out, in] into the storage; return the max abs error added."""
        raise NotImplementedError

    def storage_device(self) -> torch.device:
        return next(self.buffers()).device
