"""The adapter module and the layer-kind protocol that every wrapper class implements.

One adapter = one small module (`LoraAdapter`: A, B, scaling, dropout) kept in the wrapper's
`adapters` ModuleDict, so `.to()`, `state_dict()`, `deepcopy` and EMA copies just work. The
wrapper keeps the original module as `base_layer` untouched, which is what makes merging,
unloading back to the original module, and quantized bases straightforward.

`LoraLayer` is the protocol of a layer kind. What other code used to switch on a kind string
for, a kind declares here, with a default that fits the plain ``W + s B A`` layout:

=====================  ===================================================================
``handles``            which modules this kind wraps (the table in `lorafit.layers.kinds`)
``all_linear``         whether ``target_modules="all-linear"`` picks it
``owns_children``      targets naming a child module adapt this module instead (MHA)
``skip_reason``        why a matched module is left alone (depthwise convs)
``make_adapter``       the adapter's tensor shapes; ``init_adapter`` its PEFT initialisation
``peft_parts``         the PEFT key suffixes of each (sub)adapter: save, load, hot-swap
``form_from_file``     the adapter form a file's tensors imply (conv: PEFT's or grouped A)
``delta_weight``       ``s B A`` in the base weight's layout; ``merge_blocker`` why it cannot merge
``merge_adapter``      W += delta (and back); ``unloaded`` the plain module after merging
``build_stacks`` /     mixed-adapter batches (`lorafit.adapter_batch`); ``share_stacks`` makes
``batched_delta``      the adapters views of the stacks (``share_weights``: one copy)
``dora_*``             the DoRA weight layout and forward (unsupported unless defined)
``dense_weight``       the base weight as fp32 [out, in] for PiSSA / OLoRA (None: unsupported)
=====================  ===================================================================
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .batched import batch_rows, cached_stacks

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
        groups: blocks of the update (a grouped conv's groups; 1 otherwise): A's rows and B's
            columns split into ``groups`` equal parts, block j's update is ``B_j A_j``.
        a_groups: groups of the A conv (convs: 1 = PEFT's form, ``groups`` = lorafit's).
        variant: None for plain LoRA; else a `lorafit.variants.Variant` (DoRA, hot-swap) whose
            ``forward`` / ``merge`` / ``unmerge`` the wrapper delegates to (one branch per call).
        pending_base: PiSSA / OLoRA: the residual base weight, written by `LoraLayer.attach`
            when the injection commits (None otherwise).
        init_A, init_B: PiSSA / OLoRA's initial factors (None otherwise; see `lorafit.variants.init`).
        dora_cache, dora_merged_norm: DoRA's cached norms (see `lorafit.variants.dora`).
    Sub-adapters (MHA's out-proj update) are child `LoraAdapter` modules; `parts()` lists them.
    """

    variant = None  # class default: plain LoRA pays one attribute read, nothing else

    def __init__(self, a_shape, b_shape, r: int, alpha: float, use_rslora: bool, dropout: float,
                 dtype: torch.dtype, device, groups: int = 1, a_groups: int = 1):
        super().__init__()
        self.r, self.alpha, self.dropout = int(r), float(alpha), float(dropout)
        self.groups, self.a_groups = int(groups), int(a_groups)
        self.use_rslora = bool(use_rslora)
        self.scaling = self.alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_A = nn.Parameter(torch.zeros(a_shape, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, dtype=dtype, device=device))
        self.pending_base: torch.Tensor | None = None
        # PiSSA / OLoRA keep their initial factors (to convert to plain LoRA); buffers, so .to() moves them
        self.register_buffer("init_A", None, persistent=False)
        self.register_buffer("init_B", None, persistent=False)
        self.dora_cache: dict = {}
        self.dora_merged_norm: torch.Tensor | None = None

    def parts(self) -> list[LoraAdapter]:
        """This adapter and its sub-adapters (each one ``B A`` pair), in a fixed order."""
        return [self, *(m for m in self.children() if isinstance(m, LoraAdapter))]

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={float(self.scaling):g}, dropout={self.dropout}"


def check_shareable(live) -> None:
    """Several live adapters on one layer: refuse variants that must be alone (DoRA rescales the base)."""
    for ad in live:
        if ad.variant is not None and ad.variant.exclusive:
            raise ValueError(f"a {ad.variant.name} adapter cannot be active together with other adapters "
                             "on one layer")


