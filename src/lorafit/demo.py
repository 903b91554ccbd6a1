"""``lorafit demo detect``: offline, end to end, a few CPU minutes.

1. Generate two synthetic YOLO datasets (:mod:`lorafit.datasets.shapes`): domain A (light textures,
   warm solid shapes) and domain B (dark busy textures, cool striped outlined shapes).
2. Pretrain a tiny base detector (yolov8n from its yaml, random init) on A with the stock trainer.
3. Adapt it to B with LoRA r=4 on every dense conv (:class:`LoraDetectionTrainer`).
4. Export the merged model to ONNX and int8 ONNX, and print one table: mAP50 before / after on B,
   trainable share, adapter vs model file size, CPU latencies.

Every number in the table is measured in that run; nothing is downloaded (``YOLO_OFFLINE=1``, a
private ``YOLO_CONFIG_DIR``, a bundled font).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

from lorafit.common.files import write_text
from lorafit.common.modules import count_parameters
from lorafit.datasets.shapes import ShapesSpec, make_shapes_dataset
from lorafit.export.api import export_model
from lorafit.integrations.ultralytics import configure_offline, load_detector
from lorafit.tasks.detect_io import evaluate_detector, rename_metrics


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo. ``DemoConfig.small()`` is the CPU-test scale."""

    model: str = "yolov8n.yaml"
    imgsz: int = 128
    n_train_a: int = 256
    n_train_b: int = 128
    n_val: int = 48
    epochs_base: int = 20
    epochs_adapt: int = 10
    rank: int = 4
    lr_adapt: float = 1e-2
    batch: int = 16
    seed: int = 0
    export: bool = True

    @classmethod
    def small(cls, **changes) -> DemoConfig:
        return dataclasses.replace(cls(imgsz=96, n_train_a=160, n_train_b=96, n_val=32, epochs_base=16,
                                       epochs_adapt=8, export=False), **changes)


def pretrain_base(cfg: DemoConfig, data_yaml: Path, out_dir: Path) -> Path:
    """Stock Ultralytics training of the base on domain A; returns best.pt (a plain YOLO checkpoint)."""
    configure_offline()
    # lazy: optional extra lorafit[yolo], imported after configure_offline
    from ultralytics.models.yolo.detect import DetectionTrainer

    from lorafit.integrations.yolo_trainer import ultralytics_overrides  # lazy: imports ultralytics

    args = ultralytics_overrides(cfg.model, data_yaml, out_dir, imgsz=cfg.imgsz, epochs=cfg.epochs_base,
                                 batch=cfg.batch, seed=cfg.seed, weight_decay=5e-4, warmup_epochs=2.0, val=False)
    trainer = DetectionTrainer(overrides=args)
    trainer.train()
    return trainer.best if trainer.best.exists() else trainer.last


def run_detect_demo(cfg: DemoConfig, out: str | Path, say=print) -> dict:
    """Run the whole demo under ``out``; returns every measured number (also in ``out/demo.json``)."""
    configure_offline()
    # lazy: imports ultralytics (optional extra lorafit[yolo]), after configure_offline
    from lorafit.integrations.yolo_trainer import train_lora_detector, ultralytics_overrides

    t0 = time.perf_counter()
    out = Path(out).resolve()
    data_a = make_shapes_dataset(out / "data-A", ShapesSpec("A", cfg.n_train_a, cfg.n_val, cfg.imgsz, cfg.seed))
    data_b = make_shapes_dataset(out / "data-B", ShapesSpec("B", cfg.n_train_b, cfg.n_val, cfg.imgsz, cfg.seed))
    say(f"[1/4] datasets: A {cfg.n_train_a}+{cfg.n_val}, B {cfg.n_train_b}+{cfg.n_val} images at {cfg.imgsz}px")
    t = time.perf_counter()
    base_pt = pretrain_base(cfg, data_a, out / "base")
    t_base = time.perf_counter() - t
    say(f"[2/4] base pretrained on A in {t_base:.0f}s -> {base_pt}")
    base = load_detector(base_pt)
    before_a = evaluate_detector(base, data_a, cfg.imgsz)
    before_b = evaluate_detector(base, data_b, cfg.imgsz)
    t = time.perf_counter()
    args = ultralytics_overrides(base_pt, data_b, out / "adapt", imgsz=cfg.imgsz, epochs=cfg.epochs_adapt,
                                 batch=cfg.batch, lr=cfg.lr_adapt, seed=cfg.seed)
    trainer = train_lora_detector(args, lora={"rank": cfg.rank, "base": str(base_pt)})
    t_adapt = time.perf_counter() - t
    after_b = rename_metrics(trainer.metrics)
    adapter = trainer.adapter_best
    say(f"[3/4] LoRA r={cfg.rank} adapted to B in {t_adapt:.0f}s -> {adapter}")
    base_params = count_parameters(base)[1]
    adapter_params = count_parameters(trainer.ema.ema, trainable=lambda name, _p: name in trainer._trainable)[0]
    result = {
        "config": dataclasses.asdict(cfg), "base_checkpoint": str(base_pt), "adapter_dir": str(adapter),
        "base_on_A": before_a, "base_on_B": before_b, "adapted_on_B": after_b,
        "base_params": base_params, "adapter_params": adapter_params,
        "adapter_bytes": sum(p.stat().st_size for p in adapter.glob("*.safetensors")),
        "model_file_bytes": Path(base_pt).stat().st_size, "model_fp32_bytes": 4 * base_params,
        "pretrain_s": round(t_base, 1), "adapt_s": round(t_adapt, 1),
    }
    if cfg.export:
        rep = export_model(str(base_pt), adapter, out / "export" / "merged.onnx", int8=True, data=data_b,
                           imgsz=cfg.imgsz, runs=30)
        result["export"] = rep
        say(f"[4/4] exported merged ONNX + int8 (parity max |diff| {rep['parity']['max_abs_diff']:.2g})")
    result["total_s"] = round(time.perf_counter() - t0, 1)
    write_text(out / "demo.json", json.dumps(result, indent=2, default=str) + "\n")
    return result


