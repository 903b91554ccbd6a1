"""Quantized frozen Linear layers: ``NF4Linear`` and ``Int8Linear``.

Both implement `lorafit.layers.QuantizedBase` (docs/core-api.md, "Quantized bases":
``in_features``, ``out_features``, ``bias``, ``compute_dtype``, ``dequantize()``,
``to_linear()``, ``merge_delta_()``), so the core's LinearLora wraps them like an nn.Linear.

The weight exists only as quantized buffers. Forward runs ``_DequantLinear``, a custom
autograd Function that decodes the weight into a temporary, multiplies, and saves for backward
only the quantized storage (not the decoded weight, not the input: the frozen base has no
weight gradient). Backward decodes again and returns the input gradient (and the bias
gradient when the bias trains); the quantized storage never gets a gradient.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.quantized import QuantizedBase
from . import formats

_triton_failed = False


def nf4_backend(device: torch.device) -> str:
    """The NF4 decode path used on ``device``: "triton" or "torch".

    "triton" needs a CUDA device and an importable triton; ``LORAFIT_QUANT_BACKEND=torch``
    forces the plain path (e.g. to rule the kernel out when debugging).
    """
    choice = os.environ.get("LORAFIT_QUANT_BACKEND", "auto")
    if choice == "torch" or _triton_failed or device.type != "cuda":
        return "torch"
    return "triton" if _triton().AVAILABLE else "torch"


def _triton():
    """The Triton kernel module, imported on the first CUDA decode: importing triton costs seconds."""
    from . import triton_nf4  # lazy: triton (optional, heavy)

    return triton_nf4


class _DequantLinear(torch.autograd.Function):
    """y = x @ W^T + b with W decoded from quantized storage on the fly.

    ``layer`` provides the decoder; ``storage`` are its quantized buffers, passed as inputs so
    that ``save_for_backward`` tracks their versions (an in-place ``merge_delta_`` between
    forward and backward raises instead of silently giving a wrong gradient).
    """

    @staticmethod
    def forward(ctx, x, bias, layer, *storage):
        ctx.layer = layer
        ctx.save_for_backward(*storage)
        w = layer._decode(storage, x.dtype)  # [out, in], temporary
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        storage = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = ctx.layer._decode(storage, grad_out.dtype)
            grad_x = grad_out.matmul(w)  # [..., out] @ [out, in]
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return (grad_x, grad_bias, None) + (None,) * len(storage)


class QuantizedLinear(QuantizedBase):
    """Shared machinery: bias, dtype bookkeeping, forward, merge. Subclasses define storage.

    Args:
        in_features: input size.
        out_features: output size.
        bias: whether the layer has a bias (kept in full precision, as an nn.Parameter).
        compute_dtype: dtype that ``dequantize()`` returns; the original weight's dtype.
        device: where the storage lives.
    """

    fmt = ""
    _storage_names: tuple[str, ...] = ()
    _fp32_buffers: tuple[str, ...] = ()  # scales: must stay fp32 through model.to(dtype)
    _views: dict[str, torch.dtype] = {}  # after shardable_storage_(): storage name -> the dtype it decodes as

    def __init__(self, in_features, out_features, bias=True, compute_dtype=torch.float32, device=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device))
        else:
            self.register_parameter("bias", None)

    # -- storage ------------------------------------------------------------------------
    def _storage(self) -> tuple:
        views = self._views
        return tuple(getattr(self, n).view(views[n]) if n in views else getattr(self, n) for n in self._storage_names)

    def shardable_storage_(self) -> QuantizedLinear:
        """Turn the quantized storage buffers into frozen, integer-typed ``nn.Parameter``s (in place).

        FSDP2 (``fully_shard``) shards parameters only; buffers stay replicated, so without this
        every rank would hold the whole quantized base. As parameters the packed codes and the
        scales are split along dim 0 like any weight and all-gathered before the block's forward,
        so the decoder sees the full storage. They are integer-typed (float scales are viewed as
        same-width ints, bit for bit) because a ``MixedPrecisionPolicy(param_dtype=...)`` casts
        floating-point parameters only: the fp32 scales must not be rounded to bf16 on the way.
        FSDP2 all-gathers a group of mixed dtypes as bytes. ``requires_grad`` is False (integer
        tensors cannot have gradients anyway). Names, shapes and ``_storage()`` stay the same;
        ``state_dict()`` then holds the scales as their int views. Called by
        `lorafit.distributed.shard` before ``fully_shard``; idempotent.
        """
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
        views = dict(self._views)
        for n in self._storage_names:
            t = self._buffers.pop(n, None)
            if t is None:  # already a parameter
                continue
            if t.is_floating_point():
                views[n] = t.dtype
                t = t.view(ints[t.element_size()])
            self.register_parameter(n, nn.Parameter(t, requires_grad=False))
        self._views = views
        return self

    def _decode(self, storage: tuple, dtype: torch.dtype) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _encode(self, weight: torch.Tensor) -> dict:  # pragma: no cover
        raise NotImplementedError

    def _set_storage(self, weight: torch.Tensor) -> None:
        """(Re)quantize ``weight`` [out, in] into the existing buffers, in place."""
        for name, t in self._encode(weight).items():
            getattr(self, name).copy_(t)

    def storage_bytes(self) -> int:
        """Bytes of the quantized weight storage (bias excluded)."""
        return sum(t.numel() * t.element_size() for t in self._storage())

    def quant_config(self) -> dict:
        """What ``load_quantized`` needs to rebuild an empty layer of this kind."""
        return {
            "format": self.fmt,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
        }

    # -- protocol -------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The decoded weight [out, in] in ``dtype`` (default ``compute_dtype``); a new tensor."""
        with torch.no_grad():
            return self._decode(self._storage(), dtype or self.compute_dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """An ordinary nn.Linear holding the decoded weight (for export / merge_and_unload)."""
        dtype = dtype or self.compute_dtype
        w = self.dequantize(dtype)
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = nn.Parameter(w, requires_grad=False)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.detach().to(dtype).clone(), requires_grad=self.bias.requires_grad)
        return lin

    @torch.no_grad()
    def merge_delta_(self, delta: torch.Tensor) -> float:
        """Add a full-precision ``delta`` [out, in] into the quantized storage.

        The sum is re-quantized (new scales included), so the result carries a fresh rounding
        error; it is returned as the max abs difference between the stored weight and the exact
        ``dequantize() + delta``, so that the caller can report what merging cost.
        """
        if tuple(delta.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"merge_delta_: delta has shape {tuple(delta.shape)}, "
                f"expected ({self.out_features}, {self.in_features})"
            )
        target = self._decode(self._storage(), torch.float32)
        target += delta.to(device=target.device, dtype=torch.float32)
        self._set_storage(target)
        return (self._decode(self._storage(), torch.float32) - target).abs().max().item()

    # -- module plumbing ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in] -> [..., out], computed in ``x.dtype`` (what autocast would pick)."""
        storage = self._storage()
        bias = self.bias
        if not torch.is_grad_enabled() or not (x.requires_grad or (bias is not None and bias.requires_grad)):
            # nothing needs a gradient through the base (frozen base, frozen input: the first layers of
            # a LoRA model): decode and multiply, nothing saved - and no Function for the compiler
            return F.linear(x, self._decode(storage, x.dtype), None if bias is None else bias.to(x.dtype))
        return _DequantLinear.apply(x, bias, self, *storage)

    def _apply(self, fn, recurse=True):
        """Follow ``.to(dtype)`` with ``compute_dtype`` but keep the scales fp32 (moved only).

        ``model.to(torch.bfloat16)`` would otherwise round the block scales to bf16 and leave
        ``compute_dtype`` stale.
        """
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self._storage()[0].device))
        keep = {n: self._buffers[n] for n in self._fp32_buffers if n in self._buffers}  # not the int views
        for n in keep:
            self._buffers[n] = None
        super()._apply(fn, recurse)
        for n, t in keep.items():
            self._buffers[n] = t.to(device=probe.device)
        if probe.dtype.is_floating_point:
            self.compute_dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}"
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> QuantizedLinear:
        """Quantize an nn.Linear (its weight is not modified; the caller drops it)."""
        w = linear.weight
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            compute_dtype=w.dtype, device=w.device, **kwargs,
        )  # fmt: skip
        with torch.no_grad():
            layer._set_storage(w)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
                layer.bias.requires_grad_(linear.bias.requires_grad)
        return layer


