"""Checks of training input that give one line instead of a traceback or a silent surprise.

Each check runs before the model loads and before the run directory is written, so a refused
job leaves nothing behind: option combinations (``--full-finetune`` with adapter options), YAML
syntax errors, ``--max-length`` against the model's position table (read from config.json,
no weights), and the label column of a classification file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorafit.common.errors import LorafitError


# Options that only shape or train an adapter: --full-finetune would silently ignore them.
ADAPTER_ONLY = ("rank", "alpha", "dropout", "targets", "quantize", "lr_b_ratio")


def refuse_adapter_options(
    user: dict[str, Any], typed: dict[str, Any], from_config: dict[str, Any], config_path: str | None
) -> None:
    """Refuse adapter-only options the user set (flag or ``--config``) together with --full-finetune.

    A resumed run's config.yaml holds every key, so only the typed flags and the ``--config`` file
    count as the user's choice; the message names each option and where it was set.
    """
    if not user.get("full_finetune"):
        return
    named = []
    for key in ADAPTER_ONLY:
        flag = "--" + key.replace("_", "-")
        if typed.get(key) is not None:
            named.append(flag)
        elif from_config.get(key) is not None:
            named.append(f"{flag} (in {config_path})")
    if named:
        raise LorafitError(
            f"{', '.join(named)}: adapter option{'s' if len(named) > 1 else ''} cannot go with "
            "--full-finetune, which trains every weight without an adapter (remove them, or drop --full-finetune)"
        )



def yaml_error_line(path: Path, text: str, exc: Exception) -> str:
    """One line for a YAML syntax error: the 1-based line, what yaml found, and where the construct began.

    yaml's marks are 0-based. A construct left open (``rank: [4``, an unclosed quote) is only
    detected at the end of the stream, whose mark is the line after the last one: the line is
    clamped to the file's last line and the opening line is named, so the user is sent to a
    line that exists and holds the culprit.
    """
    mark, ctx = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
    if mark is None:
        return f"{path}: invalid YAML"
    last = max(1, len(text.rstrip("\n").split("\n")))
    line = min(mark.line + 1, last)
    detail = getattr(exc, "problem", None) or ""
    context = getattr(exc, "context", None)
    if context and ctx is not None:
        detail += f"; {context} from line {min(ctx.line + 1, last)}"
    return f"{path} line {line}: invalid YAML" + (f" ({detail})" if detail else "")


# Models whose positions start after the padding index (RoBERTa's quirk): the table holds
# max_position_embeddings rows, but only max_position_embeddings - pad_token_id - 1 usable ones.
_PADDING_OFFSET_TYPES = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text",
                         "roberta-prelayernorm", "ibert", "longformer")
# Rotary / ALiBi models have no position table: a longer input runs (extrapolates) rather than
# failing, and training longer than pretraining is a legitimate choice there.
_NO_TABLE_KEYS = ("rope_parameters", "rope_theta", "rope_scaling", "rotary_dim", "rotary_pct", "alibi")


def position_limit(model_dir: str | Path) -> tuple[int, str] | None:
    """The most tokens a model's learned position table takes, read from config.json (no weights).

    Returns:
        ``(limit, why)`` with ``why`` naming the config key and value, or None when the model has
        no such hard limit (rotary / ALiBi positions, unknown layout, unreadable config).
    """
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # resolve_model_path already required the file; loading will name any problem
    if not isinstance(cfg, dict) or any(cfg.get(k) is not None for k in _NO_TABLE_KEYS):
        return None
    if cfg.get("position_embedding_type") in ("rotary", "alibi"):
        return None
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            limit, why = value, f"config.json {key}: {value}"
            pad = cfg.get("pad_token_id")
            if cfg.get("model_type") in _PADDING_OFFSET_TYPES and isinstance(pad, int) and pad >= 0:
                limit -= pad + 1
                why += f", positions start after pad_token_id {pad}"
            return limit, why
    return None


def check_max_length(model_dir: str | Path, max_length: int | None, model_name: str) -> None:
    """Refuse ``--max-length`` beyond the model's position table, before anything loads or is written.

    Without this a long enough input fails mid-run inside the embedding lookup (an index error),
    after the run directory was made.
    """
    found = position_limit(model_dir)
    if max_length is None or found is None:
        return
    limit, why = found
    if max_length > limit:
        raise LorafitError(
            f"--max-length {max_length}: model {model_name} takes at most {limit} tokens ({why}); "
            f"give --max-length {limit} or less"
        )
