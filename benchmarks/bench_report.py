"""train_step.py's printed report and its targets (issue 2, section 4).

Tables come from bench_tables.py (one column per measure, paired ratios with their p25-p75).
"""

from __future__ import annotations

from bench_models import ALPHA, N_ADAPTERS, R
from bench_tables import TRAIN_LABELS, infer_table, text, train_table

# ----------------------------------------------------------------------------- report
def _pr(p):
    return f"{p['median']:.3f} (p25-p75 {p['p25']:.3f}-{p['p75']:.3f}, {p['n']} rounds)"


def print_report(meta, train, infer, checks, targets):
    dev = meta["device"]
    paired = meta["schedule"] == "interleaved"
    print()
    print(f"== {meta['device_name']} | size {meta['size']} ({meta['params']/1e6:,.1f}M params, {meta['dtype']}) | "
          f"torch {meta['torch']} transformers {meta['transformers']} peft {meta['peft']} | {meta['schedule']} | "
          f"{meta['date']}")
    la = meta.get("loadavg_start")
    if dev == "cpu" and la and max(la[0], (meta.get("loadavg_end") or la)[0]) > meta["cpu_count"]:
        print(f"note: load average {la[0]} -> {meta['loadavg_end'][0]} on {meta['cpu_count']} CPUs: other processes "
              f"competed for the cores; trust the paired ratios over the absolute times")
    if train:
        # one column per measure (bench_tables.py); on CPU every ratio is paired, with its p25-p75
        print(f"training step, r={R} alpha={ALPHA} all-linear, {meta['iters']} "
              + ("interleaved rounds; x REF paired = median over rounds of (time / REF's time in the same "
                 "round), (p25-p75) of those per-round ratios" if paired else
                 "sequential steps per method; x floor = ratio of the medians (no pairing)"))
        print(text(*train_table(train, meta)))
        if dev == "cuda":
            done = [k for k in TRAIN_LABELS if "median_ms" in train.get(k, {})]
            print("(peak MiB = torch.cuda.max_memory_allocated; tokens/s: "
                  + ", ".join(f"{TRAIN_LABELS[k]} {train[k]['tokens_per_s']:,.0f}" for k in done) + ")")
        if paired:
            pr = train["_paired"]
            print("lorafit / PEFT, paired: wall " + _pr(pr["lorafit_over_peft"]) + ", cpu time "
                  + _pr(pr["lorafit_over_peft_cpu"]) + "; lorafit / 20-line LoRA, paired: wall "
                  + _pr(pr["lorafit_over_minilora"]) + ", cpu time " + _pr(pr["lorafit_over_minilora_cpu"]))
        print()
    if infer:
        print(f"inference (eval, no_grad), {N_ADAPTERS} adapters for the mixed rows (row i uses a[i % {N_ADAPTERS}])")
        print(text(*infer_table(infer, meta)))
        print()
    if checks:
        bad = [c for c in checks if not c["ok"]]
        print(f"correctness (lorafit vs PEFT with identical non-zero adapters; rel err = |a-b| / |b|): "
              f"{'all ' + str(len(checks)) + ' checks pass' if not bad else str(len(bad)) + ' FAILED'}")
        for c in checks:
            if "rel_err" in c:
                eff = f"  adapter effect {c['adapter_effect']:.2e}" if c.get("adapter_effect") is not None else ""
                pe = f"  (PEFT's own {c['peft_rel_err']:.2e})" if c.get("peft_rel_err") is not None else ""
                print(f"  [{'ok' if c['ok'] else 'FAIL'}] {c['check']:38s} rel err {c['rel_err']:.2e}"
                      f" <= {c['tol']:.1e}{pe}{eff}")
            else:
                print(f"  [{'ok' if c['ok'] else 'FAIL'}] {c['check']}")
        print()
    if targets:
        print("targets (issue 2, section 4):")
        for t in targets:
            print(f"  [{'met' if t['met'] else 'MISSED'}] {t['target']:46s} {t['value']}")


def compute_targets(dev, train, infer):
    t = []

    def add(target, value, met):
        t.append({"target": target, "value": value, "met": bool(met)})

    lf, pe, mini = train["lorafit"], train["peft"], train["minilora"]
    if "median_ms" not in lf or "median_ms" not in pe:
        return t
    if dev == "cpu":
        pr = train.get("_paired")
        if pr:
            ratio = pr["lorafit_over_peft"]["median"]
            value = f"{_pr(pr['lorafit_over_peft'])}, cpu time {pr['lorafit_over_peft_cpu']['median']:.3f}"
        else:  # sequential on cpu: only a ratio of medians exists
            ratio = lf["median_ms"] / pe["median_ms"]
            value = f"{ratio:.3f} (ratio of medians)"
        add("step <= 0.95x PEFT's" + (" (paired, wall clock)" if pr else ""), value, ratio <= 0.95)
        add("saved for backward <= PEFT's", f"{lf['saved_bytes'] / 2**20:.1f} vs {pe['saved_bytes'] / 2**20:.1f} MiB",
            lf["saved_bytes"] <= pe["saved_bytes"])
    else:
        add("step <= 1.10x floor (ratio of medians)", f"{lf['x_floor_of_medians']:.3f}x",
            lf["x_floor_of_medians"] <= 1.10)
        if lf.get("peak_bytes") and mini.get("peak_bytes"):
            add("peak <= 20-line LoRA's", f"{lf['peak_bytes'] / 2**30:.2f} vs {mini['peak_bytes'] / 2**30:.2f} GiB",
                lf["peak_bytes"] <= mini["peak_bytes"])
        if "median_ms" in train["full_ft"]:
            add("faster than full fine-tuning", f"{lf['median_ms']:.1f} vs {train['full_ft']['median_ms']:.1f} ms",
                lf["median_ms"] < train["full_ft"]["median_ms"])
        for ph in ("prefill", "1tok"):
            x = infer["lorafit"][ph]["x_base_of_medians"]
            add(f"unmerged inference <= 1.10x base ({ph})", f"{x:.3f}x", x <= 1.10)
            x = infer["merged"][ph]["x_base_of_medians"]
            add(f"merged = base ({ph}, <= 1.03x)", f"{x:.3f}x", x <= 1.03)
            x = infer["lorafit_mixed8"][ph]["x_base_of_medians"]
            add(f"8 mixed adapters <= 1.3x base ({ph})", f"{x:.3f}x", x <= 1.3)
    return t
