"""``lorafit export``: merge an adapter into a copy of its base, export, check, quantize, measure.

Registered in :data:`lorafit.cli.COMMANDS` as ``"export": ("lorafit.export.cli:EXPORT", ...)``.
"""

from __future__ import annotations

import argparse
import json

from lorafit.common.errors import LorafitError
from lorafit.common.files import write_json
from lorafit.export.api import export_model, format_report


class ExportCommand:
    """The subcommand object (``description``, ``epilog``, ``add_arguments``, ``run``)."""

    description = ("Merge an adapter into a copy of its base model (the adapter on disk is never touched), export "
                   "a graph with no LoRA ops, check it against the unmerged model in PyTorch (max abs diff <= "
                   "1e-4 x max(1, max|out|), else exit 1), optionally quantize to int8, and print sizes and "
                   "CPU latency.")
    epilog = ("examples:\n"
              "  lorafit export --model base.pt --adapter runs/detect-x/adapter --format onnx --int8 \\\n"
              "      --data data.yaml --out model.onnx\n"
              "  lorafit export --model timm:vit_tiny_patch16_224 --adapter runs/ic/adapter --format torchscript "
              "--out m.pt\n"
              "Needs the extra lorafit[export] (onnx, onnxruntime); detectors also lorafit[yolo].")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="the base: a YOLO .pt / model yaml, or timm:<name> / "
                       "torchvision:<name>[@CHECKPOINT]")
        p.add_argument("--adapter", required=True, metavar="DIR", help="adapter directory (PEFT format)")
        p.add_argument("--format", dest="fmt", default="onnx", choices=("onnx", "torchscript"))
        p.add_argument("--int8", action="store_true", help="also write FILE.int8.onnx (onnxruntime quantization "
                       "of the merged fp32 graph)")
        p.add_argument("--imgsz", type=int, default=None, metavar="N", help="input size (default: the run's)")
        p.add_argument("--data", default=None, metavar="PATH", help="eval data for the int8 metric change and "
                       "calibration: a YOLO data.yaml (detect) or an ImageFolder directory (classification)")
        p.add_argument("--runs", type=int, default=20, metavar="N", help="timed runs per latency [20]")
        p.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
        p.add_argument("--out", required=True, metavar="FILE", help="output file (.onnx / .pt)")

    def run(self, args: argparse.Namespace) -> int:
        if args.imgsz is not None and args.imgsz < 32:
            raise LorafitError(f"--imgsz: must be >= 32, got {args.imgsz}")
        try:
            import onnx  # noqa: F401  # lazy: optional extra, checked for a clear message
            import onnxruntime  # noqa: F401  # lazy: optional extra
        except ImportError as exc:
            if args.fmt == "onnx":
                raise LorafitError(f"lorafit export --format onnx needs {exc.name}: pip install 'lorafit[export]'") \
                    from None
        report = export_model(args.model, args.adapter, args.out, fmt=args.fmt, int8=args.int8, imgsz=args.imgsz,
                              data=args.data, runs=args.runs)
        print(format_report(report))
        if args.json:
            write_json(args.json, json.loads(json.dumps(report, default=str)))
        return 0


EXPORT = ExportCommand()
