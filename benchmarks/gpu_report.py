"""gpu_suite.py's ratios, targets and tables (markdown for the .md file, fixed-width for stdout).

Every ratio is paired (bench_tables.paired): the median over rounds of (time / reference time in
the SAME round), with the p25-p75 of those per-round ratios. Peak memory has one value per method
(see gpu_runner.py), so its ratio is a plain ratio.
"""

from __future__ import annotations

from bench_tables import fmt_ms, fmt_ratio, markdown, ms_digits, paired, text

# the targets (issue 12, item 5)
STEP_X_FLOOR, PEAK_X_FLOOR, QLORA_X_LORA, MIXED_X_BASE = 1.10, 1.22, 1.30, 1.30

# measured on an H200 in this setting (torch 2.11, transformers 5.17, PEFT 0.21.0; ../shared/anchors/README.md):
# another run on other versions - for orientation, never for a ratio
ANCHORS_1B = [("frozen floor", 124.9, 15.6), ("PEFT, dropout 0", 240.2, 27.9), ("20-line LoRA", 157.7, 19.0),
              ("full fine-tuning", 166.9, 24.4), ("PEFT DoRA, dropout 0", 360.5, 45.8)]
ANCHORS_MIXED = [("base", 46.5, 28.0), ("PEFT one adapter", 95.5, 54.1), ("PEFT 8 mixed", 409.0, 315.0)]


def _timed(e) -> bool:
    return isinstance(e, dict) and "times_ms" in e


def add_train_pairs(train: dict) -> dict:
    """Adds e['x_floor'] (paired) and e['peak_x_floor'] to each timed entry; returns named pairs."""
    fl = train.get("frozen_floor")
    for e in train.values():
        if not _timed(e):
            continue
        if _timed(fl):
            e["x_floor"] = paired(e["times_ms"], fl["times_ms"])
            if e.get("peak_bytes") and fl.get("peak_bytes"):
                e["peak_x_floor"] = e["peak_bytes"] / fl["peak_bytes"]
    pairs = {}
    for name, a, b in [("lorafit_compiled / peft_compiled", "lorafit_compiled", "peft_compiled"),
                       ("lorafit / peft", "lorafit", "peft"),
                       ("lorafit_compiled / lorafit", "lorafit_compiled", "lorafit"),
                       ("lorafit_qlora_nf4 / lorafit", "lorafit_qlora_nf4", "lorafit"),
                       ("lorafit_qlora_nf4 / peft_qlora_bnb_nf4", "lorafit_qlora_nf4", "peft_qlora_bnb_nf4"),
                       ("lorafit_dora / lorafit", "lorafit_dora", "lorafit"),
                       ("lorafit / full_ft", "lorafit", "full_ft")]:
        if _timed(train.get(a)) and _timed(train.get(b)):
            pairs[name] = paired(train[a]["times_ms"], train[b]["times_ms"])
    return pairs


def add_infer_pairs(infer: dict, phases) -> None:
    base = infer.get("base", {})
    for v in infer.values():
        for ph in phases:
            e, b = v.get(ph), base.get(ph)
            if _timed(e) and _timed(b):
                e["x_base"] = paired(e["times_ms"], b["times_ms"])


def _why(e) -> str:
    if not isinstance(e, dict):
        return "not run"
    return e.get("error") or ("skipped: " + e["skipped"] if "skipped" in e else "not timed")


