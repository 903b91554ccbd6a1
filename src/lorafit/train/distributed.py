"""Several processes (``torchrun --nproc_per_node=N -m lorafit train ...``): data parallel.

We do not wrap the model in ``DistributedDataParallel``. With LoRA almost every parameter is
frozen, and reducing only what trains is the whole point, so after backward the trainable
gradients are flattened into one buffer and all-reduced once (SUM). The loss of every
micro-batch is divided by the *global* count of loss items (examples or target tokens) of the
optimizer step, so the summed gradient is exactly the gradient of the global mean loss: two
processes with batch B end where one process with batch 2B ends, up to float summation order.
A single process never touches ``torch.distributed``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from lorafit.common.errors import LorafitError


@dataclasses.dataclass
class Dist:
    """The process group seen from one process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files and prints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def all_reduce_sum(self, value: float | torch.Tensor) -> torch.Tensor:
        """Sum a scalar or tensor over processes (returns a new float64 tensor for scalars)."""
        tensor = value if isinstance(value, torch.Tensor) else torch.tensor(float(value), dtype=torch.float64)
        if self.enabled:
            tensor = tensor.to(self._comm_device)
            torch.distributed.all_reduce(tensor)
            tensor = tensor.cpu()
        return tensor

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is set on any process (so every process takes the same branch)."""
        return bool(self.all_reduce_sum(1.0 if flag else 0.0).item() > 0)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (used for per-rank RNG states)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def broadcast_params(self, params: list[torch.nn.Parameter]) -> None:
        """Make every process start from rank 0's trainable weights."""
        if not self.enabled:
            return
        with torch.no_grad():
            for p in params:
                buf = p.data.to(self._comm_device)
                torch.distributed.broadcast(buf, src=0)
                p.data.copy_(buf)

    def reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over processes, in one flat buffer.

        Parameters without a gradient (e.g. an adapter on an unused pooler) are skipped; that set
        is the same on every process because every process runs the same graph.
        """
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads]).to(self._comm_device)
        torch.distributed.all_reduce(flat)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    """``--device``: auto = CUDA when available, else CPU."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LorafitError("--device cuda: no CUDA device is available")
    return torch.device("cuda", local_rank)


def setup(device_choice: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1), else a single process.

    Backend: nccl on CUDA, gloo on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_choice, local_rank)
    if world > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world)
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device)
