"""The variant protocol: what DoRA, the init methods and hot-swap scaling each implement.

A variant changes plain LoRA in one of two places, or both:

* at planning time (``plan``), for the configs it is chosen by: its ``config_field`` holds a
  value it ``accepts`` (``use_dora=True``, ``init="pissa"``, ...). The table in
  `lorafit.variants` lists them in the order they run (init methods before DoRA, whose
  magnitude is measured on the weight the init leaves);
* at run time, when ``plan`` (or `lorafit.prepare_hotswap`) sets itself as ``adapter.variant``:
  the wrapper then delegates ``forward``, ``merge`` and ``unmerge`` to it, and save / load add
  its ``tensors``. Plain LoRA adapters keep ``variant = None`` and pay one attribute read.

Variants are stateless singletons; per-adapter state lives on the adapter (declared there).
"""

from __future__ import annotations

from typing import Any

import torch


class Variant:
    """Base class with plain-LoRA defaults; a variant overrides what it changes.

    Attributes:
        name: shown in messages ("DoRA").
        config_field: the `LoraConfig` field that chooses it (None: chosen by an API call).
        exclusive: it cannot share a layer with other live adapters (adapter_batch, combine
            and hot-swap refuse it too).
    """

    name = "variant"
    config_field: str | None = None
    exclusive = False

    def accepts(self, value: Any) -> bool:
        """Does this value of ``config_field`` choose this variant?"""
        return False

    def plan(self, name: str, layer, ad, config, weight: torch.Tensor | None) -> torch.Tensor | None:
        """Set up a freshly planned adapter (nothing in the model changes here).

        Args:
            name: the module's name, for messages. layer: its wrapper (maybe not yet in the model).
            weight: the base weight the adapter will see, when an earlier variant planned a new
                one (PiSSA's residual), else None.
        Returns:
            the planned base weight (``weight`` unchanged unless this variant plans a new one).
        Raises:
            ValueError: the variant does not fit this layer (one line, without the module name).
        """
        return weight

    def tensors(self, ad) -> dict[str, torch.Tensor]:
        """Extra tensors saved with the adapter, by PEFT key suffix (e.g. DoRA's magnitude)."""
        return {}

    def suffixes(self) -> tuple[str, ...]:
        """Every key suffix ``tensors`` may use (to split a file's keys into modules)."""
        return ()

    def forward(self, layer, ad, x, *args, **kwargs):
        raise NotImplementedError(f"{self.name} has no forward of its own")

    def merge(self, layer, name: str, safe: bool = False) -> None:
        layer.merge_plain(name, safe)

    def unmerge(self, layer, name: str) -> None:
        layer.unmerge_plain(name)
