"""``lorafit eval`` and ``lorafit merge``: rebuild base + adapter for any task, then evaluate or merge it.

The options come in layers: task defaults < the adapter's ``lorafit_job.json`` (what the run was
trained with: model, columns, image size, data.yaml, seed) < flags. Everything task-specific goes
through the task's methods (:class:`lorafit.tasks.base.Task`): ``restore``, ``build_model``,
``load_adapter`` (detectors rebuild their class convs first), ``merge_model``, ``read_eval``,
``evaluate``, ``export_merged``, and the class attributes ``eval_data_option`` (the flag naming
the eval data: ``--eval`` or detection's ``--data``) and ``needs_job_info``.
"""

from __future__ import annotations

import argparse
import contextlib
import warnings
from pathlib import Path
from typing import Any

import torch

from lorafit.common.errors import LorafitError
from lorafit.common.files import dir_bytes, read_json, replace_dir, write_json
from lorafit.jobs.options import all_options, refuse_not_applicable, resolve, task_defaults
from lorafit.jobs.train import fmt_metrics, quiet_transformers
from lorafit.tasks import Task, task_class
from lorafit.tasks.base import run_seed
from lorafit.train.distributed import pick_device
from lorafit.train.options import Option, coerce
from lorafit.train.progress import fmt_bytes

# keys of lorafit_job.json that are options of the reloaded job (the rest is information)
JOB_OPTIONS = ("model", "text_column", "label_column", "max_length", "packing", "imgsz", "data", "seed")


def common_args(parser: argparse.ArgumentParser, adapter_required: bool) -> None:
    parser.add_argument(
        "--model",
        help="base model (default: the one the adapter was trained on): a transformers directory or `minilm`, "
        "a YOLO .pt / yaml, timm:<name> / torchvision:<name>; for eval, also a merged or fully fine-tuned model",
    )
    parser.add_argument("--adapter", metavar="DIR", required=adapter_required, help="adapter directory (PEFT format)")
    parser.add_argument("--task", help="task (default: from the adapter's lorafit_job.json, else text-classification)")


def job_info(directory: Path | None) -> dict[str, Any]:
    """``DIR/lorafit_job.json`` as a dict ({} when absent)."""
    return {} if directory is None else read_json(Path(directory) / "lorafit_job.json")


def resolve_job(args: argparse.Namespace, extra: dict[str, Any]) -> tuple[type[Task], dict[str, Any], Path | None]:
    """(task class, opts, adapter dir or None), before anything heavy is built."""
    adapter = Path(args.adapter) if args.adapter else None
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise LorafitError(f"--adapter {adapter}: no adapter_config.json in this directory")
    info = job_info(adapter)
    if adapter is None and args.model:
        model = Path(args.model)  # a merged model: a directory, or a file (YOLO model.pt) with the info beside it
        info = job_info(model if model.is_dir() else model.parent if model.is_file() else None)
    task_name = args.task or info.get("task") or "text-classification"
    cls = task_class(task_name)
    if adapter is not None and not args.model and not info.get("model") and cls.needs_job_info:
        raise LorafitError(
            f"{adapter / 'lorafit_job.json'}: missing, so the base model of this --task {task_name} "
            "adapter is unknown (give --model)"
        )
    base = {k: v for k, v in info.items() if k in JOB_OPTIONS and v is not None}
    if adapter is not None and "seed" not in base:  # a random-weight base is rebuilt with the run's seed
        base["seed"] = run_seed(adapter)
    base["task"] = task_name
    flags = {k: v for k, v in extra.items() if v is not None}
    refuse_not_applicable(task_name, set(flags))
    if args.model:
        flags["model"] = args.model
    return cls, resolve(flags, all_options(), task_defaults, base), adapter


def build(cls: type[Task], opts: dict[str, Any], adapter: Path | None) -> tuple[Task, Any]:
    """(task, model): the task restored from the adapter (or the merged model), the base built, the adapter in."""
    quiet_transformers()
    task = cls(opts)
    task.restore(adapter or Path(task.model_path))
    torch.manual_seed(opts["seed"])
    model = task.build_model()
    if adapter is not None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                task.load_adapter(model, adapter)
            except ValueError as exc:  # shape / name mismatch: the adapter is for another architecture
                raise LorafitError(f"--adapter {adapter}: {str(exc).splitlines()[0]}") from None
        for w in caught:
            if issubclass(w.category, UserWarning) and "lorafit" in str(w.filename) + str(w.message):
                print(f"lorafit: warning: {w.message}")
    return task, model


def load(args: argparse.Namespace, extra: dict[str, Any]):
    """(task, model, opts) for eval/merge."""
    cls, opts, adapter = resolve_job(args, extra)
    task, model = build(cls, opts, adapter)
    return task, model, opts