class LoraLayer(nn.Module):
    """Base class of the wrappers: holds `base_layer`, `adapters` and the activation state.

    The active set is cached as a tuple of live (active and not merged) adapter modules so
    the forward pass does no dict look-ups and no filtering.
    """

    all_linear = False  # picked by target_modules="all-linear"
    owns_children = False  # a target naming a child adapts this module (its forward reads the child's weight)
    KEY_A, KEY_B = "lora_A.weight", "lora_B.weight"  # PEFT's key suffixes of the (main) adapter
    fan_in_fan_out = False  # the base weight is stored [in, out] (transformers Conv1D)
    zero_factor = "B"  # the factor that init_adapter zeroes so the update starts at 0 ("A" for embeddings)
    param_group: str | None = None  # LoRA+ (`lorafit.optim`): a separate learning-rate group for this kind
    scaling_in_op = False  # the forward passes ``scaling`` as a Python float (hot-swap needs a variant)

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.merged: list[str] = []
        self.disabled = False
        self.merge_error: float | None = None  # quantized bases: the error the last merge added
        self._live: tuple[LoraAdapter, ...] = ()
        self._batch = None  # set by adapter_batch: {"names": (...), "rows": LongTensor [N]}
        self.stack_cache: dict = {}  # adapter_batch's stacked weights (see `lorafit.layers.batched`)

    def __getattr__(self, name: str):
        # Model code often reads attributes of the layer it calls (`layer.weight.dtype`,
        # `conv.stride`, `linear.out_features`); answer them from the base layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer" or "base_layer" not in self._modules:
                raise
            return getattr(self._modules["base_layer"], name)

    # -------------------------------------------------------------- the kind's declarations
    @classmethod
    def handles(cls, module: nn.Module) -> bool:
        """Does this kind wrap ``module``?"""
        raise NotImplementedError

    @classmethod
    def skip_reason(cls, module: nn.Module) -> str | None:
        """Why a module that matched the targets is left alone (logged), or None."""
        return None

    @classmethod
    def form_from_file(cls, base: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> dict:
        """Extra `make_adapter` arguments implied by a file's tensors {suffix: tensor} (default none).

        Raises:
            ValueError: the tensors fit no form of this layer (the message starts with ``where``).
        """
        return {}

    @classmethod
    def peft_suffixes(cls) -> tuple[str, ...]:
        """Every key suffix this kind may write (used to split a file's keys into modules)."""
        return (cls.KEY_A, cls.KEY_B)

    def check_config(self, config, name: str) -> None:
        """Warn or refuse when a config field does not fit this layer (default: nothing to check)."""

    def make_adapter(self, name: str, r: int, alpha: float, use_rslora: bool, dropout: float,
                     **form) -> LoraAdapter:
        raise NotImplementedError

    def init_adapter(self, ad: LoraAdapter, init) -> None:
        """PEFT's initialisation: A kaiming-uniform, B zero (the update starts at zero); with
        ``init=False`` B is random too (a non-identity adapter, for tests)."""
        with torch.no_grad():
            for part in reversed(ad.parts()):  # sub-adapters first: the RNG order of earlier releases
                nn.init.kaiming_uniform_(part.lora_A, a=math.sqrt(5))
                if init is False:
                    nn.init.kaiming_uniform_(part.lora_B, a=math.sqrt(5))
                else:
                    nn.init.zeros_(part.lora_B)

    def peft_parts(self, ad: LoraAdapter) -> list[tuple[LoraAdapter, str, str]]:
        """(part, key suffix of A, key suffix of B) for each ``B A`` pair of the adapter."""
        return [(ad, self.KEY_A, self.KEY_B)]

    def delta_weight(self, adapter: LoraAdapter) -> torch.Tensor:
        """The update in the base weight's layout and dtype (computed in fp32)."""
        raise NotImplementedError

    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def fingerprint_weight(self) -> torch.Tensor | None:
        """The weight the adapter was trained against (adapter files record a hash of it)."""
        return self.base_weight()

    def dense_weight(self) -> torch.Tensor | None:
        """The base weight as an fp32 [out, in] copy (PiSSA / OLoRA), or None when it has no such form."""
        return None

    def from_dense(self, weight: torch.Tensor) -> torch.Tensor:
        """Inverse of `dense_weight`: [out, in] back in the base weight's layout and dtype."""
        raise NotImplementedError

    def merge_blocker(self, ad: LoraAdapter) -> str | None:
        """Why this adapter cannot be merged into this layer's weight, or None."""
        return None

    def peft_incompatibility(self, ad: LoraAdapter) -> str | None:
        """Why PEFT could not load this adapter's tensors for this layer (save warns), or None."""
        return None

    # -------------------------------------------------------------- mixed-adapter batches
    def build_stacks(self, adapters: list[LoraAdapter | None], dtype, device):
        """Stack the batch's adapters (None = absent here) once: a zero slot for base rows, the scales as a vector."""
        raise ValueError(f"adapter_batch is not supported for {type(self.base_layer).__name__} layers")

    def share_stacks(self, adapters: list[LoraAdapter | None], stacks) -> None:
        """``share_weights``: make the adapters' A and B views of their slots in ``stacks`` (default: keep copies)."""

    def batched_delta(self, y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, stacks, *inputs) -> torch.Tensor:
        """y += per-row update, row i using stacked adapter rows[i] (slot n = base only).

        ``inputs`` are further forward inputs of kinds that take several (`batched` passes them on).
        """
        raise NotImplementedError

    def batched(self, y: torch.Tensor, x: torch.Tensor, *inputs) -> torch.Tensor:
        """The forward inside `adapter_batch`: ``y = base(x, ...)`` plus each row's own adapter."""
        rows = batch_rows(self, x.shape[0])
        stacks = cached_stacks(self, y.dtype, y.device)
        return y if stacks is None else self.batched_delta(y, x, rows, stacks, *inputs)

    # -------------------------------------------------------------- DoRA (lorafit.variants.dora)
    def dora_layout(self, ad: LoraAdapter, weight: torch.Tensor):
        """(W [g, out/g, K], A [g, r/g, K], B [g, out/g, r/g]) views; DoRA norms are rows of W + s B A."""
        raise ValueError(f"DoRA is not supported on {type(self.base_layer).__name__} layers")

    def dora_factor_view(self) -> tuple:
        """Shape that broadcasts DoRA's per-output factor [out] over the base weight's layout."""
        raise NotImplementedError

    def dora_magnitude_shape(self) -> tuple:
        """PEFT's shape of ``lora_magnitude_vector``."""
        return (self.out_features,)

    def dora_forward(self, ad: LoraAdapter, factor: torch.Tensor, x: torch.Tensor, *args, **kwargs):
        """``factor * (W x + s B A x) + bias`` with factor = m / ||W + s B A|| [out]."""
        raise NotImplementedError

    # -------------------------------------------------------------- state management
    def _refresh(self) -> None:
        self._live = tuple(self.adapters[n] for n in self.active if n in self.adapters and n not in self.merged)

    def set_active(self, names) -> None:
        self.active = tuple(n for n in names if n in self.adapters)
        self._refresh()

    def attach(self, name: str, adapter: LoraAdapter) -> None:
        self.adapters[name] = adapter
        if adapter.pending_base is not None:  # PiSSA/OLoRA residual, applied on commit only
            with torch.no_grad():
                self.base_weight().copy_(adapter.pending_base)
            adapter.pending_base = None
        self._refresh()

    def detach(self, name: str) -> None:
        if name in self.merged:
            self.unmerge_adapter(name)
        del self.adapters[name]
        self.active = tuple(n for n in self.active if n != name)
        self._refresh()

    # -------------------------------------------------------------- merge
    def merge_adapter(self, name: str, safe: bool = False) -> None:
        """W += delta in place (a variant may do its own); with safe=True checked for inf/NaN first."""
        if name in self.merged:
            return
        ad = self.adapters[name]
        if ad.variant is not None:
            ad.variant.merge(self, name, safe)
        else:
            self.merge_plain(name, safe)
        self.merged.append(name)
        self._refresh()

    def unmerge_adapter(self, name: str) -> None:
        if name not in self.merged:
            return
        ad = self.adapters[name]
        if ad.variant is not None:
            ad.variant.unmerge(self, name)
        else:
            self.unmerge_plain(name)
        self.merged.remove(name)
        self._refresh()

    def merge_plain(self, name: str, safe: bool = False) -> None:
        """W += s B A, computed in fp32 and written back in the weight's dtype."""
        weight = self.base_weight()
        with torch.no_grad():
            new = weight.float() + self.delta_weight(self.adapters[name]).float()
            if safe and not torch.isfinite(new).all():
                raise ValueError(f"merging adapter {name!r} gives non-finite weights")
            weight.copy_(new.to(weight.dtype))

    def unmerge_plain(self, name: str) -> None:
        weight = self.base_weight()
        with torch.no_grad():
            weight.copy_((weight.float() - self.delta_weight(self.adapters[name]).float()).to(weight.dtype))

    def unloaded(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The plain module that replaces this wrapper in `merge_and_unload`: live adapters merged."""
        for n in [n for n in self.active if n in self.adapters and n not in self.merged]:
            self.merge_adapter(n)
        return self.base_layer

    def _cat_live(self):
        """Stack the live adapters into one (A [R, ...], B [..., R] pre-scaled) pair.

        Used when several adapters are active at once: one GEMM pair instead of a Python
        loop of small ones. The cat is over r x d weights, never over activations.
        """
        live = self._live
        a = torch.cat([ad.lora_A for ad in live], 0)
        b = torch.cat([ad.lora_B * ad.scaling for ad in live], 1)
        return a, b

    def _base_only(self, *args, **kwargs):
        if self.disabled and self.merged:
            raise RuntimeError("adapters are merged into this layer; unmerge before disabling them")
        return self.base_layer(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"active={list(self.active)}, merged={self.merged}"
