"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024), PEFT-compatible.

The adapted weight is ``W' = m * (W + s B A) / ||W + s B A||`` with the norm taken per output
(rows of W [out, in]; per output channel for convs; per embedding dimension for embeddings)
and, as in the paper (sec. 4.3) and PEFT, treated as a constant in backward. ``m`` is the
trainable magnitude, stored as ``lora_magnitude_vector`` in PEFT's shapes: [out] for
Linear / Conv1D, [dim] for Embedding and [1, out, 1, ...] for Conv1d/2d/3d.

How the step stays close to plain LoRA:

* no second base matmul: ``y = g * (W x + s B A x) + b`` with ``g = m / ||.||``; the fused LoRA op
  computes ``z = W x + s B A x`` exactly as plain LoRA does (bias left out) and one ``addcmul``
  applies g and the bias. PEFT instead subtracts the bias, multiplies by (g - 1) and adds
  three activation-sized tensors. Saved for backward: x and x A^T (as LoRA) plus z.
* the norm never materialises ``W + s B A``: per row,
  ``||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s <B_i, (W A^T)_i> + s^2 B_i (A A^T) B_i^T``.
  ``||W_i||^2`` is cached (W is frozen; the cache key includes its version counter) and
  ``W A^T`` [out, r] reads W once, like r extra tokens. PEFT builds ``B A`` through an
  identity matmul (in x in x r) and a full-size ``W + s B A`` on every forward.
* the norm is cached per (W, A, B) version, so eval and gradient-accumulation micro-steps
  compute it once per optimizer step.

With adapter dropout (training only) PEFT runs a second base matmul on the dropped input;
here dropout applies to the LoRA branch only (``g * (W x + s B A drop(x))``), which is the
function the merged weight computes. Eval outputs are identical.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..layers import LoraAdapter, LoraLayer
from .base import Variant

_EPS = 1e-12


def _weight_sq(w: torch.Tensor, dims) -> torch.Tensor:
    """Squared norms of the frozen weight, cached on the tensor's identity and version."""
    # at least fp32; a float64 weight stays float64 (vector_norm refuses to narrow a dtype)
    return torch.linalg.vector_norm(w, dim=dims, dtype=torch.promote_types(w.dtype, torch.float32)).square()


def dora_norm(wa: torch.Tensor, w_sq: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              scaling) -> torch.Tensor:
    """Row norms of ``W + s B A`` from ``W A^T`` without forming ``W + s B A``.

    Args:
        wa: ``W A^T`` [g, out/g, r/g] (g = conv groups, 1 otherwise), any float dtype.
        w_sq: ``||W_i||^2`` [g, out/g], fp32.
        a: A [g, r/g, K]; b: B [g, out/g, r/g] (fp32 master weights).
        scaling: the adapter's s (float or 0-dim tensor).
    Returns:
        [out] fp32 norms (no autograd graph).
    """
    a, b = a.float(), b.float()
    cross = (b * wa.float()).sum(-1)  # <B_i, (W A^T)_i>
    gram = torch.matmul(a, a.transpose(-1, -2))  # [g, r/g, r/g]
    low = (torch.matmul(b, gram) * b).sum(-1)  # ||(B A)_i||^2
    sq = w_sq + 2 * scaling * cross + scaling * scaling * low
    return sq.clamp_min(_EPS).sqrt().reshape(-1)


class Dora(Variant):
    """DoRA on any layer kind that declares ``dora_layout`` / ``dora_factor_view`` / ``dora_forward``."""

    name = "DoRA"
    config_field = "use_dora"
    exclusive = True  # rescales the base output: it cannot share a layer with other live adapters
    MAGNITUDE = "lora_magnitude_vector"

    def accepts(self, value) -> bool:
        return bool(value)

    # ------------------------------------------------------------- norms
    def weight_norm(self, layer: LoraLayer, ad: LoraAdapter, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``||W + s B A||`` per output, [out] fp32, cached until W, A or B change."""
        w = layer.base_weight() if weight is None else weight
        a, b = ad.lora_A, ad.lora_B
        s = ad.scaling
        if torch.compiler.is_compiling():
            # traced: version counters are not graph values, and the graph computes the norm once
            # per forward anyway (W A^T reads W once, like r extra tokens)
            with torch.no_grad():
                wg, ag, bg = layer.dora_layout(ad, w)
                return dora_norm(torch.matmul(wg, ag.to(wg.dtype).transpose(-1, -2)), _weight_sq(wg, -1), ag, bg, s)
        key = (id(w), w._version, a._version, b._version, float(s), w.device, w.dtype)
        cache = ad.dora_cache
        if cache.get("key") == key:
            return cache["norm"]
        with torch.no_grad():
            wg, ag, bg = layer.dora_layout(ad, w)
            sq_key = key[:2]
            if cache.get("sq_key") != sq_key:
                cache["sq"], cache["sq_key"] = _weight_sq(wg, -1), sq_key
            wa = torch.matmul(wg, ag.to(wg.dtype).transpose(-1, -2))  # [g, out/g, r/g]; reads W once
            norm = dora_norm(wa, cache["sq"], ag, bg, s)
        cache["key"], cache["norm"] = key, norm
        return norm

    def factor(self, layer: LoraLayer, ad: LoraAdapter) -> torch.Tensor:
        """g = m / ||W + s B A|| [out] (fp32; gradient flows to m only)."""
        return ad.lora_magnitude_vector.reshape(-1) / self.weight_norm(layer, ad)

    # ------------------------------------------------------------- setup
    def plan(self, name, layer, ad, config, weight):
        """m = ||W + s B A|| so the adapter starts as the base function (PEFT's init)."""
        try:
            norm = self.weight_norm(layer, ad, layer.base_weight() if weight is None else weight)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        ad.dora_cache.clear()  # `weight` may be a planned (not yet applied) tensor
        ad.lora_magnitude_vector = nn.Parameter(norm.to(ad.lora_A.dtype).reshape(layer.dora_magnitude_shape()))
        ad.variant = self
        return weight

    def tensors(self, ad):
        return {self.MAGNITUDE: ad.lora_magnitude_vector}

    def suffixes(self):
        return (self.MAGNITUDE,)

    def forward(self, layer, ad, x, *args, **kwargs):
        return layer.dora_forward(ad, self.factor(layer, ad), x, *args, **kwargs)

    # ------------------------------------------------------------- merge
    def merge(self, layer: LoraLayer, name: str, safe: bool = False) -> None:
        """W' = g (W + s B A), g from the unmerged W; the norm is kept to unmerge exactly."""
        ad = layer.adapters[name]
        weight = layer.base_weight()
        norm = self.weight_norm(layer, ad).clone()
        g = (ad.lora_magnitude_vector.detach().reshape(-1).float() / norm).view(layer.dora_factor_view())
        with torch.no_grad():
            new = g * (weight.float() + layer.delta_weight(ad).float())
            if safe and not torch.isfinite(new).all():
                raise ValueError(f"merging adapter {name!r} gives non-finite weights")
            weight.copy_(new.to(weight.dtype))
        ad.dora_merged_norm = norm

    def unmerge(self, layer: LoraLayer, name: str) -> None:
        """W = W' / g - s B A with the g used at merge time."""
        ad = layer.adapters[name]
        norm, ad.dora_merged_norm = ad.dora_merged_norm, None
        g = (ad.lora_magnitude_vector.detach().reshape(-1).float() / norm).view(layer.dora_factor_view())
        with torch.no_grad():
            weight = layer.base_weight()
            weight.copy_((weight.float() / g - layer.delta_weight(ad).float()).to(weight.dtype))


DORA = Dora()
