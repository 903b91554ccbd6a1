"""Optimizer helpers: parameter groups for LoRA+ (Hayou et al., 2024).

LoRA+ observes that A and B play asymmetric roles: B starts at zero and its updates move the
output directly, so a larger learning rate for B (ratio ~2-16) speeds up and improves training
at no cost. ``param_groups`` only builds the groups; any torch optimizer can consume them.

Embedding adapters are the other way round (A starts at zero, B random), so the B rule does
not apply to them: they get their own group at ``embedding_lr``. Recommended: the base lr
(``embedding_lr=None``). Measured in ``benchmarks/loraplus_embedding.py`` (tiny Llama, 3 seeds,
held-out loss): same lr 4.363-4.365, zero-initialised factor at 16x 4.373, PEFT's default
1e-6 4.466 - the same as no embedding adapter at all (4.466).
"""

from __future__ import annotations

import re

import torch.nn as nn

from .tree import lora_layers

# lorafit names adapter weights `...lora_B`; PEFT uses `...lora_B.<adapter>.weight` and
# `...lora_embedding_B.<adapter>`: one pattern covers both so benchmarks can reuse this helper.
_B_PATTERN = re.compile(r"(^|\.)lora_B(\.|$)")
_EMBEDDING_PATTERN = re.compile(r"(^|\.)lora_embedding_[AB](\.|$)")


def is_lora_b(name: str) -> bool:
    """True for the name of a LoRA B matrix (lorafit or PEFT naming)."""
    return _B_PATTERN.search(name) is not None


def _embedding_adapter_params(model: nn.Module) -> set[int]:
    """Adapter parameters of layer kinds that train in their own LoRA+ group (embeddings)."""
    ids = {id(p) for _, layer in lora_layers(model) if layer.param_group == "lora_embedding"
           for p in layer.adapters.parameters()}
    ids.update(id(p) for n, p in model.named_parameters() if _EMBEDDING_PATTERN.search(n))  # PEFT naming
    return ids


def param_groups(model: nn.Module, lr: float, b_ratio: float = 1.0, weight_decay: float = 0.0,
                 embedding_lr: float | None = None) -> list[dict]:
    """Split the trainable parameters of ``model`` into optimizer groups.

    Args:
        model: any module; only parameters with ``requires_grad`` are included.
        lr: learning rate of every trainable parameter except LoRA B matrices.
        b_ratio: LoRA+ ratio; B matrices train at ``lr * b_ratio`` (1.0 = plain LoRA).
        weight_decay: applied to every group (the CLI default is 0, as in the anchor runs).
        embedding_lr: learning rate of embedding adapters (both factors); None = ``lr``.

    Returns:
        A list of at most three dicts ``{"params", "lr", "weight_decay", "name"}`` (empty groups are
        dropped, since some optimizers refuse them). ``name`` is ``"default"``, ``"lora_B"`` or ``"lora_embedding"``.
    """
    if b_ratio <= 0:
        raise ValueError(f"b_ratio must be > 0, got {b_ratio}")
    if embedding_lr is not None and embedding_lr <= 0:
        raise ValueError(f"embedding_lr must be > 0, got {embedding_lr}")
    embedding = _embedding_adapter_params(model)
    default, b_params, emb_params = [], [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            if id(param) in embedding:
                emb_params.append(param)
            else:
                (b_params if is_lora_b(name) else default).append(param)
    groups = [
        {"params": default, "lr": lr, "weight_decay": weight_decay, "name": "default"},
        {"params": b_params, "lr": lr * b_ratio, "weight_decay": weight_decay, "name": "lora_B"},
        {"params": emb_params, "lr": lr if embedding_lr is None else embedding_lr, "weight_decay": weight_decay,
         "name": "lora_embedding"},
    ]
    return [g for g in groups if g["params"]]
