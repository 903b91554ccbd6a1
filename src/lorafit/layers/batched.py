"""Mixed-adapter batches: row i of a batch uses adapter names[i], in ONE batched pass.

`adapter_batch` gives every wrapper a `_batch` dict ``{"names": (n distinct names),
"rows": LongTensor [N] (index into names; n = base only)}``. On the first forward in the
context each layer stacks its adapters once (zero-padded to the largest rank, scaling folded
into B, an all-zero slot n for base-only rows) and then every forward is a gather of per-row
A/B plus two batched matmuls (the BGMV idea of Punica / S-LoRA) - never a split batch and
never a Python loop over adapters.
"""

from __future__ import annotations

import torch


def _rows(layer, n_rows: int) -> torch.Tensor:
    rows = layer._batch["rows"]
    if rows.shape[0] != n_rows:
        raise ValueError(f"adapter_batch was given {rows.shape[0]} names but the input batch has {n_rows} rows")
    return rows


def _stacks(layer, dtype, device, build):
    """The layer's stacked weights for this batch's names, cached across `adapter_batch` blocks.

    The cache lives on the layer (not in the per-block dict) and is keyed by names, dtype and
    device; it is rebuilt only when an adapter weight changed (parameter version counters, so
    a training step or a load invalidates it) - re-stacking on every block cost more than the
    batched matmuls themselves for one-token decoding.
    """
    names = layer._batch["names"]
    adapters = [layer.adapters[n] if n in layer.adapters else None for n in names]
    versions = tuple(v for a in adapters if a is not None for v in (
        a.lora_A._version, a.lora_B._version, a.scaling if isinstance(a.scaling, float) else a.scaling._version))
    key = (names, dtype, device, build)
    cache = layer.__dict__.setdefault("_stack_cache", {})
    hit = cache.get(key)
    if hit is not None and hit[0] == versions and all(x is y for x, y in zip(hit[1], adapters)):
        return hit[2]
    if any(a is not None and getattr(a.variant, "exclusive", False) for a in adapters):
        raise ValueError("adapter_batch does not support DoRA adapters (the magnitude rescales the base)")
    with torch.no_grad():
        stacks = build(adapters, dtype, device) if any(a is not None for a in adapters) else None
    cache.clear()  # one entry per layer: the names of the current mixed batch
    cache[key] = (versions, adapters, stacks)
    return stacks


def _linear_stacks(adapters, dtype, device):
    present = [a for a in adapters if a is not None]
    r = max(a.r for a in present)
    fan_in, fan_out = present[0].lora_A.shape[1], present[0].lora_B.shape[0]
    a_stack = torch.zeros(len(adapters) + 1, r, fan_in, dtype=dtype, device=device)
    b_stack = torch.zeros(len(adapters) + 1, fan_out, r, dtype=dtype, device=device)
    for i, ad in enumerate(adapters):
        if ad is not None:
            a_stack[i, : ad.r] = ad.lora_A.to(dtype)
            b_stack[i, :, : ad.r] = ad.lora_B.to(dtype) * ad.scaling
    return a_stack, b_stack


