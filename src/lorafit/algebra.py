"""Combining adapters into a new one: ``combine_adapters``.

Every method works per adapted layer on the adapters' own factors and scalings (``ad.scaling``
already folds alpha, rank_pattern / alpha_pattern and rsLoRA in, so nothing is re-derived from
configs), and writes a new adapter whose scaling is exactly 1 (alpha = r per layer, no rsLoRA;
per-layer ranks go into rank_pattern / alpha_pattern). With ``delta_i = s_i B_i A_i``:

* ``cat``: ``A = [w_1 s_1 A_1; ...]``, ``B = [B_1 | ...]``; rank sum r_i; exact:
  ``delta = sum_i w_i delta_i``. Mixed ranks are fine.
* ``linear``: PEFT's weighted sum of the factors, ``A = sum_i sign_i sqrt|w_i s_i| A_i``,
  ``B = sum_i sqrt|w_i s_i| B_i``. Equal ranks only. An APPROXIMATION: it adds cross terms
  ``B_i A_j``; it is exact only for a single adapter. Prefer ``cat`` or ``svd``.
* ``svd``: the best rank-k approximation (Eckart-Young) of ``sum_i w_i delta_i``.
* ``ties`` (Yadav et al., 2023), on the task vectors ``tau_i = delta_i``: trim each to its
  top ``density`` fraction by magnitude, elect the sign of ``sum_i w_i tau_i`` per entry, and
  average the weighted entries that agree with it; then rank k by SVD.
* ``dare_linear`` / ``dare_ties`` (Yu et al., 2024): drop each entry of ``tau_i`` with
  probability ``1 - density`` and rescale the rest by ``1 / density``; then the weighted sum
  (linear) or TIES' sign election and disjoint mean (ties); then rank k by SVD.

For the SVD-based methods ``k = svd_rank`` (default: the largest input rank of the layer);
``svd_rank >= min(out, in)`` makes them exact. DARE masks are drawn from one
``torch.Generator`` seeded with ``seed``, per layer in model order, per adapter in `names`
order, as ``torch.rand(shape) < density`` (CPU, then moved).

Grouped convs are handled per group (their update is block-diagonal over groups); MHA
layers combine their in-proj and out-proj updates separately.
"""

from __future__ import annotations

import copy
import math
import re

import torch

from .config import check_adapter_name
from .layers import LoraAdapter
from .tree import adapter_configs, lora_layers, model_state, saved_modules

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")


