"""The output layer on labelled positions only (lorafit.tasks.lm_loss) vs full logits, side by side.

    python benchmarks/lm_head_labels.py                    # SmolLM2-135M, the embedded default's chat rows
    python benchmarks/lm_head_labels.py --device cuda --out "$OUT/lm-head-labels.json"

The job is the causal-lm embedded default (SmolLM2-135M-Instruct, 49k vocabulary, LoRA r=8 on every
linear layer but the head, batches of 8 support-ticket chats of up to 128 tokens, loss on the
assistant's JSON answer only). Two variants of the same training step, each in its own fresh
process so each has its own peak memory, alternated --repeats times (a drifting machine hits both):

- ``full``: the model computes logits for every position, and the loss picks the labelled ones
  (the benchmark switches ``lm_loss.output_layer`` off in that process: what lorafit did before);
- ``labelled``: the output layer runs on the labelled positions only (lorafit's path now).

Reported per variant: the median step (forward + backward + AdamW) over the steps after 2 warm-up
steps, wall and process CPU seconds; peak RSS (VmHWM) and the RSS right after loading, so the
difference is what training added (on CUDA: peak allocated bytes); the first step's loss (the two
must agree). Ratios are labelled / full: the median over repeats of each repeat's ratio.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def vm(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def child(variant: str, args) -> dict:
    """One variant in this process: load, inject, ``args.steps`` steps; the measurements as a dict."""
    import torch

    import lorafit
    from lorafit.jobs.options import all_options, resolve, task_defaults
    from lorafit.tasks import lm_loss
    from lorafit.tasks.causal_lm import Task

    if args.threads:
        torch.set_num_threads(args.threads)
    if variant == "full":
        lm_loss.output_layer = lambda model: None  # the full-logits path, as before lm_loss
    device = torch.device(args.device)
    task = Task(resolve({"task": "causal-lm"}, all_options(), task_defaults))  # the embedded default
    train, _ = task.load_data()
    model = task.build_model().to(device)
    load_rss = vm("VmRSS")
    torch.manual_seed(0)
    lorafit.inject(model, lorafit.LoraConfig(r=8, alpha=16, target_modules="all-linear", dropout=0.0))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    bs = args.batch_size
    batches = [task.collate(train[i:i + bs]) for i in range(0, bs * args.steps, bs)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    walls, cpus, losses, labelled, positions = [], [], [], 0, 0
    for batch in batches:
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        w0, c0 = time.perf_counter(), time.process_time()
        loss = task.loss_sum(model, batch) / max(task.count(batch), 1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
        losses.append(float(loss.detach()))
        labelled += task.count(batch)
        positions += batch["input_ids"].numel()
    out = {"variant": variant, "step_wall_s": statistics.median(walls[2:]), "step_cpu_s": statistics.median(cpus[2:]),
           "first_loss": losses[0], "last_loss": losses[-1], "labelled_share": labelled / positions,
           "load_rss": load_rss, "peak_rss": vm("VmHWM")}
    if device.type == "cuda":
        out["peak_allocated"] = torch.cuda.max_memory_allocated()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="steps per process (the first 2 are not timed)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--child", choices=("full", "labelled"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="JSON path [benchmarks/results/lm-head-labels-<device>-<date>.json]")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return 0
    runs = {"full": [], "labelled": []}
    for rep in range(args.repeats):
        for variant in (("full", "labelled") if rep % 2 == 0 else ("labelled", "full")):
            cmd = [sys.executable, __file__, "--child", variant, "--steps", str(args.steps), "--batch-size",
                   str(args.batch_size), "--device", args.device, "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            runs[variant].append(r)
            print(f"repeat {rep} {variant:9s} step {r['step_wall_s'] * 1e3:7.0f} ms wall "
                  f"{r['step_cpu_s'] * 1e3:7.0f} ms CPU  peak RSS {r['peak_rss'] / 2**30:.2f} GiB "
                  f"(after load {r['load_rss'] / 2**30:.2f})"
                  f"  loss {r['first_loss']:.5f}", flush=True)

    def ratio(key, f=lambda r, k: r[k]):
        return statistics.median(f(a, key) / f(b, key) for a, b in zip(runs["labelled"], runs["full"]))

    added = lambda r, k: r["peak_rss"] - r["load_rss"]  # noqa: E731 - what training added to the loaded model
    import torch
    import transformers

    result = {
        "benchmark": "lm_head_labels", "date": datetime.date.today().isoformat(), "device": args.device,
        "machine": platform.platform(), "python": platform.python_version(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "setup": {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32)",
                  "job": "causal-lm embedded default", "lora": "r=8 alpha=16 all-linear",
                  "batch_size": args.batch_size, "max_length": 128, "steps_per_process": args.steps,
                  "repeats": args.repeats, "threads": args.threads or "default"},
        "runs": runs,
        "ratios_labelled_over_full": {"step_wall": ratio("step_wall_s"), "step_cpu": ratio("step_cpu_s"),
                                      "peak_rss_added_by_training": ratio(None, added)},
        "first_loss_abs_diff": max(abs(a["first_loss"] - b["first_loss"]) for a, b in zip(runs["labelled"],
                                                                                            runs["full"])),
    }
    if args.device == "cuda":
        result["ratios_labelled_over_full"]["peak_allocated"] = ratio("peak_allocated")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"lm-head-labels-{args.device}-{result['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["ratios_labelled_over_full"], indent=1), f"\nfirst-step loss |diff| "
          f"{result['first_loss_abs_diff']:.2e}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
