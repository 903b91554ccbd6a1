"""PiSSA and OLoRA initialisation, and their conversion back to a plain LoRA adapter.

Both start the adapter on the top of the base weight and move that part out of the base:
``W = W_res + s B0 A0``, so the model's function is unchanged at step 0.

* PiSSA (Meng et al., 2024): ``W = U S V^T``; ``B0 = U_r sqrt(S_r / s)``, ``A0 = sqrt(S_r / s) V_r^T``
  (the principal singular directions train). ``pissa_niter_K`` uses the randomized
  ``torch.svd_lowrank(W, q=r, niter=K)`` (Halko et al.) instead of a full SVD: minutes become
  seconds on large layers, at a small accuracy cost.
* OLoRA (Buyukakyuz, 2024): ``W = Q R``; ``B0 = Q[:, :r]``, ``A0 = R[:r]`` (orthonormal B).

Because the base weights change, an adapter trained this way only fits the residual base. The
initial factors are kept (non-persistent buffers ``init_A`` / ``init_B``, r x (in + out)
each), so ``save_adapter(..., convert_to_lora=True)`` can write the update relative to the
ORIGINAL base: ``W_res + s B A - W = s (B A - B0 A0) = s [B | -B0] [A ; A0]`` - a rank-2r
plain LoRA adapter with the same scaling (alpha doubled, or times sqrt(2) with rsLoRA), as
PEFT's ``path_initial_model_for_weight_conversion`` does.

The residual is computed when the injection is planned and written into the base weight only
when it is committed, so a failed ``inject`` leaves the base untouched.

``init="gaussian"`` (PEFT's option) draws A from N(0, 1/r) instead of kaiming-uniform; on kinds
whose identity init is A = 0 (embeddings) it changes nothing, as in PEFT.
"""

from __future__ import annotations

import math
import re
import warnings

import torch
import torch.nn as nn

from .base import Variant

_PISSA = re.compile(r"pissa(_niter_(\d+))?")


def pissa_factors(w: torch.Tensor, r: int, scaling: float, niter: int | None = None):
    """(A0 [r, in], B0 [out, r]) with ``s B0 A0`` the best rank-r approximation of w [out, in]."""
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(w, q=r, niter=niter)
        vh = v.t()
    root = (s / scaling).sqrt()
    return root[:, None] * vh, u * root[None, :]


def olora_factors(w: torch.Tensor, r: int):
    """(A0 = R[:r] [r, in], B0 = Q[:, :r] [out, r]) from the QR decomposition of w [out, in]."""
    q, rr = torch.linalg.qr(w)
    return rr[:r].contiguous(), q[:, :r].contiguous()


class WeightInit(Variant):
    """PiSSA / OLoRA: A and B from the top of the base weight; the base keeps the residual."""

    config_field = "init"

    def __init__(self, name: str):
        self.name = name

    def accepts(self, value) -> bool:
        if not isinstance(value, str):
            return False
        return _PISSA.fullmatch(value) is not None if self.name == "pissa" else value == self.name

    def plan(self, name, layer, ad, config, weight):
        """Initialise A/B from the base weight; return the planned residual base weight.

        The residual is stored on the adapter (``pending_base``) and written into the base weight
        by ``LoraLayer.attach`` when the injection commits.

        Raises:
            ValueError: on a layer without a dense [out, in] weight (conv, embedding, MHA,
                quantized), or a rank larger than min(out, in).
        """
        init = config.init
        w = layer.dense_weight()
        if w is None:
            raise ValueError(f"{name}: init={init!r} is supported on Linear / transformers Conv1D layers only "
                             f"(got {type(layer.base_layer).__name__}); use a target list without this layer")
        if len(layer.adapters):
            warnings.warn(f"{name}: init={init!r} changes the base weight that adapters {list(layer.adapters)} "
                          "were trained on; convert those to plain LoRA first", stacklevel=5)
        r = ad.r
        if r > min(w.shape):
            raise ValueError(f"{name}: init={init!r} needs r <= min(out, in) = {min(w.shape)}, got r={r}")
        if self.name == "olora":
            a0, b0 = olora_factors(w, r)
        else:
            niter = _PISSA.fullmatch(init).group(2)
            a0, b0 = pissa_factors(w, r, ad.scaling, niter=None if niter is None else int(niter))
        with torch.no_grad():
            ad.lora_A.copy_(a0)
            ad.lora_B.copy_(b0)
        residual = layer.from_dense(w - ad.scaling * (b0 @ a0))
        ad.init_A, ad.init_B = a0.to(ad.lora_A.dtype).clone(), b0.to(ad.lora_B.dtype).clone()
        ad.pending_base = residual
        return residual


class GaussianInit(Variant):
    """``init="gaussian"``: A ~ N(0, 1/r) where the kind's identity init has B = 0 (not embeddings)."""

    name = "gaussian"
    config_field = "init"

    def accepts(self, value) -> bool:
        return value == "gaussian"

    def plan(self, name, layer, ad, config, weight):
        if layer.zero_factor == "B":  # A is the random factor: draw it N(0, 1/r); embeddings keep A = 0 (PEFT)
            with torch.no_grad():
                for part in ad.parts():
                    nn.init.normal_(part.lora_A, std=1.0 / part.r)
        return weight


PISSA, OLORA, GAUSSIAN = WeightInit("pissa"), WeightInit("olora"), GaussianInit()


def convert_to_lora(layers, adapter: str, tensors: dict, config):
    """Tensors and config of a plain LoRA adapter equal to a PiSSA/OLoRA one on the ORIGINAL base.

    Args:
        tensors: PEFT-format tensors of `adapter` (from ``io.adapter_state``).
        config: the adapter's LoraConfig.
    Returns:
        (tensors, config): A' = [A ; A0] [2r, in], B' = [B | -B0] [out, 2r]; r, rank_pattern
        doubled and alpha, alpha_pattern scaled so each layer's scaling is unchanged.
    Raises:
        ValueError: an adapter without stored initial factors (not PiSSA/OLoRA) or with DoRA.
    """
    if config.use_dora:
        raise ValueError(f"adapter {adapter!r} uses DoRA: it cannot be written as a plain LoRA adapter")
    out = dict(tensors)
    for name, layer in layers:
        if adapter not in layer.adapters:
            continue
        ad = layer.adapters[adapter]
        a0, b0 = ad.init_A, ad.init_B
        if a0 is None or b0 is None:
            raise ValueError(f"convert_to_lora: adapter {adapter!r} on {name} has no PiSSA/OLoRA initial "
                             "weights (only adapters created with init='pissa', 'pissa_niter_K' or 'olora' "
                             "can be converted)")
        a_key, b_key = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        out[a_key] = torch.cat([out[a_key], a0.to(out[a_key].dtype)], 0).contiguous()
        out[b_key] = torch.cat([out[b_key], -b0.to(out[b_key].dtype)], 1).contiguous()
    mult = math.sqrt(2) if config.use_rslora else 2
    new = config.replace(r=2 * config.r, alpha=config.alpha * mult, init="default",
                         rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
                         alpha_pattern={k: v * mult for k, v in config.alpha_pattern.items()})
    return out, new