# ------------------------------------------------------------------ eval
def eval_args(parser: argparse.ArgumentParser) -> None:
    common_args(parser, adapter_required=False)
    parser.add_argument(
        "--eval",
        metavar="FILE",
        help="evaluation data: a table as for `lorafit train --eval` (.csv .tsv .jsonl .json .parquet .arrow, "
        "hf:NAME[:SPLIT]), an ImageFolder directory (image-classification); required for those tasks",
    )
    parser.add_argument(
        "--data",
        metavar="FILE.yaml",
        help="detect: a YOLO data.yaml whose val split is evaluated (default: the "
        "one the adapter was trained on); its classes must be the adapter's",
    )
    trained = "as in `lorafit train` (default: the value the adapter was trained with)"
    parser.add_argument("--text-column", help=trained)
    parser.add_argument("--label-column", help=trained)
    parser.add_argument("--max-length", metavar="N", help=trained)
    parser.add_argument("--imgsz", metavar="N", help="detect / image-classification: image size; " + trained)
    parser.add_argument("--batch-size", metavar="N", help="evaluation batch size [the task's: 64, detect 32]")
    parser.add_argument("--precision", metavar="{fp32,bf16,fp16}", help="autocast precision [fp32]")
    parser.add_argument("--device", metavar="{auto,cpu,cuda}", help="[auto]")
    parser.add_argument(
        "--out",
        metavar="FILE.json",
        help="where to write the metrics (default: eval-<data name>.json next to the adapter directory)",
    )


def eval_run(args: argparse.Namespace) -> int:
    extra = {
        "text_column": args.text_column,
        "label_column": args.label_column,
        "max_length": args.max_length,
        "imgsz": args.imgsz,
        "precision": args.precision,
        "device": args.device,
        "eval": args.eval,
        "data": args.data,
    }
    cls, opts, adapter = resolve_job(args, extra)
    key = cls.eval_data_option
    other = "data" if key == "eval" else "eval"
    if getattr(args, other):
        raise LorafitError(f"--{other} does not apply to lorafit eval --task {opts['task']} (give --{key})")
    if not opts.get(key):
        raise LorafitError(f"--{key} is required for lorafit eval --task {opts['task']}")
    task, model = build(cls, opts, adapter)
    rows = task.read_eval(opts[key])
    if not rows:
        raise LorafitError(f"{opts[key]}: no data rows")
    batch = coerce(Option("batch-size", "int", None, "", minimum=1), args.batch_size, "--batch-size")
    batch = batch or opts.get("eval_batch_size") or 64
    device = pick_device(opts["device"])
    model.to(device).eval()
    prec = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(opts["precision"])
    ctx = torch.autocast(device.type, dtype=prec) if prec else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        metrics = task.evaluate(model, rows, batch, device)
    print(f"{len(rows)} {'images' if key == 'data' else 'rows'} from {opts[key]}: {fmt_metrics(metrics)}")
    sample = task.sample(model, rows, device)
    if sample:
        print(f"sample: {sample}")
    where = Path(args.adapter or opts["model"]).resolve()
    out = Path(args.out) if args.out else where.parent / f"eval-{Path(opts[key]).stem}.json"
    write_json(
        out,
        {
            **metrics,
            "eval_rows": len(rows),
            "eval_file": str(opts[key]),
            "adapter": args.adapter,
            "model": opts["model"],
        },
    )
    print(f"wrote {out}")
    return 0


# ------------------------------------------------------------------ merge
def merge_args(parser: argparse.ArgumentParser) -> None:
    common_args(parser, adapter_required=True)
    parser.add_argument("--out", metavar="DIR", required=True, help="output directory (replaced if it exists)")
    parser.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="dtype of the merged weights [fp32] (detect: model.pt in this dtype; Ultralytics' own are fp16)",
    )
    parser.add_argument(
        "--data",
        metavar="FILE.yaml",
        help="detect: the data.yaml recorded with the merged model (default: the adapter's)",
    )


def merge_run(args: argparse.Namespace) -> int:
    cls, opts, adapter = resolve_job(args, {"data": args.data})
    if args.data and cls.eval_data_option != "data":
        raise LorafitError(f"--data does not apply to lorafit merge --task {opts['task']}")
    task, model = build(cls, opts, adapter)
    model = task.merge_model(model)
    model.to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype])
    replace_dir(args.out, lambda d: task.export_merged(model, d))
    print(f"merged {args.adapter} into {opts['model']}: wrote {args.out} ({fmt_bytes(dir_bytes(args.out))})")
    return 0
