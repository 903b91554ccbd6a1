"""Hot-swapping adapter weights in place, without re-injection and without recompiling.

A compiled model (``torch.compile``) guards on what its graph was specialised to: parameter
shapes and python scalars read in forward (the scaling ``alpha / r``). Swapping an adapter of
another rank or alpha would therefore recompile, and re-injecting would rebuild the modules.

``prepare_hotswap(model, max_rank)`` makes every adapter swap-ready once, BEFORE compiling:

* A and B are zero-padded to ``max_rank`` (the padded rows of A and columns of B are zero, so
  ``B A`` is unchanged; grouped convs are padded per group);
* each scaling becomes a 0-dim fp32 buffer (non-persistent), so a new alpha is a ``fill_``;
  linear layers fold it into B inside forward (``B * s``: out x r work, not tokens x out).

``hotswap(model, directory, adapter)`` then loads a PEFT/lorafit adapter directory into the
existing tensors with ``copy_`` (same objects, same shapes): no new modules, no recompile.
The file must adapt the same layers, with rank <= max_rank; everything is checked before
the first tensor is written, so a refused swap leaves the model unchanged.

After preparation ``ad.r`` is the padded rank; the adapter's dropout stays the prepared one
(hot-swap is for inference). Save adapters before preparing: a prepared model's tensors are
padded.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .io import classify_file, read_adapter_config, read_adapter_tensors, resolve_dir
from .layers import LoraAdapter
from .tree import lora_layers, model_state
from .variants import TENSOR_SCALING


def _padded(a: torch.Tensor, b: torch.Tensor, ad: LoraAdapter, rank: int):
    """(A [rank, ...], B [..., rank, ...]) zero-padded in `ad`'s layout; grouped convs per group.

    Args:
        a, b: factors in the file's / adapter's layout with rank r <= rank.
    """
    g = ad.groups
    r = a.shape[0]
    ag = a.reshape(g, r // g, *a.shape[1:])
    bg = b.reshape(g, b.shape[0] // g, r // g, *b.shape[2:])
    pa = a.new_zeros(g, rank // g, *a.shape[1:])
    pb = b.new_zeros(g, b.shape[0] // g, rank // g, *b.shape[2:])
    pa[:, : r // g], pb[:, :, : r // g] = ag, bg
    return pa.reshape(rank, *a.shape[1:]), pb.reshape(b.shape[0], rank // g, *b.shape[2:])


def _check_rank(name: str, ad: LoraAdapter, r: int, max_rank: int) -> None:
    if r > max_rank:
        raise ValueError(f"hotswap: {name} has rank {r} > max_rank={max_rank} that the model was prepared "
                         "for; prepare with a larger max_rank (before compiling)")
    g = ad.groups
    if max_rank % g:
        raise ValueError(f"hotswap: {name} is a conv with groups={g}; max_rank={max_rank} must be a "
                         "multiple of it")


def prepare_hotswap(model: nn.Module, max_rank: int) -> nn.Module:
    """Pad every adapter to `max_rank` and turn its scaling into a tensor (once, before compiling).

    Raises:
        ValueError: an adapter of rank > max_rank, a grouped conv whose groups do not divide
            max_rank, a DoRA adapter, or a model already prepared; the model is unchanged then.
    """
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"prepare_hotswap: max_rank must be a positive integer, got {max_rank!r}")
    state = model_state(model)
    if state.hotswap_rank is not None:
        raise ValueError("prepare_hotswap: the model is already prepared")
    todo = []
    for name, layer in lora_layers(model):
        for aname, ad in layer.adapters.items():
            if ad.variant is not None:
                raise ValueError(f"prepare_hotswap: adapter {aname!r} on {name} is a {ad.variant.name} "
                                 "adapter; hot-swap supports plain LoRA adapters")
            _check_rank(name, ad, ad.r, max_rank)
            todo.append((layer, ad))
    if not todo:
        raise ValueError("prepare_hotswap: the model has no LoRA adapters")
    for layer, ad in todo:
        for part in ad.parts():
            a, b = _padded(part.lora_A.detach(), part.lora_B.detach(), part, max_rank)
            part.lora_A = nn.Parameter(a, requires_grad=part.lora_A.requires_grad)
            part.lora_B = nn.Parameter(b, requires_grad=part.lora_B.requires_grad)
            scaling = float(part.scaling)
            del part.scaling  # a plain float attribute, replaced by a buffer of the same name
            part.register_buffer("scaling", torch.tensor(scaling, dtype=torch.float32, device=a.device),
                                 persistent=False)
            part.r = max_rank
        if layer.scaling_in_op:  # its forward passes the scaling into the fused op as a float
            ad.variant = TENSOR_SCALING
    state.hotswap_rank = max_rank
    return model


def hotswap(model: nn.Module, directory, adapter: str = "default") -> nn.Module:
    """Replace adapter `adapter`'s weights and scalings in place with those of `directory`.

    Args:
        directory: an adapter directory (PEFT's format, from lorafit or PEFT).
    Raises:
        ValueError: model not prepared, unknown adapter, a file that adapts other layers, has a
            rank > max_rank, uses DoRA or carries non-LoRA tensors (modules_to_save, biases);
            nothing is written then.
    """
    max_rank = model_state(model).hotswap_rank
    if max_rank is None:
        raise ValueError("hotswap: call lorafit.prepare_hotswap(model, max_rank) first (before compiling)")
    config = read_adapter_config(directory, adapter)
    tensors, _ = read_adapter_tensors(directory, adapter)
    file = resolve_dir(directory, adapter)
    if config.use_dora:
        raise ValueError(f"hotswap: {file} is a DoRA adapter; hot-swap supports plain LoRA adapters")
    layers = {n: layer for n, layer in lora_layers(model) if adapter in layer.adapters}
    if not layers:
        raise ValueError(f"hotswap: the model has no adapter {adapter!r}")
    lora, rest = classify_file(tensors, layers, file)
    if rest:
        raise ValueError(f"hotswap: {file} has non-LoRA tensors (e.g. {next(iter(rest))!r}: modules_to_save "
                         "or biases), which hot-swap does not replace")
    if set(lora) != set(layers):
        extra, missing = sorted(set(lora) - set(layers)), sorted(set(layers) - set(lora))
        raise ValueError(f"hotswap: {file} adapts other layers than adapter {adapter!r}: "
                         f"not in the model: {extra[:5]}, not in the file: {missing[:5]}")
    writes, alphas = [], []  # (destination tensor, new value) - all built and checked before any write
    for name, layer in layers.items():
        ad, slots = layer.adapters[adapter], lora[name]
        scaling = config.scaling_for(name)
        for part, ka, kb in layer.peft_parts(ad):
            if ka not in slots or kb not in slots:
                raise ValueError(f"hotswap: {file}: module {name!r} lacks {ka} or {kb}")
            (key_a, a), (key_b, b) = slots[ka], slots[kb]
            r = a.shape[0]
            _check_rank(name, part, r, max_rank)
            if b.dim() < 2 or b.shape[1] * part.groups != r:
                raise ValueError(f"hotswap: {file}: {key_a!r} and {key_b!r} have inconsistent ranks")
            pa, pb = _padded(a.to(part.lora_A.dtype), b.to(part.lora_B.dtype), part, max_rank)
            for key, src, dst in ((key_a, pa, part.lora_A), (key_b, pb, part.lora_B)):
                if src.shape != dst.shape:
                    raise ValueError(f"hotswap: {file}: key {key!r} does not fit {name} "
                                     f"(padded shape {tuple(src.shape)}, model {tuple(dst.shape)})")
                writes.append((dst, src))
            writes.append((part.scaling, torch.tensor(scaling, dtype=torch.float32)))
            alphas.append((part, config.alpha_for(name)))
    with torch.no_grad():
        for dst, src in writes:
            dst.copy_(src)
    for part, alpha in alphas:
        part.alpha = alpha
    model_state(model).configs[adapter] = config
    return model
