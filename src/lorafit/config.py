"""LoraConfig: a validated, immutable description of one LoRA adapter.

The field names follow the LoRA paper and PEFT (`r`, `alpha`, `dropout`, ...); PEFT's own
spellings (`lora_alpha`, `lora_dropout`, `init_lora_weights`) are accepted as aliases so a
PEFT user can paste their config. `to_peft_dict` / `from_peft_dict` translate to and from
PEFT's `adapter_config.json`, refusing any PEFT key that would change the function and that
lorafit does not implement (rather than silently computing something else).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import re
from typing import Any

import torch.nn as nn

from .common.matching import pattern_key

INIT_VALUES = ("default", "gaussian", "pissa", "olora")  # also "pissa_niter_K" (K >= 0 power iterations)
_PISSA_NITER = re.compile(r"pissa_niter_\d+")
BIAS_VALUES = ("none", "all", "lora_only")
# PEFT's TaskType values: which PeftModel class (and AutoPeftModelFor...) an adapter belongs to
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
ALIASES = {"lora_alpha": "alpha", "lora_dropout": "dropout", "init_lora_weights": "init"}

# PEFT config keys that change the computed function and that lorafit does not implement,
# with the value(s) that mean "off". A file with any other value is refused.
_UNSUPPORTED_PEFT = {
    "layers_to_transform": (None, []),
    "layers_pattern": (None, [], ""),
    "lora_bias": (False, None),
    "target_parameters": (None, []),
    "layer_replication": (None, []),
    "alora_invocation_tokens": (None,),
    "use_qalora": (False, None),
    "use_bdlora": (False, None),
    "trainable_token_indices": (None, {}, []),
    "arrow_config": (None,),
    "kasa_config": (None,),
    "velora_config": (None,),
    "monteclora_config": (None,),
}
# Keys that only affect how weights were initialised or how PEFT bookkeeps; safe to ignore.
_IGNORED_PEFT = {
    "peft_type", "peft_version", "auto_mapping", "base_model_name_or_path", "revision", "task_type",
    "inference_mode", "loftq_config", "corda_config", "eva_config", "lora_ga_config", "megatron_config",
    "megatron_core", "qalora_group_size", "ensure_weight_tying", "modules_to_tie", "init_lora_weights",
    "lora_dropout", "runtime_config",
}


@dataclasses.dataclass(frozen=True, init=False)
class LoraConfig:
    """What to adapt and how.

    Args:
        r: rank of the update B @ A (>= 1).
        alpha: scaling numerator; the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA).
        dropout: dropout on the adapter's input, 0 <= p < 1. At 0 nothing is copied.
        target_modules: list (exact name or dotted suffix), str (regex full match) or "all-linear".
        exclude_modules: same forms; matched names are never adapted.
        rank_pattern / alpha_pattern: per-module overrides, PEFT's regex-suffix rule.
        use_rslora: scale by alpha / sqrt(r) (rank-stabilised LoRA).
        init: "default" (A kaiming-uniform, B zero; embeddings reversed) or "gaussian";
            "pissa" / "pissa_niter_K" / "olora" (linear layers; they move the top of the base
            weight into A/B, see `lorafit.variants.init`);
            ``True`` means "default" as in PEFT; ``False`` makes B random too (a non-identity
            adapter, useful for tests).
        bias: "none", "all" (every bias trainable) or "lora_only" (biases of adapted layers).
        modules_to_save: modules trained fully and saved with the adapter (e.g. a new head).
        fan_in_fan_out: None = decided per layer (True for transformers Conv1D).
        use_dora: weight-decomposed LoRA (DoRA): a trainable magnitude per output, see
            `lorafit.variants.dora`.
        task_type: PEFT's task type ("CAUSAL_LM", "SEQ_CLS", ... or PEFT's `TaskType`); None lets
            `save_adapter` infer it from the model class. Bookkeeping only: not compared, no effect on the math.
        base_model_name_or_path: the base the adapter belongs to (kept from a loaded file; the model's own
            name wins when it has one). Bookkeeping only, not compared.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: Any = None
    exclude_modules: Any = None
    rank_pattern: dict | None = None
    alpha_pattern: dict | None = None
    use_rslora: bool = False
    init: Any = "default"
    bias: str = "none"
    modules_to_save: tuple | None = None
    fan_in_fan_out: bool | None = None
    use_dora: bool = False
    task_type: str | None = dataclasses.field(default=None, compare=False)
    base_model_name_or_path: str | None = dataclasses.field(default=None, compare=False)

    def __init__(self, r=8, alpha=16, dropout=0.0, target_modules=None, exclude_modules=None,
                 rank_pattern=None, alpha_pattern=None, use_rslora=False, init="default", bias="none",
                 modules_to_save=None, fan_in_fan_out=None, use_dora=False, task_type=None,
                 base_model_name_or_path=None, **aliases):
        values = dict(r=r, alpha=alpha, dropout=dropout, init=init)
        for key, val in aliases.items():
            if key not in ALIASES:
                raise TypeError(f"LoraConfig got an unknown argument {key!r}")
            values[ALIASES[key]] = val
        values.update(target_modules=_freeze_targets(target_modules, "target_modules"),
                      exclude_modules=_freeze_targets(exclude_modules, "exclude_modules"),
                      rank_pattern=dict(rank_pattern or {}), alpha_pattern=dict(alpha_pattern or {}),
                      use_rslora=bool(use_rslora), bias=bias,
                      modules_to_save=tuple(modules_to_save) if modules_to_save else None,
                      fan_in_fan_out=fan_in_fan_out, use_dora=bool(use_dora), task_type=_enum_value(task_type),
                      base_model_name_or_path=None if base_model_name_or_path is None else str(base_model_name_or_path))
        if values["init"] is True:
            values["init"] = "default"
        for key, val in values.items():
            object.__setattr__(self, key, val)
        self._validate()

    def _validate(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraConfig.r must be an integer >= 1, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"LoraConfig.alpha must be > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoraConfig.dropout must satisfy 0 <= dropout < 1, got {self.dropout!r}")
        if self.init is not False and self.init not in INIT_VALUES and not (
                isinstance(self.init, str) and _PISSA_NITER.fullmatch(self.init)):
            raise ValueError(f"LoraConfig.init must be one of {INIT_VALUES}, 'pissa_niter_K' or True/False, "
                             f"got {self.init!r}")
        if self.bias not in BIAS_VALUES:
            raise ValueError(f"LoraConfig.bias must be one of {BIAS_VALUES}, got {self.bias!r}")
        for field in ("rank_pattern", "alpha_pattern"):
            for key, val in getattr(self, field).items():
                ok = isinstance(val, int) and val >= 1 if field == "rank_pattern" else val > 0
                if not ok:
                    raise ValueError(f"LoraConfig.{field}[{key!r}] must be positive, got {val!r}")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"LoraConfig.task_type must be None or one of {TASK_TYPES}, got {self.task_type!r}")
        if self.fan_in_fan_out not in (None, True, False):
            raise ValueError(f"LoraConfig.fan_in_fan_out must be None, True or False, got {self.fan_in_fan_out!r}")

    # ----------------------------------------------------------------- per-module values
    def rank_for(self, name: str) -> int:
        key = pattern_key(self.rank_pattern, name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, name: str) -> float:
        key = pattern_key(self.alpha_pattern, name)
        return float(self.alpha_pattern[key]) if key is not None else float(self.alpha)

    def scaling_for(self, name: str) -> float:
        r, alpha = self.rank_for(name), self.alpha_for(name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def replace(self, **changes) -> LoraConfig:
        """A new validated config with some fields changed (configs are immutable)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values.update(changes)
        return LoraConfig(**values)

    # ----------------------------------------------------------------- PEFT translation
    def to_peft_dict(self, base_model_name_or_path: str | None = None, fan_in_fan_out: bool | None = None,
                     target_modules: list[str] | None = None) -> dict[str, Any]:
        """PEFT's `adapter_config.json` content (only keys every PEFT version knows).

        `target_modules` defaults to this config's; `io.save_adapter` passes the resolved
        list of adapted module names so the file says exactly what was adapted.
        """
        targets = target_modules if target_modules is not None else self.target_modules
        if isinstance(targets, tuple):
            targets = list(targets)
        return {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": base_model_name_or_path or self.base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": targets,
            "exclude_modules": list(self.exclude_modules) if isinstance(self.exclude_modules, tuple)
            else self.exclude_modules,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "use_rslora": self.use_rslora,
            "init_lora_weights": True if self.init == "default" else self.init,
            "bias": self.bias,
            "modules_to_save": list(self.modules_to_save) if self.modules_to_save else None,
            "fan_in_fan_out": bool(self.fan_in_fan_out),
            "use_dora": self.use_dora,
            "layers_to_transform": None,
            "layers_pattern": None,
            "inference_mode": True,
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> LoraConfig:
        """Build a config from PEFT's json, an in-memory PEFT dict (`peft.LoraConfig(...).to_dict()`, whose
        `peft_type` / `task_type` are enums and target sets) or a `peft.LoraConfig` object itself;
        refuses what would change the function unnoticed."""
        if not isinstance(data, dict) and callable(getattr(data, "to_dict", None)) and hasattr(data, "peft_type"):
            source = f"{type(data).__name__} object" if source == "adapter_config.json" else source
            data = data.to_dict()  # a peft.LoraConfig (duck typed: peft stays optional)
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object")
        data = {k: _enum_value(v) for k, v in data.items()}
        if data.get("peft_type") is None:
            raise ValueError(f"{source}: missing key 'peft_type' (not a PEFT/lorafit adapter config)")
        if str(data["peft_type"]).upper() != "LORA":
            raise ValueError(f"{source}: peft_type {data['peft_type']!r} is not supported (only 'LORA')")
        if "r" not in data:
            raise ValueError(f"{source}: missing key 'r'")
        for key, off in _UNSUPPORTED_PEFT.items():
            if key in data and data[key] not in off:
                raise ValueError(f"{source}: key {key!r}={data[key]!r} is not supported by lorafit")
        task_type = data.get("task_type") if data.get("task_type") in TASK_TYPES else None  # bookkeeping only
        init = data.get("init_lora_weights", True)
        if init not in (True, False, "gaussian"):
            init = True  # weights come from the file; how they were first drawn does not matter
        try:
            return cls(r=data["r"], alpha=data.get("lora_alpha", 8), dropout=data.get("lora_dropout", 0.0) or 0.0,
                       target_modules=data.get("target_modules"), exclude_modules=data.get("exclude_modules"),
                       rank_pattern=data.get("rank_pattern"), alpha_pattern=data.get("alpha_pattern"),
                       use_rslora=data.get("use_rslora", False), init=init, bias=data.get("bias", "none"),
                       modules_to_save=data.get("modules_to_save"), fan_in_fan_out=data.get("fan_in_fan_out"),
                       use_dora=bool(data.get("use_dora") or False), task_type=task_type,
                       base_model_name_or_path=data.get("base_model_name_or_path") or None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{source}: {exc}") from None


def as_lora_config(config) -> LoraConfig:
    """A `LoraConfig` as it is; a `peft.LoraConfig` object or a PEFT dict translated (`from_peft_dict`).

    Raises:
        TypeError: anything else (one line naming its type).
    """
    if isinstance(config, LoraConfig):
        return config
    if isinstance(config, dict) or (callable(getattr(config, "to_dict", None)) and hasattr(config, "peft_type")):
        return LoraConfig.from_peft_dict(config, source=f"{type(config).__name__} config")
    raise TypeError(f"config must be a lorafit.LoraConfig, a peft.LoraConfig or a PEFT config dict, "
                    f"got {type(config).__name__}")


def _enum_value(value):
    """PEFT's str enums (PeftType.LORA, TaskType.CAUSAL_LM) as their value; sets of targets as sorted lists."""
    if isinstance(value, set):
        return sorted(value)
    return value.value if isinstance(value, enum.Enum) else value


