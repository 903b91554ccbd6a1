"""The metadata of an exported GGUF: carried over from a GGUF base, or built from a transformers directory.

A GGUF file is self-describing: besides the tensors it holds key/value metadata that llama.cpp
needs to run the model (``llama.block_count``, ``llama.attention.head_count_kv``, ``rope``
settings ...) and the tokenizer (``tokenizer.ggml.tokens`` / ``merges`` / special ids,
``tokenizer.chat_template``). Merging LoRA changes none of it, so:

- a base that came from a GGUF file (``--model smollm2`` / ``FILE.gguf``) gives all its keys to
  the export unchanged (read with ``gguf.GGUFReader``), except what does change: the file type
  (the tensor encoding), the quantization version and the name;
- a transformers directory gives them the way llama.cpp's ``convert_hf_to_gguf.py`` does for a
  Llama with a byte-level BPE vocabulary (tokenizer model ``"gpt2"``): hyperparameters from
  ``config.json``, the token list and types from the tokenizer, merges / special ids / chat
  template through ``gguf.SpecialVocab``. Other vocabularies (SentencePiece) are refused.

Only Llama is written (``ARCHS``); :func:`check_architecture` refuses the rest with one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorafit.common.errors import LorafitError

ARCHS = {"llama": "llama"}  # transformers model_type -> llama.cpp architecture
QUANTS = ("f16", "q8_0", "q4_0", "q4_1")
# keys a GGUF base cannot pass on as they are (the writer sets the architecture itself)
REPLACED = ("general.architecture", "general.file_type", "general.quantization_version", "general.name")


def check_architecture(model_type: str | None, where: str, config=None) -> str:
    """The llama.cpp architecture for a transformers ``model_type`` (or a GGUF's own name), else one line.

    ``config`` (when given) is checked too: RoPE scaling is not written, so a model with any is refused.
    """
    if model_type not in ARCHS:
        cls = (getattr(config, "architectures", None) or [None])[0]
        named = f" ({cls})" if cls else ""
        raise LorafitError(f"{where}: architecture {model_type!r}{named} cannot be exported to GGUF; "
                           f"supported: {', '.join(ARCHS)}")
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else "default"
    if kind not in ("default", None):
        raise LorafitError(f"{where}: rope_scaling {kind!r} is not written by the GGUF export (only plain RoPE)")
    return ARCHS[model_type]


def file_type(quant: str) -> int:
    """``general.file_type`` for ``quant`` (llama.cpp's ``LlamaFileType``: "mostly" that type, norms F32)."""
    import gguf  # lazy: optional extra lorafit[gguf]

    return {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[quant]


def copy_gguf_metadata(writer, reader, path: Path, quant: str, name_suffix: str) -> dict[str, Any]:
    """Copy every key of the GGUF ``reader`` (of ``path``) into ``writer`` but ``REPLACED``; set those anew.

    Returns:
        what the report says about it: the keys copied, the name written.
    """
    import gguf  # lazy: optional extra lorafit[gguf]

    copied = 0
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in REPLACED:
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY and len(field.types) > 2:
            raise LorafitError(f"{path}: metadata key {field.name} is a nested array, which the export cannot copy")
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
        copied += 1
    old = reader.fields.get("general.name")
    name = f"{old.contents() if old is not None else path.stem} {name_suffix}"
    writer.add_name(name)
    writer.add_file_type(file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return {"metadata": f"carried over from {path.name} ({copied} keys)", "name": name,
            "tokenizer": "carried over (the base GGUF's)"}


def _pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's ``tokenizer.ggml.pre``: "gpt2" for a plain byte-level split, else "default".

    llama.cpp names the splitting regex in this key. A plain ``ByteLevel`` pre-tokenizer (with
    its regex) is exactly GPT-2's split; other splits (``Sequence`` of ``Split`` + ``ByteLevel``)
    are recognised by llama.cpp's converter through a table of hashes that this export does
    not carry, so it writes "default" and the report says so.
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2"
    return "default"


def add_transformers_metadata(writer, directory: Path, config, tokenizer, quant: str, name: str) -> dict[str, Any]:
    """Hyperparameters from ``config`` and a "gpt2" (byte-level BPE) vocabulary from ``directory``.

    Raises:
        LorafitError: no ``tokenizer.json``, or a vocabulary that is not byte-level BPE.
    """
    import gguf  # lazy: optional extra lorafit[gguf]

    tj_path = directory / "tokenizer.json"
    if not tj_path.is_file():
        raise LorafitError(f"{directory}: no tokenizer.json (the GGUF export needs a fast BPE tokenizer)")
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    model_type = (tj.get("model") or {}).get("type")
    byte_level = "ByteLevel" in json.dumps(tj.get("pre_tokenizer"))
    if model_type != "BPE" or not byte_level:
        raise LorafitError(f"{tj_path}: a {model_type} tokenizer without byte-level BPE; the GGUF export writes "
                           "byte-level BPE vocabularies only (llama.cpp tokenizer model 'gpt2')")
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    theta = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    pre = _pre_tokenizer(tj)
    tokens, types = _vocab(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=config.vocab_size)
    special.add_to_gguf(writer, quiet=True)
    probe = tokenizer("a")["input_ids"]  # does the tokenizer add BOS / EOS? (llama.cpp must do the same)
    for kind, at, tid in (("bos", 0, tokenizer.bos_token_id), ("eos", -1, tokenizer.eos_token_id)):
        if kind not in special.add_special_token:
            getattr(writer, f"add_add_{kind}_token")(tid is not None and bool(probe) and probe[at] == tid)
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
    note = "" if pre == "gpt2" else " (pre-tokenizer not recognised: llama.cpp splits text its default way)"
    return {"metadata": f"built from {directory / 'config.json'}", "name": name,
            "tokenizer": f"byte-level BPE from {tj_path.name}, {len(special.merges)} merges, pre {pre!r}{note}"}


def _vocab(tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types for ids ``0 .. n_vocab - 1`` (missing ids: unused pads).

    Types as ``convert_hf_to_gguf.py`` sets them: added special tokens CONTROL, other added tokens
    USER_DEFINED, the BPE vocabulary NORMAL.
    """
    import gguf  # lazy: optional extra lorafit[gguf]

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    if len(by_id) > n_vocab:
        raise LorafitError(f"the tokenizer has {len(by_id)} tokens, more than the model's vocab_size {n_vocab}")
    return tokens, types
