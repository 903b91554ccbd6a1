"""lorafit: LoRA adapters for any PyTorch model - PEFT-compatible, fast by design.

Quick start::

    import lorafit
    model = lorafit.inject(model, lorafit.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    ...train...
    lorafit.save_adapter(model, "my-adapter")          # PEFT's format
    model = lorafit.merge_and_unload(model)            # plain modules, zero-cost inference

Only torch and safetensors are imported here; everything else is imported lazily.
"""

from ._version import __version__

from .adapters import (
    active_adapters,
    adapter_batch,
    adapter_names,
    delete_adapter,
    disabled,
    set_adapter,
    trainable_parameters,
)
from .config import LoraConfig
# imported eagerly (torch only): the function `hotswap` must shadow the submodule of the same name
from .hotswap import hotswap, prepare_hotswap
from .inject import inject
from .io import load_adapter, read_adapter_config, save_adapter
from .merge import merge, merge_and_unload, merge_state_dict, unload, unmerge

__all__ = [
    "LoraConfig", "inject", "trainable_parameters", "set_adapter", "delete_adapter", "disabled", "adapter_batch",
    "adapter_names", "active_adapters", "merge", "unmerge", "merge_and_unload", "unload", "merge_state_dict",
    "save_adapter", "load_adapter", "read_adapter_config", "__version__",
    "combine_adapters", "prepare_hotswap", "hotswap",
]


def __getattr__(name):
    # optional parts, imported on first use so `import lorafit` needs only torch + safetensors
    if name in ("quantize", "save_quantized", "load_quantized"):
        from . import quant
        return getattr(quant, name)
    if name == "optim":
        from . import optim
        return optim
    if name == "combine_adapters":
        from .algebra import combine_adapters
        return combine_adapters
    raise AttributeError(f"module 'lorafit' has no attribute {name!r}")
