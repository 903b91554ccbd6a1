"""Paired timing statistics and the tables train_step.py prints and the READMEs show.

Why this module exists: a table that puts medians (179.1 vs 201.9 ms, which reads as 0.89x) beside
a column of paired ratios (1.15x floor) invites the reader to divide the wrong numbers. So every
table built here has one column per measure, each named for what it is:

- ``ms median (p25-p75)``: wall-clock time per call, median over rounds, with the interquartile
  range of the per-round times;
- ``x REF paired (p25-p75)``: the median over rounds of (this method's time / REF's time in the
  SAME round), with the p25-p75 of those per-round ratios. On a shared CPU the load drifts between
  rounds; a same-round ratio cancels it, a ratio of medians does not;
- ``x REF of medians`` only where no pairing exists (CUDA runs one method after another so that
  peak memory is comparable), and then named so.

The stats are computed from the per-round times exactly as stored in the JSON (rounded to 1 us),
so anyone can recompute them from the file and get the same numbers:

    python benchmarks/bench_tables.py benchmarks/results/cpu-small-2026-12-01.json

prints the markdown tables that README.md and benchmarks/README.md copy verbatim (a test checks).
"""

from __future__ import annotations

import json
import statistics
import sys


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    """(p25, median, p75) with the 'inclusive' method (linear between order statistics; n >= 2)."""
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def spread(times_ms: list[float]) -> dict:
    """Median, p25, p75, min, max of per-round times (ms)."""
    p25, med, p75 = quartiles(times_ms)
    return {"median_ms": med, "p25_ms": p25, "p75_ms": p75, "min_ms": min(times_ms), "max_ms": max(times_ms)}


def paired(times: list[float], ref: list[float]) -> dict:
    """Per-round ratios t_i / ref_i (same round i) and their median, p25, p75.

    `times` and `ref` are one value per round, in round order (equal lengths). The median of the
    per-round ratios is NOT median(times) / median(ref): that one mixes rounds run under different
    load.
    """
    if len(times) != len(ref) or not times:
        raise ValueError(f"paired ratio needs one time per round for both: {len(times)} vs {len(ref)}")
    ratios = [a / b for a, b in zip(times, ref)]
    p25, med, p75 = quartiles(ratios)
    return {"median": med, "p25": p25, "p75": p75, "n": len(ratios)}


def round_ms(seconds: list[float]) -> list[float]:
    """Seconds -> ms rounded to 1 us: the form stored in the JSON and the one the stats use."""
    return [round(t * 1e3, 3) for t in seconds]


# ----------------------------------------------------------------------------- formatting
def ms_digits(entries: list[dict]) -> int:
    """Decimals for one column of times: 2 when any median is below 20 ms, else 1 (same for the column)."""
    return 2 if min(e["median_ms"] for e in entries) < 20 else 1


def fmt_ms(e: dict, d: int = 1) -> str:
    """'179.1 (170.2-190.3)': median (p25-p75) with `d` decimals."""
    return f"{e['median_ms']:.{d}f} ({e['p25_ms']:.{d}f}-{e['p75_ms']:.{d}f})"


