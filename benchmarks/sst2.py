"""SST-2 side by side: lorafit LoRA, HF PEFT LoRA and full fine-tuning of all-MiniLM-L6-v2, same loop.

    python benchmarks/sst2.py [--seeds 0,1] [--methods lorafit,peft,full] [--max-samples 8000]

Every method runs through the same :class:`lorafit.train.Trainer` (mean-pooled encoder + linear
head, max length 64, AdamW, 6% warmup then linear decay, batch 32, one epoch of 8000 seeded
SST-2 training rows; accuracy on the 872 labelled GLUE validation sentences in test.tsv), so
only the adaptation differs: lorafit's injection, PEFT's ``get_peft_model`` on the encoder
(both r=8, alpha=16, query,key,value,dense, lr 1e-3, head trained fully), or every weight at
lr 5e-5. Each (method, seed) runs in its own process, so peak memory (max RSS, or CUDA peak
allocated) is that run's own. Data: ``../shared/data/sst2`` next to the repository (Socher et
al., 2013, GLUE distribution). Writes ``benchmarks/results/sst2.json`` and ``sst2.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "sst2"
TARGETS = ["query", "key", "value", "dense"]
METHODS = {"lorafit": "lorafit LoRA", "peft": "PEFT LoRA", "full": "full fine-tuning"}


def run_one(method: str, seed: int, max_samples: int, device: str, timing_steps: int = 0) -> dict:
    """Train and evaluate one (method, seed) in this process; returns the result row.

    With ``timing_steps`` > 0: only that many steps and no evaluation (the interleaved timing pass).
    """
    import random

    import torch

    import lorafit
    from lorafit.tasks.text_classification import Task
    from lorafit.train.distributed import Dist, pick_device
    from lorafit.train.job import all_options, count_params, quiet_transformers, task_defaults
    from lorafit.train.loop import Trainer
    from lorafit.train.options import resolve
    from lorafit.train.progress import peak_memory

    quiet_transformers()
    flags = {
        "model": "minilm",
        "train": str(DATA / "train.tsv"),
        "eval": str(DATA / "test.tsv"),
        "text_column": "sentence",
        "label_column": "label",
        "max_samples": timing_steps * 32 if timing_steps else max_samples,
        "epochs": 1,
        "rank": 8,
        "alpha": 16,
        "targets": ",".join(TARGETS),
        "batch_size": 32,
        "seed": seed,
        "full_finetune": method == "full",
        "eval_before": False,
        "log_every": 50,
    }
    if method == "full":  # adapter options are refused with --full-finetune (issue 10)
        flags = {k: v for k, v in flags.items() if k not in ("rank", "alpha", "targets")}
    opts = resolve(flags, all_options(), task_defaults)
    task = Task(opts)
    train, evaluation = task.load_data()
    random.seed(seed)
    torch.manual_seed(seed)
    model = task.build_model()
    if method == "lorafit":
        lorafit.inject(
            model,
            lorafit.LoraConfig(
                r=8,
                alpha=16,
                dropout=0.0,
                target_modules=TARGETS,
                modules_to_save=["head"],
                exclude_modules=["head"],
            ),
        )
    elif method == "peft":
        import peft

        for p in model.parameters():
            p.requires_grad_(False)
        model.encoder = peft.get_peft_model(
            model.encoder, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
        )
        for p in model.head.parameters():
            p.requires_grad_(True)
    dev = pick_device(device)
    model.to(dev)
    trainable, total = count_params(model)
    t0 = time.perf_counter()
    result = Trainer(
        model, task, train, [] if timing_steps else evaluation, opts, Dist(device=dev), tty=False
    ).fit()
    wall = time.perf_counter() - t0
    steps = [r["step_time_s"] for r in result["records"] if r.get("kind") == "train"]
    if timing_steps:
        return {"method": method, "steps": len(steps), "step_median_s": statistics.median(steps)}
    return {
        "method": method,
        "seed": seed,
        "accuracy": result["final"]["eval_accuracy"],
        "eval_loss": result["final"]["eval_loss"],
        "steps": len(steps),
        "step_median_s": statistics.median(steps),
        "train_time_s": result["train_time_s"],
        "wall_s": wall,
        "peak_memory_bytes": peak_memory(dev)[0],
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": 100 * trainable / total,
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
    }


def table(rows: list[dict], timing: dict[str, float] | None = None) -> str:
    """Markdown table; the step column is the interleaved timing pass when there is one."""
    timing = timing or {}
    lines = [
        "| method | accuracy (mean ± sd) | per seed | step median | peak memory | trainable |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for method, label in METHODS.items():
        rs = [r for r in rows if r["method"] == method]
        if not rs:
            continue
        accs = [100 * r["accuracy"] for r in rs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(
            f"| {label} | {statistics.mean(accs):.2f}% ± {sd:.2f} | "
            f"{', '.join(f'{a:.2f}' for a in accs)} | "
            f"{timing.get(method, statistics.median(r['step_median_s'] for r in rs)):.3f} s | "
            f"{max(r['peak_memory_bytes'] for r in rs) / 2**20:.0f} MiB | "
            f"{rs[0]['trainable_params']:,} ({rs[0]['trainable_pct']:.2f}%) |"
        )
    return "\n".join(lines)


def spawn(env: dict, *args: str) -> dict:
    """Run ``--one ...`` in a fresh process (its own peak memory) and parse its RESULT line."""
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.exit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--max-samples", type=int, default=8000)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sst2"))
    ap.add_argument("--timing-rounds", type=int, default=2, help="rounds of the interleaved timing pass")
    ap.add_argument("--timing-steps", type=int, default=40, help="steps per method per timing round")
    ap.add_argument(
        "--timing-only", action="store_true", help="redo only the timing pass of an existing JSON"
    )
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    ap.add_argument("--timing", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        result = run_one(a.one[0], int(a.one[1]), a.max_samples, a.device, a.timing)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if not (DATA / "train.tsv").is_file():
        sys.exit(f"SST-2 not found at {DATA} (expected train.tsv and test.tsv)")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "HF_HUB_OFFLINE": "1",
    }
    out = Path(a.out)
    methods = a.methods.split(",")
    common = ["--max-samples", str(a.max_samples), "--device", a.device]
    if a.timing_only:
        saved = json.loads(out.with_suffix(".json").read_text())
        rows, meta = saved["runs"], saved["meta"]
    else:
        rows = []
        meta = {
            "data": f"SST-2 (GLUE): {a.max_samples} seeded train rows, 872 test rows",
            "model": "all-MiniLM-L6-v2",
            "cpu_count": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }
        for seed in [int(s) for s in a.seeds.split(",")]:
            for method in methods:
                r = spawn(env, "--one", method, str(seed), *common)
                rows.append(r)
                print(
                    f"{METHODS[method]:>17} seed {seed}: accuracy {100 * r['accuracy']:.2f}%  "
                    f"step {r['step_median_s']:.3f} s  peak {r['peak_memory_bytes'] / 2**20:.0f} MiB",
                    flush=True,
                )
    # Step times of runs made minutes apart on a shared machine are not comparable: time the methods
    # again in short runs interleaved round by round, and report the median over rounds.
    rounds: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(a.timing_rounds):
        for method in methods:
            rounds[method].append(
                spawn(env, "--one", method, "0", *common, "--timing", str(a.timing_steps))["step_median_s"]
            )
    timing = {m: statistics.median(v) for m, v in rounds.items() if v}
    md = table(rows, timing)
    print("\n" + md)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta["timing"] = (
        f"step median of {a.timing_rounds} interleaved rounds of {a.timing_steps} steps per method"
    )
    out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "runs": rows, "timing_rounds": rounds}, indent=2) + "\n"
    )
    out.with_suffix(".md").write_text(
        f"SST-2, all-MiniLM-L6-v2, {meta['data']}, {meta['date']}; {meta['timing']}\n\n{md}\n"
    )
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
