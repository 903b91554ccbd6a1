"""``--fsdp``: the training loop on a model sharded with FSDP2 (`lorafit.distributed.shard`).

What differs from the data-parallel path of :mod:`lorafit.train.distributed`:

- the model is sharded after injection (every block, then the root); each rank holds about 1/N
  of the frozen base (a quantized base too) and of the adapter;
- no manual all-reduce: FSDP2 reduce-scatters the gradients in backward. Its reduction is set to
  a SUM (divide factor 1), because the loop already divides every micro-batch's summed loss by
  the global item count of the step, exactly as in the data-parallel path;
- checkpoints hold full tensors gathered on rank 0 (`lorafit.distributed.full_state` and
  ``optimizer_state``, torch.distributed.checkpoint) and are restored into the sharded model,
  so ``checkpoint.pt`` looks like a one-process one and rank 0 still writes it alone;
- evaluation, ``best/`` and the final adapter are collective: every rank runs the forward (FSDP2
  gathers each block's weights from all ranks) and calls ``save_adapter``; rank 0 writes.
"""

from __future__ import annotations

import torch
from torch import nn
from lorafit import distributed
from lorafit.distributed import FSDPModule
from lorafit.common.errors import LorafitError


def frozen_bytes(model: nn.Module) -> int:
    """Bytes this process holds of the frozen base: parameters that do not train, and buffers (local shards)."""
    total = 0
    for t in [p for p in model.parameters() if not p.requires_grad] + list(model.buffers()):
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def shard_for_training(model: nn.Module, precision: str, device: torch.device) -> tuple[int, int]:
    """Shard ``model`` in place for the loop; returns (frozen base bytes before, this rank's after).

    Gathered weights compute in bf16 with ``--precision bf16`` on CUDA (the fp32 adapter stays the
    master copy, gradients are reduced in fp32); otherwise in the parameters' own dtype.
    """
    before = frozen_bytes(model)
    param_dtype = torch.bfloat16 if precision == "bf16" and device.type == "cuda" else None
    distributed.shard(model, param_dtype=param_dtype, reduce_dtype=torch.float32)
    if not hasattr(FSDPModule, "set_force_sum_reduction_for_comms"):
        raise LorafitError(f"--fsdp needs FSDP2's plain-sum gradient reduction (set_force_sum_reduction_for_comms), "
                           f"which torch {torch.__version__} lacks; use a newer torch")
    for mod in model.modules():
        if isinstance(mod, FSDPModule):  # the loss is already divided by the global count: sum, not mean
            mod.set_gradient_divide_factor(1.0)
            mod.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM), no division
    return before, frozen_bytes(model)


def refuse_unsupported(opts: dict, task_shards: bool, world: int) -> None:
    """``--fsdp`` with what it cannot go with: one line each (checked before a model is loaded).

    Raises:
        LorafitError: another task, --full-finetune, --precision fp16, or a single process.
    """
    if not opts.get("fsdp"):
        return
    if not task_shards:
        raise LorafitError(f"--fsdp shards transformer blocks: only causal-lm and text-classification, "
                           f"not --task {opts['task']}")
    if opts["full_finetune"]:
        raise LorafitError("--fsdp trains a LoRA adapter on a sharded frozen base; it cannot go with --full-finetune")
    if opts["precision"] == "fp16":
        raise LorafitError("--fsdp cannot go with --precision fp16 (its gradient scaler does not take sharded "
                           "gradients); use --precision bf16")
    if world < 2:
        raise LorafitError("--fsdp shards the model over several processes: run it under "
                           "torchrun --nproc_per_node=N (N >= 2)")
