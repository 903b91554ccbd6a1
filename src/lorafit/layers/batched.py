"""Mixed-adapter batches: row i of a batch uses adapter names[i], in ONE batched pass.

`adapter_batch` gives every wrapper a `_batch` dict ``{"names": (n distinct names),
"rows": LongTensor [N] (index into names; n = base only)}``. On the first forward in the
context each layer stacks its adapters once (its kind's ``build_stacks``: zero-padded to the
largest rank, scaling folded into B, an all-zero slot n for base-only rows) and then every
forward is a gather of per-row A/B plus two batched matmuls (its kind's ``batched_delta``; the
BGMV idea of Punica / S-LoRA) - never a split batch and never a Python loop over adapters.

This module imports nothing of lorafit: the wrappers call it.
"""

from __future__ import annotations

import contextlib

import torch


def batch_rows(layer, n_rows: int) -> torch.Tensor:
    """The row -> stacked-adapter index tensor [N], checked against the input's batch size."""
    rows = layer._batch["rows"]
    if rows.shape[0] != n_rows:
        raise ValueError(f"adapter_batch was given {rows.shape[0]} names but the input batch has {n_rows} rows")
    return rows


def cached_stacks(layer, dtype, device):
    """The layer's stacked weights for this batch's names, cached across `adapter_batch` blocks.

    The cache lives on the layer (``layer.stack_cache``, not in the per-block dict) and is keyed
    by names, dtype and device; it is rebuilt only when an adapter weight changed (parameter
    version counters, so a training step or a load invalidates it) - re-stacking on every block
    cost more than the batched matmuls themselves for one-token decoding.

    With ``share_weights`` (``adapter_batch(..., share_weights=True)``) a fresh stack then becomes
    the adapters' storage: the kind's ``share_stacks`` turns each adapter's A and B into views of
    its slot, so a resident adapter is held once, not once as parameters and again stacked. The
    old storage is freed when the last view of it is re-pointed. A re-pointed parameter keeps its own
    version counter, so a later in-place write to it still invalidates the cache.

    Returns:
        whatever the kind's ``build_stacks`` returns, or None when the layer has none of the
        batch's adapters.
    """
    names = layer._batch["names"]
    adapters = [layer.adapters[n] if n in layer.adapters else None for n in names]
    if torch.compiler.is_compiling():  # traced: stacking is part of the graph (version counters are not)
        _check_batchable(adapters)
        with torch.no_grad():
            return layer.build_stacks(adapters, dtype, device) if any(a is not None for a in adapters) else None
    versions = tuple(v for a in adapters if a is not None for v in (
        a.lora_A._version, a.lora_B._version, a.scaling if isinstance(a.scaling, float) else a.scaling._version))
    key = (names, dtype, device)
    cache = layer.stack_cache
    hit = cache.get(key)
    if hit is not None and hit[0] == versions and all(x is y for x, y in zip(hit[1], adapters)):
        return hit[2]
    _check_batchable(adapters)
    cache.clear()  # one entry per layer (the names of the current batch); the old stacks go before the new come
    share = layer._batch.get("share", False)
    # shared stacks are made outside inference mode: parameters must stay normal tensors (an inference
    # tensor has no version counter and refuses in-place writes outside inference mode)
    with torch.inference_mode(False) if share else contextlib.nullcontext(), torch.no_grad():
        stacks = layer.build_stacks(adapters, dtype, device) if any(a is not None for a in adapters) else None
        if stacks is not None and share:
            layer.share_stacks(adapters, stacks)  # the parameters' version counters are unchanged by it
    cache[key] = (versions, adapters, stacks)
    return stacks


def _check_batchable(adapters) -> None:
    exclusive = next((a.variant for a in adapters if a is not None and a.variant is not None and a.variant.exclusive),
                     None)
    if exclusive is not None:
        raise ValueError(f"adapter_batch does not support {exclusive.name} adapters (the magnitude rescales the base)")


def zero_slots(adapters, a_shape, b_shape, dtype, device):
    """(A [n + 1, r_max, *a_shape], B [n + 1, *b_shape, r_max], scale [n + 1]) zeros for n adapters + the base slot.

    B stays unscaled and the scales are a vector gathered per row: a slot can then be the very
    storage of its adapter's parameters (``share_weights``), which a B with the scale folded in could not.
    """
    r = max(a.r for a in adapters if a is not None)
    n = len(adapters) + 1
    return (torch.zeros(n, r, *a_shape, dtype=dtype, device=device),
            torch.zeros(n, *b_shape, r, dtype=dtype, device=device),
            torch.zeros(n, dtype=dtype, device=device))


def can_share(ad, stack: torch.Tensor) -> bool:
    """May ``ad``'s parameters become views of ``stack``? Only with the same dtype and device (an fp32
    master adapter batched in bf16 keeps its own copy) and without sub-adapters."""
    return ad is not None and ad.lora_A.dtype == stack.dtype and ad.lora_A.device == stack.device \
        and len(ad.parts()) == 1


def repoint(param: torch.Tensor, view: torch.Tensor) -> None:
    """Make ``param`` use ``view``'s storage (same values); its autograd identity and version counter stay."""
    param.data = view


def fill_slots(adapters, a_slot, b_stack: torch.Tensor, scale: torch.Tensor) -> None:
    """Copy each adapter into its slot: A into ``a_slot(i, r)`` (a view of the A stack in A's own
    [r, ...] shape), B [..., r] into ``b_stack[i, ..., :r]``, its scaling into ``scale[i]``."""
    for i, ad in enumerate(adapters):
        if ad is not None:
            a_slot(i, ad.r).copy_(ad.lora_A)
            b_stack[i, ..., : ad.r].copy_(ad.lora_B)
            scale[i] = ad.scaling


def share_slots(adapters, a_slot, a_stack: torch.Tensor, b_stack: torch.Tensor) -> None:
    """``share_weights`` for a kind that filled its stacks with `fill_slots`: the same views become
    the adapters' A and B."""
    for i, ad in enumerate(adapters):
        if can_share(ad, a_stack):
            repoint(ad.lora_A, a_slot(i, ad.r))
            repoint(ad.lora_B, b_stack[i, ..., : ad.r])


def batched_modules(modules, rows: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Run each distinct module (e.g. per-adapter heads) and pick row i from module rows[i].

    Every module sees the whole batch (heads are small); no batch is split.
    """
    outs = torch.stack([m(*args, **kwargs) for m in modules])  # [n + 1, N, ...]
    if rows.shape[0] != outs.shape[1]:
        raise ValueError(f"adapter_batch was given {rows.shape[0]} names but the input batch has {outs.shape[1]} rows")
    return outs[rows, torch.arange(rows.shape[0], device=outs.device)]
