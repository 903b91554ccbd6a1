"""The ``train``, ``eval``, ``merge`` and ``info`` subcommands (registered in :data:`lorafit.cli.COMMANDS`).

A command is an object with ``description``, ``epilog``, ``add_arguments(parser)`` and
``run(args) -> int``; arguments are added only when that command is invoked, so a command with
heavy imports costs nothing to the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any
from collections.abc import Callable

from lorafit.train.errors import LorafitError
from lorafit.train.options import Option, add_arguments, coerce


@dataclasses.dataclass(frozen=True)
class Command:
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    epilog: str = ""


# ------------------------------------------------------------------ train
def _train_args(parser: argparse.ArgumentParser) -> None:
    from lorafit.train.job import all_options

    add_arguments(parser, all_options())


def _train_run(args: argparse.Namespace) -> int:
    from lorafit.train.job import run_train

    run_train(vars(args))
    return 0


TRAIN = Command(
    description="Fine-tune a LoRA adapter (or, with --full-finetune, every weight) and write a run "
    "directory: "
    "adapter/, metrics.jsonl, metrics.json, loss.png, config.yaml. With no arguments: all-MiniLM-L6-v2 "
    "on the embedded support-intent dataset (about a minute on a laptop CPU).",
    add_arguments=_train_args,
    run=_train_run,
    epilog="examples:\n"
    "  lorafit train\n"
    "  lorafit train --model minilm --train train.tsv --eval test.tsv --text-column sentence \\\n"
    "      --label-column label --max-samples 8000 --rank 8 --alpha 16 --targets query,key,value,dense\n"
    "  lorafit train --task causal-lm --model ./my-llm --train chat.jsonl --packing --max-length 512\n"
    "  torchrun --nproc_per_node=2 -m lorafit train --config job.yaml\n"
    "  lorafit train --resume runs/text-classification-20250101-120000",
)


# --------------------------------------------------------- eval / merge
def _common(parser: argparse.ArgumentParser, adapter_required: bool) -> None:
    parser.add_argument(
        "--model",
        help="base model: a transformers directory or `minilm` (default: the one the "
        "adapter was trained on); for eval, also a merged or fully fine-tuned model directory",
    )
    parser.add_argument(
        "--adapter", metavar="DIR", required=adapter_required, help="adapter directory (PEFT format)"
    )
    parser.add_argument(
        "--task", help="task (default: from the adapter's lorafit_job.json, else text-classification)"
    )


def _job_info(directory: Path | None) -> dict[str, Any]:
    if directory is None:
        return {}
    path = Path(directory) / "lorafit_job.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise LorafitError(f"{path}: not valid JSON") from None


def _load(args: argparse.Namespace, extra: dict[str, Any]):
    """(task, model, opts) for eval/merge: options = task defaults < the adapter's job info < flags."""
    from lorafit.tasks import task_module
    from lorafit.train.job import all_options, quiet_transformers, task_defaults
    from lorafit.train.options import resolve

    adapter = Path(args.adapter) if args.adapter else None
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise LorafitError(f"--adapter {adapter}: no adapter_config.json in this directory")
    info = _job_info(adapter)
    if adapter is None and args.model:
        info = _job_info(Path(args.model))
    task_name = args.task or info.get("task") or "text-classification"
    base = {
        k: v
        for k, v in info.items()
        if k in ("model", "text_column", "label_column", "max_length", "packing")
    }
    base["task"] = task_name
    flags = {k: v for k, v in extra.items() if v is not None}
    if args.model:
        flags["model"] = args.model
    opts = resolve(flags, all_options(), task_defaults, base)
    quiet_transformers()
    task = task_module(task_name).Task(opts)
    task.restore(adapter or Path(task.model_path))
    import torch

    torch.manual_seed(opts["seed"])
    model = task.build_model()
    if adapter is not None:
        import lorafit

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                lorafit.load_adapter(model, adapter)
            except ValueError as exc:
                raise LorafitError(str(exc)) from None
        for w in caught:
            if issubclass(w.category, UserWarning) and "lorafit" in str(w.filename) + str(w.message):
                print(f"lorafit: warning: {w.message}")
    return task, model, opts


