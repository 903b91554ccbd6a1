"""LoRA variants built on the core wrappers: DoRA, PiSSA / OLoRA initialisation, hot-swap scaling.

A variant is a stateless object set as ``adapter.variant``; a wrapper checks that one attribute
and, when it is set, delegates ``forward`` (and ``merge`` / ``unmerge`` where the variant
defines them). Plain LoRA adapters keep the class default ``variant = None`` and pay nothing
else. `setup_adapter` is called by injection planning for configs that need a variant.
"""

from __future__ import annotations

from .dora import DORA_CONV, DORA_EMBEDDING, DORA_LINEAR, dora_norm, setup_dora
from .init import convert_to_lora, olora_factors, pissa_factors, setup_init


def setup_adapter(name: str, layer, adapter, config) -> None:
    """Apply the config's init (PiSSA/OLoRA) and DoRA to a freshly planned adapter.

    Nothing in the model changes here: PiSSA/OLoRA leave the residual base weight on the
    adapter (``pending_base``) for ``LoraLayer.attach`` to write when the plan commits.
    """
    weight = None
    if isinstance(config.init, str) and config.init.startswith(("pissa", "olora")):
        weight = setup_init(name, layer, adapter, config.init)
    if config.use_dora:
        setup_dora(name, layer, adapter, weight)


__all__ = ["setup_adapter", "setup_dora", "setup_init", "convert_to_lora", "pissa_factors", "olora_factors",
           "dora_norm", "DORA_LINEAR", "DORA_CONV", "DORA_EMBEDDING"]
