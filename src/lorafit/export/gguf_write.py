"""The tensors of a merged Llama as llama.cpp stores them: names, Q/K row order, encodings.

Three things differ from the transformers state dict:

- **names**: ``model.layers.3.self_attn.q_proj.weight`` is ``blk.3.attn_q.weight`` and so on,
  from the ``gguf`` package's own table (``gguf.get_tensor_name_map``), never a hand-kept list;
- **Q/K rows**: llama.cpp applies RoPE to *adjacent* pairs of a head's dimensions, transformers
  to its two *halves*; llama.cpp's converter therefore reorders the rows of ``q_proj`` / ``k_proj``
  within each head, ``[h, 2, d/2, in] -> [h, d/2, 2, in]`` (:func:`llama_permute`), and
  transformers' GGUF loader undoes exactly that when it reads the file. ``k_proj`` has
  ``num_key_value_heads`` heads;
- **encodings**: 1-D tensors (the RMSNorm weights) stay F32, as llama.cpp wants them; matrices
  become F16, or Q8_0 / Q4_0 / Q4_1 blocks of 32 values along a row (``gguf.quants.quantize``).
  A matrix whose rows are not a multiple of 32 cannot be block-quantized and is written F16;
  under q4_0 / q4_1 the output layer (``output.weight``, or ``token_embd.weight`` when the two are
  tied) is written Q8_0, as llama.cpp's own quantizer keeps the output layer at a higher precision.
  (q4_1 has a per-block minimum: a base that came as Q4_1, like SmolLM2's, keeps its 4-bit grid
  nearly as it was, where q4_0 rounds it a second time onto another grid.)
  Every such exception is listed in the report.

Tied embeddings: when ``lm_head.weight`` is ``embed_tokens.weight`` there is no
``output.weight`` (llama.cpp and transformers both read its absence as "tied").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

import numpy as np
import torch.nn as nn

from lorafit.common.errors import LorafitError

BLOCK = 32  # values per Q8_0 / Q4_0 block, along a row


@dataclass
class TensorSummary:
    """What was written: ``counts`` per GGML type, ``exceptions`` ("name: type (why)"), ``tied``."""

    counts: dict[str, int] = field(default_factory=dict)
    exceptions: list[str] = field(default_factory=list)
    tied: bool = False


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a Q or K projection ``[n_head * d, ...]`` from transformers' RoPE order to llama.cpp's.

    Within each head, row ``j`` of the first half and row ``j`` of the second half become rows
    ``2j`` and ``2j + 1`` (``[h, 2, d/2, ...] -> [h, d/2, 2, ...]``). ``n_head`` is the number of
    heads of this projection (``num_key_value_heads`` for K). Works on a LoRA ``B`` too, whose
    rows are the update's rows.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise LorafitError(f"cannot reorder {rows} rows into {n_head} RoPE heads (not a multiple of {2 * n_head})")
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_name_map(config):
    """The ``gguf`` package's transformers -> GGUF tensor name table for this Llama."""
    import gguf  # lazy: optional extra lorafit[gguf]

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)


def gguf_name(name_map, hf_name: str) -> str | None:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight`` (None: no GGUF tensor)."""
    return name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def rope_heads(gguf_tensor: str, config) -> int | None:
    """How many RoPE heads the rows of this GGUF tensor hold (None: not a Q / K projection)."""
    if ".attn_q." in gguf_tensor:
        return config.num_attention_heads
    if ".attn_k." in gguf_tensor:
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def _is_tied(model: nn.Module) -> bool:
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and emb is not None and out.weight is emb.weight


def _encode(name: str, data: np.ndarray, quant: str, is_output: bool, summary: TensorSummary):
    """(array, raw GGML type or None) for one tensor; records any exception to the plan."""
    import gguf  # lazy: optional extra lorafit[gguf]

    q = gguf.GGMLQuantizationType
    if data.ndim == 1:
        kind = "F32"
    elif quant == "f16":
        kind = "F16"
    elif data.shape[-1] % BLOCK:
        kind = "F16"
        summary.exceptions.append(f"{name}: F16 (rows of {data.shape[-1]} values, not a multiple of {BLOCK})")
    elif quant in ("q4_0", "q4_1") and is_output:
        kind = "Q8_0"
        summary.exceptions.append(f"{name}: Q8_0 (the output layer, kept at higher precision as llama.cpp does)")
    else:
        kind = quant.upper()
    summary.counts[kind] = summary.counts.get(kind, 0) + 1
    if kind == "F32":
        return data.astype(np.float32), None
    if kind == "F16":
        return data.astype(np.float16), None
    qtype = getattr(q, kind)
    return gguf.quants.quantize(data.astype(np.float32), qtype), qtype


def add_model_tensors(writer, model: nn.Module, config, quant: str) -> TensorSummary:
    """Add every parameter of the merged Llama ``model`` to ``writer`` under its GGUF name.

    Raises:
        LorafitError: a parameter with no GGUF name (the model is not a plain Llama).
    """
    name_map = tensor_name_map(config)
    summary = TensorSummary(tied=_is_tied(model))
    out_name = "token_embd.weight" if summary.tied else "output.weight"
    for hf_name, tensor in model.state_dict(keep_vars=False).items():
        if summary.tied and hf_name == "lm_head.weight":
            continue
        name = gguf_name(name_map, hf_name)
        if name is None:
            raise LorafitError(f"{hf_name}: this parameter has no llama.cpp tensor name; the model is not a plain "
                               "Llama")
        data = tensor.detach().float().cpu().numpy()
        heads = rope_heads(name, config)
        if heads is not None:
            data = llama_permute(data, heads)
        array, raw = _encode(name, data, quant, name == out_name, summary)
        writer.add_tensor(name, array, raw_dtype=raw)
    return summary


def write_gguf(path: Path, arch: str, add_metadata: Callable, add_tensors: Callable) -> None:
    """Write one GGUF file: ``add_metadata(writer)`` then ``add_tensors(writer)``, then the file in one go."""
    import gguf  # lazy: optional extra lorafit[gguf]

    writer = gguf.GGUFWriter(str(path), arch)
    try:
        add_metadata(writer)
        add_tensors(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
