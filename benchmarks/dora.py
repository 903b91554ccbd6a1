"""DoRA training-step benchmark: lorafit DoRA vs lorafit LoRA vs PEFT DoRA (and PEFT LoRA), one process.

One Llama-shaped model (random weights, sdpa attention) is built once; every method adapts all
seven projections (r=16, alpha=32, dropout 0) of a copy of it and runs forward + backward +
AdamW with input_ids as labels.

Before timing, lorafit's DoRA and PEFT's DoRA get identical non-trivial weights (lorafit's
adapter is saved and loaded into PEFT) and their logits, loss and gradients are compared; the
result goes into the JSON so a fast-but-wrong run cannot pass unnoticed.

    python benchmarks/dora.py --device cpu --size small          # ~1 min on 2 cores
    python benchmarks/dora.py --device cuda --size 1b --out DIR  # GPU (bf16, 4 x 2048)

Methods are interleaved (one step each per round, rotating order); ratios are medians of
per-round ratios to lorafit LoRA, so load from other processes hits every method alike. On CPU
a second table times one projection-shaped layer alone (forward + backward + SGD step, 1 thread,
many rounds): on a shared machine it is the steadier number.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

R, ALPHA = 16, 32
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = {
    "small": (dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=6,
                   num_key_value_heads=2, vocab_size=4096), (2, 256)),
    "1b": (dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000), (4, 2048)),
}


def build_base(size, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=4096, attn_implementation="sdpa", **SIZES[size][0])
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def lorafit_model(base, dora, init=False):
    import lorafit
    cfg = lorafit.LoraConfig(r=R, alpha=ALPHA, target_modules=PROJ, init=init, use_dora=dora)
    return lorafit.inject(copy.deepcopy(base), cfg)


def peft_model(base, dora, directory=None):
    from peft import LoraConfig, PeftModel, get_peft_model
    if directory is not None:
        return PeftModel.from_pretrained(copy.deepcopy(base), directory, is_trainable=True)
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=PROJ, use_dora=dora,
                     init_lora_weights=False)
    return get_peft_model(copy.deepcopy(base), cfg)


def check_parity(base, ids, device):
    """lorafit DoRA and PEFT DoRA with the same weights: max abs differences."""
    import lorafit
    ours = lorafit_model(base, dora=True)
    with torch.no_grad():  # a trained-looking magnitude (fresh DoRA has m = ||W + sBA||)
        for n, p in ours.named_parameters():
            if n.endswith("lora_magnitude_vector"):
                p.mul_(1 + 0.2 * torch.rand_like(p))
    with tempfile.TemporaryDirectory() as d:
        lorafit.save_adapter(ours, d)
        theirs = peft_model(base, dora=True, directory=d)
    out = {}
    lo, lt = ours(input_ids=ids, labels=ids), theirs(input_ids=ids, labels=ids)
    out["logits_max_abs_diff"] = (lo.logits - lt.logits).abs().max().item()
    out["loss_abs_diff"] = abs(lo.loss.item() - lt.loss.item())
    lo.loss.backward()
    lt.loss.backward()
    ours_g = {n.replace(".adapters.default", ""): p.grad for n, p in ours.named_parameters()
              if p.grad is not None}
    worst = 0.0
    for n, p in theirs.named_parameters():
        if p.grad is None:
            continue
        key = (n.replace("base_model.model.", "").replace(".default.weight", "").replace(".default", "")
               .replace(".weight", ""))
        g = ours_g.get(key)
        if g is None:
            raise RuntimeError(f"no lorafit gradient for PEFT parameter {n} ({key})")
        err = (g.reshape(p.grad.shape) - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-12)
        worst = max(worst, err.item())
    out["grad_max_rel_diff"] = worst
    tol = 1e-4 if device == "cpu" else 5e-2
    out["ok"] = out["logits_max_abs_diff"] < tol * 10 and worst < tol * 100
    return out


def step_fn(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
    return step


def layer_table(dev, dtype, rounds, tokens=512, fan_in=384, fan_out=1024):
    """One Linear [fan_in -> fan_out] over `tokens` tokens: the per-layer DoRA overhead."""
    import torch.nn as nn
    from peft import LoraConfig, get_peft_model

    import lorafit
    base = nn.Sequential(nn.Linear(fan_in, fan_out, bias=False)).to(dev, dtype)
    make = {
        "lorafit LoRA": lambda: lorafit.inject(copy.deepcopy(base), lorafit.LoraConfig(
            r=R, alpha=ALPHA, target_modules=["0"], init=False)),
        "lorafit DoRA": lambda: lorafit.inject(copy.deepcopy(base), lorafit.LoraConfig(
            r=R, alpha=ALPHA, target_modules=["0"], init=False, use_dora=True)),
        "PEFT DoRA": lambda: get_peft_model(copy.deepcopy(base), LoraConfig(
            r=R, lora_alpha=ALPHA, target_modules=["0"], init_lora_weights=False, use_dora=True)),
        "PEFT LoRA": lambda: get_peft_model(copy.deepcopy(base), LoraConfig(
            r=R, lora_alpha=ALPHA, target_modules=["0"], init_lora_weights=False)),
    }
    x = torch.randn(tokens, fan_in, device=dev, dtype=dtype, requires_grad=True)
    steps = {}
    for k, f in make.items():
        m = f()
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-6)

        def step(m=m, opt=opt):  # the optimizer step changes A/B, so DoRA's norm is recomputed
            opt.zero_grad(set_to_none=True)
            m(x).sum().backward()
            opt.step()
        steps[k] = step
    times = {k: [] for k in steps}
    for rnd in range(rounds + 5):
        for k in list(steps)[rnd % 4:] + list(steps)[: rnd % 4]:
            t = time.perf_counter()
            steps[k]()
            if rnd >= 5:
                times[k].append(time.perf_counter() - t)
    rows = []
    print(f"\none layer {fan_in} -> {fan_out}, {tokens} tokens, {rounds} rounds, "
          f"{torch.get_num_threads()} thread(s)")
    for k in steps:
        ratio = statistics.median(t / r for t, r in zip(times[k], times["lorafit LoRA"]))
        med = statistics.median(times[k]) * 1e3
        rows.append({"method": k, "median_ms": round(med, 3), "ratio_to_lorafit_lora": round(ratio, 3)})
        print(f"{k:<14} {med:>15.2f} {ratio:>15.2f}")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default="small", choices=list(SIZES))
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    args = ap.parse_args()
    dev = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    base = build_base(args.size, dev, dtype)
    batch, seq = SIZES[args.size][1]
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), device=dev)
    parity = check_parity(base, ids[:, : min(seq, 64)], dev)
    print(f"parity lorafit DoRA vs PEFT DoRA: {parity}")
    methods = {
        "lorafit LoRA": lorafit_model(base, dora=False),
        "lorafit DoRA": lorafit_model(base, dora=True),
        "PEFT DoRA": peft_model(base, dora=True),
        "PEFT LoRA": peft_model(base, dora=False),
    }
    steps = {k: step_fn(m.train(), ids) for k, m in methods.items()}
    times = {k: [] for k in steps}
    names = list(steps)
    for rnd in range(args.warmup + args.rounds):
        order = names[rnd % len(names):] + names[: rnd % len(names)]
        for k in order:
            if dev == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            steps[k]()
            if dev == "cuda":
                torch.cuda.synchronize()
            if rnd >= args.warmup:
                times[k].append(time.perf_counter() - t)
    ref = times["lorafit LoRA"]
    rows = []
    print(f"\n{args.size} Llama shape, {dev} {str(dtype).split('.')[-1]}, batch {batch} x {seq}, r={R}, "
          f"{args.rounds} rounds")
    print(f"{'method':<14} {'median step ms':>15} {'x lorafit LoRA':>15}")
    for k in names:
        ratio = statistics.median(t / r for t, r in zip(times[k], ref))
        med = statistics.median(times[k]) * 1e3
        rows.append({"method": k, "median_ms": round(med, 2), "ratio_to_lorafit_lora": round(ratio, 3)})
        print(f"{k:<14} {med:>15.1f} {ratio:>15.2f}")
    layer_rows = None
    if dev == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        layer_rows = layer_table(dev, dtype, rounds=max(40, args.rounds * 5))
        torch.set_num_threads(threads)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"dora_{dev}_{args.size}_{datetime.date.today().isoformat()}.json")
    with open(path, "w") as f:
        json.dump({"size": args.size, "device": dev, "dtype": str(dtype), "batch": batch, "seq": seq, "r": R,
                   "rounds": args.rounds, "parity": parity, "results": rows, "layer": layer_rows,
                   "torch": torch.__version__, "python": sys.version.split()[0],
                   "machine": platform.machine(),
                   "threads": torch.get_num_threads()}, f, indent=2)
    print(f"wrote {path}")
    if not parity["ok"]:
        sys.exit("parity check FAILED")


if __name__ == "__main__":
    main()