def fmt_ratio(p: dict, digits: int = 2) -> str:
    return f"{p['median']:.{digits}f} ({p['p25']:.{digits}f}-{p['p75']:.{digits}f})"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table; every column but the first right-aligned."""
    out = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def text(header: list[str], rows: list[list[str]]) -> str:
    """The same table as fixed-width text (the script's printed report)."""
    w = [max(len(x) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(c.ljust(w[0]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([line(header)] + [line(r) for r in rows])


TRAIN_LABELS = {"frozen_floor": "frozen floor", "lorafit": "lorafit", "peft": "PEFT", "minilora": "20-line LoRA",
                "full_ft": "full fine-tuning"}


def train_table(train: dict, meta: dict) -> tuple[list[str], list[list[str]]]:
    """Training-step table: (header, rows). Paired (interleaved) runs get paired columns only."""
    mib = lambda n: "-" if n is None else f"{n / 2**20:,.1f}"  # noqa: E731
    is_paired = meta["schedule"] == "interleaved"
    shape = f"{meta['train_batch']} x {meta['train_seq']}"
    if is_paired:
        header = [f"training step, {shape}", "ms median (p25-p75)", "x floor paired (p25-p75)",
                  "x PEFT paired (p25-p75)", "cpu ms median", "x PEFT paired, cpu time (p25-p75)",
                  "saved for backward MiB", "trainable"]
    else:
        header = [f"training step, {shape}", "ms median (p25-p75)", "x floor of medians", "peak MiB",
                  "saved for backward MiB", "trainable"]
    rows = []
    d = ms_digits([e for e in train.values() if isinstance(e, dict) and "median_ms" in e])
    for key, label in TRAIN_LABELS.items():
        e = train.get(key) or {}
        if "median_ms" not in e:
            rows.append([label, e.get("error", "n/a")] + [""] * (len(header) - 2))
            continue
        if is_paired:
            p = e["paired"]
            rows.append([label, fmt_ms(e, d), fmt_ratio(p["x_floor"]), fmt_ratio(p["x_peft"], 3),
                         f"{e['cpu']['median_ms']:.1f}", fmt_ratio(p["x_peft_cpu"], 3), mib(e["saved_bytes"]),
                         f"{e['trainable']:,}"])
        else:
            rows.append([label, fmt_ms(e, d), f"{e['x_floor_of_medians']:.2f}", mib(e.get("peak_bytes")),
                         mib(e["saved_bytes"]), f"{e['trainable']:,}"])
    return header, rows


def infer_table(infer: dict, meta: dict) -> tuple[list[str], list[list[str]]]:
    """Inference table: (header, rows), prefill and one token per row."""
    is_paired = meta["schedule"] == "interleaved"
    ratio = "x base paired (p25-p75)" if is_paired else "x base of medians"
    header = [f"inference, {meta['infer_prefill'].split('x')[0]} rows", f"prefill {meta['infer_prefill']} ms median "
              "(p25-p75)", ratio, f"1 token {meta['infer_1tok']} ms median (p25-p75)", ratio]
    rows = []
    digits = {ph: ms_digits([infer[k][ph] for k in infer["_labels"]]) for ph in ("prefill", "1tok")}
    for key, label in infer["_labels"].items():
        row = [label]
        for ph in ("prefill", "1tok"):
            e = infer[key][ph]
            x = fmt_ratio(e["paired"]["x_base"]) if is_paired else f"{e['x_base_of_medians']:.2f}"
            row += [fmt_ms(e, digits[ph]), x]
        rows.append(row)
    return header, rows


def recheck(result: dict) -> list[str]:
    """Recompute every stored statistic from the stored per-round times; returns the mismatches."""
    bad = []

    def cmp(where, got, want):
        for k, v in want.items():
            if got.get(k) != v:
                bad.append(f"{where}.{k}: stored {got.get(k)!r}, recomputed {v!r}")

    train, meta = result.get("train") or {}, result["meta"]
    if meta["schedule"] != "interleaved":
        return bad
    for key in TRAIN_LABELS:
        e = train.get(key)
        if not e or "times_ms" not in e:
            continue
        cmp(f"train.{key}", e, spread(e["times_ms"]))
        cmp(f"train.{key}.paired", e["paired"], {
            "x_floor": paired(e["times_ms"], train["frozen_floor"]["times_ms"]),
            "x_peft": paired(e["times_ms"], train["peft"]["times_ms"]),
            "x_peft_cpu": paired(e["cpu"]["times_ms"], train["peft"]["cpu"]["times_ms"])})
    infer = result.get("infer") or {}
    for key in infer.get("_labels", {}):
        for ph in ("prefill", "1tok"):
            e = infer[key][ph]
            cmp(f"infer.{key}.{ph}", e, spread(e["times_ms"]))
            cmp(f"infer.{key}.{ph}.paired", e["paired"],
                {"x_base": paired(e["times_ms"], infer["base"][ph]["times_ms"])})
    return bad


def tables(result: dict) -> str:
    """Every markdown table of one train_step.py JSON, in the order the READMEs show them."""
    out = []
    if result.get("train"):
        out.append(markdown(*train_table(result["train"], result["meta"])))
    if result.get("infer"):
        out.append(markdown(*infer_table(result["infer"], result["meta"])))
    return "\n\n".join(out)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python benchmarks/bench_tables.py RESULT.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        result = json.load(f)
    bad = recheck(result)
    for b in bad:
        print(f"MISMATCH {b}", file=sys.stderr)
    print(tables(result))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
