"""The ``lorafit train`` flags: one table drives argparse, ``--config`` files and validation.

Every option can come from three layers, lowest first: built-in and task defaults, the
``config.yaml`` of a run being resumed, a ``--config FILE.yaml``, then command-line flags. Flags
win. Argparse only collects strings (its defaults are suppressed so we know what was typed);
``coerce`` converts and checks values from every layer with the same rules, so a bad value in a
YAML file and a bad flag give the same one-line error naming where the value came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from pathlib import Path
from typing import Any
from collections.abc import Callable

from lorafit.common.errors import LorafitError
from lorafit.train.input_checks import refuse_adapter_options, yaml_error_line


@dataclasses.dataclass(frozen=True)
class Option:
    """One flag. ``name`` is the flag without dashes (``max-length``); its key is ``max_length``.

    ``kind``: "str", "int", "float", "bool", "path" (a string naming a file or directory), or
    "optional-path" (``--resume``: a flag that may be given bare). ``minimum`` bounds numbers
    (inclusive) and ``above`` makes it exclusive; ``maximum`` / ``below`` likewise from above.
    ``None`` is always accepted as "not set".
    """

    name: str
    kind: str
    default: Any
    help: str
    choices: tuple | None = None
    minimum: float | None = None
    above: bool = False
    maximum: float | None = None
    below: bool = False
    metavar: str | None = None
    group: str = "training"

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")


PRECISIONS = ("fp32", "bf16", "fp16")

OPTIONS: list[Option] = [
    Option(
        "config",
        "path",
        None,
        "YAML file of option values (keys as flags, - or _); flags win.",
        metavar="FILE.yaml",
        group="job",
    ),
    Option("task", "str", "text-classification", "what to train (see `lorafit.tasks.TASKS`).", group="job"),
    Option(
        "model",
        "str",
        None,
        "a transformers model directory, or `minilm` for the bundled "
        "all-MiniLM-L6-v2 (default for text-classification).",
        group="job",
    ),
    Option(
        "train",
        "path",
        None,
        "training data: .csv, .tsv or .jsonl (default for text-classification: "
        "the embedded support-intent dataset).",
        metavar="FILE",
        group="data",
    ),
    Option(
        "eval",
        "path",
        None,
        "evaluation data, same formats; never capped by --max-samples.",
        metavar="FILE",
        group="data",
    ),
    Option("text-column", "str", "text", "column holding the input text.", group="data"),
    Option(
        "label-column",
        "str",
        "label",
        "column holding the label (ints or strings; the label set is saved as labels.json).",
        group="data",
    ),
    Option(
        "max-samples",
        "int",
        None,
        "seeded shuffle of the training rows, then keep the first N.",
        minimum=1,
        metavar="N",
        group="data",
    ),
    Option(
        "max-length",
        "int",
        None,
        "truncate inputs to this many tokens (task default: 64 for classification).",
        minimum=1,
        group="data",
    ),
    Option("rank", "int", 8, "LoRA rank r.", minimum=1, group="lora"),
    Option(
        "alpha",
        "float",
        None,
        "LoRA alpha; the update is scaled by alpha / rank (default 2 x rank).",
        minimum=0,
        above=True,
        group="lora",
    ),
    Option(
        "dropout", "float", 0.0, "dropout on the adapter input, 0 <= p < 1.", minimum=0, maximum=1, below=True,
        group="lora",
    ),
    Option(
        "targets",
        "str",
        "all-linear",
        "layers to adapt: a comma list of names or dotted suffixes "
        "(query,key,value), a regex matched against full names, or all-linear.",
        group="lora",
    ),
    Option(
        "full-finetune", "bool", False, "baseline: train every weight (no adapter), same loop.", group="lora"
    ),
    Option(
        "quantize",
        "str",
        None,
        "QLoRA: store the frozen base's linear weights in nf4 (4-bit) or int8; the output layer stays as is.",
        choices=("nf4", "int8"),
        group="lora",
    ),
    Option("epochs", "int", 1, "passes over the training rows.", minimum=1),
    Option(
        "batch-size",
        "int",
        None,
        "examples per process per micro-batch (global batch = this x grad-accum x processes).",
        minimum=1,
    ),
    Option("grad-accum", "int", 1, "micro-batches per optimizer step.", minimum=1),
    Option(
        "lr",
        "float",
        None,
        "peak learning rate (task default: 1e-3 for LoRA, 5e-5 for full fine-tuning, classification).",
        minimum=0,
        above=True,
    ),
    Option("weight-decay", "float", 0.0, "AdamW weight decay.", minimum=0),
    Option(
        "warmup",
        "float",
        0.06,
        "linear warmup: a fraction of the steps if < 1, else a step count; then linear decay to 0.",
        minimum=0,
    ),
    Option("lr-b-ratio", "float", 1.0, "LoRA+: B matrices train at lr x ratio.", minimum=0, above=True),
    Option("max-grad-norm", "float", 0.0, "clip the gradient norm (0 = off; detect default 10, as Ultralytics).",
           minimum=0),
    Option("seed", "int", 0, "seed of every random choice (data order, init, dropout).", minimum=0),
    Option(
        "precision", "str", "fp32", "autocast precision; weights and optimizer stay fp32.", choices=PRECISIONS
    ),
    Option("grad-checkpointing", "bool", False, "recompute activations in backward (less memory)."),
    Option(
        "device", "str", "auto", "auto (CUDA when present), cpu or cuda.", choices=("auto", "cpu", "cuda")
    ),
    Option(
        "eval-every",
        "int",
        0,
        "evaluate every N steps (0 = at the end of each epoch; detect: every N epochs).",
        minimum=0,
        metavar="N",
        group="output",
    ),
    Option(
        "eval-before", "bool", True, "evaluate once before training (the 'before' number).", group="output"
    ),
    Option("eval-batch-size", "int", 64, "batch size for evaluation.", minimum=1, group="output"),
    Option(
        "save-every",
        "int",
        0,
        "write a resumable checkpoint every N steps (0 = about 10 per run; detect: every N epochs, 0 = 1).",
        minimum=0,
        metavar="N",
        group="output",
    ),
    Option(
        "log-every",
        "int",
        0,
        "log line every N steps when stdout is not a terminal (0 = about 20 per run; detect: epochs).",
        minimum=0,
        metavar="N",
        group="output",
    ),
    Option(
        "out",
        "path",
        None,
        "run directory (default ./runs/<task>-<timestamp>/); it must be absent or empty, unless "
        "--overwrite or --resume.",
        metavar="DIR",
        group="output",
    ),
    Option(
        "overwrite",
        "bool",
        False,
        "replace the run already in --out (its files are deleted, best/ included); without it a "
        "non-empty --out is refused.",
        group="output",
    ),
    Option(
        "resume",
        "optional-path",
        None,
        "continue an interrupted run: its directory, or bare to use --out (or the newest run of the task).",
        metavar="DIR",
        group="output",
    ),
]

GROUP_TITLES = {"job": "job", "data": "data", "lora": "adapter", "training": "training", "output": "output"}


def coerce(opt: Option, value: Any, source: str) -> Any:
    """Convert ``value`` to the option's type and check its bounds and choices.

    Args:
        opt: the option.
        value: a string from the command line, or any YAML scalar.
        source: where the value came from, for the message (``--lr`` or ``cfg.yaml: lr``).

    Raises:
        LorafitError: one line naming ``source`` and what was expected.
    """
    if value is None:
        return None
    kind = opt.kind
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "optional-path":
            return value if value is True else str(value)
        if kind in ("str", "path"):
            if isinstance(value, (dict, list)):
                raise ValueError
            value = str(value)
        elif kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = int(str(value).strip()) if not isinstance(value, (int, float)) else int(value)
        elif kind == "float":
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
            if not math.isfinite(value):
                raise ValueError
    except (TypeError, ValueError):
        want = {"bool": "true or false", "int": "an integer", "float": "a number"}.get(kind, "a string")
        raise LorafitError(f"{source}: expected {want}, got {value!r}") from None
    if opt.choices is not None and value not in opt.choices:
        raise LorafitError(
            f"{source}: invalid value {value!r} (choose from {', '.join(map(str, opt.choices))})"
        )
    if opt.minimum is not None and (value < opt.minimum or (opt.above and value == opt.minimum)):
        rel = ">" if opt.above else ">="
        raise LorafitError(f"{source}: must be {rel} {opt.minimum:g}, got {value!r}")
    if opt.maximum is not None and (value > opt.maximum or (opt.below and value == opt.maximum)):
        rel = "<" if opt.below else "<="
        raise LorafitError(f"{source}: must be {rel} {opt.maximum:g}, got {value!r}")
    return value


# A negative number, exponent included. argparse's own pattern (``-1``, ``-.5``) misses ``-1e-3``,
# so ``--lr -1e-3`` was "expected one argument" instead of reaching coerce's range check.
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def add_arguments(parser: argparse.ArgumentParser, options: list[Option]) -> None:
    """Add ``options`` to ``parser`` with suppressed defaults (so only typed flags appear).

    Negative numbers are taken as values (``--lr -1e-3``), so that coerce names the range. No
    option of ours looks like a number, which is the condition argparse itself uses to allow it.
    """
    parser._negative_number_matcher = NEGATIVE_NUMBER  # private, but stable since Python 3.2
    groups: dict[str, Any] = {}
    for opt in options:
        group = groups.get(opt.group)
        if group is None:
            group = groups[opt.group] = parser.add_argument_group(GROUP_TITLES.get(opt.group, opt.group))
        default_text = "" if opt.default is None or opt.kind == "bool" else f" [{opt.default}]"
        kwargs: dict[str, Any] = {
            "dest": opt.key,
            "default": argparse.SUPPRESS,
            "help": opt.help + default_text,
        }
        if opt.kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif opt.kind == "optional-path":
            kwargs.update(nargs="?", const=True, metavar=opt.metavar or "DIR")
        else:
            kwargs["metavar"] = (
                opt.metavar or (opt.choices and "{" + ",".join(opt.choices) + "}") or opt.key.upper()
            )
        group.add_argument("--" + opt.name, **kwargs)


def load_yaml(path: str | Path, options: list[Option]) -> dict[str, Any]:
    """Read a YAML mapping of option values; keys may use - or _. Values are coerced.

    Raises:
        LorafitError: missing or unreadable file, not a mapping, unknown key or bad value.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LorafitError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LorafitError(f"{path}: cannot read config file ({exc.__class__.__name__})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise LorafitError(yaml_error_line(path, text, exc)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LorafitError(f"{path}: expected a mapping of option: value")
    by_key = {o.key: o for o in options}
    out = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in by_key:
            raise LorafitError(f"{path}: unknown option {raw_key!r}")
        if key in ("config", "resume"):
            continue
        out[key] = coerce(by_key[key], value, f"{path}: {raw_key}")
    return out


def user_keys(flags: dict[str, Any], options: list[Option]) -> set[str]:
    """The option keys the user set: typed flags plus the keys of a ``--config`` file."""
    given = {k for k, v in flags.items() if v is not None and k not in ("config", "resume")}
    if flags.get("config"):
        given |= set(load_yaml(flags["config"], options))
    return given


def resolve(
    flags: dict[str, Any],
    options: list[Option],
    task_defaults: Callable[[str], dict],
    base: dict[str, Any] | None = None,
    base_source: str = "",
) -> dict[str, Any]:
    """Merge the layers into one complete option dict (every option key present).

    Args:
        flags: the options typed on the command line (raw strings / bools).
        options: the option table (common and task-specific).
        task_defaults: task name -> that task's defaults (raises LorafitError for an unknown task).
        base: values from a resumed run's config.yaml (already coerced), lowest user layer.
        base_source: label of ``base`` for messages.

    Returns:
        The resolved options. ``alpha`` defaults to 2 x rank; ``lr`` and ``batch_size`` come from the
        task defaults when unset (they depend on ``full_finetune``).
    """
    by_key = {o.key: o for o in options}
    typed = {k: coerce(by_key[k], v, "--" + by_key[k].name) for k, v in flags.items()}
    layers = [dict(base or {})]
    from_config = load_yaml(typed["config"], options) if typed.get("config") else {}
    layers += [from_config, typed]
    user: dict[str, Any] = {}
    for layer in layers:
        user.update(layer)
    refuse_adapter_options(user, typed, from_config, typed.get("config"))
    task = user.get("task") or by_key["task"].default
    merged = {o.key: o.default for o in options}
    merged.update(task_defaults(task))
    merged.update(user)
    merged["task"] = task
    if merged.get("alpha") is None:
        merged["alpha"] = 2.0 * merged["rank"]
    if merged.get("lr") is None:
        merged["lr"] = merged["lr_full"] if merged["full_finetune"] else merged["lr_lora"]
    merged.pop("lr_full", None)
    merged.pop("lr_lora", None)
    return merged


def parse_targets(text: str) -> str | list[str]:
    """``--targets`` value -> what ``LoraConfig(target_modules=...)`` takes.

    ``all-linear`` stays a string; text with regex syntax (``*+?[](){}|^$\\``) is a regex string
    (full match on module names); otherwise a comma list of names or dotted suffixes. A dot alone
    does not make a regex, so ``attention.self.query`` stays a suffix.
    """
    import re

    text = text.strip()
    if text == "all-linear":
        return text
    if any(ch in text for ch in "*+?[](){}|^$\\"):
        try:
            re.compile(text)
        except re.error as exc:
            raise LorafitError(f"--targets: invalid regex {text!r} ({exc})") from None
        return text
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise LorafitError("--targets: empty list")
    return names
