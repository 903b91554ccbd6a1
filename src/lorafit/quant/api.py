"""``quantize(model, "nf4" | "int8", targets=None)``: swap frozen Linear layers for quantized ones.

Layers are replaced in place at the same module path, so ``lorafit.inject`` finds them by the
same names afterwards. Quantize first, then inject.
"""

from __future__ import annotations

import re

from torch import nn

from ..common.matching import name_matches
from ..layers import LoraLayer
from ..tree import OUTPUT_NAMES, output_layer_ids
from .formats import check_nf4_shape
from .layers import LAYER_TYPES, QuantizedLinear

OUTPUT_LAYER_NAMES = OUTPUT_NAMES  # the core's "all-linear" rule, shared so both agree


def _mha_linear_ids(model: nn.Module) -> set[int]:
    """nn.MultiheadAttention reads ``out_proj.weight`` directly: its Linear cannot be swapped."""
    return {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}


def select_targets(model: nn.Module, targets=None) -> list[str]:
    """Names of the modules to quantize, validated.

    Args:
        model: the model.
        targets: None = every nn.Linear except the output layer (the core's "all-linear" rule:
            ``get_output_embeddings()`` where the model has one, else Linear modules named
            lm_head / classifier / score / head) and the out_proj of nn.MultiheadAttention;
            a list of names (exact, or a dotted suffix such as "q_proj"); a str = a regex that
            must fullmatch the module name.

    Returns:
        Module names, in ``named_modules`` order.

    Raises:
        ValueError: a target that matches nothing, or matches a module that is not an nn.Linear.
    """
    named = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if n]
    if targets is None:
        skip = output_layer_ids(model) | _mha_linear_ids(model)
        return [n for n, m in named if isinstance(m, nn.Linear) and id(m) not in skip]
    if isinstance(targets, str):
        try:
            rx = re.compile(targets)
        except re.error as e:
            raise ValueError(f"quantize targets: invalid regex {targets!r}: {e}") from None
        chosen = [n for n, _ in named if name_matches(rx.pattern, n)]
        if not chosen:
            raise ValueError(f"quantize targets: regex {targets!r} matches no module name")
    else:
        items = list(targets)
        if not items or not all(isinstance(t, str) and t for t in items):
            raise ValueError(f"quantize targets must be None, a regex str or a list of names, got {targets!r}")
        chosen, seen = [], set()
        for t in items:
            hits = [n for n, _ in named if name_matches([t], n)]
            if not hits:
                raise ValueError(f"quantize target {t!r} matches no module name")
            for n in hits:
                if n not in seen:
                    seen.add(n)
                    chosen.append(n)
        order = {n: i for i, (n, _) in enumerate(named)}
        chosen.sort(key=order.__getitem__)
    mods = dict(named)
    mha = _mha_linear_ids(model)
    for n in chosen:
        m = mods[n]
        if isinstance(m, QuantizedLinear):
            raise ValueError(f"quantize target {n!r} is already quantized ({m.fmt})")
        if isinstance(m, LoraLayer):
            raise ValueError(f"quantize target {n!r} is a LoRA wrapper: quantize before lorafit.inject")
        if not isinstance(m, nn.Linear):
            raise ValueError(f"quantize target {n!r} is a {type(m).__name__}, not an nn.Linear")
        if id(m) in mha:
            raise ValueError(f"quantize target {n!r} is the out_proj of an nn.MultiheadAttention, "
                             "which reads its weight directly")  # fmt: skip
    return chosen


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize(model: nn.Module, fmt: str = "nf4", targets=None, block_size: int = 64,
             double_quant: bool = False) -> nn.Module:  # fmt: skip
    """Replace Linear layers of ``model`` by NF4 or int8 quantized layers, in place.

    The original weights are dropped as each layer is replaced (peak extra memory: one layer's
    temporaries). Biases stay full precision. Compute dtype = each original weight's dtype.

    Args:
        model: any nn.Module (a transformers model, a torchvision model, ...).
        fmt: "nf4" (4-bit, blockwise absmax) or "int8" (per-output-channel scales).
        targets: see :func:`select_targets`; None = all Linear layers but the output layer.
        block_size: NF4 values per scale (even, dividing each weight's numel).
        double_quant: NF4 only: store the block scales in 8 bits as well.

    Returns:
        ``model`` (the same object).

    Raises:
        ValueError: unknown format, bad block size, or a target that is not an nn.Linear. All
            targets are checked before any layer is replaced.
    """
    if fmt not in LAYER_TYPES:
        raise ValueError(f"unknown quantization format {fmt!r}; expected one of {sorted(LAYER_TYPES)}")
    names = select_targets(model, targets)
    kwargs = {}
    if fmt == "nf4":
        kwargs = {"block_size": block_size, "double_quant": double_quant}
        for n in names:
            w = model.get_submodule(n).weight
            check_nf4_shape(w.numel(), block_size, f"{n!r} ({w.shape[0]}x{w.shape[1]})")
    elif double_quant:
        raise ValueError("double_quant applies to nf4 only")
    done: dict[int, nn.Module] = {}  # a Linear shared under two names becomes one quantized layer
    for n in names:
        lin = model.get_submodule(n)
        q = done.get(id(lin))
        if q is None:
            q = done[id(lin)] = LAYER_TYPES[fmt].from_linear(lin, **kwargs)
        _set_module(model, n, q)
    return model


def quantized_modules(model: nn.Module) -> dict[str, QuantizedLinear]:
    """name -> quantized layer, for every quantized layer in ``model``."""
    # isinstance, not the protocol flag: LoRA wrappers forward attribute reads to their base layer
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def weight_bytes(model: nn.Module) -> dict:
    """Bytes held by quantized storage, and by every other parameter/buffer (deduplicated)."""
    seen, quant, other = set(), 0, 0
    qids = {id(t) for m in quantized_modules(model).values() for t in m._storage()}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        nbytes = t.numel() * t.element_size()
        if id(t) in qids:
            quant += nbytes
        else:
            other += nbytes
    return {"quantized_storage": quant, "other": other, "total": quant + other}
