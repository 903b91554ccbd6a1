"""Export latency: a merged LoRA model must run as fast as its base (within 5%), in PyTorch and ONNX Runtime.

For each model (yolov8n detector from its yaml, timm vit_tiny and resnet18 classifiers; random
weights, offline), LoRA r=8 is injected on the default targets with *random* B (a non-zero
update), a copy is merged (and, for YOLO, Conv+BN fused), and both base and merged models are
exported to ONNX. Timed at batch 1 on CPU:

    base_torch / merged_torch       PyTorch eager, inference_mode
    base_onnx  / merged_onnx        onnxruntime CPU (graph optimisations on), 1 intra-op thread
    lora_unmerged_torch             the unmerged LoRA model (what merging saves)

Runners are interleaved (one call each per round, rotating order) and the ratio reported is the
median of per-round ratios merged / base, so load from other processes hits both alike. A ratio
above 1.05 is printed as FAIL; the merged ONNX graph is also checked to hold exactly the base
graph's ops (a structural reason for equal latency, independent of timing noise).

    python benchmarks/export_latency.py                   # ~1 min on 2 cores
    python benchmarks/export_latency.py --rounds 200 --out benchmarks/results

Needs the vision environment (scripts/setup_vision_env.sh).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def build(name: str):
    """(base, lora, merged, imgsz) for one benchmark model; every module in eval mode."""
    import lorafit

    torch.manual_seed(0)
    if name == "yolov8n":
        from lorafit.integrations.ultralytics import FirstOutput
        from lorafit.integrations.ultralytics import detector_config, inject_detector, load_detector, merged_copy

        base = load_detector("yolov8n.yaml", nc=3).eval()
        cfg = detector_config(base, rank=8).replace(init=False)
        lora = inject_detector(copy.deepcopy(base), cfg).eval()
        merged = merged_copy(lora).fuse(verbose=False).eval()
        base = copy.deepcopy(base).fuse(verbose=False).eval()
        return FirstOutput(base).eval(), FirstOutput(lora).eval(), FirstOutput(merged).eval(), 320
    from lorafit.tasks.image_classification import classifier_name, create_model, preset_targets

    base = create_model(f"timm:{name}", 10, 224).eval()
    head = classifier_name(base, 10)
    cfg = lorafit.LoraConfig(r=8, alpha=16, target_modules=preset_targets(base, "auto", head), init=False,
                             modules_to_save=[head], exclude_modules=[head])
    lora = lorafit.inject(copy.deepcopy(base), cfg).eval()
    merged = lorafit.merge_and_unload(copy.deepcopy(lora)).eval()
    return base, lora, merged, 224


def bench(name: str, rounds: int, tmp: Path) -> dict:
    from lorafit.export.formats import example_input, op_histogram, ort_session, run_onnx, to_onnx

    base, lora, merged, imgsz = build(name)
    x = example_input(imgsz, batch=1)
    to_onnx(base, imgsz, tmp / f"{name}-base.onnx")
    to_onnx(merged, imgsz, tmp / f"{name}-merged.onnx")
    same_ops = op_histogram(tmp / f"{name}-base.onnx") == op_histogram(tmp / f"{name}-merged.onnx")
    sb, sm = ort_session(tmp / f"{name}-base.onnx", threads=1), ort_session(tmp / f"{name}-merged.onnx", threads=1)

    def torch_run(m):
        def run():
            with torch.inference_mode():
                m(x)
        return run

    runners = {"base_torch": torch_run(base), "merged_torch": torch_run(merged),
               "lora_unmerged_torch": torch_run(lora),
               "base_onnx": lambda: run_onnx(sb, x), "merged_onnx": lambda: run_onnx(sm, x)}
    for fn in runners.values():
        for _ in range(3):
            fn()
    times = {k: [] for k in runners}
    keys = list(runners)
    for r in range(rounds):
        order = keys[r % len(keys):] + keys[: r % len(keys)]
        for k in order:
            t0 = time.perf_counter()
            runners[k]()
            times[k].append((time.perf_counter() - t0) * 1e3)
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    ratio = {f"{kind}_merged_over_base": round(statistics.median(m / b for m, b in zip(times[f"merged_{kind}"],
                                                                                        times[f"base_{kind}"])), 4)
             for kind in ("torch", "onnx")}
    return {"model": name, "imgsz": imgsz, "median_ms": med, **ratio, "same_onnx_ops": same_ops,
            "within_5pct": all(v <= 1.05 for v in ratio.values())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="yolov8n,vit_tiny_patch16_224,resnet18")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (onnxruntime uses 1)")
    p.add_argument("--out", default=None, help="directory for the JSON result")
    a = p.parse_args(argv)
    os.environ.setdefault("YOLO_VERBOSE", "false")
    torch.set_num_threads(a.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            rows.append(bench(name.strip(), a.rounds, Path(tmp)))
    print(f"{'model':<24}{'base ms':>9}{'merged ms':>10}{'unmerged':>10}{'ratio':>8}  "
          f"{'ORT base':>9}{'ORT merged':>11}{'ratio':>8}  same ops  verdict")
    for r in rows:
        m = r["median_ms"]
        print(f"{r['model']:<24}{m['base_torch']:>9.2f}{m['merged_torch']:>10.2f}{m['lora_unmerged_torch']:>10.2f}"
              f"{r['torch_merged_over_base']:>8.3f}  {m['base_onnx']:>9.2f}{m['merged_onnx']:>11.2f}"
              f"{r['onnx_merged_over_base']:>8.3f}  {str(r['same_onnx_ops']):>8}  "
              f"{'PASS' if r['within_5pct'] else 'FAIL (> 5%)'}")
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"export_latency_cpu_{datetime.date.today().isoformat()}.json"
        meta = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                "rounds": a.rounds, "threads": a.threads}
        path.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
        print(f"wrote {path}")
    return 0 if all(r["within_5pct"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
