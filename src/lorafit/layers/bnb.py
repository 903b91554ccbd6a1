"""LoRA on bitsandbytes bases: ``bnb.nn.Linear4bit`` (NF4 / FP4) and ``bnb.nn.Linear8bitLt``.

These are the layers of a model loaded by transformers with
``BitsAndBytesConfig(load_in_4bit=True)`` or ``load_in_8bit=True``: the QLoRA base users already
have. `BnbLora` wraps them like lorafit's own quantized bases (`LinearLora` with
``quantized``): the base runs its own kernel, ``y = base(x)`` [..., out], and the LoRA term
``s (x A^T) B^T`` (A [r, in], B [out, r], fp32 master weights) is added in place; the packed
storage never gets a gradient and stays quantized while the adapter trains.

Dequantizing (``merge_and_unload(model, dtype=...)``, in-place ``merge``) goes through
bitsandbytes' own decoders: ``dequantize_4bit`` for ``Params4bit``, ``int8_vectorwise_dequant``
(``CB * SCB / 127``) for ``Int8Params``. The CPU inference layout bitsandbytes switches a
Linear4bit to in an eval forward is held off while the layer is wrapped (see `unpack_`).
``merge_and_unload`` merges the update into the decoded weight in full precision;
``merge`` re-quantizes ``W + dW`` (as PEFT does) and records the rounding it added in
``merge_error``.

bitsandbytes is an optional extra (``lorafit[bnb]``): it is never imported here. A module can be
a bitsandbytes layer only if the program has imported bitsandbytes, so `handles` looks it up in
``sys.modules`` and costs nothing otherwise.
"""

from __future__ import annotations

import copy
import logging
import sys

import torch
import torch.nn as nn

from .linear import LinearLora

log = logging.getLogger("lorafit")


def _bnb():
    """The imported bitsandbytes module, or None (never imports it)."""
    return sys.modules.get("bitsandbytes")


def is_bnb_linear(module: nn.Module) -> bool:
    """A bitsandbytes ``Linear4bit`` (incl. ``LinearNF4`` / ``LinearFP4``) or ``Linear8bitLt``."""
    bnb = _bnb()
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def is_4bit(module: nn.Module) -> bool:
    return type(module.weight).__name__ == "Params4bit"


def dequantize(module: nn.Module) -> torch.Tensor:
    """The decoded weight [out, in] of a bitsandbytes linear layer, a new tensor (the layer is unchanged).

    4-bit: in bitsandbytes' original dtype (the dtype of the weight it quantized); 8-bit: fp32
    (``CB * SCB / 127``; an ``Int8Params`` that still holds fp16 training weights returns those).
    """
    bnb = _bnb()
    weight = module.weight
    with torch.no_grad():
        if is_4bit(module):
            data, state = weight.data, weight.quant_state
            if getattr(state, "packing_format_for_cpu", False):  # eval-time CPU layout: undo it on copies
                data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
            return bnb.functional.dequantize_4bit(data, state).reshape(module.out_features, module.in_features)
        if weight.dtype.is_floating_point:
            return weight.data.clone()
        scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scb.to(weight.device)).float()


