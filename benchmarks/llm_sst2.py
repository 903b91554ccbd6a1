"""A real LLM learns a task: SmolLM2-135M-Instruct on SST-2 as instruction following, side by side.

    python benchmarks/llm_sst2.py                       # 1,000 train rows, the 872 test rows (CPU: ~1 h)
    python benchmarks/llm_sst2.py --train-rows 64 --test-rows 32 --no-memory   # a quick look
    # on 2 cores, as run for the results: the LoRA pair interleaved, QLoRA in a second process alongside,
    # each on one thread (three variants interleaved in one process oversubscribed a shared machine)
    python benchmarks/llm_sst2.py --variants lorafit,peft --threads 1
    python benchmarks/llm_sst2.py --variants qlora --no-zero-shot --threads 1 \
        --out benchmarks/results/llm-sst2-qlora-cpu-DATE.json

The model answers "positive" or "negative" to a chat turn holding a movie review (SST-2, Socher et
al. 2013, ../shared/data/sst2). Four columns, one run, the same data in the same order:

- zero-shot: the base model as it is;
- lorafit LoRA, PEFT LoRA: r=8, alpha=16, every linear layer but the output layer, dropout 0,
  AdamW lr --lr with linear decay, 1 epoch, batch --batch-size, fp32 on the CPU;
- lorafit QLoRA: the same adapter on the base quantized to NF4 (lorafit.quant).

Accuracy is greedy generation scored by lorafit's exact match (lorafit.tasks.generation: the answer,
normalised, must be the label word and then end the turn) on the test rows.

Step time: the three trainings are interleaved step by step (lorafit, PEFT, QLoRA, lorafit, ...), each
step timed alone, so a machine shared with other work slows all three alike; medians over the steps
after the first 3 are reported, as wall time and as process CPU time, and their ratios to PEFT.
Peak memory: each variant again in a fresh subprocess (base load + a few steps), its own peak RSS (VmHWM); the RSS
right after loading the base is given beside it, so the difference is what training added.

Order: the three trainings, their evaluations, the zero-shot evaluation, the memory subprocesses; the
JSON is rewritten after each, so a run stopped part way keeps what it measured.
Writes benchmarks/results/llm-sst2-<device>-<date>.json and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import json
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
SST2 = ROOT.parent / "shared" / "data" / "sst2"
SYSTEM = "You label movie reviews."  # short: without one, the chat template inserts a 20-token default
QUESTION = "Is this review positive or negative? Answer with one word.\n\nReview: "
WORDS = {"0": "negative", "1": "positive"}
VARIANTS = ("lorafit", "peft", "qlora")


def read_rows(path: Path, n: int | None, seed: int) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    if n is not None and n < len(rows):
        rows = random.Random(seed).sample(rows, n)
    return [{"messages": [{"role": "system", "content": SYSTEM},
                          {"role": "user", "content": QUESTION + r["sentence"].strip()},
                          {"role": "assistant", "content": WORDS[r["label"].strip()]}]} for r in rows]


def make_task(max_length: int):
    from lorafit.jobs.options import all_options, resolve, task_defaults
    from lorafit.tasks.causal_lm import Task

    opts = resolve({"task": "causal-lm", "model": "smollm2", "max_length": str(max_length)}, all_options(),
                   task_defaults)
    return Task(opts)


def build(variant: str, base: torch.nn.Module, seed: int) -> torch.nn.Module:
    import lorafit

    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    if variant == "peft":
        import peft

        cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
        return peft.get_peft_model(model, cfg).train()
    if variant == "qlora":
        lorafit.quantize(model, "nf4")
    lorafit.inject(model, lorafit.LoraConfig(r=8, alpha=16, target_modules="all-linear", dropout=0.0))
    return model.train()


def step(task, model, opt, sched, batch) -> tuple[float, float, float]:
    """One optimizer step; returns (loss, wall seconds, process CPU seconds)."""
    w0, c0 = time.perf_counter(), time.process_time()
    loss = task.loss_sum(model, batch) / max(task.count(batch), 1)
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach()), time.perf_counter() - w0, time.process_time() - c0


def trainer(task, model, lr: float, steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(0.0, 1.0 - i / steps))
    return opt, sched


def batches(task, rows: list, batch_size: int, seed: int) -> list[dict]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [task.collate([rows[i] for i in order[s:s + batch_size]]) for s in range(0, len(order), batch_size)]


def accuracy(task, model, rows: list, batch_size: int) -> float:
    from lorafit.tasks.generation import exact_match

    with torch.no_grad():
        out = exact_match(model, task.tokenizer, rows, batch_size, torch.device("cpu"), task.pad_id,
                          task.answer_ends())
    return out["eval_exact_match"]


def label_word_accuracy(task, model, rows: list, batch_size: int) -> float:
    """Lenient score for the base model, which answers in a sentence ("This review is positive."): the share
    of rows whose greedy answer names the right label word before the other one (or alone)."""
    from lorafit.tasks.generation import greedy, prompt_and_reference

    pairs = [prompt_and_reference(ids, labels) for ids, labels in rows]
    stop = [task.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    hits = 0
    with torch.no_grad():
        for s in range(0, len(pairs), batch_size):
            chunk = pairs[s:s + batch_size]
            for (_, ref), gen in zip(chunk, greedy(model, [p for p, _ in chunk], 16, task.pad_id, stop,
                                                   torch.device("cpu"))):
                want = task.tokenizer.decode(ref, skip_special_tokens=True).strip()
                text = task.tokenizer.decode(gen, skip_special_tokens=True).lower()
                found = sorted((text.find(w), w) for w in WORDS.values() if w in text)
                hits += bool(found) and found[0][1] == want
    return hits / len(pairs)


def memory_probe(args) -> None:
    """Subprocess: peak RSS of one variant (base load + --probe-steps steps); prints one JSON line."""
    from lorafit.train.progress import peak_memory

    task = make_task(args.max_length)
    base = task.build_model()
    # this process's own peak (VmHWM): ru_maxrss would include the parent's size at fork + exec
    after_load = peak_memory(torch.device("cpu"))[0]
    rows = [task.encode(r, "x") for r in read_rows(SST2 / "train.tsv", args.batch_size * args.probe_steps, 0)]
    model = build(args.probe, base, args.seed)
    del base
    opt, sched = trainer(task, model, args.lr, args.probe_steps)
    for batch in batches(task, rows, args.batch_size, args.seed):
        step(task, model, opt, sched, batch)
    print(json.dumps({"variant": args.probe, "rss_after_base_load": after_load,
                      "peak_rss": peak_memory(torch.device("cpu"))[0]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-rows", type=int, default=1000)
    ap.add_argument("--test-rows", type=int, default=None, help="default: all 872")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma list of lorafit,peft,qlora (ratios need peft in the same run)")
    ap.add_argument("--no-zero-shot", action="store_true", help="skip the base model's evaluation")
    ap.add_argument("--lenient-zero-shot", type=Path, metavar="JSON",
                    help="only: add the base model's label-word accuracy to an existing results JSON")
    ap.add_argument("--probe", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--probe-steps", type=int, default=6, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.probe:
        memory_probe(args)
        return
    if args.lenient_zero_shot:
        task = make_task(args.max_length)
        base = task.build_model().eval()
        test = [task.encode(r, f"test {i}") for i, r in enumerate(read_rows(SST2 / "test.tsv", args.test_rows, 0))]
        report = json.loads(args.lenient_zero_shot.read_text())
        report["results"]["zero-shot"]["label_word_first"] = label_word_accuracy(task, base, test,
                                                                                 args.eval_batch_size)
        args.lenient_zero_shot.write_text(json.dumps(report, indent=2) + "\n")
        print(f"zero-shot label-word accuracy {report['results']['zero-shot']['label_word_first']:.4f}")
        return


    t0 = time.time()
    task = make_task(args.max_length)
    base = task.build_model().eval()
    train = [task.encode(r, f"train {i}") for i, r in enumerate(read_rows(SST2 / "train.tsv", args.train_rows, 0))]
    test = [task.encode(r, f"test {i}") for i, r in enumerate(read_rows(SST2 / "test.tsv", args.test_rows, 0))]
    task.kinds.add("chat")
    print(f"SmolLM2-135M-Instruct, {len(train)} train / {len(test)} test rows, loaded in {time.time() - t0:.0f}s",
          flush=True)
    results: dict = {}
    out = args.out or ROOT / "benchmarks" / "results" / f"llm-sst2-cpu-{datetime.date.today().isoformat()}.json"

    variants = tuple(v for v in VARIANTS if v in args.variants.split(","))
    plan = batches(task, train, args.batch_size, args.seed)
    models = {v: build(v, base, args.seed) for v in variants}
    state = {v: trainer(task, models[v], args.lr, len(plan)) for v in variants}
    times: dict = {v: {"wall": [], "cpu": [], "loss": []} for v in variants}
    for i, batch in enumerate(plan):
        k = i % len(variants)
        for v in variants[k:] + variants[:k]:  # rotate who goes first
            loss, wall, cpu = step(task, models[v], *state[v], batch)
            times[v]["wall"].append(wall)
            times[v]["cpu"].append(cpu)
            times[v]["loss"].append(loss)
        if i % 10 == 0 or i == len(plan) - 1:
            print(f"step {i + 1}/{len(plan)} " + "  ".join(f"{v} {times[v]['loss'][-1]:.3f}" for v in variants),
                  flush=True)
    skip = 3 if len(plan) > 6 else 0
    for v in variants:
        results[v] = {
            "step_wall_s": statistics.median(times[v]["wall"][skip:]),
            "step_cpu_s": statistics.median(times[v]["cpu"][skip:]),
            "final_loss": statistics.mean(times[v]["loss"][-10:]),
            "trainable_params": sum(p.numel() for p in models[v].parameters() if p.requires_grad),
        }
    for v in variants if "peft" in variants else ():
        for k in ("step_wall_s", "step_cpu_s"):
            results[v][k.replace("_s", "_vs_peft")] = results[v][k] / results["peft"][k]
    write(out, args, results, len(train), len(test), t0)  # partial results survive a stop from here on
    for v in variants:
        results[v]["accuracy"] = accuracy(task, models[v], test, args.eval_batch_size)
        print(f"{v}: accuracy {results[v]['accuracy']:.4f}", flush=True)
        write(out, args, results, len(train), len(test), t0)
    if not args.no_zero_shot:
        results["zero-shot"] = {"accuracy": accuracy(task, base, test, args.eval_batch_size)}
        print(f"zero-shot accuracy {results['zero-shot']['accuracy']:.4f}", flush=True)
        write(out, args, results, len(train), len(test), t0)
    if not args.no_memory:
        del models, state
        for v in variants:
            cmd = [sys.executable, __file__, "--probe", v, "--batch-size", str(args.batch_size),
                   "--max-length", str(args.max_length)] + (["--threads", str(args.threads)] if args.threads else [])
            line = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results[v].update({k: val for k, val in json.loads(line).items() if k != "variant"})
            write(out, args, results, len(train), len(test), t0)
    print(table(results))
    print(f"wrote {out}")


def write(out: Path, args, results: dict, n_train: int, n_test: int, t0: float) -> None:
    """The report so far (device, versions, date, settings, results), written atomically."""
    import peft
    import transformers

    import lorafit

    report = {
        "benchmark": "llm_sst2", "date": datetime.date.today().isoformat(), "device": "cpu",
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "lorafit": lorafit.__version__, "python": platform.python_version()},
        "settings": {k: v for k, v in vars(args).items() if k not in ("probe", "out")} | {
            "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)", "r": 8, "alpha": 16,
            "targets": "all-linear", "epochs": 1, "train": n_train, "test": n_test, "system": SYSTEM,
            "question": QUESTION},
        "results": results, "wall_time_s": time.time() - t0,
    }
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)


def table(results: dict) -> str:
    """Markdown table of one run's results (or of several runs' results merged into one dict)."""
    gib = 2.0 ** 30
    lines = ["| | accuracy (greedy) | step wall (s) | x PEFT (of medians) | step CPU (s) | x PEFT (of medians) "
             "| peak RSS (GiB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    if "zero-shot" in results:
        zs = results["zero-shot"]
        lenient = f" (says the right label first: {zs['label_word_first']:.3f})" if "label_word_first" in zs else ""
        lines.append(f"| zero-shot base | {zs['accuracy']:.3f}{lenient} | | | | | |")
    for v, name in (("lorafit", "lorafit LoRA"), ("peft", "PEFT LoRA"), ("qlora", "lorafit QLoRA NF4")):
        if v not in results:
            continue
        r = results[v]
        cell = {k: (f"{r[k]:.3f}" if isinstance(r.get(k), float) else "-")
                for k in ("accuracy", "step_wall_s", "step_wall_vs_peft", "step_cpu_s", "step_cpu_vs_peft")}
        peak = f"{r['peak_rss'] / gib:.2f}" if "peak_rss" in r else "-"
        lines.append(f"| {name} | {cell['accuracy']} | {cell['step_wall_s']} | {cell['step_wall_vs_peft']} | "
                     f"{cell['step_cpu_s']} | {cell['step_cpu_vs_peft']} | {peak} |")
    return "\n".join(lines)


def merged_results(paths: list[Path]) -> dict:
    """The results of several runs (the LoRA pair, then QLoRA) as one dict; a later run adds, never overrides."""
    out: dict = {}
    for path in paths:
        for name, value in json.loads(Path(path).read_text())["results"].items():
            out.setdefault(name, value)
    return out


if __name__ == "__main__":
    main()
