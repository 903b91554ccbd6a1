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

from ..functional import lora_add_, lora_linear
from ..layers import ConvLora, EmbeddingLora, LinearLora, LoraAdapter, LoraLayer

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


class _Dora:
    """Shared DoRA logic; subclasses give the per-kind weight layout and forward."""

    name = "DoRA"
    exclusive = True  # rescales the base output: it cannot share a layer with other live adapters

    # ------------------------------------------------------------- per-kind layout
    def grouped(self, layer: LoraLayer, ad: LoraAdapter, weight: torch.Tensor):
        """(W [g, out/g, K], A [g, r/g, K], B [g, out/g, r/g]) as views."""
        raise NotImplementedError

    def factor_view(self, layer: LoraLayer) -> tuple:
        """Shape that broadcasts g [out] over the base weight's layout."""
        raise NotImplementedError

    # ------------------------------------------------------------- norms
    def weight_norm(self, layer: LoraLayer, ad: LoraAdapter,
                    weight: torch.Tensor | None = None) -> torch.Tensor:
        """``||W + s B A||`` per output, [out] fp32, cached until W, A or B change."""
        w = layer.base_weight() if weight is None else weight
        a, b = ad.lora_A, ad.lora_B
        s = ad.scaling
        key = (id(w), w._version, a._version, b._version, float(s), w.device, w.dtype)
        cache = ad.__dict__.setdefault("_dora_cache", {})
        if cache.get("key") == key:
            return cache["norm"]
        with torch.no_grad():
            wg, ag, bg = self.grouped(layer, ad, w)
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
    def magnitude_shape(self, layer: LoraLayer) -> tuple:
        return (layer.out_features,)

    def init_magnitude(self, layer: LoraLayer, ad: LoraAdapter, weight: torch.Tensor) -> None:
        """m = ||W + s B A|| so the adapter starts as the base function (PEFT's init)."""
        norm = self.weight_norm(layer, ad, weight)
        ad.__dict__.pop("_dora_cache", None)  # `weight` may be a planned (not yet applied) tensor
        ad.lora_magnitude_vector = nn.Parameter(norm.to(ad.lora_A.dtype).reshape(self.magnitude_shape(layer)))
        ad.variant = self

    # ------------------------------------------------------------- merge
    def merge(self, layer: LoraLayer, name: str, safe: bool = False) -> None:
        """W' = g (W + s B A), g from the unmerged W; the norm is kept to unmerge exactly."""
        ad = layer.adapters[name]
        weight = layer.base_weight()
        norm = self.weight_norm(layer, ad).clone()
        g = (ad.lora_magnitude_vector.detach().reshape(-1).float() / norm).view(self.factor_view(layer))
        with torch.no_grad():
            new = g * (weight.float() + layer.delta_weight(ad).float())
            if safe and not torch.isfinite(new).all():
                raise ValueError(f"merging adapter {name!r} gives non-finite weights")
            weight.copy_(new.to(weight.dtype))
        ad.__dict__["_dora_merged_norm"] = norm
        layer.merged.append(name)
        layer._refresh()

    def unmerge(self, layer: LoraLayer, name: str) -> None:
        """W = W' / g - s B A with the g used at merge time."""
        ad = layer.adapters[name]
        norm = ad.__dict__.pop("_dora_merged_norm")
        g = (ad.lora_magnitude_vector.detach().reshape(-1).float() / norm).view(self.factor_view(layer))
        with torch.no_grad():
            weight = layer.base_weight()
            weight.copy_((weight.float() / g - layer.delta_weight(ad).float()).to(weight.dtype))
        layer.merged.remove(name)
        layer._refresh()


