"""Optimizer helpers: parameter groups for LoRA+ (Hayou et al., 2024).

LoRA+ observes that A and B play asymmetric roles: B starts at zero and its updates move the
output directly, so a larger learning rate for B (ratio ~2-16) speeds up and improves training
at no cost. ``param_groups`` only builds the groups; any torch optimizer can consume them.
"""

from __future__ import annotations

import re

import torch.nn as nn

# lorafit names adapter weights `...lora_B`; PEFT uses `...lora_B.<adapter>.weight` and
# `...lora_embedding_B.<adapter>`: one pattern covers both so benchmarks can reuse this helper.
_B_PATTERN = re.compile(r"(^|\.)lora(_embedding)?_B(\.|$)")


def is_lora_b(name: str) -> bool:
    """True for the name of a LoRA B matrix (lorafit or PEFT naming)."""
    return _B_PATTERN.search(name) is not None


def param_groups(model: nn.Module, lr: float, b_ratio: float = 1.0, weight_decay: float = 0.0) -> list[dict]:
    """Split the trainable parameters of ``model`` into optimizer groups.

    Args:
        model: any module; only parameters with ``requires_grad`` are included.
        lr: learning rate of every trainable parameter except LoRA B matrices.
        b_ratio: LoRA+ ratio; B matrices train at ``lr * b_ratio`` (1.0 = plain LoRA).
        weight_decay: applied to every group (the CLI default is 0, as in the anchor runs).

    Returns:
        A list of at most two dicts ``{"params", "lr", "weight_decay", "name"}`` (empty groups are
        dropped, since some optimizers refuse them). ``name`` is ``"lora_B"`` or ``"default"``.
    """
    if b_ratio <= 0:
        raise ValueError(f"b_ratio must be > 0, got {b_ratio}")
    default, b_params = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (b_params if is_lora_b(name) else default).append(param)
    groups = [
        {"params": default, "lr": lr, "weight_decay": weight_decay, "name": "default"},
        {"params": b_params, "lr": lr * b_ratio, "weight_decay": weight_decay, "name": "lora_B"},
    ]
    return [g for g in groups if g["params"]]