def compute_targets(train: dict | None, pairs: dict, infer: dict | None) -> list[dict]:
    """The issue's targets: met (bool) or None (not measured, with the reason)."""
    train, infer, out = train or {}, infer or {}, []

    def add(target, p, limit, detail="", missing=""):
        if p is None:
            out.append({"target": target, "met": None, "value": f"not measured ({missing})"})
            return
        r = p if isinstance(p, float) else p["median"]
        val = f"{r:.3f}x" if isinstance(p, float) else f"{fmt_ratio(p, 3)}x paired"
        val += f"; {detail}" if detail else ""
        out.append({"target": target, "ratio": r, "limit": limit, "met": bool(r <= limit), "value": val})

    for key, label in (("lorafit", "lorafit eager"), ("lorafit_compiled", "lorafit compiled")):
        e = train.get(key, {})
        fl = train.get("frozen_floor", {})
        add(f"{label} step <= {STEP_X_FLOOR:.2f}x frozen floor", e.get("x_floor"), STEP_X_FLOOR,
            f"{e.get('median_ms', 0):.1f} vs {fl.get('median_ms', 0):.1f} ms" if _timed(e) else "",
            _why(e) if not _timed(e) else _why(fl))
        pk = e.get("peak_x_floor")
        unit = _unit([e, fl])
        add(f"{label} peak <= floor + {PEAK_X_FLOOR - 1:.0%}", pk, PEAK_X_FLOOR,
            f"{_bytes(e['peak_bytes'], unit)} vs {_bytes(fl['peak_bytes'], unit)} {unit[0]}" if pk is not None else "",
            "no memory meter" if _timed(e) and _timed(fl) else _why(e if not _timed(e) else fl))
    add("compiled lorafit <= compiled PEFT", pairs.get("lorafit_compiled / peft_compiled"), 1.0,
        missing=_why(train.get("lorafit_compiled") if not _timed(train.get("lorafit_compiled"))
                     else train.get("peft_compiled")))
    add(f"QLoRA NF4 step <= {QLORA_X_LORA:.1f}x bf16 LoRA (lorafit)", pairs.get("lorafit_qlora_nf4 / lorafit"),
        QLORA_X_LORA, missing=_why(train.get("lorafit_qlora_nf4") if not _timed(train.get("lorafit_qlora_nf4"))
                                   else train.get("lorafit")))
    for ph, what in (("prefill", "prefill"), ("decode", "one token per row")):
        e = infer.get("lorafit_mixed8", {}).get(ph)
        add(f"8 mixed adapters <= {MIXED_X_BASE:.1f}x base ({what})", (e or {}).get("x_base"), MIXED_X_BASE,
            missing=_why(e) if not _timed(e) else _why(infer.get("base", {}).get(ph)))
    return out


# ----------------------------------------------------------------------------- tables
def _bytes(n, unit):
    return "-" if n is None else f"{n / unit[1]:,.2f}"


def _unit(entries):
    peaks = [e.get("peak_bytes") or 0 for e in entries]
    return ("GiB", 2**30) if max(peaks, default=0) >= 2**30 else ("MiB", 2**20)


def train_table(train: dict, shape: str) -> tuple[list[str], list[list[str]]]:
    timed = [e for e in train.values() if _timed(e)]
    unit = _unit(timed)
    header = [f"training step, {shape}", "ms median (p25-p75)", "x floor paired (p25-p75)", f"peak {unit[0]}",
              "peak x floor", "trainable", "first call s", "graphs / breaks"]
    rows = []
    d = ms_digits(timed) if timed else 1
    for e in train.values():
        if not isinstance(e, dict) or "label" not in e:
            continue
        if not _timed(e):
            rows.append([e["label"], _why(e)[:48] + " (notes)"] + [""] * (len(header) - 2))
            continue
        gb = f"{e['graphs_compiled']} / {e['graph_breaks']}" if "compile_backend" in e else "-"
        rows.append([e["label"], fmt_ms(e, d), fmt_ratio(e["x_floor"]) if "x_floor" in e else "-",
                     _bytes(e.get("peak_bytes"), unit),
                     f"{e['peak_x_floor']:.2f}" if "peak_x_floor" in e else "-", f"{e.get('trainable', 0):,}",
                     f"{e['warmup_ms'][0] / 1e3:.1f}" if e.get("warmup_ms") else "-", gb])
    return header, rows


def infer_table(infer: dict, phases, shapes: dict) -> tuple[list[str], list[list[str]]]:
    header = [f"inference, {shapes['rows']} rows"]
    for ph in phases:
        header += [f"{ph} {shapes[ph]} ms median (p25-p75)", "x base paired (p25-p75)"]
    rows = []
    digits = {ph: ms_digits([v[ph] for v in infer.values() if _timed(v.get(ph))] or [{"median_ms": 99}])
              for ph in phases}
    for v in infer.values():
        row = [v["label"]]
        for ph in phases:
            e = v.get(ph)
            if _timed(e):
                row += [fmt_ms(e, digits[ph]), fmt_ratio(e["x_base"]) if "x_base" in e else "-"]
            else:
                row += [_why(e)[:48] + " (notes)", ""]
        rows.append(row)
    return header, rows


