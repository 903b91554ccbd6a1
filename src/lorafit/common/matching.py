"""The one rule for naming modules: target lists, target regexes and rank / alpha patterns.

Every place that picks modules by name (injection, ``modules_to_save``, quantization targets,
the YOLO presets, the CLI's ``--targets``) calls :func:`name_matches`, so a name means the same
thing everywhere; :func:`pattern_key` is PEFT's rule for ``rank_pattern`` / ``alpha_pattern``.
"""

from __future__ import annotations

import re
from typing import Any


def name_matches(targets, name: str) -> bool:
    """Does module ``name`` (dotted, e.g. ``model.layers.0.self_attn.q_proj``) match ``targets``?

    Args:
        targets: None (nothing matches); a str: a regex that must match the whole name; a list /
            tuple / set of names: each matches the exact name or a dotted suffix of it
            (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``, not ``xq_proj``).
    """
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def pattern_key(patterns: dict[str, Any] | None, name: str) -> str | None:
    """PEFT's rule for rank/alpha patterns: the first key that matches the end of ``name`` as a regex.

    Args:
        patterns: mapping pattern -> value (PEFT's `rank_pattern` / `alpha_pattern`).
        name: full dotted module name, e.g. ``model.layers.0.self_attn.q_proj``.
    """
    for key in patterns or {}:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None
