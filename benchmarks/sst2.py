"""SST-2 side by side: lorafit LoRA, HF PEFT LoRA and full fine-tuning of all-MiniLM-L6-v2, same loop.

    python benchmarks/sst2.py [--seeds 0,1] [--methods lorafit,peft,full] [--max-samples 8000]

Every method runs through the same :class:`lorafit.train.Trainer` (mean-pooled encoder + linear
head, max length 64, AdamW, 6% warmup then linear decay, batch 32, one epoch of 8000 seeded
SST-2 training rows; accuracy on the 872 labelled GLUE validation sentences in test.tsv), so
only the adaptation differs: lorafit's injection, PEFT's ``get_peft_model`` on the encoder
(both r=8, alpha=16, query,key,value,dense, lr 1e-3, head trained fully), or every weight at
lr 5e-5. Data: ``../shared/data/sst2`` next to the repository (Socher et al., 2013, GLUE
distribution). Writes ``benchmarks/results/sst2.json`` and ``sst2.md``.

Memory is measured the same way for every method: each run is a fresh process that imports the
same modules (torch, transformers, peft, lorafit: here, 2026-12-01, importing PEFT after the
other three raised the RSS from 293 to 540 MiB, which a process that imports it for one method
only would charge to that method), then loads the data
and the model and applies the method; the RSS at that point is "before training". The peak RSS is
then reset (``/proc/self/clear_refs``, Linux) so "peak in training" is the training phase's own,
and "increase" = peak in training - before training (CUDA: allocator counters instead of RSS).
The memory pass runs ``--memory-steps`` steps per method and seed, without evaluation;
``--memory-only`` redoes only it, keeping the accuracy runs and step timings of the existing JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "sst2"
TARGETS = ["query", "key", "value", "dense"]
METHODS = {"lorafit": "lorafit LoRA", "peft": "PEFT LoRA", "full": "full fine-tuning"}
SAME_IMPORTS = ("torch", "transformers", "peft", "lorafit")


def _proc_status_kib(key: str) -> int | None:
    """VmRSS / VmHWM of this process in KiB (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def memory_mark(dev) -> dict:
    """Memory at the start of training; resets the peak so the one read after is training's own.

    CPU: current RSS, then the peak RSS (VmHWM) is reset by writing 5 to /proc/self/clear_refs.
    CUDA: memory_allocated, then reset_peak_memory_stats.
    """
    import gc

    import torch

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        return {"kind": "CUDA allocated", "before_train_bytes": before, "peak_reset": True}
    rss, hwm = _proc_status_kib("VmRSS"), _proc_status_kib("VmHWM")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = _proc_status_kib("VmHWM") is not None
    except OSError:
        reset = False
    return {"kind": "RSS", "before_train_bytes": None if rss is None else rss * 1024,
            "load_peak_bytes": None if hwm is None else hwm * 1024, "peak_reset": reset}


def memory_read(dev, mark: dict) -> dict:
    """Complete `mark` with the training-phase peak and the increase over the start of training."""
    import torch

    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev)
    else:
        hwm = _proc_status_kib("VmHWM")
        peak = None if hwm is None else hwm * 1024
    out = dict(mark, train_peak_bytes=peak)
    if mark["peak_reset"] and peak is not None and mark["before_train_bytes"] is not None:
        out["train_increase_bytes"] = peak - mark["before_train_bytes"]
    return out


