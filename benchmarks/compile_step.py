#!/usr/bin/env python3
"""Compiled LoRA training step on CPU: lorafit vs PEFT under ``torch.compile``, side by side in ONE process.

The model and step are train_step.py's (small Llama, r=16 alpha=32 all-linear, dropout 0, AdamW,
one thread); each method has its own copy of the same base weights so that the rounds can be
interleaved (one step of each per round, order rotated) and every ratio is a median of per-round
ratios (p25-p75 beside it), so load from other processes hits every method alike:

    frozen floor, compiled   no adapters, all frozen; the input embeddings (computed outside the
                             compiled model, so no hook breaks its graph) require grad
    lorafit, compiled        ``torch.compile(lorafit model)`` (0 graph breaks: tests/api/test_compile.py)
    PEFT, compiled           ``torch.compile(get_peft_model(...))``
    lorafit / PEFT, eager    the same models without compile, for reference

Target (issue 12): compiled lorafit <= compiled PEFT (ratio <= 1.0).

    python benchmarks/compile_step.py                    # ~2-4 min on 2 cores (compile included)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_models import lf_config, peft_config  # noqa: E402
from bench_tables import markdown, paired, round_ms, spread  # noqa: E402
from train_step import SIZES, interleaved, make_step  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def build(base, kind: str):
    """(callable module, trainable params) for one method on its own copy of ``base``."""
    import lorafit
    from peft import get_peft_model

    model = copy.deepcopy(base)
    if kind.startswith("floor"):
        for p in model.parameters():
            p.requires_grad_(False)
        module, params = model, []
    elif kind.startswith("lorafit"):
        lorafit.inject(model, lf_config())
        module, params = model, [p for p in model.parameters() if p.requires_grad]
    else:
        module = get_peft_model(model, peft_config())
        params = [p for p in module.parameters() if p.requires_grad]
    if kind.endswith("_compiled"):
        module = torch.compile(module)
    return module, params


def step_fn(module, params, ids, floor=False):
    """train_step.py's step; the floor's embeddings are computed outside the compiled model and
    made to require grad there (the gradient must reach the first layer's input, as LoRA's does)."""
    if not floor:
        return make_step(module, params, ids)
    embed = module.get_input_embeddings()

    def step():
        emb = embed(ids).detach().requires_grad_(True)
        module(inputs_embeds=emb, labels=ids).loss.backward()
    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=30, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds (the first compiles)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg_kw, (batch, seq), _ = SIZES["small"]
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**cfg_kw, attn_implementation="sdpa")).eval()
    ids = torch.randint(0, cfg_kw["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1))
    kinds = ["floor_compiled", "lorafit_compiled", "peft_compiled", "lorafit_eager", "peft_eager"]
    fns = {k: step_fn(*build(base, k), ids, floor=k.startswith("floor")) for k in kinds}
    wall, _cpu = interleaved(fns, "cpu", args.warmup, args.iters)
    ms = {k: round_ms(v) for k, v in wall.items()}
    rows, ratios = [], {}
    for k in kinds:
        ratios[k] = {"vs_floor_compiled": paired(ms[k], ms["floor_compiled"]),
                     "vs_peft_compiled": paired(ms[k], ms["peft_compiled"])}
    for k in kinds:
        e = spread(ms[k])
        f, p = ratios[k]["vs_floor_compiled"], ratios[k]["vs_peft_compiled"]
        rows.append([k.replace("_", " "), f"{e['median_ms']:.1f} ({e['p25_ms']:.1f}-{e['p75_ms']:.1f})",
                     f"{f['median']:.3f} ({f['p25']:.3f}-{f['p75']:.3f})",
                     f"{p['median']:.3f} ({p['p25']:.3f}-{p['p75']:.3f})"])
    table = markdown(["method", "step ms (p25-p75)", "/ compiled floor", "/ compiled PEFT"], rows)
    target = ratios["lorafit_compiled"]["vs_peft_compiled"]["median"]
    print(table)
    print(f"target: compiled lorafit / compiled PEFT <= 1.0: {target:.3f} ({'met' if target <= 1.0 else 'MISSED'})")
    import peft
    import transformers
    result = {"date": datetime.date.today().isoformat(), "device": "cpu", "machine": platform.platform(),
              "cpu_threads": 1, "loadavg": os.getloadavg(), "size": "small", "batch": batch, "seq": seq,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "peft": peft.__version__},
              "iters": args.iters, "warmup": args.warmup, "times_ms": ms, "ratios": ratios, "table": table,
              "target_lorafit_over_peft_compiled": {"value": target, "met": target <= 1.0}}
    out = args.out or RESULTS / f"cpu-compile-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
