"""LoRA training-step and inference benchmark: lorafit vs PEFT vs the frozen floor, in ONE process.

One Llama-shaped model (transformers LlamaConfig, random weights, sdpa attention) is built once;
every method runs on the same base weights:

training step (forward + backward + AdamW, input_ids as labels):
    frozen floor   no adapters, every weight frozen, embedding output requires grad
                   (``enable_input_require_grads``), no optimizer: the cost a LoRA step cannot beat
    lorafit        ``lorafit.inject`` r=16 alpha=32 all-linear, dropout 0
    PEFT           ``peft.get_peft_model`` with the same config (dropout 0)
    20-line LoRA   ``base(x) + B(A(x)) * s``, adapters in the model dtype (the anchor's MiniLoRA)
    full FT        every weight trainable
inference (eval, no_grad, use_cache=False), prefill and one token per row:
    base, lorafit unmerged, PEFT unmerged, merged (lorafit.merge_and_unload), 8 adapters mixed in
    one batch (lorafit ``adapter_batch`` vs PEFT ``adapter_names``).

Before timing, a correctness check compares lorafit and PEFT with identical, non-zero adapter
weights (logits, loss, adapter gradients, merged and mixed-batch outputs); a failure is printed
and recorded in the JSON, so a fast-but-wrong run cannot pass unnoticed.

    python benchmarks/train_step.py --device cpu --size small            # < 3 min on 2 cores
    python benchmarks/train_step.py --device cuda --size 1b --out $OUT   # GPU run (bf16, 4 x 2048)

On CPU the methods are interleaved (one step of each per round, rotating the order) and ratios
are medians of per-round ratios, so load from other processes hits every method alike. On CUDA
each method runs in its own block (in place on one model, unwrapped afterwards) so that
``torch.cuda.max_memory_allocated`` is comparable across methods.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_models import (  # noqa: E402  (models and the correctness check)
    ALPHA, N_ADAPTERS, R, fingerprint, free, lf_config, lorafit_model, make_adapter_weights, minilora_unwrap,
    minilora_wrap, peft_config, peft_model, run_checks, saved_bytes, sync)
from bench_report import compute_targets, print_report  # noqa: E402
from bench_tables import paired, round_ms, spread  # noqa: E402

INFER_ROWS = 16

# size -> (LlamaConfig kwargs, (train batch, train seq), inference prefill seq)
SIZES = {
    # a CPU shape: the whole --device cpu run stays under 3 minutes on 2 cores
    "small": (dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=6,
                   num_key_value_heads=2, vocab_size=4096), (1, 256), 32),
    # TinyLlama-1.1B shape
    "1b": (dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000), (4, 2048), 512),
    # Llama-3-8B shape
    "8b": (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256), (1, 4096), 512),
}


# ----------------------------------------------------------------------------- training variants
class TrainVariant:
    """build(model) modifies `model` in place and returns (module to call, trainable params, undo)."""

    def __init__(self, key, label, build):
        self.key, self.label, self.build = key, label, build


def build_floor(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model, [], lambda m: m


def build_lorafit(model):
    import lorafit
    lorafit.inject(model, lf_config())
    return model, [p for p in model.parameters() if p.requires_grad], lambda m: lorafit.unload(m)


def build_peft(model):
    from peft import get_peft_model
    pm = get_peft_model(model, peft_config())
    return pm, [p for p in pm.parameters() if p.requires_grad], lambda m: m.unload()


def build_minilora(model):
    minilora_wrap(model)
    return model, [p for p in model.parameters() if p.requires_grad], minilora_unwrap


def build_full(model):
    for p in model.parameters():
        p.requires_grad_(True)

    def undo(m):
        for p in m.parameters():
            p.requires_grad_(False)
        return m
    return model, list(model.parameters()), undo


TRAIN = [
    TrainVariant("frozen_floor", "frozen floor", build_floor),
    TrainVariant("lorafit", "lorafit", build_lorafit),
    TrainVariant("peft", "PEFT", build_peft),
    TrainVariant("minilora", "20-line LoRA", build_minilora),
    TrainVariant("full_ft", "full fine-tuning", build_full),  # last: it changes the weights
]


def make_step(module, params, ids):
    opt = torch.optim.AdamW(params, lr=1e-5) if params else None

    def step():
        out = module(input_ids=ids, labels=ids)
        out.loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def timed(fn, dev, cpu_times=None):
    sync(dev)
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    sync(dev)
    t = time.perf_counter() - t0
    if cpu_times is not None:
        cpu_times.append(time.process_time() - c0)
    return t


def interleaved(fns: dict, dev, warmup, iters):
    """One call of each per round, order rotated per round.

    Returns (wall, cpu): name -> seconds per round, wall clock and this process's CPU time. With
    one thread, CPU time leaves out the time the OS gave other processes: steadier on a shared box.
    """
    keys = list(fns)
    for _ in range(warmup):
        for k in keys:
            fns[k]()
    times, cpu = {k: [] for k in keys}, {k: [] for k in keys}
    gc.collect()
    gc.disable()
    try:
        for i in range(iters):
            order = keys[i % len(keys):] + keys[: i % len(keys)]
            if (i // len(keys)) % 2:
                order = order[::-1]
            for k in order:
                times[k].append(timed(fns[k], dev, cpu[k]))
    finally:
        gc.enable()
    return times, cpu


def sequential(fn, dev, warmup, iters):
    for _ in range(warmup):
        fn()
    sync(dev)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    gc.collect()
    gc.disable()
    try:
        times = [timed(fn, dev) for _ in range(iters)]
    finally:
        gc.enable()
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else None
    return times, peak


def summarize(times, tokens):
    """Per-round times (s) -> stored ms (rounded to 1 us) and their spread, computed from the stored values."""
    ms = round_ms(times)
    e = spread(ms)
    return {**e, "tokens_per_s": tokens / (e["median_ms"] / 1e3), "times_ms": ms}


def paired_ms(times, ref):
    """Paired ratio (median and p25-p75 over rounds of t / t_ref, same round) of two per-round lists in s."""
    return paired(round_ms(times), round_ms(ref))


def run_train(base, ids, dev, args, schedule, base_fp=None):
    tokens = ids.numel()
    res = {}
    oom = getattr(torch.cuda, "OutOfMemoryError", RuntimeError)
    if schedule == "interleaved":
        fns, keep = {}, []
        for v in TRAIN:
            module, params, _ = v.build(copy.deepcopy(base))
            module.train()
            nbytes, nst = saved_bytes(module, ids)
            res[v.key] = {"trainable": sum(p.numel() for p in params), "saved_bytes": nbytes, "saved_storages": nst,
                          "peak_bytes": None}
            fns[v.key] = make_step(module, params, ids)
            keep.append(module)
        free(dev)
        times, cpu = interleaved(fns, dev, args.warmup, args.iters)
        for k, t in times.items():
            res[k].update(summarize(t, tokens))
            res[k]["cpu"] = {"times_ms": round_ms(cpu[k]), "median_ms": statistics.median(round_ms(cpu[k]))}
            # every ratio is paired: same-round times, so load drifting between rounds cancels
            res[k]["paired"] = {"x_floor": paired_ms(t, times["frozen_floor"]),
                                "x_peft": paired_ms(t, times["peft"]),
                                "x_floor_cpu": paired_ms(cpu[k], cpu["frozen_floor"]),
                                "x_peft_cpu": paired_ms(cpu[k], cpu["peft"])}
        if base_fp is not None:
            res["_base_unchanged"] = bool(torch.equal(fingerprint(base), base_fp))
        res["_paired"] = {"lorafit_over_peft": res["lorafit"]["paired"]["x_peft"],
                          "lorafit_over_minilora": paired_ms(times["lorafit"], times["minilora"]),
                          "lorafit_over_peft_cpu": res["lorafit"]["paired"]["x_peft_cpu"],
                          "lorafit_over_minilora_cpu": paired_ms(cpu["lorafit"], cpu["minilora"])}
        del fns, keep
    else:  # sequential, in place on one model (no extra copy counted in the CUDA peak)
        model = base
        for v in TRAIN:
            free(dev)
            if v.key == "full_ft" and base_fp is not None:  # the adapters before it were unwrapped cleanly
                res["_base_unchanged"] = bool(torch.equal(fingerprint(model), base_fp))
            module, params, undo = v.build(model)
            module.train()
            entry = {"trainable": sum(p.numel() for p in params)}
            step = None
            try:
                entry["saved_bytes"], entry["saved_storages"] = saved_bytes(module, ids)
                free(dev)
                step = make_step(module, params, ids)
                t, peak = sequential(step, dev, args.warmup, args.iters)
                entry.update(summarize(t, tokens))
                entry["peak_bytes"] = peak
            except oom:
                entry["error"] = "OOM"
                print(f"  {v.label}: OOM", flush=True)
            step = None  # frees the optimizer state before the next method
            for p in params:
                p.grad = None
            del params
            model = undo(module)
            del module
            res[v.key] = entry
            print(f"  {v.label:18s} {entry.get('median_ms', float('nan')):9.1f} ms", flush=True)
        free(dev)
    floor = res["frozen_floor"]
    for k, e in res.items():
        if k.startswith("_") or not isinstance(e, dict) or "median_ms" not in e:
            continue
        # a ratio of medians, named so: the only ratio a sequential (CUDA) run has
        e["x_floor_of_medians"] = e["median_ms"] / floor["median_ms"]
        e["saved_x_floor"] = e["saved_bytes"] / floor["saved_bytes"]
        if e.get("peak_bytes") and floor.get("peak_bytes"):
            e["peak_x_floor"] = e["peak_bytes"] / floor["peak_bytes"]
    return res


# ----------------------------------------------------------------------------- inference variants
def run_infer(base, weights, prefill, onetok, dev, args, schedule):
    import lorafit
    names = [f"a{i % N_ADAPTERS}" for i in range(prefill.shape[0])]

    def fwd(m, x):
        return lambda: m(input_ids=x, use_cache=False)

    def mixed_lf(m, x):
        def f():
            with lorafit.adapter_batch(m, names):
                return m(input_ids=x, use_cache=False)
        return f

    # builders: key -> (label, build() -> (model, {"prefill": fn, "1tok": fn}, cleanup))
    def b_base():
        return base, {"prefill": fwd(base, prefill), "1tok": fwd(base, onetok)}, None

    def b_lf():
        m = lorafit_model(base, weights, "a0").eval()
        return m, {"prefill": fwd(m, prefill), "1tok": fwd(m, onetok)}, None

    def b_peft():
        m = peft_model(base, weights, "a0").eval()
        return m, {"prefill": fwd(m, prefill), "1tok": fwd(m, onetok)}, None

    def b_merged():
        m = lorafit.merge_and_unload(lorafit_model(base, {"a0": weights["a0"]}, "a0")).eval()
        return m, {"prefill": fwd(m, prefill), "1tok": fwd(m, onetok)}, None

    def b_lf_mixed():
        m = lorafit_model(base, weights, "a0").eval()
        return m, {"prefill": mixed_lf(m, prefill), "1tok": mixed_lf(m, onetok)}, None

    def b_lf_mixed_reuse():
        # the stacked per-adapter weights are built on the first forward in an adapter_batch
        # context; here one context stays open, so only the gathered matmuls are timed
        m = lorafit_model(base, weights, "a0").eval()
        stack = contextlib.ExitStack()
        stack.enter_context(lorafit.adapter_batch(m, names))
        return m, {"prefill": fwd(m, prefill), "1tok": fwd(m, onetok)}, stack.close

    def b_peft_mixed():
        m = peft_model(base, weights, "a0").eval()
        return m, {"prefill": lambda: m(input_ids=prefill, use_cache=False, adapter_names=names),
                   "1tok": lambda: m(input_ids=onetok, use_cache=False, adapter_names=names)}, None

    variants = [("base", "base", b_base), ("lorafit", "lorafit unmerged", b_lf),
                ("peft", "PEFT unmerged", b_peft), ("merged", "merged (lorafit)", b_merged),
                ("lorafit_mixed8", "lorafit 8 mixed", b_lf_mixed),
                ("lorafit_mixed8_ctx", "lorafit 8 mixed, ctx kept", b_lf_mixed_reuse),
                ("peft_mixed8", "PEFT 8 mixed", b_peft_mixed)]
    toks = {"prefill": prefill.numel(), "1tok": onetok.numel()}
    res = {}
    with torch.no_grad():
        if schedule == "interleaved":
            fns, cleanups, keep = {}, [], []
            for key, _, b in variants:
                m, fs, cleanup = b()
                keep.append(m)
                for ph, f in fs.items():
                    fns[(key, ph)] = f
                if cleanup:
                    cleanups.append(cleanup)
            times, cpu = interleaved(fns, dev, args.warmup, args.iters)
            for (key, ph), t in times.items():
                e = res.setdefault(key, {})
                e[ph] = summarize(t, toks[ph])
                c = round_ms(cpu[(key, ph)])
                e[ph]["cpu"] = {"times_ms": c, "median_ms": statistics.median(c)}
                e[ph]["paired"] = {"x_base": paired_ms(t, times[("base", ph)]),
                                   "x_base_cpu": paired_ms(cpu[(key, ph)], cpu[("base", ph)])}
            for c in cleanups:
                c()
            del fns, keep
        else:
            for key, label, b in variants:
                free(dev)
                m, fs, cleanup = b()
                e = res.setdefault(key, {})
                for ph, f in fs.items():
                    t, _ = sequential(f, dev, args.warmup, args.iters)
                    e[ph] = summarize(t, toks[ph])
                if cleanup:
                    cleanup()
                print(f"  {label:26s} prefill {e['prefill']['median_ms']:8.2f} ms  "
                      f"1tok {e['1tok']['median_ms']:8.2f} ms", flush=True)
                del m, fs
            free(dev)
    for e in res.values():
        for ph in toks:
            e[ph]["x_base_of_medians"] = e[ph]["median_ms"] / res["base"][ph]["median_ms"]
    res["_labels"] = {k: lbl for k, lbl, _ in variants}
    return res


def device_slug(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--size", choices=list(SIZES), default="small")
    ap.add_argument("--iters", type=int, default=None, help="timed steps per method (default: 20 cpu, 10 cuda)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per method (default: 2 cpu, 3 cuda)")
    ap.add_argument("--out", default=None,
                    help="directory for the JSON (default benchmarks/results/), or a path ending in .json")
    ap.add_argument("--schedule", choices=["auto", "interleaved", "sequential"], default="auto",
                    help="auto: interleaved on cpu (noise), sequential on cuda (comparable peak memory)")
    ap.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                    help="auto: bf16 on cuda, fp32 on cpu (bf16 on cpu is for checking the bf16 code path)")
    ap.add_argument("--threads", default="auto",
                    help="torch CPU threads, or auto (default): torch's own choice, but 1 on a CPU run when the "
                         "load average is already >= the core count - OpenMP threads spinning on each other "
                         "on a shared machine otherwise swamp the timings (and the run takes 5x longer)")
    ap.add_argument("--parts", default="checks,infer,train",
                    help="comma list of checks, infer, train (default: all three)")
    args = ap.parse_args(argv)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    args.iters = args.iters or (20 if dev == "cpu" else 10)
    args.warmup = args.warmup if args.warmup is not None else (2 if dev == "cpu" else 3)
    schedule = args.schedule if args.schedule != "auto" else ("interleaved" if dev == "cpu" else "sequential")
    load_start = _loadavg()
    if args.threads != "auto":
        torch.set_num_threads(int(args.threads))
    elif dev == "cpu" and load_start and load_start[0] >= (os.cpu_count() or 1) and torch.get_num_threads() > 1:
        print(f"load average {load_start[0]} on {os.cpu_count()} CPUs: using 1 thread (--threads N to override)")
        torch.set_num_threads(1)

    import peft
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorafit

    t_start = time.perf_counter()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(args.dtype) or (
        torch.bfloat16 if dev == "cuda" else torch.float32)
    cfg_kw, (tb, ts), pf_seq = SIZES[args.size]
    cfg = LlamaConfig(**cfg_kw, max_position_embeddings=max(ts, pf_seq, 2048))
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(dev):
        base = LlamaForCausalLM(cfg).to(dtype)
    for p in base.parameters():
        p.requires_grad_(False)
    base.enable_input_require_grads()  # the floor's definition; kept for every training method alike
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (tb, ts), generator=g).to(dev)
    prefill = torch.randint(0, cfg.vocab_size, (INFER_ROWS, pf_seq), generator=g).to(dev)
    onetok = torch.randint(0, cfg.vocab_size, (INFER_ROWS, 1), generator=g).to(dev)
    weights = make_adapter_weights(base, [f"a{i}" for i in range(N_ADAPTERS)])
    base_fp = fingerprint(base)

    device_name = torch.cuda.get_device_name() if dev == "cuda" else (platform.processor() or platform.machine()
                                                                         or "cpu")
    if dev == "cpu":
        device_name = f"cpu ({_cpu_model()}, {torch.get_num_threads()} threads)"
    now = datetime.datetime.now()
    meta = {
        "device": dev, "device_name": device_name, "size": args.size, "dtype": str(dtype).replace("torch.", ""),
        "params": sum(p.numel() for p in base.parameters()),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "lorafit": lorafit.__version__, "python": platform.python_version(),
        "date": now.date().isoformat(), "datetime": now.isoformat(timespec="seconds"),
        "config": {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                "num_attention_heads", "num_key_value_heads", "vocab_size")},
        "attn_implementation": base.config._attn_implementation,
        "lora": {"r": R, "alpha": ALPHA, "dropout": 0.0, "target_modules": "all-linear"},
        "train_batch": tb, "train_seq": ts, "infer_prefill": f"{INFER_ROWS}x{pf_seq}", "infer_1tok": f"{INFER_ROWS}x1",
        "cpu_threads": torch.get_num_threads(), "threads_arg": args.threads, "cpu_count": os.cpu_count(),
        "cuda": torch.version.cuda if dev == "cuda" else None,
        "n_mixed_adapters": N_ADAPTERS, "iters": args.iters, "warmup": args.warmup, "schedule": schedule,
        "optimizer": "AdamW(lr=1e-5), adapters only (all weights for full FT); floor has none",
        "argv": sys.argv[1:] if argv is None else argv,
    }
    print(f"lorafit benchmark: {device_name}, size {args.size}, {meta['params']/1e6:.1f}M params, {meta['dtype']}, "
          f"{schedule}, iters {args.iters}, warmup {args.warmup}", flush=True)

    parts = set(args.parts.split(","))
    checks, infer, train = [], None, None
    if "checks" in parts:
        print("correctness check ...", flush=True)
        checks = run_checks(base, weights, ids, prefill, dev, dtype)
        if not all(c["ok"] for c in checks):
            print("!! CORRECTNESS CHECK FAILED: lorafit and PEFT disagree; timings below are not trustworthy",
                  flush=True)
    if "infer" in parts:
        print("inference ...", flush=True)
        infer = run_infer(base, weights, prefill, onetok, dev, args, schedule)
    if "train" in parts:
        print("training step ...", flush=True)
        train = run_train(base, ids, dev, args, schedule, base_fp)
        checks.append({"check": "base weights unchanged by the other runs (deepcopy / unload)",
                       "ok": train.pop("_base_unchanged", True)})
    targets = compute_targets(dev, train, infer) if train and infer else []
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)
    meta["loadavg_start"], meta["loadavg_end"] = load_start, _loadavg()
    print_report(meta, train, infer, checks, targets)

    result = {"meta": meta, "train": train, "infer": infer, "checks": checks, "targets": targets,
              "all_checks_ok": all(c["ok"] for c in checks)}
    slug = device_slug(torch.cuda.get_device_name() if dev == "cuda" else "cpu")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    default_dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    tag = f"{slug}-{args.size}" + ("" if dtype == default_dtype else f"-{meta['dtype']}")
    path = out if out.endswith(".json") else os.path.join(out, f"{tag}-{meta['date']}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {path}  ({meta['wall_s']} s)")
    return 0 if result["all_checks_ok"] else 1


def _loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


if __name__ == "__main__":
    sys.exit(main())
