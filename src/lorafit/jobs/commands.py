"""The ``train``, ``eval``, ``merge`` and ``info`` subcommands (registered in :data:`lorafit.cli.COMMANDS`).

A command is an object with ``description``, ``epilog``, ``add_arguments(parser)`` and
``run(args) -> int``; arguments are added only when that command is invoked, so a command with
heavy imports costs nothing to the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path
from typing import Any
from collections.abc import Callable

from lorafit.common.errors import LorafitError
from lorafit.common.files import dir_bytes, read_json
from lorafit.common.matching import pattern_key
from lorafit.io import read_safetensors_shapes
from lorafit.jobs.options import add_arguments, all_options
from lorafit.jobs.reload import eval_args, eval_run, job_info, merge_args, merge_run
from lorafit.jobs.train import run_train
from lorafit.train.progress import fmt_bytes


@dataclasses.dataclass(frozen=True)
class Command:
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    epilog: str = ""


# ------------------------------------------------------------------ train
def _train_args(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, all_options())


def _train_run(args: argparse.Namespace) -> int:
    run_train(vars(args))
    return 0


TRAIN = Command(
    description="Fine-tune a LoRA adapter (or, with --full-finetune, every weight) and write a run "
    "directory: "
    "adapter/, metrics.jsonl, metrics.json, loss.png, config.yaml. With no arguments: all-MiniLM-L6-v2 "
    "on the embedded support-intent dataset (about a minute on a laptop CPU). With --task causal-lm and no "
    "model or data: SmolLM2-135M-Instruct learns to answer the bundled support tickets in JSON (a few minutes).",
    add_arguments=_train_args,
    run=_train_run,
    epilog="examples:\n"
    "  lorafit train\n"
    "  lorafit train --task causal-lm                  # the embedded LLM default (SmolLM2)\n"
    "  lorafit train --model minilm --train train.tsv --eval test.tsv --text-column sentence \\\n"
    "      --label-column label --max-samples 8000 --rank 8 --alpha 16 --targets query,key,value,dense\n"
    "  lorafit train --task causal-lm --model ./my-llm --train chat.jsonl --packing --max-length 512\n"
    "  torchrun --nproc_per_node=2 -m lorafit train --config job.yaml\n"
    "  lorafit train --resume runs/text-classification-20250101-120000",
)


# ---------------------------------------------------------- eval / merge (lorafit.jobs.reload)
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
    """What ``lorafit info`` reports, as a dict (no model is loaded, no tensor data is read).

    The LoRA tensors' shapes are checked against the config's rank (``rank_pattern`` included),
    since a loader would refuse them anyway and the reported rank would be wrong.

    Raises:
        LorafitError: one line naming the file (and key) for a missing, truncated or malformed
            file, or a tensor whose rank does not match the config.
    """
    d = Path(directory)
    cfg_path, weights = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise LorafitError(f"{d}: no adapter_config.json (not an adapter directory)")
    cfg = read_json(cfg_path)
    if not isinstance(cfg, dict):
        raise LorafitError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    if not weights.is_file():
        raise LorafitError(f"{d}: no adapter_model.safetensors")
    try:
        shapes, meta = read_safetensors_shapes(weights)
    except ValueError as exc:
        raise LorafitError(str(exc).splitlines()[0]) from None
    ranks = _check_ranks(cfg, cfg_path, weights, shapes)
    lora, saved, layers = 0, 0, set()
    for key, shape in shapes.items():
        n = 1
        for s in shape:
            n *= s
        if key in ranks or key.endswith(".lora_magnitude_vector"):
            lora += n
            layers.update([ranks[key]] if key in ranks else [])
        else:
            saved += n
    patterns: dict[str, int] = {}
    for name in layers:
        pat = re.sub(r"\.\d+\.", ".*.", name)
        patterns[pat] = patterns.get(pat, 0) + 1
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    scale = None if not r or not isinstance(alpha, (int, float)) else alpha / (r**0.5 if cfg.get("use_rslora") else r)
    labels_path = d / "labels.json"
    labels = read_json(labels_path) if labels_path.is_file() else None
    job = job_info(d)
    if not isinstance(job, dict):
        raise LorafitError(f"{d / 'lorafit_job.json'}: expected a JSON object, got {type(job).__name__}")
    if labels is not None and not isinstance(labels, list):
        raise LorafitError(f"{labels_path}: expected a JSON list of labels, got {type(labels).__name__}")
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
        "job": job,
        "labels": labels,
    }


_LORA_KEY = re.compile(r"base_model\.model\.(.+?)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight)?$")


def _check_ranks(cfg: dict, cfg_path: Path, weights: Path, shapes: dict) -> dict[str, str]:
    """{LoRA key: layer name}, after checking each A/B shape against ``r`` / ``rank_pattern``.

    A is [r, in, *kernel] and B is [out, r, *ones] (PEFT's layout), except that B of a grouped
    conv is [out, r / groups, ...]: without the model, only "divides r" can be checked there.
    """
    r, pattern = cfg.get("r"), cfg.get("rank_pattern") or {}
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise LorafitError(f"{cfg_path}: 'r' must be an integer >= 1, got {r!r}")
    if not isinstance(pattern, dict) or not all(isinstance(v, int) and v >= 1 for v in pattern.values()):
        raise LorafitError(f"{cfg_path}: 'rank_pattern' must map patterns to integers >= 1, got {pattern!r}")
    out, found = {}, {}
    for key, shape in shapes.items():
        m = _LORA_KEY.fullmatch(key)
        if not m:
            continue
        layer, slot = m.group(1), m.group(2)
        owner = layer[: -len(".base_layer.out_proj")] if layer.endswith(".base_layer.out_proj") else layer
        try:
            hit = pattern_key(pattern, owner)
        except re.error as exc:
            raise LorafitError(f"{cfg_path}: rank_pattern key is not a valid regex ({exc})") from None
        want = r if hit is None else int(pattern[hit])
        is_a = slot.endswith("A")
        got = shape[0] if is_a and len(shape) >= 2 else shape[1] if len(shape) >= 2 else None
        fits = got == want or (not is_a and len(shape) > 2 and got and want % got == 0)
        if not fits:
            where = f"rank_pattern gives r={want} for {owner!r}" if want != r else f"r={r}"
            raise LorafitError(f"{weights}: key {key!r} has shape {tuple(shape)}, which does not fit "
                               f"{cfg_path.name}'s {where}")
        out[key] = layer
        found.setdefault(layer, set()).add(slot[-1])
    for layer, slots in found.items():
        if slots != {"A", "B"}:
            has, lacks = ("A", "B") if "A" in slots else ("B", "A")
            raise LorafitError(f"{weights}: layer {layer!r} has lora_{has} but not its lora_{lacks}")
    return out


def _info_run(args: argparse.Namespace) -> int:
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
