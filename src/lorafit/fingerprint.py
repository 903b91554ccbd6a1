"""The base-weight fingerprint an adapter file records, and the check made when it is loaded.

An adapter is only meaningful on the weights it was trained against. ``save_adapter`` stores a
cheap hash of the targeted base weights (names, shapes, 1024 evenly spaced values each) in the
safetensors metadata, plus the same hash of the values rounded to bf16 and to fp16: rounding the
fp32 values gives exactly the values of the base cast to that dtype, so an adapter trained on an
fp32 base is recognised on that base served in bf16 or fp16, while other weights still differ.
"""

from __future__ import annotations

import hashlib

import torch

from .tree import full_tensor

ROUNDED = {"bf16": torch.bfloat16, "fp16": torch.float16}  # lorafit_base_fingerprint_<suffix>


def fingerprints(named_weights, roundings=(None,)) -> list[str | None]:
    """A cheap, stable hash of base weights per rounding: names, shapes and 1024 evenly spaced values each.

    ``roundings`` are None (the values as they are) or a dtype the values are rounded to first
    (``torch.bfloat16``: the same weights held in fp32 or cast to bf16 then hash alike, while other
    weights still differ). All hashes come from one pass, so a sharded weight is gathered once.
    """
    hashers = [hashlib.sha256() for _ in roundings]
    count = 0
    for name, w in sorted(named_weights, key=lambda t: t[0]):
        flat = full_tensor(w.detach()).reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, steps=min(flat.numel(), 1024), device=flat.device).long()
        values = flat[idx]
        for h, rounding in zip(hashers, roundings):
            h.update(name.encode())
            h.update(str(tuple(w.shape)).encode())
            h.update((values if rounding is None else values.to(rounding)).float().cpu().numpy().tobytes())
        count += 1
    return [h.hexdigest()[:32] if count else None for h in hashers]


def fingerprint_metadata(named_weights) -> dict[str, str]:
    """The safetensors metadata ``save_adapter`` records: the exact hash and the rounded ones (none
    when no weight was hashed)."""
    exact, *rounded = fingerprints(named_weights, (None, *ROUNDED.values()))
    if exact is None:
        return {}
    return {"lorafit_base_fingerprint": exact,
            **{f"lorafit_base_fingerprint_{k}": v for k, v in zip(ROUNDED, rounded)}}


def base_matches(meta: dict, named_weights) -> bool:
    """Does the model's base fit the fingerprint a file recorded? (True when either side has none.)

    Exact first; else a rounded hash (``lorafit_base_fingerprint_bf16`` / ``_fp16``, in files saved
    since they were added), so an adapter trained on an fp32 base loads onto that base cast to bf16
    or fp16 (rounding the fp32 values gives exactly the cast base's values).
    """
    want = meta.get("lorafit_base_fingerprint")
    if not want:
        return True
    exact, *rounded = fingerprints(named_weights, (None, *ROUNDED.values()))
    if exact is None or want == exact:
        return True
    return any(meta.get(f"lorafit_base_fingerprint_{k}") == v for k, v in zip(ROUNDED, rounded))
