"""The GPU suite (issue 12, item 5): lorafit vs PEFT vs the frozen floor on one GPU, in one process.

    python benchmarks/gpu_suite.py                      # one CUDA GPU (H200 class), <= 8 minutes
    python benchmarks/gpu_suite.py --big                # + the 8B shape, 1 x 4096, if time is left
    python benchmarks/gpu_suite.py --dry-run --out DIR  # the same code paths, tiny shapes, CPU, < 1 min

Setting (the anchors', ../shared/anchors/gpu_*_anchor.py): a 1.1B Llama (TinyLlama shape, random
init, seed 0, sdpa), bf16, batch 4 x 2048, LoRA r=16 alpha=32 on q,k,v,o,gate,up,down, dropout 0,
AdamW(lr=1e-5) on the trainable parameters. Measured side by side, interleaved (one step of each
per round, order rotated; ratios paired over rounds, see bench_tables.py):

training step   frozen floor, lorafit eager, lorafit compiled (torch.compile(model)), PEFT eager,
                PEFT compiled, lorafit DoRA, lorafit QLoRA NF4 (lorafit.quantize(model, "nf4") then
                inject; the Triton decode kernel on CUDA), PEFT + bitsandbytes NF4 (when
                bitsandbytes imports), full fine-tuning
inference       16 rows, 8 adapters mixed in one batch (row i on a[i % 8]), prefill 16 x 512 and
                one token per row (16 x 1, no KV cache, as the anchor): base, lorafit one adapter,
                lorafit adapter_batch (context per call / kept open), PEFT one adapter, PEFT
                adapter_names
--big           8B (Llama-3-8B shape) 1 x 4096: floor, lorafit, PEFT (eager)

Reported: step ms (median, p25-p75), paired ratios, peak memory (gpu_runner.py: resident bytes +
max_memory_allocated over a call, reset per call), and the targets: step <= 1.10x floor, peak <=
floor + 22%, compiled lorafit <= compiled PEFT, QLoRA NF4 <= 1.3x bf16 LoRA, 8 mixed adapters <= 1.3x
base, each printed as met / missed with its numbers. Each section is timed and fenced: a failing
method or section is recorded with its error and the suite goes on. The number of timed rounds is
sized after the first round so that the whole run fits --budget-s.

Writes gpu-suite-<device>-<date>.json (every raw time, versions, errors) and .md (the tables) to
--out (default benchmarks/results/ for a GPU run; a dry run writes to a temporary directory unless
--out is given).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import tempfile
import time
import traceback

import torch
import torch._dynamo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))  # lorafit
from bench_models import ALPHA, R  # noqa: E402
from gpu_methods import (SHAPES, INFER_PHASES, build_template, infer_methods, mixed_check,  # noqa: E402
                         train_methods)
from gpu_report import add_infer_pairs, add_train_pairs, compute_targets, markdown_report, print_report  # noqa: E402
from gpu_runner import CudaMeter, InjectedFailure, RssMeter, error_text, free, run_methods  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RESERVE_INFER_S, RESERVE_BIG_S = 75, 150  # seconds kept for the later sections out of --budget-s


def _version(mod: str):
    try:
        return __import__(mod).__version__
    except Exception as e:
        return f"not importable ({type(e).__name__})"


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: every code path, no CUDA call")
    ap.add_argument("--out", default=None, help="output directory (default: benchmarks/results/, dry run: a tmp dir)")
    ap.add_argument("--big", action="store_true", help="add the 8B shape, 1 x 4096 (floor, lorafit, PEFT)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget the rounds are sized to")
    ap.add_argument("--iters", type=int, default=None, help="most timed rounds per section (20; dry run 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls per method (3; dry run 1)")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (inductor; dry run aot_eager)")
    ap.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                    help="auto: bf16 on CUDA, fp32 for a dry run (--dry-run --dtype bf16 checks the bf16 paths)")
    ap.add_argument("--sections", default="train,infer", help="comma list of train, infer")
    # hidden, for the test: KEY (raises in its first timed call), KEY:build, or section:NAME
    ap.add_argument("--fail-method", action="append", default=[], help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def section(name: str, result: dict, fn, fail=()):
    """Runs one section, records its elapsed time and any error; the suite goes on."""
    t0 = time.perf_counter()
    print(f"\n== {name} ...", flush=True)
    rec = result["sections"].setdefault(name, {})
    try:
        if f"section:{name}" in fail:
            raise InjectedFailure(f"--fail-method section:{name}: injected failure of the section")
        return fn()
    except Exception as e:
        rec["error"] = error_text(e)
        traceback.print_exc()
        return None
    finally:
        rec["elapsed_s"] = round(time.perf_counter() - t0, 1)
        print(f"-- {name}: {rec['elapsed_s']} s" + (f"  ERROR {rec['error']}" if "error" in rec else ""), flush=True)


def main(argv=None) -> int:
    t0 = time.perf_counter()
    args = parse(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        sys.exit("gpu_suite.py: no CUDA device is available (use --dry-run for the CPU check of the code paths)")
    dev = "cpu" if dry else "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(args.dtype) or (
        torch.float32 if dry else torch.bfloat16)
    backend = args.compile_backend or ("aot_eager" if dry else "inductor")
    warmup = args.warmup if args.warmup is not None else (1 if dry else 3)
    iters = args.iters or (3 if dry else 20)
    min_iters = min(iters, 3 if dry else 5)
    meter = CudaMeter() if dev == "cuda" else RssMeter.create()
    if dry:  # tiny shapes gain nothing from threads; on a shared 2-core box spinning OpenMP threads cost 5x
        torch.set_num_threads(1)
    deadline = t0 + args.budget_s
    sections = set(args.sections.split(","))

    import peft
    import transformers

    import lorafit

    shape = "tiny" if dry else "1b"
    kw, (tb, ts), (rows, pf) = SHAPES[shape]
    now = datetime.datetime.now(datetime.timezone.utc)
    device_name = torch.cuda.get_device_name() if dev == "cuda" else f"cpu dry run ({platform.machine()})"
    meta = {
        "dry_run": dry, "device": dev, "device_name": device_name, "date": now.date().isoformat(),
        "datetime_utc": now.isoformat(timespec="seconds"), "torch": torch.__version__,
        "cuda": torch.version.cuda, "transformers": transformers.__version__, "peft": peft.__version__,
        "lorafit": lorafit.__version__, "triton": _version("triton"), "bitsandbytes": _version("bitsandbytes"),
        "python": platform.python_version(), "argv": sys.argv[1:] if argv is None else list(argv),
        "model": f"Llama {shape} (hidden {kw['hidden_size']}, {kw['num_hidden_layers']} layers, vocab "
                 f"{kw['vocab_size']}; random init, sdpa)", "shape": shape, "config": kw,
        "dtype": str(dtype).replace("torch.", ""), "r": R, "alpha": ALPHA, "dropout": 0.0,
        "target_modules": "all-linear (q,k,v,o,gate,up,down)", "optimizer": "AdamW(lr=1e-5)",
        "train_shape": f"{tb} x {ts}", "infer_phases": list(INFER_PHASES),
        "infer_shapes": {"rows": rows, "prefill": f"{rows} x {pf}", "decode": f"{rows} x 1"},
        "compile_backend": backend, "warmup": warmup, "iters_max": iters, "iters_min": min_iters,
        "budget_s": args.budget_s, "memory_meter": meter.name if meter else "none (null)",
        "schedule": "interleaved: one call of each method per round, order rotated; ratios paired per round",
        "fail_method": args.fail_method,
    }
    print(f"gpu suite: {device_name} | torch {torch.__version__} transformers {transformers.__version__} "
          f"peft {peft.__version__} | {shape} {meta['dtype']} | compile {backend}" + (" | DRY RUN" if dry else ""),
          flush=True)
    result = {"meta": meta, "sections": {}, "train": None, "train_pairs": {}, "train_rounds": None,
              "infer": None, "infer_rounds": None, "big": None, "checks": [], "targets": []}
    ctx = {}

    def setup():
        ctx["template"], ctx["cfg"] = build_template(shape, dev, dtype)
        g = torch.Generator().manual_seed(0)
        vocab = ctx["cfg"].vocab_size
        ctx["ids"] = torch.randint(0, vocab, (tb, ts), generator=g).to(dev)
        ctx["prefill"] = torch.randint(0, vocab, (rows, pf), generator=g).to(dev)
        ctx["onetok"] = torch.randint(0, vocab, (rows, 1), generator=g).to(dev)
        meta["params"] = sum(p.numel() for p in ctx["template"].parameters())

    meta["params"] = 0
    section("setup", result, setup, args.fail_method)
    reserve = (RESERVE_INFER_S if "infer" in sections else 0) + (RESERVE_BIG_S if args.big else 0)

    def train():
        methods = train_methods(ctx["template"], ctx["ids"], backend)
        res, rounds = run_methods(methods, dev, meter, warmup=warmup, iters=iters, fail=args.fail_method,
                                  deadline=deadline - reserve, min_iters=min_iters,
                                  tokens={m.key: tb * ts for m in methods})
        result["train"], result["train_rounds"] = res, rounds
        result["train_pairs"] = add_train_pairs(res)
        torch._dynamo.reset()  # drops the compiled graphs (and what they hold) before the next section

    def infer():
        shared = {}
        try:
            methods = infer_methods(ctx["template"], ctx["prefill"], ctx["onetok"], shared)
            with torch.no_grad():
                res, rounds = run_methods(methods, dev, None, warmup=warmup, iters=iters, fail=args.fail_method,
                                          deadline=deadline - (RESERVE_BIG_S if args.big else 0),
                                          min_iters=min_iters, tokens={m.key: rows * (pf if m.key.endswith(
                                              "prefill") else 1) for m in methods})
            nested = {}
            for key, e in res.items():
                variant, ph = key.split(".")
                v = nested.setdefault(variant, {"label": e["label"].rsplit(" (", 1)[0]})
                v[ph] = e
            add_infer_pairs(nested, INFER_PHASES)
            result["infer"], result["infer_rounds"] = nested, rounds
            result["checks"].append(mixed_check(shared, ctx["prefill"], dtype))
        finally:
            shared.clear()

    for name, fn in (("train", train), ("infer", infer)):
        if name in sections and "template" in ctx:
            section(name, result, fn, args.fail_method)
        elif name in sections:
            result["sections"][name] = {"elapsed_s": 0.0, "error": "not run: the setup section failed"}
        free(dev)
    ctx.clear()
    free(dev)

    if args.big:
        def big():
            left = deadline - time.perf_counter()
            if left < 100 and not dry:
                raise RuntimeError(f"skipped: {left:.0f} s left of --budget-s, the 8B section needs about 120 s")
            big_shape = "tiny" if dry else "8b"
            template, cfg = build_template(big_shape, dev, dtype)
            b, s = SHAPES[big_shape][1]
            meta["big_shape"] = f"{b} x {s}" + (" (dry run: tiny)" if dry else "")
            meta["big_params"] = sum(p.numel() for p in template.parameters())
            ids = torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(0)).to(dev)
            methods = train_methods(template, ids, backend, big=True)
            res, rounds = run_methods(methods, dev, meter, warmup=warmup, iters=min(iters, 10), fail=args.fail_method,
                                      deadline=deadline, min_iters=min_iters, tokens={m.key: b * s for m in methods})
            add_train_pairs(res)
            result["big"], result["big_rounds"] = res, rounds
        section("big", result, big, args.fail_method)
        free(dev)

    result["targets"] = compute_targets(result["train"], result["train_pairs"], result["infer"])
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    meta["over_8_minutes"] = meta["wall_s"] > 480
    rr = [(n, result.get(n + "_rounds")) for n in ("train", "infer", "big")]
    meta["rounds_note"] = ", ".join(f"{n} {r['rounds']} rounds" for n, r in rr if r) or "no rounds"
    out = args.out or (RESULTS if not dry else tempfile.mkdtemp(prefix="gpu-suite-dry-"))
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"gpu-suite-{device_slug(device_name if not dry else 'cpu-dry-run')}-{meta['date']}")
    with open(stem + ".json", "w") as f:  # first: the raw times survive a failing report
        json.dump(result, f, indent=1)
    print_report(result)
    with open(stem + ".md", "w") as f:
        f.write(markdown_report(result))
    print(f"\nwrote {stem}.json and .md  ({meta['wall_s']} s" + (", OVER 8 MINUTES" if meta["over_8_minutes"] else "")
          + ")", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
