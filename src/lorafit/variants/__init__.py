"""LoRA variants built on the core wrappers: DoRA, PiSSA / OLoRA / gaussian init, hot-swap scaling.

Each variant implements `lorafit.variants.base.Variant`. The config-chosen ones are listed in
`VARIANTS`, in the order they are planned (init methods first: DoRA measures its magnitude on
the weight they leave); `plan_variants` runs the ones a config selects. A new variant is one
file here (a `Variant` subclass) plus `register_variant(MyVariant())`.
"""

from __future__ import annotations

from .base import Variant
from .dora import DORA, Dora, dora_norm
from .hotswap import TENSOR_SCALING, TensorScaling
from .init import GAUSSIAN, OLORA, PISSA, GaussianInit, WeightInit, convert_to_lora, olora_factors, pissa_factors

VARIANTS: list[Variant] = [GAUSSIAN, PISSA, OLORA, DORA]  # planning order


def register_variant(variant: Variant, before: Variant | None = None) -> Variant:
    """Add a config-chosen variant to the table (at the end, or before ``before``); returns it."""
    if not isinstance(variant, Variant) or variant.config_field is None:
        raise TypeError(f"register_variant needs a Variant with a config_field, got {variant!r}")
    if variant not in VARIANTS:
        VARIANTS.insert(VARIANTS.index(before) if before in VARIANTS else len(VARIANTS), variant)
    return variant


def chosen(config) -> list[Variant]:
    """The variants a config selects, in planning order."""
    return [v for v in VARIANTS if v.accepts(getattr(config, v.config_field))]


def plan_variants(name: str, layer, adapter, config) -> None:
    """Apply the config's variants to a freshly planned adapter (nothing in the model changes).

    PiSSA/OLoRA leave the residual base weight on the adapter (``pending_base``) for
    ``LoraLayer.attach`` to write when the plan commits; DoRA measures its magnitude on it.
    """
    weight = None
    for variant in chosen(config):
        weight = variant.plan(name, layer, adapter, config, weight)


def suffixes() -> set[str]:
    """Key suffixes of every variant's extra tensors (DoRA's magnitude)."""
    return {s for v in VARIANTS for s in v.suffixes()}


__all__ = ["Variant", "VARIANTS", "register_variant", "chosen", "plan_variants", "suffixes", "Dora", "DORA",
           "WeightInit", "GaussianInit", "PISSA", "OLORA", "GAUSSIAN", "TensorScaling", "TENSOR_SCALING",
           "convert_to_lora", "pissa_factors", "olora_factors", "dora_norm"]