def format_table(r: dict) -> str:
    """The demo's summary table (markdown-ish, readable in a terminal)."""
    mb = 1e6
    rows = [("mAP50 on B (new domain), base", f"{r['base_on_B']['eval_mAP50']:.3f}"),
            ("mAP50 on B, base + LoRA adapter", f"{r['adapted_on_B']['eval_mAP50']:.3f}"),
            ("mAP50-95 on B, base -> adapted", f"{r['base_on_B']['eval_mAP50-95']:.3f} -> "
             f"{r['adapted_on_B']['eval_mAP50-95']:.3f}"),
            ("mAP50 on A (pretraining domain), base", f"{r['base_on_A']['eval_mAP50']:.3f}"),
            ("trainable params (adapter / base)", f"{r['adapter_params']:,} / {r['base_params']:,} "
             f"({100 * r['adapter_params'] / r['base_params']:.1f}%)"),
            ("adapter file vs model file", f"{r['adapter_bytes'] / mb:.2f} MB vs {r['model_file_bytes'] / mb:.2f} MB "
             f"(.pt, fp16) / {r['model_fp32_bytes'] / mb:.2f} MB fp32 "
             f"({100 * r['adapter_bytes'] / r['model_fp32_bytes']:.1f}% of fp32)")]
    e = r.get("export")
    if e:
        lat = e["latency_ms"]
        rows += [("latency base, PyTorch (fused)", f"{lat['base_torch']:.1f} ms"),
                 ("latency LoRA unmerged, PyTorch", f"{lat['lora_unmerged_torch']:.1f} ms"),
                 ("latency base, ONNX Runtime", f"{lat['base_onnx']:.1f} ms"),
                 ("latency merged, ONNX Runtime", f"{lat['merged_onnx']:.1f} ms"),
                 ("latency merged int8, ONNX Runtime", f"{lat['int8_onnx']:.1f} ms"),
                 ("ONNX parity (max |diff|, tolerance)", f"{e['parity']['max_abs_diff']:.2g} <= "
                  f"{e['parity']['tolerance']:.2g}"),
                 ("merged ONNX / int8 ONNX size", f"{e['sizes_bytes']['merged'] / mb:.2f} MB / "
                  f"{e['sizes_bytes']['int8'] / mb:.2f} MB")]
        ch = e.get("int8", {}).get("metric_change", {})
        if "eval_mAP50" in ch:
            rows.append(("mAP50 on B, merged fp32 ONNX -> int8", f"{e['int8']['metrics_fp32']['eval_mAP50']:.3f} -> "
                         f"{e['int8']['metrics_int8']['eval_mAP50']:.3f} ({ch['eval_mAP50']:+.3f})"))
    rows.append(("time: pretrain / adapt / total",
                 f"{r['pretrain_s']:.0f}s / {r['adapt_s']:.0f}s / {r['total_s']:.0f}s"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{'':-<{width + 2}}+{'':-<44}"] + [f"{k:<{width + 2}}| {v}" for k, v in rows]
    img = r["config"]["imgsz"]
    return f"lorafit demo detect ({r['config']['model']}, {img}px, CPU, batch 1 latencies)\n" + "\n".join(lines)


class DemoCommand:
    """``lorafit demo detect`` (the subcommand object registered in ``lorafit.cli.COMMANDS``)."""

    description = ("Offline end-to-end demos. `detect`: pretrain a tiny YOLO on synthetic domain A, adapt it with "
                   "LoRA r=4 to domain B, export merged ONNX + int8, print mAP / size / latency table.")
    epilog = "Needs lorafit[yolo,export]; takes a few CPU minutes. Use --small for a quicker, smaller run."

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("which", choices=("detect",), help="which demo")
        p.add_argument("--out", default=None, metavar="DIR", help="work directory [runs/demo-detect-<time>]")
        p.add_argument("--small", action="store_true", help="test scale: smaller data, fewer epochs, no export")
        p.add_argument("--seed", type=int, default=0)

    def run(self, args: argparse.Namespace) -> int:
        os.environ.setdefault("YOLO_VERBOSE", "false")  # keep the demo's output to its own table
        cfg = DemoConfig.small(seed=args.seed) if args.small else DemoConfig(seed=args.seed)
        out = args.out or f"runs/demo-detect-{time.strftime('%Y%m%d-%H%M%S')}"
        result = run_detect_demo(cfg, out)
        print(format_table(result))
        print(f"details: {Path(out).resolve() / 'demo.json'}")
        return 0


DEMO = DemoCommand()