def original_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a decoded weight comes back in (and a merged ``nn.Linear`` gets by default)."""
    if is_4bit(module):
        state = module.weight.quant_state
        return getattr(state, "original_dtype", None) if getattr(state, "packing_format_for_cpu", False) \
            else state.dtype
    return torch.float32


def unpack_(module: nn.Module) -> None:
    """Undo bitsandbytes' CPU inference layout of a Linear4bit, in place.

    On a CPU with AVX512-BF16, bitsandbytes (>= 0.49) switches a Linear4bit in an eval forward
    without gradients, in place, to a layout only ``gemv_4bit`` reads, with its block scales
    rounded to bf16. That op has no autograd kernel: a training forward through it gives a wrong
    input gradient (the adapters below the layer silently learn from a wrong signal), and the bf16
    scales change the base (about 0.4% relative) for the rest of the run, so an adapter trained
    with evaluations in between would fit another base than the one in the file. The wrapper
    therefore holds that switch off during its own forward; a layer that was switched before
    injection is switched back here with bitsandbytes' own inverse (as its ``Params4bit.cuda()``
    does; the bf16 rounding of the scales stays).
    """
    if is_4bit(module) and getattr(module.weight.quant_state, "packing_format_for_cpu", False):
        weight = module.weight
        weight.data, weight.quant_state = _bnb().functional._convert_weight_packed_for_cpu_inverse(
            weight.data, weight.quant_state)


def requantize_(module: nn.Module, weight: torch.Tensor) -> None:
    """Store ``weight`` [out, in] as the layer's new quantized weight, with the layer's own format."""
    bnb = _bnb()
    old = module.weight
    device = old.device
    if is_4bit(module):
        state = old.quant_state
        new = bnb.nn.Params4bit(weight.to("cpu", original_dtype(module)), requires_grad=False,
                                blocksize=state.blocksize, compress_statistics=old.compress_statistics,
                                quant_type=old.quant_type, quant_storage=old.quant_storage, module=module)
    else:
        new = bnb.nn.Int8Params(weight.to("cpu", torch.float32), requires_grad=False,
                                has_fp16_weights=old.has_fp16_weights)
        module.state.reset_grads()
        module.state.CB = module.state.SCB = None
    module.weight = new.to(device)


class BnbLora(LinearLora):
    """LoRA on a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` base (see the module doc).

    Shapes as `LinearLora`: x [..., in]; A [r, in]; B [out, r]; y [..., out]. DoRA, PiSSA / OLoRA
    and the fingerprint refuse or skip it with the reason `LinearLora` gives a quantized base.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.quantized = True
        self.fan_in_fan_out = False
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    @classmethod
    def handles(cls, module: nn.Module) -> bool:
        return is_bnb_linear(module)

    def _dtype_device(self):
        return original_dtype(self.base_layer), self.base_layer.weight.device

    def _delta32(self, ad) -> torch.Tensor:
        """s B A [out, in] in fp32 (no graph): merged into the decoded weight before any rounding."""
        return (ad.lora_B.detach().float() @ ad.lora_A.detach().float()) * ad.scaling

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """As `LinearLora`, with bitsandbytes' CPU inference repacking held off (see `unpack_`)."""
        base = self.base_layer
        unpack_(base)  # packed before injection: back to the layout training and merging read
        repacks = getattr(base, "support_avx512bf16_for_cpu", False)
        if not repacks:
            return super().forward(x, *args, **kwargs)
        base.support_avx512bf16_for_cpu = False  # only for this call: the module is the user's
        try:
            return super().forward(x, *args, **kwargs)
        finally:
            base.support_avx512bf16_for_cpu = repacks

    # ------------------------------------------------------------------ merge
    def merge_plain(self, name, safe=False):
        unpack_(self.base_layer)
        target = dequantize(self.base_layer).float() + self._delta32(self.adapters[name])
        if safe and not torch.isfinite(target).all():
            raise ValueError(f"adapter {name!r}: the merged weight has inf/NaN")
        requantize_(self.base_layer, target)
        self.merge_error = float((dequantize(self.base_layer).float() - target).abs().max())
        log.info("merged %r into a bitsandbytes base: max abs error added %.3g", name, self.merge_error)

    def unmerge_plain(self, name):
        unpack_(self.base_layer)
        target = dequantize(self.base_layer).float() - self._delta32(self.adapters[name])
        requantize_(self.base_layer, target)

    def unloaded(self, dtype=None):
        """A plain ``nn.Linear`` holding the decoded weight plus the live updates (merged in fp32)."""
        base = self.base_layer
        dtype = dtype or original_dtype(base)
        linear = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, dtype=dtype,
                           device=base.weight.device)
        with torch.no_grad():
            weight = dequantize(base).float()
            for n in self.active:
                if n in self.adapters and n not in self.merged:
                    weight += self._delta32(self.adapters[n])
            linear.weight.copy_(weight)
            if base.bias is not None:
                linear.bias.copy_(base.bias)
        return linear.requires_grad_(False)
