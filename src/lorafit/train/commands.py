"""The ``train``, ``eval``, ``merge`` and ``info`` subcommands (registered in :data:`lorafit.cli.COMMANDS`).

A command is an object with ``description``, ``epilog``, ``add_arguments(parser)`` and
``run(args) -> int``; arguments are added only when that command is invoked, so a command with
heavy imports costs nothing to the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any
from collections.abc import Callable

from lorafit.train.errors import LorafitError
from lorafit.train.options import add_arguments
from lorafit.train.reload import eval_args, eval_run, job_info, merge_args, merge_run


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


# --------------------------------------------------------- eval / merge (lorafit.train.reload)
EVAL = Command(
    description="Evaluate a trained adapter (or a merged / fully fine-tuned model) on a data file; "
    "prints the metrics and writes them as JSON.",
    add_arguments=eval_args,
    run=eval_run,
    epilog="examples:\n  lorafit eval --adapter runs/x/adapter --eval test.tsv --text-column sentence\n"
    "  lorafit eval --adapter runs/detect-x/adapter --data other.yaml     # mAP50, mAP50-95, precision, recall\n"
    "  lorafit eval --adapter runs/image-x/adapter --eval val_dir/",
)


MERGE = Command(
    description="Merge an adapter into its base model and save the result: for transformers models a "
    "directory that from_pretrained loads (classification: the encoder, plus head.safetensors "
    "and labels.json); detect: model.pt, a plain Ultralytics checkpoint YOLO() loads; "
    "image-classification: model.safetensors + labels.json (lorafit eval --model DIR reads it).",
    add_arguments=merge_args,
    run=merge_run,
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
        "job": job_info(d),
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
