"""Fused LoRA ops in plain PyTorch (custom autograd).

The LoRA term of a linear layer is ``s * (x @ A^T) @ B^T`` with A [r, in], B [out, r]. A naive
module graph costs, per layer: a dropout copy of x, an fp32 copy of x (PEFT upcasts), a
separate multiply by s and an out-of-place add, and autograd keeps several activation-sized
tensors. Here, per layer:

* forward: ``y = x @ W^T (+ b)`` then ``y.addmm_(x @ A^T, B^T, alpha=s)`` - scaling folded into
  the GEMM, result added in place, no activation-sized temporary besides y itself;
* saved for backward: x (shared with any sibling layer that reads the same tensor) and
  ``xa = x @ A^T`` [T, r] - tiny; W, A and B are parameters (no copy);
* backward: ``dX = dY @ W`` and ``dX.addmm_(dY @ B, A, alpha=s)`` into one buffer;
  ``dA = s (dY B)^T x``, ``dB = s dY^T xa``, returned in the master dtype (fp32).

A and B are kept as fp32 master weights (a bf16 weight loses small AdamW updates) and cast to
the activation dtype inside the op: that costs r x d, never tokens x d.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _linear_forward(x, x_lora, weight, bias, lora_a, lora_b, scaling):
    """(y, xa): ``y = x W^T + b + s (x_l A^T) B^T`` with the LoRA term added in place; xa = x_l A^T [T, r]."""
    dtype = x.dtype
    a, b = lora_a.to(dtype), lora_b.to(dtype)
    y = F.linear(x, weight.to(dtype) if weight.dtype != dtype else weight, None if bias is None else bias.to(dtype))
    xa = _flat(x_lora) @ a.t()  # [T, r]
    _flat(y).addmm_(xa, b.t(), alpha=scaling)
    return y, xa


def _linear_backward(ctx, grad_y, x, x_lora, xa, weight, lora_a, lora_b, need_x, need_xl, need_w, need_bias,
                     need_a, need_b):
    """Gradients of `_linear_forward`; with ``x_lora is x`` dX is one buffer (dY W + s (dY B) A)."""
    s = ctx.scaling
    dtype = grad_y.dtype
    a, b = lora_a.to(dtype), lora_b.to(dtype)
    gy = _flat(grad_y)
    gyb = gy @ b  # [T, r]
    grad_x = grad_xl = grad_w = grad_bias = grad_a = grad_b = None
    same = x_lora is None
    if need_x or need_xl:
        if same:
            gx = gy @ weight.to(dtype)
            gx.addmm_(gyb, a, alpha=s)
            grad_x = gx.view(*grad_y.shape[:-1], gx.shape[-1])
        else:
            if need_x:
                grad_x = (gy @ weight.to(dtype)).view(*grad_y.shape[:-1], weight.shape[1])
            if need_xl:
                grad_xl = torch.mm(gyb, a).mul_(s).view(*grad_y.shape[:-1], a.shape[1])
    x_l = x if same else x_lora
    if need_a:
        grad_a = torch.mm(gyb.t(), _flat(x_l)).mul_(s).to(lora_a.dtype)
    if need_b:
        grad_b = torch.mm(gy.t(), xa).mul_(s).to(lora_b.dtype)
    if need_w:
        grad_w = torch.mm(gy.t(), _flat(x)).to(weight.dtype)
    if need_bias and ctx.has_bias:
        grad_bias = gy.sum(0).to(dtype)
    return grad_x, grad_xl, grad_w, grad_bias, grad_a, grad_b


class _LoraLinearFn(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T (no adapter dropout: x is read once and saved once)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        y, xa = _linear_forward(x, x, weight, bias, lora_a, lora_b, scaling)
        ctx.scaling, ctx.has_bias = scaling, bias is not None
        ctx.save_for_backward(x, xa, weight, lora_a, lora_b)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, xa, weight, lora_a, lora_b = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        gx, _, gw, gb, ga, gbb = _linear_backward(ctx, grad_y, x, None, xa, weight, lora_a, lora_b, need_x, False,
                                                  need_w, need_bias, need_a, need_b)
        return gx, gw, gb, ga, gbb, None


class _LoraLinearDropoutFn(torch.autograd.Function):
    """y = x W^T + b + s (x_l A^T) B^T with x_l = dropout(x), a separate tensor (saved instead of x
    unless W itself needs a gradient)."""

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, lora_a, lora_b, scaling):
        y, xa = _linear_forward(x, x_lora, weight, bias, lora_a, lora_b, scaling)
        ctx.scaling, ctx.has_bias = scaling, bias is not None
        ctx.save_for_backward(x if weight.requires_grad else None, x_lora, xa, weight, lora_a, lora_b)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, x_lora, xa, weight, lora_a, lora_b = ctx.saved_tensors
        need_x, need_xl, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        grads = _linear_backward(ctx, grad_y, x, x_lora, xa, weight, lora_a, lora_b, need_x, need_xl, need_w,
                                 need_bias, need_a, need_b)
        return (*grads, None)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """Fused ``F.linear(x, W, b) + s * dropout(x) @ A^T @ B^T``.

    Args:
        x: [..., in] activations in the compute dtype.
        weight: [out, in] frozen base weight. bias: [out] or None.
        lora_a: [r, in], lora_b: [out, r] (fp32 master weights; cast inside).
        scaling: python float s.
        dropout: adapter-input dropout; at p=0 (or eval) x itself is used, no copy.
    Returns:
        [..., out] in x's dtype.
    """
    if x.dim() == 1:
        return lora_linear(x[None], weight, bias, lora_a, lora_b, scaling, dropout, training)[0]
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        # Autocast does not reach inside a custom Function: cast x once here, as autocast would.
        x = x.to(torch.get_autocast_dtype(dev))
        with torch.autocast(dev, enabled=False):
            return lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout, training)
    if dropout > 0 and training:
        return _LoraLinearDropoutFn.apply(x, F.dropout(x, dropout, True), weight, bias, lora_a, lora_b, scaling)
    return _LoraLinearFn.apply(x, weight, bias, lora_a, lora_b, scaling)


class _LoraAddFn(torch.autograd.Function):
    """y += s (x A^T) B^T in place, for any base whose output y is already computed.

    Used for bases whose forward is not a plain F.linear (quantized storage, custom modules):
    the base's own autograd handles dX through W; this adds the LoRA term and its grads.
    """

    @staticmethod
    def forward(ctx, y, x_lora, lora_a, lora_b, scaling):
        dtype = y.dtype
        xa = _flat(x_lora.to(dtype)) @ lora_a.to(dtype).t()
        _flat(y).addmm_(xa, lora_b.to(dtype).t(), alpha=scaling)
        ctx.mark_dirty(y)
        ctx.scaling = scaling
        ctx.x_dtype = x_lora.dtype
        ctx.save_for_backward(x_lora, xa, lora_a, lora_b)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_lora, xa, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        dtype = grad_y.dtype
        gy = _flat(grad_y)
        gyb = gy @ lora_b.to(dtype)
        need_y, need_x, need_a, need_b, _ = ctx.needs_input_grad
        grad_x = grad_a = grad_b = None
        if need_x:
            grad_x = torch.mm(gyb, lora_a.to(dtype)).mul_(s).view(*x_lora.shape).to(ctx.x_dtype)
        if need_a:
            grad_a = torch.mm(gyb.t(), _flat(x_lora.to(dtype))).mul_(s).to(lora_a.dtype)
        if need_b:
            grad_b = torch.mm(gy.t(), xa).mul_(s).to(lora_b.dtype)
        return grad_y if need_y else None, grad_x, grad_a, grad_b, None


def lora_add_(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
              dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """Add ``s * dropout(x) A^T B^T`` to the base output y ([..., out]) in place; returns y."""
    x_lora = F.dropout(x, dropout, True) if (dropout > 0 and training) else x
    if not torch.is_grad_enabled() or not (x.requires_grad or lora_a.requires_grad or lora_b.requires_grad
                                           or y.requires_grad):
        with torch.no_grad():
            xa = _flat(x_lora.to(y.dtype)) @ lora_a.to(y.dtype).t()
            _flat(y).addmm_(xa, lora_b.to(y.dtype).t(), alpha=scaling)
        return y
    if torch.compiler.is_compiling():
        # traced: plain ops (autograd saves x_l and xa, as the Function does; the compiler fuses the
        # add), since dynamo cannot trace an in-place Function that marks its input dirty
        dtype = y.dtype
        xa = x_lora.to(dtype) @ lora_a.to(dtype).t()
        return y + (xa @ lora_b.to(dtype).t()) * scaling
    if y._base is not None or not y.is_contiguous():
        y = y.contiguous().clone() if y._base is not None else y.contiguous()
    return _LoraAddFn.apply(y, x_lora, lora_a, lora_b, scaling)