class DoraLinear(_Dora):
    """nn.Linear and transformers Conv1D (weight [in, out]); x [..., in] -> y [..., out]."""

    def grouped(self, layer, ad, weight):
        w = weight.t() if layer.fan_in_fan_out else weight  # [out, in] view, no copy
        return w[None], ad.lora_A[None], ad.lora_B[None]

    def factor_view(self, layer):
        return (1, -1) if layer.fan_in_fan_out else (-1, 1)

    def forward(self, layer: LinearLora, ad: LoraAdapter, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        g = self.factor(layer, ad)
        plain = layer._plain()
        if plain is not None and not args and not kwargs:
            weight, bias = plain
            z = lora_linear(x, weight, None, ad.lora_A, ad.lora_B, ad.scaling, ad.dropout, layer.training)
        else:  # custom base forward: its output minus the bias is W x
            y = layer.base_layer(x, *args, **kwargs)
            bias = getattr(layer.base_layer, "bias", None)
            z = y - bias if bias is not None else y
            z = lora_add_(z, x, ad.lora_A, ad.lora_B, ad.scaling, ad.dropout, layer.training)
        g = g.to(z.dtype)
        return z * g if bias is None else torch.addcmul(bias.to(z.dtype), z, g)


class DoraConv(_Dora):
    """Conv1d/2d/3d with groups=1, or lorafit's grouped form (A grouped like the base)."""

    def grouped(self, layer, ad, weight):
        g = layer.groups
        out, rg = layer.out_features, ad.lora_A.shape[0] // g
        return (weight.reshape(g, out // g, -1), ad.lora_A.reshape(g, rg, -1),
                ad.lora_B.reshape(g, out // g, rg))

    def factor_view(self, layer):
        return (-1,) + (1,) * (layer.nd + 1)

    def magnitude_shape(self, layer):
        return (1, layer.out_features) + (1,) * layer.nd

    def forward(self, layer: ConvLora, ad: LoraAdapter, x: torch.Tensor) -> torch.Tensor:
        base = layer.base_layer
        g = self.factor(layer, ad)
        z = layer.conv_a(x, base.weight, base.groups)  # the base conv without its bias
        z = z.add_(layer._delta(x, ad))
        view = (1, -1) + (1,) * layer.nd
        g = g.to(z.dtype).view(view)
        return z * g if base.bias is None else torch.addcmul(base.bias.to(z.dtype).view(view), z, g)


class DoraEmbedding(_Dora):
    """nn.Embedding: W [vocab, dim]; the norm is per embedding dimension (a column of W), as PEFT."""

    def grouped(self, layer, ad, weight):
        # W^T [dim, vocab], A [r, vocab], B [dim, r]
        return weight.t()[None], ad.lora_A[None], ad.lora_B[None]

    def factor_view(self, layer):
        return (1, -1)

    def forward(self, layer: EmbeddingLora, ad: LoraAdapter, ids: torch.Tensor) -> torch.Tensor:
        g = self.factor(layer, ad)
        y = layer.base_layer(ids)
        xa = layer._lookup(ids, ad.lora_A.t().to(y.dtype))  # [..., r]
        z = y.add_(xa @ (ad.lora_B * ad.scaling).t().to(y.dtype))
        return z * g.to(z.dtype)


DORA_LINEAR, DORA_CONV, DORA_EMBEDDING = DoraLinear(), DoraConv(), DoraEmbedding()


def setup_dora(name: str, layer: LoraLayer, ad: LoraAdapter, weight: torch.Tensor | None = None) -> None:
    """Give a freshly planned adapter its magnitude (m = ||W + s B A||) and the DoRA forward.

    Args:
        weight: the base weight the adapter will see (PiSSA/OLoRA pass the planned residual).
    Raises:
        ValueError: for layers DoRA is not defined on here (MHA, quantized bases, PEFT's conv
            form on a grouped conv, where the update does not fit the weight's layout).
    """
    base = layer.base_layer
    if getattr(base, "lorafit_quantized", False):
        raise ValueError(f"{name}: DoRA on a quantized base is not supported yet")
    if isinstance(layer, LinearLora):
        variant = DORA_LINEAR
    elif isinstance(layer, ConvLora):
        if ad.a_groups != layer.groups:
            raise ValueError(f"{name}: DoRA needs the update in the conv weight's layout; this grouped conv "
                             f"(groups={layer.groups}) uses PEFT's form, whose update mixes groups")
        variant = DORA_CONV
    elif isinstance(layer, EmbeddingLora):
        variant = DORA_EMBEDDING
    else:
        raise ValueError(f"{name}: DoRA is not supported on {type(base).__name__} layers "
                         "(supported: Linear, transformers Conv1D, Conv1d/2d/3d, Embedding)")
    variant.init_magnitude(layer, ad, layer.base_weight() if weight is None else weight)