def _split(ad: LoraAdapter):
    """(A [g, r/g, K], B [g, out/g, r/g]) fp32 views of one adapter, g = conv groups (else 1)."""
    g = ad.groups
    a, b = ad.lora_A.detach().float(), ad.lora_B.detach().float()
    rg = a.shape[0] // g
    return a.reshape(g, rg, -1), b.reshape(g, b.shape[0] // g, rg)


def _join(a: torch.Tensor, b: torch.Tensor, like: LoraAdapter):
    """Inverse of `_split` for a new rank: (A [R, ...], B [out, R / g, ...]) in `like`'s layout."""
    g, rg = a.shape[0], a.shape[1]
    a = a.reshape(g * rg, *like.lora_A.shape[1:])
    b = b.reshape(like.lora_B.shape[0], rg, *like.lora_B.shape[2:])
    return a, b


def _trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: keep the top `density` fraction of entries by magnitude (ties broken by topk)."""
    k = int(density * t.numel())
    flat = t.reshape(-1)
    keep = torch.zeros_like(flat)
    if k > 0:
        keep[flat.abs().topk(k).indices] = 1
    return t * keep.view(t.shape)


def _dare(t: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    mask = (torch.rand(t.shape, generator=gen) < density).to(t.device, t.dtype)
    return t * mask / density


def _elect(weighted: torch.Tensor) -> torch.Tensor:
    """TIES' sign election and disjoint mean over dim 0 of the weighted, trimmed task vectors."""
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = (weighted.sign() == sign).to(weighted.dtype)  # zeros (trimmed/dropped) never agree
    return (weighted * agree).sum(0) / agree.sum(0).clamp_min(1.0)


def _lowrank(delta: torch.Tensor, k: int):
    """Best rank-k factors of delta [g, out/g, K]: (A [g, k, K], B [g, out/g, k]) with B A ~= delta."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    m = s.shape[-1]
    if k > m:  # pad with zero directions so every group keeps the requested rank
        u = torch.cat([u, u.new_zeros(*u.shape[:-1], k - m)], -1)
        s = torch.cat([s, s.new_zeros(*s.shape[:-1], k - m)], -1)
        vh = torch.cat([vh, vh.new_zeros(*vh.shape[:-2], k - m, vh.shape[-1])], -2)
    return vh[..., :k, :], u[..., :k] * s[..., None, :k]


def combine_part(parts, weights, method: str, density: float, rank: int | None, gen: torch.Generator | None):
    """Combine the matching parts (one per input adapter) of one layer into new (A, B) factors.

    Args:
        parts: LoraAdapter per input adapter (same layer, same kind).
        weights: w_i.  rank: the svd rank k (total over groups) for svd/ties/dare.
    Returns:
        (A [g, R/g, K], B [g, out/g, R/g]) fp32, with ``B A = combined delta`` (scaling 1).
    """
    split = [_split(p) for p in parts]
    scaled = [w * p.scaling for w, p in zip(weights, parts)]  # w_i s_i (s_i may be a 0-dim tensor)
    if method == "cat":
        return torch.cat([s * a for s, (a, _) in zip(scaled, split)], 1), torch.cat([b for _, b in split], 2)
    if method == "linear":
        sq = [math.sqrt(abs(float(s))) for s in scaled]
        a = sum(q * (1 if float(s) >= 0 else -1) * a for q, s, (a, _) in zip(sq, scaled, split))
        b = sum(q * b for q, (_, b) in zip(sq, split))
        return a, b
    # task vectors tau_i = s_i B_i A_i: [n, g, out/g, K]
    deltas = torch.stack([torch.matmul(b, a) * float(p.scaling) for p, (a, b) in zip(parts, split)])
    w = torch.tensor([float(x) for x in weights], dtype=deltas.dtype).view(-1, 1, 1, 1)
    if method == "svd":
        delta = (w * deltas).sum(0)
    elif method == "ties":
        delta = _elect(w * torch.stack([_trim(d, density) for d in deltas]))
    elif method == "dare_linear":
        delta = (w * torch.stack([_dare(d, density, gen) for d in deltas])).sum(0)
    else:  # dare_ties
        delta = _elect(w * torch.stack([_dare(d, density, gen) for d in deltas]))
    return _lowrank(delta, rank // deltas.shape[1])


def _check(model, names, weights, new_name, method, density, svd_rank):
    configs = adapter_configs(model)
    if method not in METHODS:
        raise ValueError(f"combine_adapters: method must be one of {METHODS}, got {method!r}")
    if not names:
        raise ValueError("combine_adapters: names is empty")
    if isinstance(names, str) or isinstance(weights, (int, float)):
        raise ValueError("combine_adapters: names and weights must be lists (one weight per adapter)")
    names, weights = list(names), list(weights)
    if len(weights) != len(names):
        raise ValueError(f"combine_adapters: got {len(weights)} weights for {len(names)} adapters {names}")
    for n in names:
        if n not in configs:
            raise ValueError(f"combine_adapters: unknown adapter {n!r}; the model has {sorted(configs)}")
        if configs[n].use_dora:
            raise ValueError(f"combine_adapters: adapter {n!r} uses DoRA; its magnitude cannot be combined")
    try:
        check_adapter_name(new_name)  # the rule of inject / load_adapter: a module key and a path component
    except ValueError as exc:
        raise ValueError(f"combine_adapters: new_name: {exc}") from None
    if new_name in configs:
        raise ValueError(f"combine_adapters: new_name {new_name!r} is already an adapter of the model")
    if method in ("ties", "dare_linear", "dare_ties") and (density is None or not 0 < density <= 1):
        raise ValueError(f"combine_adapters: method {method!r} needs 0 < density <= 1, got {density!r}")
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank < 1):
        raise ValueError(f"combine_adapters: svd_rank must be a positive integer, got {svd_rank!r}")
    return names, weights


def combine_adapters(model, names, weights, new_name: str, method: str = "cat", density: float | None = None,
                     svd_rank: int | None = None, seed: int = 0):
    """Add adapter `new_name` that combines adapters `names` with weights `weights` (see module doc).

    The new adapter is added inactive and frozen (as a second `inject` would); activate it
    with ``lorafit.set_adapter``. It saves like any adapter (PEFT format).

    Args:
        names: existing adapters; they must adapt exactly the same layers.
        weights: one float per adapter (negative subtracts).
        method: "cat" (exact; default), "linear", "svd", "ties", "dare_linear", "dare_ties".
        density: kept fraction for ties / dare (0 < density <= 1).
        svd_rank: rank k for svd / ties / dare (default: each layer's largest input rank).
        seed: DARE's random masks.
    Returns:
        the model.
    Raises:
        ValueError: unknown or DoRA adapters, wrong number of weights, different target sets,
            unequal ranks for "linear", several adapters with copies of one module in
            `modules_to_save`, ... - the model is unchanged then.
    """
    names, weights = _check(model, names, weights, new_name, method, density, svd_rank)
    configs = adapter_configs(model)
    gen = torch.Generator().manual_seed(int(seed))
    layers = [(n, layer) for n, layer in lora_layers(model) if any(a in layer.adapters for a in names)]
    built = []
    for lname, layer in layers:
        missing = [a for a in names if a not in layer.adapters]
        if missing:
            raise ValueError(f"combine_adapters: adapters {names} adapt different layers: {lname} has no "
                             f"{missing[0]!r}; combine adapters with the same targets")
        ads = [layer.adapters[a] for a in names]
        if len({a.a_groups for a in ads}) > 1:
            raise ValueError(f"combine_adapters: {lname}: the adapters use different conv forms")
        ranks = [a.r for a in ads]
        if method == "linear" and len(set(ranks)) > 1:
            raise ValueError(f"combine_adapters: method 'linear' needs equal ranks, but {lname} has ranks "
                             f"{ranks}; use 'cat' (exact) or 'svd'")
        g = ads[0].groups
        k = svd_rank if svd_rank is not None else max(ranks)
        if method not in ("cat", "linear") and k % g:
            raise ValueError(f"combine_adapters: {lname}: svd_rank {k} is not a multiple of the conv's "
                             f"groups={g}")
        combined = [combine_part(list(p), weights, method, density, k, gen)
                    for p in zip(*[a.parts() for a in ads])]
        rank = combined[0][0].shape[0] * combined[0][0].shape[1]
        new = layer.make_adapter(new_name, rank, float(rank), False, ads[0].dropout, a_groups=ads[0].a_groups)
        with torch.no_grad():
            for part, (a, b) in zip(new.parts(), combined):
                a, b = _join(a, b, part)
                part.lora_A.copy_(a)
                part.lora_B.copy_(b)
        new.requires_grad_(False)
        built.append((lname, layer, new))
    if not built:
        raise ValueError(f"combine_adapters: adapters {names} adapt no layer")
    saved = _saved_copies(model, names)
    # commit: nothing above touched the model
    for _, layer, new in built:
        layer.attach(new_name, new)
    for mod, copy_ in saved:
        mod.add_copy(new_name, copy_)
        copy_.requires_grad_(False)
    model_state(model).configs[new_name] = _config(configs[names[0]], built, saved, model)
    return model


def _saved_copies(model, names):
    """modules_to_save: a copy of the one adapter that has one; several differing copies cannot mix."""
    out = []
    for mname, mod in saved_modules(model):
        have = [n for n in names if n in mod.modules_to_save]
        if len(have) > 1:
            raise ValueError(f"combine_adapters: adapters {have} each have their own copy of {mname} "
                             "(modules_to_save); such copies cannot be combined")
        if have:
            out.append((mod, copy.deepcopy(mod.modules_to_save[have[0]])))
    return out


def _config(first, built, saved, model):
    """Scaling 1 everywhere: alpha = r per layer; ranks that differ from the most common go in patterns."""
    ranks = {lname: new.r for lname, _, new in built}
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {re.escape(n): r for n, r in ranks.items() if r != common}
    saved_names = [n for n, mod in saved_modules(model) if any(mod is m for m, _ in saved)]
    return first.replace(r=common, alpha=float(common), rank_pattern=pattern, alpha_pattern=dict(pattern),
                         use_rslora=False, init="default", target_modules=sorted(ranks), use_dora=False,
                         modules_to_save=saved_names or None)
