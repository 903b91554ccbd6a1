"""LoRA+ with embedding adapters: which learning rate should the embedding adapter get?

A small, honest comparison (CPU, ~1 min): a tiny random-weight Llama learns a random bigram
language (next token drawn from a fixed per-token distribution), with LoRA r=8 on all linear
layers AND on ``embed_tokens``. Every run uses AdamW, lr 2e-3 and LoRA+ ratio 16 for the
linear B matrices; only the embedding adapter's treatment changes:

    same_as_linear   embedding A/B in the groups their names give (B at 16x) - today's param_groups
    peft_default     embedding A/B at a separate lr of 1e-6 (PEFT's ``loraplus_lr_embedding``)
    emb_lr_1x        embedding A/B both at lr (no LoRA+ ratio for embeddings)
    emb_zero_init_16x  the zero-initialised factor (A for embeddings) at 16x, B at lr:
                     LoRA+'s rule applied to the factor that starts at zero
    no_emb_adapter   no adapter on the embedding (reference)

Prints the mean held-out loss over seeds after a fixed number of steps and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

import lorafit
from lorafit.layers import EmbeddingLora

VOCAB, SEQ, BATCH = 128, 32, 16


def make_data(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(VOCAB, VOCAB, generator=g) * 3
    probs = logits.softmax(-1)

    def sample(n):
        x = torch.empty(n, SEQ, dtype=torch.long)
        x[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
        for t in range(1, SEQ):
            x[:, t] = torch.multinomial(probs[x[:, t - 1]], 1, generator=g)[:, 0]
        return x
    return sample


def build(seed, emb_adapter):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=SEQ)
    model = LlamaForCausalLM(cfg)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if emb_adapter:
        targets.append("embed_tokens")
    return lorafit.inject(model, lorafit.LoraConfig(r=8, alpha=16, target_modules=targets))


def groups(model, lr, ratio, mode):
    emb_ads = [ad for m in model.modules() if isinstance(m, EmbeddingLora) for ad in m.adapters.values()]
    emb = {id(p) for ad in emb_ads for p in (ad.lora_A, ad.lora_B)}
    emb_a = {id(ad.lora_A) for ad in emb_ads}
    out = {"default": [], "b": [], "emb": [], "emb_fast": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_b = name.endswith("lora_B")
        if id(p) in emb and mode != "same_as_linear":
            key = "emb_fast" if (mode == "emb_zero_init_16x" and id(p) in emb_a) else "emb"
        else:
            key = "b" if is_b else "default"
        out[key].append(p)
    emb_lr = 1e-6 if mode == "peft_default" else lr
    lrs = {"default": lr, "b": lr * ratio, "emb": emb_lr, "emb_fast": lr * ratio}
    return [{"params": ps, "lr": lrs[k]} for k, ps in out.items() if ps]


def run(seed, mode, steps, lr=2e-3, ratio=16.0):
    sample = make_data(1000 + seed)
    val = sample(64)
    model = build(seed, emb_adapter=mode != "no_emb_adapter").train()
    opt = torch.optim.AdamW(groups(model, lr, ratio, mode), weight_decay=0.0)
    for _ in range(steps):
        ids = sample(BATCH)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return model(input_ids=val, labels=val).loss.item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    modes = ["same_as_linear", "peft_default", "emb_lr_1x", "emb_zero_init_16x", "no_emb_adapter"]
    res = {m: [run(s, m, args.steps) for s in range(args.seeds)] for m in modes}
    print(f"held-out loss after {args.steps} steps (mean over {args.seeds} seeds; lower is better)")
    for m, v in res.items():
        print(f"{m:<18} {statistics.mean(v):.4f}  ({', '.join(f'{x:.4f}' for x in v)})")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "loraplus_embedding_cpu.json"), "w") as f:
        json.dump({"steps": args.steps, "seeds": args.seeds, "val_loss": res}, f, indent=2)


if __name__ == "__main__":
    main()
