"""FSDP2 for lorafit models: shard a LoRA (or QLoRA) model over ranks, and gather what must be whole.

Typical use under ``torchrun --nproc_per_node=N`` (after ``dist.init_process_group``)::

    model = lorafit.inject(base, config)            # optionally lorafit.quantize(base, "nf4") first
    model = lorafit.distributed.shard(model, param_dtype=torch.bfloat16)   # on CUDA
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=...)
    ... each rank trains on its slice of the global batch ...
    lorafit.save_adapter(model, "out")              # collective: every rank calls it, rank 0 writes

Why this shape:

- ``fully_shard`` per transformer block, then on the root: FSDP2 all-gathers one block's
  parameters just before its forward and frees them after, so peak memory is the sharded model
  plus about one whole block. Sharding only the root would gather the whole model at once.
- Mixed precision: ``param_dtype`` is the compute dtype of the gathered parameters (bf16 on
  CUDA); the *sharded* parameters keep the dtype they were created in, so lorafit's fp32 LoRA
  weights stay fp32 master weights and AdamW's moments are fp32. Gradients are reduced in
  ``reduce_dtype`` (fp32 by default) and land in the sharded fp32 parameter.
- A quantized base (``lorafit.quantize``) keeps its storage in buffers, which FSDP2 never
  shards; `shard` first turns that storage into frozen integer parameters
  (`QuantizedLinear.shardable_storage_`) so each of N ranks holds about 1/N of it.
- `shard` must come last: inject, load adapters and quantize before it. Merging into sharded
  weights is refused (`lorafit.merge_and_unload` says so); save the adapter and merge on an
  unsharded base.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
try:  # FSDPModule is re-exported for lorafit.train.sharded
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard  # noqa: F401
except ImportError:  # torch < 2.6 (the declared range starts at 2.4): FSDP2 lived under _composable
    from torch.distributed._composable.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard  # noqa: F401

from .tree import full_tensor, is_sharded  # noqa: F401 - part of this module's API
from .quant.layers import QuantizedLinear

__all__ = [
    "barrier",
    "find_blocks",
    "full_state",
    "full_tensor",
    "is_main_process",
    "is_sharded",
    "load_optimizer_state",
    "optimizer_state",
    "rank",
    "shard",
    "world_size",
]


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model`` (the unit `shard` wraps).

    A transformers model names its block classes in ``_no_split_modules`` (what accelerate's FSDP
    auto-wrap reads); the outermost modules of those classes are the blocks. Otherwise the
    longest ``nn.ModuleList`` whose children are all of one class (``model.layers``,
    ``encoder.layer``, ``transformer.h``). Empty when neither exists.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    if names:
        found, inside = [], set()
        for name, mod in model.named_modules():
            if type(mod).__name__ in names and not any(name.startswith(p) for p in inside):
                found.append(mod)
                inside.add(name + ".")
        if found:
            return found
    best: list[nn.Module] = []
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > len(best) and len({type(m) for m in mod}) == 1:
            best = list(mod)
    return best


def shard(model: nn.Module, *, mesh=None, blocks=None, param_dtype: torch.dtype | None = None,
          reduce_dtype: torch.dtype | None = torch.float32, reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``model`` with FSDP2: ``fully_shard`` on each transformer block, then on the root.

    Args:
        mesh: a 1-D ``DeviceMesh`` over the data-parallel ranks (default: all ranks, on CUDA when
            available, else CPU, which runs with gloo).
        blocks: the modules to shard one by one (default: `find_blocks`).
        param_dtype: compute dtype of the gathered parameters, e.g. ``torch.bfloat16`` on CUDA;
            None computes in the parameters' own dtype. Sharded parameters keep their dtype
            (fp32 LoRA master weights and optimizer state stay fp32).
        reduce_dtype: dtype of the gradient reduction (fp32: no bf16 rounding of the sum).
        reshard_after_forward: free each block's gathered parameters after its forward (gather
            again for backward); False trades memory for one all-gather less per block.
    Returns:
        the same model object, now an ``FSDPModule`` whose parameters are DTensors.
    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
        ValueError: no blocks found (pass ``blocks=``), or the model is sharded already.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("lorafit.distributed.shard: torch.distributed is not initialised; run under torchrun "
                           "and call torch.distributed.init_process_group first")
    if is_sharded(model):
        raise ValueError("lorafit.distributed.shard: the model is sharded already")
    blocks = find_blocks(model) if blocks is None else list(blocks)
    if not blocks:
        raise ValueError(f"lorafit.distributed.shard: no transformer blocks found in {type(model).__name__}; "
                         "pass blocks=[...] (the modules to shard one by one)")
    for mod in model.modules():
        if isinstance(mod, QuantizedLinear):
            mod.shardable_storage_()  # buffers -> frozen int parameters, so that FSDP2 splits them too
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kwargs = {"mesh": mesh, "mp_policy": policy}
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    return model


def rank() -> int:
    """This process's rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and without torch.distributed): the process that logs and writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op without torch.distributed)."""
    if world_size() > 1:
        dist.barrier()


def full_state(model: nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state dict on CPU, on rank 0; an empty dict on the other ranks.

    Collective: every rank must call it. Keys are the unsharded model's (FSDP2 adds no prefix).
    ``trainable_only`` keeps the parameters that require grad (the adapter and anything trained
    with it), which is what a resumable checkpoint of a LoRA run needs. Works unsharded too.
    """
    if is_sharded(model):
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if trainable_only:
        keep = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in keep}
    return state


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state (keyed by parameter names) on rank 0, for a resumable checkpoint.

    Collective on a sharded model (``torch.distributed.checkpoint``'s ``get_optimizer_state_dict``,
    full and CPU-offloaded: the other ranks get an empty dict). Load it back with
    `load_optimizer_state` on the same sharding.
    """
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=opts)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a state written by `optimizer_state` (read on rank 0 only; broadcast and re-sharded)."""
    sharded = is_sharded(model)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=sharded and world_size() > 1)
    set_optimizer_state_dict(model, optimizer, state, options=opts)