class NF4Linear(QuantizedLinear):
    """Linear layer with an NF4 weight: 4-bit codes packed two per byte, blockwise absmax.

    Buffers: ``weight_packed`` uint8 [out * in / 2]; ``weight_absmax`` fp32 [n_blocks], or with
    ``double_quant`` ``weight_absmax_q`` uint8 [n_blocks] + ``weight_absmax_lo`` /
    ``weight_absmax_step`` fp32 [ceil(n_blocks / 256)]. ``n_blocks = out * in / block_size``.

    Args:
        block_size: values per scale; must be even and divide ``out * in``.
        double_quant: store the block scales in 8 bits.
    """

    fmt = "nf4"

    def __init__(self, in_features, out_features, bias=True, compute_dtype=torch.float32, device=None,
                 block_size: int = 64, double_quant: bool = False):  # fmt: skip
        super().__init__(in_features, out_features, bias, compute_dtype, device)
        numel = in_features * out_features
        formats.check_nf4_shape(numel, block_size, f"a {out_features}x{in_features} weight")
        self.block_size = block_size
        self.double_quant = bool(double_quant)
        n_blocks = numel // block_size
        u8 = {"dtype": torch.uint8, "device": device}
        self.register_buffer("weight_packed", torch.zeros(numel // 2, **u8))
        if self.double_quant:
            n_groups = -(-n_blocks // formats.SCALE_GROUP)
            self.register_buffer("weight_absmax_q", torch.zeros(n_blocks, **u8))
            self.register_buffer("weight_absmax_lo", torch.zeros(n_groups, device=device))
            self.register_buffer("weight_absmax_step", torch.zeros(n_groups, device=device))
            self._storage_names = (
                "weight_packed",
                "weight_absmax_q",
                "weight_absmax_lo",
                "weight_absmax_step",
            )
            self._fp32_buffers = ("weight_absmax_lo", "weight_absmax_step")
        else:
            self.register_buffer("weight_absmax", torch.zeros(n_blocks, device=device))
            self._storage_names = ("weight_packed", "weight_absmax")
            self._fp32_buffers = ("weight_absmax",)

    def _as_dict(self, storage: tuple) -> dict:
        if self.double_quant:
            return dict(zip(("packed", "absmax_q", "absmax_lo", "absmax_step"), storage))
        return dict(zip(("packed", "absmax"), storage))

    def _decode(self, storage, dtype):
        global _triton_failed
        d = self._as_dict(storage)
        shape = (self.out_features, self.in_features)
        if nf4_backend(d["packed"].device) == "triton":
            try:
                return _triton().nf4_dequantize_triton(d, shape, dtype, self.block_size)
            except Exception as e:  # a kernel that fails to build must not stop training
                _triton_failed = True
                warnings.warn(f"lorafit: Triton NF4 kernel failed ({e!r}); using the PyTorch path", stacklevel=2)
        return formats.nf4_dequantize(d["packed"], formats.nf4_scales(d), shape, dtype)

    def _encode(self, weight):
        s = formats.nf4_quantize(weight, self.block_size, self.double_quant)
        if self.double_quant:
            return {"weight_packed": s["packed"], "weight_absmax_q": s["absmax_q"],
                    "weight_absmax_lo": s["absmax_lo"], "weight_absmax_step": s["absmax_step"]}  # fmt: skip
        return {"weight_packed": s["packed"], "weight_absmax": s["absmax"]}

    def block_scales(self) -> torch.Tensor:
        """fp32 [n_blocks]: the effective scale of each block (after double quantization)."""
        return formats.nf4_scales(self._as_dict(self._storage()))

    def quant_config(self) -> dict:
        return {**super().quant_config(), "block_size": self.block_size, "double_quant": self.double_quant}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={self.block_size}, double_quant={self.double_quant}"


class Int8Linear(QuantizedLinear):
    """Linear layer with an int8 weight and one fp32 scale per output row.

    Buffers: ``weight_int8`` int8 [out, in]; ``weight_scale`` fp32 [out] (absmax(row) / 127).
    """

    fmt = "int8"
    _storage_names = ("weight_int8", "weight_scale")
    _fp32_buffers = ("weight_scale",)

    def __init__(self, in_features, out_features, bias=True, compute_dtype=torch.float32, device=None):
        super().__init__(in_features, out_features, bias, compute_dtype, device)
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.zeros(out_features, device=device))

    def _decode(self, storage, dtype):
        return formats.int8_dequantize(storage[0], storage[1], dtype)

    def _encode(self, weight):
        s = formats.int8_quantize(weight)
        return {"weight_int8": s["q"], "weight_scale": s["scale"]}


LAYER_TYPES = {"nf4": NF4Linear, "int8": Int8Linear}