def run_one(method: str, seed: int, max_samples: int, device: str, timing_steps: int = 0,
            memory_steps: int = 0) -> dict:
    """Train and evaluate one (method, seed) in this process; returns the result row.

    With ``timing_steps`` > 0: only that many steps and no evaluation (the interleaved timing pass);
    ``memory_steps`` > 0: the same for the memory pass. Every method imports SAME_IMPORTS first, so
    that no method's memory includes a module only it imported.
    """
    import importlib
    import random

    for name in SAME_IMPORTS:
        importlib.import_module(name)
    import torch

    import lorafit
    from lorafit.common.modules import count_parameters
    from lorafit.jobs.options import all_options, resolve, task_defaults
    from lorafit.jobs.train import quiet_transformers
    from lorafit.tasks.text_classification import Task
    from lorafit.train.distributed import Dist, pick_device
    from lorafit.train.loop import Trainer
    from lorafit.train.progress import peak_memory

    quiet_transformers()
    flags = {
        "model": "minilm",
        "train": str(DATA / "train.tsv"),
        "eval": str(DATA / "test.tsv"),
        "text_column": "sentence",
        "label_column": "label",
        "max_samples": (timing_steps or memory_steps) * 32 if (timing_steps or memory_steps) else max_samples,
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
    trainable, total = count_parameters(model, originals=False)
    short = bool(timing_steps or memory_steps)
    mark = memory_mark(dev)
    t0 = time.perf_counter()
    result = Trainer(model, task, train, [] if short else evaluation, opts, Dist(device=dev), tty=False).fit()
    wall = time.perf_counter() - t0
    memory = memory_read(dev, mark)
    steps = [r["step_time_s"] for r in result["records"] if r.get("kind") == "train"]
    if timing_steps:
        return {"method": method, "steps": len(steps), "step_median_s": statistics.median(steps)}
    if memory_steps:
        return {"method": method, "seed": seed, "steps": len(steps), "memory": memory,
                "torch_threads": torch.get_num_threads(), "same_imports": list(SAME_IMPORTS)}
    return {
        "method": method,
        "seed": seed,
        "accuracy": result["final"]["eval_accuracy"],
        "eval_loss": result["final"]["eval_loss"],
        "steps": len(steps),
        "step_median_s": statistics.median(steps),
        "train_time_s": result["train_time_s"],
        "wall_s": wall,
        "peak_memory_bytes": peak_memory(dev)[0],  # since the reset in memory_mark: training + evaluation
        "memory": memory,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": 100 * trainable / total,
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
    }


def _mib_spread(vals: list[int]) -> str:
    """'1203 (1198-1208)': median over runs (min-max), MiB."""
    m = [v / 2**20 for v in vals]
    return f"{statistics.median(m):.0f} ({min(m):.0f}-{max(m):.0f})"


def table(rows: list[dict], rounds: dict[str, list[float]], memory: list[dict], memory_steps: int) -> str:
    """Markdown table, one column per measure.

    Accuracy: the full runs. Step time: the interleaved timing pass, median over rounds (min-max).
    Memory: the memory pass (fresh process per method and seed, same imports), median over runs (min-max).
    """
    kind = memory[0]["memory"]["kind"] if memory else "RSS"
    n_mem = {m: sum(1 for r in memory if r["method"] == m) for m in METHODS}
    n_rounds = max(map(len, rounds.values()), default=0)
    lines = [
        f"| method | accuracy (mean ± sd) | accuracy per seed | step s, median of {n_rounds}"
        f" rounds (min-max) | {kind} before training MiB | peak {kind} in training MiB | training increase MiB"
        " | trainable |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method, label in METHODS.items():
        rs = [r for r in rows if r["method"] == method]
        if not rs:
            continue
        accs = [100 * r["accuracy"] for r in rs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        steps = rounds.get(method) or []
        step = f"{statistics.median(steps):.3f} ({min(steps):.3f}-{max(steps):.3f})" if steps else "-"
        mem = [r["memory"] for r in memory if r["method"] == method]
        cols = [_mib_spread([m[k] for m in mem]) if mem and all(m.get(k) is not None for m in mem) else "-"
                for k in ("before_train_bytes", "train_peak_bytes", "train_increase_bytes")]
        lines.append(
            f"| {label} | {statistics.mean(accs):.2f}% ± {sd:.2f} | {', '.join(f'{a:.2f}' for a in accs)} | "
            f"{step} | {' | '.join(cols)} | {rs[0]['trainable_params']:,} ({rs[0]['trainable_pct']:.2f}%) |"
        )
    runs = ", ".join(f"{n_mem[m]} {m}" for m in METHODS if n_mem[m])
    lines.append(
        f"\nMemory columns: median (min-max) over the memory pass's runs ({runs}), each a fresh process with the "
        f"same imports ({', '.join(SAME_IMPORTS)}), {memory_steps} training steps of batch 32, no evaluation; "
        "before training = after imports, data, model and adapters; peak reset at the start of training."
    )
    return "\n".join(lines)


def spawn(env: dict, *args: str) -> dict:
    """Run ``--one ...`` in a fresh process (its own peak memory) and parse its RESULT line."""
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.exit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def write_atomic(path: Path, content: str) -> None:
    """Temp file + rename: a killed run never leaves a half-written result."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(content)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--max-samples", type=int, default=8000)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sst2"))
    ap.add_argument("--timing-rounds", type=int, default=2, help="rounds of the interleaved timing pass")
    ap.add_argument("--timing-steps", type=int, default=40, help="steps per method per timing round")
    ap.add_argument("--memory-steps", type=int, default=40,
                    help="training steps per run of the memory pass (one fresh process per method and seed)")
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--timing-only", action="store_true", help="redo only the timing pass of an existing JSON")
    only.add_argument("--memory-only", action="store_true", help="redo only the memory pass of an existing JSON")
    only.add_argument("--table-only", action="store_true", help="rewrite the .md from the existing JSON")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    ap.add_argument("--timing", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--memory", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        result = run_one(a.one[0], int(a.one[1]), a.max_samples, a.device, a.timing, a.memory)
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
    seeds = [int(s) for s in a.seeds.split(",")]
    common = ["--max-samples", str(a.max_samples), "--device", a.device]
    reuse = a.timing_only or a.memory_only or a.table_only
    saved = json.loads(out.with_suffix(".json").read_text()) if reuse else {}
    rows, meta = saved.get("runs", []), saved.get("meta", {})
    rounds: dict[str, list[float]] = saved.get("timing_rounds", {})
    memory: list[dict] = saved.get("memory_runs", [])
    if not saved:
        meta = {
            "data": f"SST-2 (GLUE): {a.max_samples} seeded train rows, 872 test rows",
            "model": "all-MiniLM-L6-v2",
            "cpu_count": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }
        for seed in seeds:
            for method in methods:
                r = spawn(env, "--one", method, str(seed), *common)
                rows.append(r)
                print(f"{METHODS[method]:>17} seed {seed}: accuracy {100 * r['accuracy']:.2f}%  "
                      f"step {r['step_median_s']:.3f} s", flush=True)
    if not (a.memory_only or a.table_only):
        # Step times of runs made minutes apart on a shared machine are not comparable: time the methods
        # again in short runs interleaved round by round, and report the median over rounds.
        rounds = {m: [] for m in methods}
        for _ in range(a.timing_rounds):
            for method in methods:
                rounds[method].append(
                    spawn(env, "--one", method, "0", *common, "--timing", str(a.timing_steps))["step_median_s"]
                )
        meta["timing"] = f"step median of {a.timing_rounds} interleaved rounds of {a.timing_steps} steps per method"
    if a.memory_only:
        meta["accuracy_note"] = (f"accuracy and step times from the {meta['date']} runs, not re-run with this "
                                 "memory pass (the training code has been refactored since; not re-verified)")
    if not (a.timing_only or a.table_only):
        memory = []
        for seed in seeds:  # methods interleaved within each seed, like the timing pass
            for method in methods:
                r = spawn(env, "--one", method, str(seed), *common, "--memory", str(a.memory_steps))
                memory.append(r)
                m = r["memory"]
                print(f"{METHODS[method]:>17} seed {seed}: {m['kind']} before training "
                      f"{m['before_train_bytes'] / 2**20:.0f} MiB, peak in training {m['train_peak_bytes'] / 2**20:.0f}"
                      f" MiB", flush=True)
        meta["memory"] = (f"memory pass {time.strftime('%Y-%m-%d %H:%M')}: one fresh process per method and seed, "
                          f"same imports ({', '.join(SAME_IMPORTS)}), {a.memory_steps} steps, no evaluation")
        meta["memory_steps"] = a.memory_steps
    md = table(rows, rounds, memory, meta.get("memory_steps", a.memory_steps))
    print("\n" + md)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out.with_suffix(".json"), json.dumps(
        {"meta": meta, "runs": rows, "timing_rounds": rounds, "memory_runs": memory}, indent=2) + "\n")
    notes = "; ".join(meta[k] for k in ("timing", "memory", "accuracy_note") if meta.get(k))
    write_atomic(out.with_suffix(".md"), f"SST-2, all-MiniLM-L6-v2, {meta['data']}, {meta['date']}; {notes}\n\n{md}\n")
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