def _freeze_targets(value, field: str):
    """Lists become tuples (hashable, immutable); strings stay regexes."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set)):
        if not all(isinstance(v, str) for v in value):
            raise ValueError(f"LoraConfig.{field} must contain module names (str), got {value!r}")
        return tuple(sorted(value)) if isinstance(value, set) else tuple(value)
    raise ValueError(f"LoraConfig.{field} must be a list of names, a regex string or None, got {value!r}")


def check_adapter_name(name) -> str:
    """Refuse an adapter name that would fail half-way through a commit or escape a directory.

    The name becomes a key of ``nn.ModuleDict`` (which refuses "", "." and its own attribute
    names such as "keys" or "training" with a KeyError - after earlier layers were already
    wrapped) and, in `load_adapter`, a sub-directory name (so no separator, no "..", no drive).

    Raises:
        ValueError: one line naming the bad name.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
    bad = [c for c in (".", "/", "\\", os.sep, os.altsep or "/", "\0", ":") if c in name]
    if bad:
        raise ValueError(f"adapter name {name!r} contains {bad[0]!r}: it is used as a module key and a "
                         "directory name, so it may not contain '.', '/', '\\' or ':'")
    if hasattr(nn.ModuleDict(), name):
        raise ValueError(f"adapter name {name!r} is an attribute of nn.ModuleDict; choose another name")
    return name