def batched_linear_delta(layer, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y [N, ..., out] += per-row s_i (x A_i^T) B_i^T, with x [N, ..., in]."""
    rows = _rows(layer, x.shape[0])
    stacks = _stacks(layer, y.dtype, y.device, _linear_stacks)
    if stacks is None:  # this layer has none of the batch's adapters
        return y
    a_stack, b_stack = stacks
    n = x.shape[0]
    x3 = x.reshape(n, -1, x.shape[-1]).to(y.dtype)
    xa = torch.bmm(x3, a_stack[rows].transpose(1, 2))  # [N, T, r]
    delta = torch.bmm(xa, b_stack[rows].transpose(1, 2))  # [N, T, out]
    return y.add_(delta.view(y.shape))


def _conv_stacks(adapters, dtype, device):
    present = [a for a in adapters if a is not None]
    if len({a.a_groups for a in present}) > 1:
        raise ValueError("adapter_batch: adapters of one conv layer use different conv forms (PEFT's and grouped)")
    groups = present[0].groups
    rg = max(a.r for a in present) // groups
    a_shape = present[0].lora_A.shape[1:]
    out = present[0].lora_B.shape[0]
    a_stack = torch.zeros(groups, len(adapters), rg, *a_shape, dtype=dtype, device=device)
    b_stack = torch.zeros(len(adapters) + 1, groups, out // groups, rg, dtype=dtype, device=device)
    for i, ad in enumerate(adapters):
        if ad is not None:
            k = ad.r // groups
            a_stack[:, i, :k] = ad.lora_A.to(dtype).view(groups, k, *a_shape)
            b_stack[i, :, :, :k] = (ad.lora_B.to(dtype) * ad.scaling).view(groups, out // groups, k)
    return a_stack.reshape(-1, *a_shape), b_stack, present[0].a_groups, len(adapters), rg


def batched_conv_delta(layer, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y [N, out, *S] += per-row conv-LoRA delta; one A conv for all adapters, then a gather."""
    rows = _rows(layer, x.shape[0])
    stacks = _stacks(layer, y.dtype, y.device, _conv_stacks)
    if stacks is None:
        return y
    a_all, b_stack, a_groups, n_ad, rg = stacks
    xa = layer.conv_a(x.to(y.dtype), a_all, a_groups)  # [N, g * n_ad * rg, *S]
    n, g = x.shape[0], b_stack.shape[1]
    xa = xa.view(n, g, n_ad, rg, -1)
    pick = rows.clamp(max=n_ad - 1)
    xa = xa[torch.arange(n, device=x.device), :, pick]  # [N, g, rg, S]
    delta = torch.einsum("ngrs,ngor->ngos", xa, b_stack[rows])  # [N, g, out/g, S]
    return y.add_(delta.reshape(y.shape))


def _embedding_stacks(adapters, dtype, device):
    present = [a for a in adapters if a is not None]
    r = max(a.r for a in present)
    vocab, dim = present[0].lora_A.shape[1], present[0].lora_B.shape[0]
    a_stack = torch.zeros(len(adapters) + 1, vocab, r, dtype=dtype, device=device)
    b_stack = torch.zeros(len(adapters) + 1, dim, r, dtype=dtype, device=device)
    for i, ad in enumerate(adapters):
        if ad is not None:
            a_stack[i, :, : ad.r] = ad.lora_A.to(dtype).t()
            b_stack[i, :, : ad.r] = ad.lora_B.to(dtype) * ad.scaling
    return a_stack, b_stack


def batched_embedding_delta(layer, y: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """y [N, ..., dim] += per-row s_i A_i[:, ids]^T B_i^T, with ids [N, ...]."""
    rows = _rows(layer, ids.shape[0])
    stacks = _stacks(layer, y.dtype, y.device, _embedding_stacks)
    if stacks is None:
        return y
    a_stack, b_stack = stacks
    n = ids.shape[0]
    xa = a_stack[rows.view(n, *([1] * (ids.dim() - 1))), ids]  # [N, ..., r]
    delta = torch.bmm(xa.reshape(n, -1, xa.shape[-1]), b_stack[rows].transpose(1, 2))
    return y.add_(delta.view(y.shape))


def batched_modules(modules, rows: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Run each distinct module (e.g. per-adapter heads) and pick row i from module rows[i].

    Every module sees the whole batch (heads are small); no batch is split.
    """
    outs = torch.stack([m(*args, **kwargs) for m in modules])  # [n + 1, N, ...]
    if rows.shape[0] != outs.shape[1]:
        raise ValueError(f"adapter_batch was given {rows.shape[0]} names but the input batch has {outs.shape[1]} rows")
    return outs[rows, torch.arange(rows.shape[0], device=outs.device)]
