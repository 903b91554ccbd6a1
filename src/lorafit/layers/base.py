"""The adapter module and the wrapper base class shared by every layer kind.

One adapter = one small module (`LoraAdapter`: A, B, scaling, dropout) kept in the wrapper's
`adapters` ModuleDict, so `.to()`, `state_dict()`, `deepcopy` and EMA copies just work. The
wrapper keeps the original module as `base_layer` untouched, which is what makes merging,
unloading back to the original module, and quantized bases straightforward.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn

MASTER_DTYPES = (torch.float32, torch.float64)


def master_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """fp32 master weights for low-precision bases (small AdamW updates survive), else the base's."""
    return base_dtype if base_dtype in MASTER_DTYPES else torch.float32


class LoraAdapter(nn.Module):
    """A low-rank update ``delta = scaling * B @ A`` for one layer.

    Attributes:
        lora_A: [r, fan_in, *kernel] for linear/conv (conv: fan_in = in_channels / a_groups),
            [r, num_embeddings] for embeddings (PEFT's layout).
        lora_B: [out, r] for linear, [out, r / groups, 1, ...] for conv, [dim, r] for embeddings.
        r, alpha, scaling: rank, alpha and the folded scale (alpha / r or alpha / sqrt(r)).
        dropout: probability on the adapter input (0 = no copy at all).
        kind: "linear", "conv", "embedding", "mha_in" or "mha_out".
        a_groups: conv only; groups of the A conv (1 = PEFT's form, base groups = ours).
        variant: None for plain LoRA; else an object from `lorafit.variants` (DoRA, hot-swap)
            whose `forward` / `merge` / `unmerge` the wrapper delegates to (one branch per call).
    """

    variant = None  # class default: plain LoRA pays one attribute read, nothing else

    def __init__(self, kind: str, a_shape, b_shape, r: int, alpha: float, use_rslora: bool, dropout: float,
                 dtype: torch.dtype, device, a_groups: int = 1):
        super().__init__()
        self.kind, self.r, self.alpha, self.dropout = kind, int(r), float(alpha), float(dropout)
        self.a_groups = a_groups
        self.use_rslora = bool(use_rslora)
        self.scaling = self.alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_A = nn.Parameter(torch.zeros(a_shape, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, dtype=dtype, device=device))

    def reset(self, init) -> None:
        """Initialise as PEFT does: update starts at zero (B = 0; for embeddings A = 0)."""
        for sub in self.children():  # MHA: the out-proj update
            sub.reset(init)
        with torch.no_grad():
            if self.kind == "embedding":
                nn.init.zeros_(self.lora_A)
                nn.init.normal_(self.lora_B)
                if init is False:
                    nn.init.normal_(self.lora_A)
                return
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            if init is False:
                nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
            else:
                nn.init.zeros_(self.lora_B)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}"


def check_shareable(live) -> None:
    """Several live adapters on one layer: refuse variants that must be alone (DoRA rescales the base)."""
    for ad in live:
        if getattr(ad.variant, "exclusive", False):
            raise ValueError(f"a {ad.variant.name} adapter cannot be active together with other adapters "
                             "on one layer")


class LoraLayer(nn.Module):
    """Base class of the wrappers: holds `base_layer`, `adapters` and the activation state.

    The active set is cached as a tuple of live (active and not merged) adapter modules so
    the forward pass does no dict look-ups and no filtering.
    """

    adapter_kind = "linear"

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.merged: list[str] = []
        self.disabled = False
        self._live: tuple[LoraAdapter, ...] = ()
        self._batch = None  # set by adapter_batch: (row index tensor [N], stacked weights cache)

    def __getattr__(self, name: str):
        # Model code often reads attributes of the layer it calls (`layer.weight.dtype`,
        # `conv.stride`, `linear.out_features`); answer them from the base layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer" or "base_layer" not in self._modules:
                raise
            return getattr(self._modules["base_layer"], name)

    # -------------------------------------------------------------- state management
    def _refresh(self) -> None:
        self._live = tuple(self.adapters[n] for n in self.active if n in self.adapters and n not in self.merged)

    def set_active(self, names) -> None:
        self.active = tuple(n for n in names if n in self.adapters)
        self._refresh()

    def attach(self, name: str, adapter: LoraAdapter) -> None:
        self.adapters[name] = adapter
        pending = adapter.__dict__.pop("pending_base", None)  # PiSSA/OLoRA residual, applied on commit only
        if pending is not None:
            with torch.no_grad():
                self.base_weight().copy_(pending)
        self._refresh()

    def detach(self, name: str) -> None:
        if name in self.merged:
            self.unmerge_adapter(name)
        del self.adapters[name]
        self.active = tuple(n for n in self.active if n != name)
        self._refresh()

    # -------------------------------------------------------------- to implement
    def make_adapter(self, name: str, r: int, alpha: float, use_rslora: bool, dropout: float,
                     a_groups: int | None = None) -> LoraAdapter:
        raise NotImplementedError

    def delta_weight(self, adapter: LoraAdapter) -> torch.Tensor:
        """The update in the base weight's layout and dtype (computed in fp32)."""
        raise NotImplementedError

    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def merge_adapter(self, name: str, safe: bool = False) -> None:
        """W += delta in place; with safe=True the result is checked for inf/NaN first."""
        if name in self.merged:
            return
        if getattr(self.adapters[name].variant, "merge", None) is not None:  # DoRA: W' = m / ||W + dW|| (W + dW)
            return self.adapters[name].variant.merge(self, name, safe)
        delta = self.delta_weight(self.adapters[name])
        if getattr(self.base_layer, "lorafit_quantized", False):
            # re-quantizing loses precision: report the error it added (merge_and_unload avoids this)
            self.merge_error = float(self.base_layer.merge_delta_(delta))
            logging.getLogger("lorafit").info("merged %r into a quantized base: max abs error added %.3g",
                                              name, self.merge_error)
        else:
            weight = self.base_weight()
            with torch.no_grad():
                new = weight.float() + delta.float()
                if safe and not torch.isfinite(new).all():
                    raise ValueError(f"merging adapter {name!r} gives non-finite weights")
                weight.copy_(new.to(weight.dtype))
        self.merged.append(name)
        self._refresh()

    def unmerge_adapter(self, name: str) -> None:
        if name not in self.merged:
            return
        if getattr(self.adapters[name].variant, "unmerge", None) is not None:
            return self.adapters[name].variant.unmerge(self, name)
        delta = self.delta_weight(self.adapters[name])
        if getattr(self.base_layer, "lorafit_quantized", False):
            self.base_layer.merge_delta_(-delta)
        else:
            with torch.no_grad():
                weight = self.base_weight()
                weight.copy_((weight.float() - delta.float()).to(weight.dtype))
        self.merged.remove(name)
        self._refresh()

    def _cat_live(self):
        """Stack the live adapters into one (A [R, ...], B [..., R] pre-scaled) pair.

        Used when several adapters are active at once: one GEMM pair instead of a Python
        loop of small ones. The cat is over r x d weights, never over activations.
        """
        live = self._live
        a = torch.cat([ad.lora_A for ad in live], 0)
        b = torch.cat([ad.lora_B * ad.scaling for ad in live], 1)
        return a, b

    def extra_repr(self) -> str:
        return f"active={list(self.active)}, merged={self.merged}"
