"""Quantized frozen bases for QLoRA: NF4 (4-bit, blockwise absmax) and int8 (per-channel).

    import lorafit.quant as lq
    model = lq.quantize(model, "nf4")            # every Linear but the output layer
    lorafit.inject(model, lorafit.LoraConfig(r=16, alpha=32))
    ...train...
    lq.save_quantized(model, "base.nf4.safetensors")   # base only; adapters via save_adapter
    model = lq.load_quantized(Model(config), "base.nf4.safetensors")

See README.md in this folder for the format, the backends and why no extra dependency.
"""

from .api import OUTPUT_LAYER_NAMES, quantize, quantized_modules, select_targets, weight_bytes
from .formats import NF4_CODE, NF4_MAX_HALF_GAP
from .io import load_quantized, read_quantized_config, save_quantized
from .layers import Int8Linear, NF4Linear, QuantizedLinear, nf4_backend
from .stream import checkpoint_files, empty_weights, load_streamed

__all__ = [
    "NF4_CODE",
    "checkpoint_files",
    "empty_weights",
    "load_streamed",
    "NF4_MAX_HALF_GAP",
    "OUTPUT_LAYER_NAMES",
    "Int8Linear",
    "NF4Linear",
    "QuantizedLinear",
    "load_quantized",
    "nf4_backend",
    "quantize",
    "quantized_modules",
    "read_quantized_config",
    "save_quantized",
    "select_targets",
    "weight_bytes",
]