def _eval_args(parser: argparse.ArgumentParser) -> None:
    _common(parser, adapter_required=False)
    parser.add_argument("--eval", metavar="FILE", required=True, help="evaluation data (.csv, .tsv, .jsonl)")
    trained = "as in `lorafit train` (default: the value the adapter was trained with)"
    parser.add_argument("--text-column", help=trained)
    parser.add_argument("--label-column", help=trained)
    parser.add_argument("--max-length", metavar="N", help=trained)
    parser.add_argument("--batch-size", metavar="N", help="evaluation batch size [64]")
    parser.add_argument("--precision", metavar="{fp32,bf16,fp16}", help="autocast precision [fp32]")
    parser.add_argument("--device", metavar="{auto,cpu,cuda}", help="[auto]")
    parser.add_argument(
        "--out",
        metavar="FILE.json",
        help="where to write the metrics (default: eval-<data name>.json next to the adapter directory)",
    )


def _eval_run(args: argparse.Namespace) -> int:
    import torch

    from lorafit.train.checkpoint import write_json
    from lorafit.train.distributed import pick_device
    from lorafit.train.job import fmt_metrics

    extra = {
        "text_column": args.text_column,
        "label_column": args.label_column,
        "max_length": args.max_length,
        "precision": args.precision,
        "device": args.device,
        "eval": args.eval,
    }
    task, model, opts = _load(args, extra)
    rows = task.read_eval(opts["eval"])
    if not rows:
        raise LorafitError(f"{opts['eval']}: no data rows")
    batch = coerce(Option("batch-size", "int", 64, "", minimum=1), args.batch_size, "--batch-size") or 64
    device = pick_device(opts["device"])
    model.to(device).eval()
    prec = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(opts["precision"])
    import contextlib

    ctx = torch.autocast(device.type, dtype=prec) if prec else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        metrics = task.evaluate(model, rows, batch, device)
    print(f"{len(rows)} rows from {opts['eval']}: {fmt_metrics(metrics)}")
    if hasattr(task, "sample"):
        sample = task.sample(model, rows, device)
        if sample:
            print(f"sample: {sample}")
    where = Path(args.adapter or opts["model"]).resolve()
    out = Path(args.out) if args.out else where.parent / f"eval-{Path(opts['eval']).stem}.json"
    write_json(
        out,
        {
            **metrics,
            "eval_rows": len(rows),
            "eval_file": str(opts["eval"]),
            "adapter": args.adapter,
            "model": opts["model"],
        },
    )
    print(f"wrote {out}")
    return 0


EVAL = Command(
    description="Evaluate a trained adapter (or a merged / fully fine-tuned model) on a data file; "
    "prints the metrics and writes them as JSON.",
    add_arguments=_eval_args,
    run=_eval_run,
    epilog="example:\n  lorafit eval --adapter runs/x/adapter --eval test.tsv --text-column sentence",
)


def _merge_args(parser: argparse.ArgumentParser) -> None:
    _common(parser, adapter_required=True)
    parser.add_argument(
        "--out", metavar="DIR", required=True, help="output directory (replaced if it exists)"
    )
    parser.add_argument(
        "--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="dtype of the merged weights [fp32]"
    )


def _merge_run(args: argparse.Namespace) -> int:
    import torch

    import lorafit
    from lorafit.train.checkpoint import dir_bytes, replace_dir
    from lorafit.train.progress import fmt_bytes

    task, model, opts = _load(args, {})
    model = lorafit.merge_and_unload(model)
    model.to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype])
    export = getattr(task, "export_merged", None)
    if export is None:  # a task without its own format: a state dict plus the rebuild info

        def export(m, d):
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in m.state_dict().items()}, Path(d) / "model.safetensors")
            task.save_extras(d)

    replace_dir(args.out, lambda d: export(model, d))
    print(f"merged {args.adapter} into {opts['model']}: wrote {args.out} ({fmt_bytes(dir_bytes(args.out))})")
    return 0


MERGE = Command(
    description="Merge an adapter into its base model and save the result: for transformers models a "
    "directory that from_pretrained loads (classification: the encoder, plus head.safetensors "
    "and labels.json).",
    add_arguments=_merge_args,
    run=_merge_run,
    epilog="example:\n  lorafit merge --adapter runs/x/adapter --out merged/",
)


