"""The options of a job: the table with every task's flags, argparse, ``--config`` and the layers.

Every option can come from three layers, lowest first: built-in and task defaults, the
``config.yaml`` of a run being resumed, a ``--config FILE.yaml``, then command-line flags. Flags
win. Argparse only collects strings (its defaults are suppressed so we know what was typed);
:func:`lorafit.train.options.coerce` converts and checks values from every layer with the same
rules. The task registry is asked here, never in :mod:`lorafit.train`.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from lorafit.common.errors import LorafitError
from lorafit.tasks import TASKS, task_class, task_names
from lorafit.train.input_checks import refuse_adapter_options, yaml_error_line
from lorafit.train.options import OPTIONS, Option, coerce


def all_options() -> list[Option]:
    """The common options plus every registered task's extra options (tasks failing to import are skipped)."""
    out = [
        dataclasses.replace(o, help=f"what to train: {' | '.join(TASKS)}.") if o.key == "task" else o
        for o in OPTIONS
    ]
    seen = {o.key for o in out}
    for name in task_names():  # a broken or uninstallable task must not break the others
        for opt in task_class(name).OPTIONS:  # tasks may share an extra flag (e.g. --imgsz): the first wins
            if opt.key not in seen:
                seen.add(opt.key)
                out.append(opt)
    return out


def task_defaults(name: str) -> dict[str, Any]:
    return dict(task_class(name).DEFAULTS)


def refuse_not_applicable(task: str, given: set[str]) -> None:
    """Refuse an option the user set (flag or ``--config``) that the task would not use.

    A task lists such options in ``NOT_APPLICABLE = {key: reason}``: silently ignoring
    ``--packing`` on a classifier, or ``--text-column`` on a detector, would let a user believe a
    setting took effect when it did not.
    """
    table = task_class(task).NOT_APPLICABLE
    for key in sorted(given & set(table)):
        raise LorafitError(f"--{key.replace('_', '-')} does not apply to --task {task} ({table[key]})")


# a task's EMBEDDED option values apply when the user gave none of these (flags, --config or a resumed run)
EMBEDDED_UNLESS = {"model", "train", "eval"}

GROUP_TITLES = {"job": "job", "data": "data", "lora": "adapter", "training": "training", "output": "output"}

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
        kwargs: dict[str, Any] = {
            "dest": opt.key,
            "default": argparse.SUPPRESS,
            "help": f"{opt.help} {default_text(opt)}".rstrip(),
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


def default_text(opt: Option) -> str:
    """What ``--help`` shows as the default: ``[8]``, ``[on]``, ``[none]``, or each task's value when
    the tasks differ (``--batch-size``: ``[text-classification 32, causal-lm 8, ...]``; ``--lr``: the
    LoRA rate, ``lr_lora``)."""
    def shown(value: Any) -> str:
        return "none" if value is None else ("on" if value else "off") if isinstance(value, bool) else str(value)

    key = "lr_lora" if opt.key == "lr" else opt.key
    per_task = {name: task_class(name).DEFAULTS.get(key, opt.default) for name in task_names()}
    if len({shown(v) for v in per_task.values()}) > 1:
        return "[" + ", ".join(f"{name} {shown(v)}" for name, v in per_task.items()) + "]"
    value = next(iter(per_task.values()), opt.default)
    return "" if value is None and "default" in opt.help else f"[{shown(value)}]"  # the help says it


def load_yaml(path: str | Path, options: list[Option]) -> dict[str, Any]:
    """Read a YAML mapping of option values; keys may use - or _. Values are coerced.

    Raises:
        LorafitError: missing or unreadable file, not a mapping, unknown key or bad value.
    """
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
        The resolved options. A task's ``EMBEDDED`` values (its embedded default job) sit between its
        defaults and the user's layers when the user named no model and no data. ``alpha`` defaults
        to 2 x rank; ``lr`` and ``batch_size`` come from the
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
    if not user.keys() & EMBEDDED_UNLESS:  # no model and no data: the task's embedded default job
        merged.update(task_class(task).EMBEDDED)
    merged.update(user)
    merged["task"] = task
    if merged.get("alpha") is None:
        merged["alpha"] = 2.0 * merged["rank"]
    if merged.get("lr") is None:
        merged["lr"] = merged["lr_full"] if merged["full_finetune"] else merged["lr_lora"]
    merged.pop("lr_full", None)
    merged.pop("lr_lora", None)
    return merged


