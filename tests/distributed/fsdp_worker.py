"""The two-rank side of tests/distributed/test_fsdp.py (spawned by it; not a test module itself).

Each rank builds the same tiny Llama (fp32, bf16 or NF4 base + a fp32 LoRA adapter), shards it
with `lorafit.distributed.shard`, trains K steps of AdamW on its rows ``rank::world`` of the
global batches, saves the adapter (collectively), and records per-rank facts to
``<out>/<kind>_rank<r>.pt`` for the test process to compare against a one-process run.
"""

from __future__ import annotations

import os
from unittest import mock

import torch
import torch.distributed as dist

import lorafit
import lorafit.io
from lorafit import distributed

K = 3  # optimizer steps
GLOBAL_BATCH, SEQ, VOCAB = 4, 16, 128


def build(kind: str):
    """The tiny Llama of `kind` ("fp32", "bf16", "nf4") with a fresh LoRA adapter; same numbers in every process."""
    from transformers import LlamaConfig, LlamaForCausalLM  # the test needs transformers; lorafit's core does not

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    if kind == "bf16":
        model.to(torch.bfloat16)
    if kind == "nf4":
        lorafit.quantize(model, "nf4")
    return model


def add_adapter(model):
    torch.manual_seed(1)
    return lorafit.inject(model, lorafit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(K)]


def probe() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))


def train(model, rows: slice, steps: int = K):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for ids in batches()[:steps]:
        ids = ids[rows]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def base_bytes(model) -> int:
    """Bytes this process holds of the frozen base: parameters not trained, and buffers (local shards)."""
    total = 0
    for t in [p for p in model.parameters() if not p.requires_grad] + list(model.buffers()):
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def run_kind(kind: str, out: str, rank: int, world: int) -> None:
    model = add_adapter(build(kind))
    facts = {"bytes_before": base_bytes(model)}
    distributed.shard(model)
    facts["bytes_after"] = base_bytes(model)
    try:  # new modules after shard() would stay outside FSDP2: refused, the model unchanged
        lorafit.inject(model, lorafit.LoraConfig(r=2, target_modules="all-linear"), adapter="late")
        facts["late_inject"] = "injected"
    except ValueError as exc:
        facts["late_inject"] = str(exc)
    if kind == "bf16":  # bytes only: a bf16 base computes differently per batch split
        torch.save(facts, os.path.join(out, f"{kind}_rank{rank}.pt"))
        return
    opt = train(model, slice(rank, None, world))
    if kind == "fp32":
        check_resume_state(model, opt, facts, rank, world)
    with mock.patch.object(lorafit.io, "atomic_write", wraps=lorafit.io.atomic_write) as writes:
        path = lorafit.save_adapter(model, os.path.join(out, kind))
    facts["writes"] = writes.call_count
    facts["path"] = str(path)
    facts["files_on_return"] = sorted(os.listdir(path))
    model.eval()
    with torch.no_grad():
        facts["logits"] = model(input_ids=probe()).logits
    facts["adapter"] = lorafit.io.adapter_state(model)  # gathered: collective
    try:
        lorafit.merge_and_unload(model)
        facts["merge"] = "merged"
    except ValueError as exc:
        facts["merge"] = str(exc)
    torch.save(facts, os.path.join(out, f"{kind}_rank{rank}.pt"))


def check_resume_state(model, opt, facts: dict, rank: int, world: int) -> None:
    """optimizer_state / load_optimizer_state / full_state round-trip onto a fresh sharded model."""
    state = distributed.optimizer_state(model, opt)
    weights = distributed.full_state(model, trainable_only=True)
    fresh = add_adapter(build("fp32"))
    distributed.shard(fresh)
    opt2 = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    distributed.load_optimizer_state(fresh, opt2, state if rank == 0 else {})
    again = distributed.optimizer_state(fresh, opt2)
    facts["opt_state_sizes"] = (len(state.get("state", {})), len(again.get("state", {})))
    facts["opt_state_equal"] = rank != 0 or all(
        torch.equal(v, again["state"][k][m]) for k, s in state["state"].items() for m, v in s.items()
    )
    facts["full_state_keys"] = sorted(weights)


def run_mixed_precision(out: str, rank: int) -> None:
    """shard(param_dtype=bf16): the sharded LoRA weights and AdamW's moments stay fp32."""
    model = add_adapter(build("fp32"))
    distributed.shard(model, param_dtype=torch.bfloat16)
    opt = train(model, slice(rank, None, 2), steps=1)
    lora = [p for p in model.parameters() if p.requires_grad]
    moments = [s["exp_avg"] for s in opt.state.values()]
    facts = {"param_dtypes": sorted({str(p.dtype) for p in lora}), "n_lora": len(lora),
             "moment_dtypes": sorted({str(m.dtype) for m in moments}), "n_moments": len(moments)}
    torch.save(facts, os.path.join(out, f"mp_rank{rank}.pt"))


def worker(rank: int, world: int, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for kind in ("fp32", "nf4", "bf16"):
            run_kind(kind, out, rank, world)
        run_mixed_precision(out, rank)
    finally:
        dist.destroy_process_group()
