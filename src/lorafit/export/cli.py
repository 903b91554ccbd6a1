"""``lorafit export``: merge an adapter into a copy of its base, export, check, quantize, measure.

Registered in :data:`lorafit.cli.COMMANDS` as ``"export": ("lorafit.export.cli:EXPORT", ...)``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json

from lorafit.common.errors import LorafitError
from lorafit.common.files import write_json
from lorafit.export.api import export_model, format_report
from lorafit.export.gguf import GGUF_FORMATS, QUANTS, export_gguf, format_gguf_report
from lorafit.export.gguf_lora import export_gguf_lora, format_gguf_lora_report


class ExportCommand:
    """The subcommand object (``description``, ``epilog``, ``add_arguments``, ``run``)."""

    description = ("Merge an adapter into a copy of its base model (the adapter on disk is never touched), export "
                   "a graph with no LoRA ops, check it against the unmerged model in PyTorch (max abs diff <= "
                   "1e-4 x max(1, max|out|), else exit 1), optionally quantize to int8, and print sizes and "
                   "CPU latency. --format gguf writes a causal-LM adapter merged into its Llama base as a GGUF "
                   "for llama.cpp (f16 / q8_0 / q4_0 / q4_1; read back by transformers and compared), "
                   "--format gguf-lora the adapter alone in llama.cpp's LoRA layout (llama-cli --lora).")
    epilog = ("examples:\n"
              "  lorafit export --model base.pt --adapter runs/detect-x/adapter --format onnx --int8 \\\n"
              "      --data data.yaml --out model.onnx\n"
              "  lorafit export --model timm:vit_tiny_patch16_224 --adapter runs/ic/adapter --format torchscript "
              "--out m.pt\n"
              "  lorafit export --adapter runs/causal-lm-x/adapter --format gguf --quant q8_0 --out model.gguf\n"
              "  lorafit export --adapter runs/causal-lm-x/adapter --format gguf-lora --out lora.gguf\n"
              "Needs the extra lorafit[export] (onnx, onnxruntime); detectors also lorafit[yolo]; gguf / gguf-lora "
              "need lorafit[gguf].")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=None, help="the base: a YOLO .pt / model yaml, or timm:<name> / "
                       "torchvision:<name>[@CHECKPOINT] (required for onnx / torchscript); for gguf / gguf-lora "
                       "it overrides the adapter's lorafit_job.json (smollm2, FILE.gguf or a transformers directory)")
        p.add_argument("--adapter", required=True, metavar="DIR", help="adapter directory (PEFT format)")
        p.add_argument("--format", dest="fmt", default="onnx", choices=("onnx", "torchscript", *GGUF_FORMATS))
        p.add_argument("--quant", default=None, choices=QUANTS, help="--format gguf: the encoding of the "
                       "matrices [f16]; norms stay F32 (q4_0 / q4_1 keep the output layer q8_0)")
        p.add_argument("--int8", action="store_true", help="also write FILE.int8.onnx (onnxruntime quantization "
                       "of the merged fp32 graph)")
        p.add_argument("--imgsz", type=int, default=None, metavar="N", help="input size (default: the run's)")
        p.add_argument("--data", default=None, metavar="PATH", help="eval data for the int8 metric change and "
                       "calibration: a YOLO data.yaml (detect) or an ImageFolder directory (classification)")
        p.add_argument("--runs", type=int, default=20, metavar="N", help="timed runs per latency [20]")
        p.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
        p.add_argument("--out", required=True, metavar="FILE", help="output file (.onnx / .pt / .gguf)")

    def run(self, args: argparse.Namespace) -> int:
        if args.quant is not None and args.fmt != "gguf":
            raise LorafitError(f"--quant applies to --format gguf, not --format {args.fmt}"
                               + (" (a llama.cpp LoRA is written F32)" if args.fmt == "gguf-lora" else ""))
        if args.fmt in GGUF_FORMATS:
            return self.run_gguf(args)
        if args.model is None:
            raise LorafitError(f"--model is required for --format {args.fmt}")
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

    def run_gguf(self, args: argparse.Namespace) -> int:
        for flag, value in (("--int8", args.int8), ("--imgsz", args.imgsz), ("--data", args.data)):
            if value not in (None, False):
                raise LorafitError(f"{flag} applies to --format onnx / torchscript, not --format {args.fmt}")
        if importlib.util.find_spec("gguf") is None:
            raise LorafitError(f"lorafit export --format {args.fmt} needs the package gguf: "
                               "pip install 'lorafit[gguf]'")
        if args.fmt == "gguf":
            report = export_gguf(args.adapter, args.out, quant=args.quant or "f16", model=args.model)
            print(format_gguf_report(report))
        else:
            report = export_gguf_lora(args.adapter, args.out, model=args.model)
            print(format_gguf_lora_report(report))
        if args.json:
            write_json(args.json, json.loads(json.dumps(report, default=str)))
        return 0


EXPORT = ExportCommand()