# ------------------------------------------------------------------ info
def _info_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", metavar="DIR", nargs="?", help="adapter directory")
    parser.add_argument("--adapter", dest="adapter_flag", metavar="DIR", help="same as the positional DIR")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def adapter_info(directory: str | Path) -> dict[str, Any]:
    """What ``lorafit info`` reports, as a dict (no model is loaded)."""
    import re

    from safetensors import safe_open

    from lorafit.train.checkpoint import dir_bytes

    d = Path(directory)
    cfg_path, weights = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise LorafitError(f"{d}: no adapter_config.json (not an adapter directory)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise LorafitError(f"{cfg_path}: not valid JSON") from None
    if not weights.is_file():
        raise LorafitError(f"{d}: no adapter_model.safetensors")
    lora, saved, layers = 0, 0, set()
    with safe_open(weights, framework="pt") as f:
        meta = f.metadata() or {}
        for key in f.keys():
            n = 1
            for s in f.get_slice(key).get_shape():
                n *= s
            m = re.match(
                r"base_model\.model\.(.+?)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.|$)", key
            )
            if m:
                lora += n
                layers.add(m.group(1))
            else:
                saved += n
    patterns: dict[str, int] = {}
    for name in layers:
        pat = re.sub(r"\.\d+\.", ".*.", name)
        patterns[pat] = patterns.get(pat, 0) + 1
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    scale = None if not r or alpha is None else alpha / (r**0.5 if cfg.get("use_rslora") else r)
    labels_path = d / "labels.json"
    return {
        "path": str(d),
        "peft_type": cfg.get("peft_type"),
        "rank": r,
        "alpha": alpha,
        "scaling": scale,
        "use_rslora": cfg.get("use_rslora", False),
        "dropout": cfg.get("lora_dropout"),
        "rank_pattern": cfg.get("rank_pattern") or {},
        "alpha_pattern": cfg.get("alpha_pattern") or {},
        "target_layers": len(layers),
        "target_patterns": dict(sorted(patterns.items())),
        "modules_to_save": cfg.get("modules_to_save"),
        "lora_params": lora,
        "saved_module_params": saved,
        "params": lora + saved,
        "weights_bytes": weights.stat().st_size,
        "dir_bytes": dir_bytes(d),
        "base_model": cfg.get("base_model_name_or_path"),
        "base_fingerprint": meta.get("lorafit_base_fingerprint"),
        "lorafit_version": meta.get("lorafit_version"),
        "job": _job_info(d),
        "labels": json.loads(labels_path.read_text(encoding="utf-8")) if labels_path.is_file() else None,
    }


def _info_run(args: argparse.Namespace) -> int:
    from lorafit.train.progress import fmt_bytes

    directory = args.adapter or args.adapter_flag
    if not directory:
        raise LorafitError("info: give the adapter directory (lorafit info DIR)")
    info = adapter_info(directory)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    scale = f", scaling {info['scaling']:g}" if info["scaling"] is not None else ""
    rs = " (rsLoRA)" if info["use_rslora"] else ""
    print(
        f"adapter {info['path']}: {info['peft_type']} rank {info['rank']}, alpha {info['alpha']}{scale}{rs}, "
        f"dropout {info['dropout']}"
    )
    if info["rank_pattern"] or info["alpha_pattern"]:
        print(f"  rank pattern {info['rank_pattern']}  alpha pattern {info['alpha_pattern']}")
    print(f"  target layers: {info['target_layers']}")
    for pat, n in info["target_patterns"].items():
        print(f"    {pat}" + (f"  (x{n})" if n > 1 else ""))
    if info["modules_to_save"]:
        print(
            f"  modules_to_save: {', '.join(info['modules_to_save'])} "
            f"({info['saved_module_params']:,} params)"
        )
    print(f"  parameters: {info['params']:,} ({info['lora_params']:,} LoRA)")
    print(f"  file size: {fmt_bytes(info['weights_bytes'])} (directory {fmt_bytes(info['dir_bytes'])})")
    print(f"  base model: {info['base_model']}")
    print(f"  base fingerprint: {info['base_fingerprint'] or 'unknown (not saved by lorafit)'}")
    if info["job"]:
        print(f"  trained as: {', '.join(f'{k}={v}' for k, v in info['job'].items())}")
    if info["labels"] is not None:
        print(f"  labels ({len(info['labels'])}): {', '.join(map(str, info['labels'][:20]))}")
    return 0


INFO = Command(
    description="Describe an adapter directory: config, rank, target layers, parameter count, "
    "file size, base model fingerprint.",
    add_arguments=_info_args,
    run=_info_run,
    epilog="example:\n  lorafit info runs/x/adapter",
)