def targets_table(targets: list[dict]) -> tuple[list[str], list[list[str]]]:
    status = {True: "met", False: "MISSED", None: "not measured"}
    return ["target", "result", "value"], [[t["target"], status[t["met"]], t["value"]] for t in targets]


def _tables(result: dict, fmt) -> list[str]:
    meta, out = result["meta"], []
    if result.get("train"):
        out.append(fmt(*train_table(result["train"], meta["train_shape"])))
        if result.get("train_pairs"):
            out.append(fmt(["paired ratio (same round)", "median (p25-p75)"],
                           [[k, fmt_ratio(p, 3)] for k, p in result["train_pairs"].items()]))
    if result.get("infer"):
        out.append(fmt(*infer_table(result["infer"], meta["infer_phases"], meta["infer_shapes"])))
    if result.get("big"):
        out.append(fmt(*train_table(result["big"], meta.get("big_shape", "1 x 4096"))))
    if result.get("targets"):
        out.append(fmt(*targets_table(result["targets"])))
    return out


def markdown_report(result: dict) -> str:
    m = result["meta"]
    lines = [f"# GPU suite: {m['device_name']}, {m['date']}", "",
             f"{m['model']} ({m['params'] / 1e6:,.1f}M params, {m['dtype']}), r={m['r']} alpha={m['alpha']}, "
             f"all seven projections, AdamW; torch {m['torch']}, transformers {m['transformers']}, "
             f"peft {m['peft']}, lorafit {m['lorafit']}; compile backend {m['compile_backend']}; "
             f"{m['rounds_note']}; wall {m['wall_s']} s" + (" (DRY RUN: tiny CPU shapes, not the target "
                                                            "setting)" if m["dry_run"] else ""), "",
             f"Memory: {m['memory_meter']}.", ""]
    for t in _tables(result, markdown):
        lines += [t, ""]
    for c in result.get("checks", []):
        lines.append(f"- check: {c['check']}: " + {True: "ok", False: "FAILED", None: "not run"}[c["ok"]]
                     + (f" (rel err {c['rel_err']:.2e} <= {c['tol']:.0e}, adapter effect {c['adapter_effect']:.2e})"
                        if "rel_err" in c else f" ({c.get('note', '')})"))
    for where, part in (("train", result.get("train")), ("8B", result.get("big"))):
        for k, e in (part or {}).items():
            if "error" in e or "skipped" in e:
                lines.append(f"- note, {where} {k}: {_why(e)}")
    for k, v in (result.get("infer") or {}).items():
        for ph in ("prefill", "decode"):
            if isinstance(v.get(ph), dict) and ("error" in v[ph] or "skipped" in v[ph]):
                lines.append(f"- note, inference {k}.{ph}: {_why(v[ph])}")
    for k, e in (result.get("train") or {}).items():
        if e.get("graph_breaks"):
            lines.append(f"- note, train {k}: {e['graph_breaks']} dynamo graph break(s) while warming up")
    for part in ("train_rounds", "infer_rounds"):
        r = result.get(part) or {}
        if r.get("graphs_compiled_while_timed"):
            lines.append(f"- note, {part}: {r['graphs_compiled_while_timed']} graph(s) compiled during the timed "
                         "rounds (recompiles)")
    for name, s in result.get("sections", {}).items():
        lines.append(f"- section {name}: {s['elapsed_s']} s" + (f", ERROR {s['error']}" if "error" in s else ""))
    if not m["dry_run"]:
        lines += ["", "Anchors (H200, torch 2.11, transformers 5.17, PEFT 0.21.0; another run, for orientation "
                      "only): 1.1B 4 x 2048 step ms / peak GiB: "
                  + "; ".join(f"{n} {ms} / {g}" for n, ms, g in ANCHORS_1B)
                  + ". Mixed 16 rows, prefill 16 x 512 / one token ms: "
                  + "; ".join(f"{n} {a} / {b}" for n, a, b in ANCHORS_MIXED) + "."]
    return "\n".join(lines) + "\n"


def print_report(result: dict) -> None:
    print()
    print(markdown_report(result).split("\n\n", 1)[0].replace("# ", "== "))
    for t in _tables(result, text):
        print(t)
        print()
    for t in result.get("targets", []):
        print(f"  [{ {True: 'met', False: 'MISSED', None: 'not measured'}[t['met']] }] {t['target']}: {t['value']}")
