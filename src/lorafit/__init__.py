"""lorafit: LoRA adapters for any PyTorch model - PEFT-compatible, fast by design.

Quick start::

    import lorafit
    model = lorafit.inject(model, lorafit.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    ...train...
    lorafit.save_adapter(model, "my-adapter")          # PEFT's format
    model = lorafit.merge_and_unload(model)            # plain modules, zero-cost inference

Only torch and safetensors are imported here (the heavy optional parts - triton, ultralytics,
transformers - load where they are used).
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
from . import optim, quant
from .algebra import combine_adapters
from .config import LoraConfig
# imported eagerly (torch only): the function `hotswap` must shadow the submodule of the same name
from .hotswap import hotswap, prepare_hotswap
from .inject import inject
from .io import load_adapter, read_adapter_config, reload_adapter, save_adapter
from .peft_format import infer_task_type, print_trainable_parameters
from .merge import merge, merge_and_unload, merge_state_dict, unload, unmerge
from .quant import load_quantized, quantize, save_quantized

__all__ = [
    "LoraConfig", "inject", "trainable_parameters", "set_adapter", "delete_adapter", "disabled", "adapter_batch",
    "adapter_names", "active_adapters", "merge", "unmerge", "merge_and_unload", "unload", "merge_state_dict",
    "save_adapter", "load_adapter", "read_adapter_config", "reload_adapter", "print_trainable_parameters",
    "infer_task_type", "__version__",
    "combine_adapters", "prepare_hotswap", "hotswap", "quantize", "save_quantized", "load_quantized", "optim",
    "quant",
]
