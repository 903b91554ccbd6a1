"""PEFT's on-disk format below `lorafit.io`: reading a directory, the PEFT keys of a model's adapter,
and what PEFT keeps beside the LoRA tensors (task type, resized vocabularies, counts).

`lorafit.io` re-exports the readers (`resolve_dir`, `read_adapter_config`, `read_adapter_tensors`,
`read_safetensors_shapes`) and `adapter_state`; it saves and loads. `reload_adapter` copies a saved
adapter into the model's existing one (a trainer's resume). The model is duck typed
(``model.config``, ``get_input_embeddings``), so the core still imports neither transformers nor peft:

* `infer_task_type`: PEFT's ``task_type`` ("CAUSAL_LM", ...) from the model class name, else from
  ``config.architectures``. `AutoPeftModelForCausalLM` and friends refuse a file without it.
* `resized_embeddings`: the input / output embedding weights when their row count differs from the
  base's ``vocab_size`` (read from ``<base>/config.json`` like PEFT's ``save_embedding_layers="auto"``,
  else ``model.config.vocab_size``): after ``resize_token_embeddings`` the new rows are part of the
  trained model, so they must travel with the adapter, under PEFT's key names.
* `print_trainable_parameters`: PEFT's one-line summary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from .adapters import trainable_parameters
from .config import LoraConfig, check_adapter_name
from .layers import LoraLayer, ModulesToSave
from .tree import (adapter_configs, base_named_parameters, full_tensor, is_sharded, lora_layers, saved_modules,
                   walk)

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# class-name endings -> PEFT task type (first match wins; "...ForConditionalGeneration" is decided by
# config.is_encoder_decoder: T5 / BART are SEQ_2_SEQ_LM, a vision-language decoder is left unset)
_TASK_SUFFIXES = (
    ("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
)


def _task_from_name(name: str, encoder_decoder: bool) -> str | None:
    for suffix, task in _TASK_SUFFIXES:
        if name.endswith(suffix):
            return task
    if name.endswith("ForConditionalGeneration"):
        return "SEQ_2_SEQ_LM" if encoder_decoder else None
    return None


def infer_task_type(model: nn.Module) -> str | None:
    """PEFT's task type for a transformers-style model (None for anything else or when unsure).

    ``LlamaForCausalLM`` / ``GPT2LMHeadModel`` -> CAUSAL_LM, ``...ForSequenceClassification`` ->
    SEQ_CLS, ``...ForTokenClassification`` -> TOKEN_CLS, ``...ForQuestionAnswering`` -> QUESTION_ANS,
    an encoder-decoder ``...ForConditionalGeneration`` -> SEQ_2_SEQ_LM, a bare ``BertModel`` (a
    model with a transformers config and no head) -> FEATURE_EXTRACTION. Then ``config.architectures[0]``.
    """
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "model_type"):
        return None  # not a transformers model: no task type, as for a custom nn.Module in PEFT
    enc_dec = bool(getattr(cfg, "is_encoder_decoder", False))
    name = type(model).__name__
    task = _task_from_name(name, enc_dec)
    if task is None and name.endswith("Model") and "For" not in name and not name.endswith("HeadsModel"):
        return "FEATURE_EXTRACTION"
    if task is None:
        archs = getattr(cfg, "architectures", None) or []
        task = _task_from_name(str(archs[0]), enc_dec) if archs else None
    return task


def _embedding_modules(model: nn.Module) -> list[nn.Module]:
    """The input and output embedding modules (as the model holds them: maybe LoRA-wrapped), if it says."""
    out = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        if not callable(fn):
            continue
        try:
            mod = fn()
        except (NotImplementedError, AttributeError):  # transformers' default for models without one
            mod = None
        if isinstance(mod, nn.Module) and mod not in out:
            out.append(mod)
    return out


def embedding_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """{PEFT key (no prefix): weight [vocab, hidden]} of the input / output embeddings.

    A LoRA-wrapped embedding is keyed ``<name>.base_layer.weight`` as PEFT keys it; a `modules_to_save`
    one is left out (it travels with the adapter anyway). A tied output layer shares the input's weight.
    """
    wanted = _embedding_modules(model)
    out = {}
    for name, mod, _, _ in walk(model):
        if mod not in wanted or isinstance(mod, ModulesToSave):
            continue
        base = mod.base_layer if isinstance(mod, LoraLayer) else mod
        weight = getattr(base, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            out[f"{name}.base_layer.weight" if isinstance(mod, LoraLayer) else f"{name}.weight"] = weight
    return out


def _base_config_file(base: str) -> Path | None:
    """``config.json`` of the base: in a local directory, else in the Hugging Face hub cache (a Hub id
    like ``org/name`` that was downloaded before: ``$HF_HUB_CACHE`` or ``$HF_HOME/hub``, the revision
    ``refs/main`` points at, else any snapshot). Read as files: the core imports no hub library."""
    local = Path(base) / "config.json"
    if local.is_file():
        return local
    if base.count("/") != 1 or base.startswith((".", "/")):
        return None
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub")
    repo = Path(hub) / ("models--" + base.replace("/", "--"))
    ref = repo / "refs" / "main"
    try:
        if ref.is_file() and (repo / "snapshots" / ref.read_text().strip() / "config.json").is_file():
            return repo / "snapshots" / ref.read_text().strip() / "config.json"
    except OSError:
        return None
    return next(iter(sorted(repo.glob("snapshots/*/config.json"))), None)


def base_vocab_size(model: nn.Module, base_model_name_or_path: str | None) -> int | None:
    """The base model's vocabulary size: its own ``config.json`` (a local directory, or a Hub id found in
    the hub cache) as PEFT reads it, because ``resize_token_embeddings`` also updates
    ``model.config.vocab_size`` and only the base's file still has the old size; else
    ``model.config.vocab_size``; else None."""
    path = _base_config_file(base_model_name_or_path) if base_model_name_or_path else None
    if path is not None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        data = data if isinstance(data, dict) else {}
        size = data.get("vocab_size") or (data.get("text_config") or {}).get("vocab_size")
        if isinstance(size, int):
            return size
    cfg = getattr(model, "config", None)
    size = getattr(cfg, "vocab_size", None)
    if size is None and callable(getattr(cfg, "get_text_config", None)):
        size = getattr(cfg.get_text_config(), "vocab_size", None)
    return size if isinstance(size, int) else None


def resized_embeddings(model: nn.Module, base_model_name_or_path: str | None,
                       save_embedding_layers: bool | str = "auto") -> dict[str, torch.Tensor]:
    """{PEFT key: weight copy} of the embedding layers to save with the adapter (PEFT's semantics).

    ``"auto"``: those whose row count differs from `base_vocab_size` (a resized vocabulary); True:
    every one; False: none. Copies (a tied output layer would otherwise share storage, which
    safetensors refuses).
    """
    if save_embedding_layers is False:
        return {}
    weights = embedding_weights(model)
    if save_embedding_layers == "auto":
        vocab = base_vocab_size(model, base_model_name_or_path)
        if vocab is None or all(w.shape[0] == vocab for w in weights.values()):
            return {}
    elif save_embedding_layers is not True:
        raise ValueError(f"save_embedding_layers must be 'auto', True or False, got {save_embedding_layers!r}")
    return {k: w.detach().clone() for k, w in weights.items()}


def check_embedding_rows(model: nn.Module, tensors: dict[str, torch.Tensor], file) -> None:
    """Refuse a file whose saved embeddings have another vocabulary size than the model's (one line)."""
    for key, weight in embedding_weights(model).items():
        saved = tensors.get(key)
        if saved is not None and saved.dim() == 2 and saved.shape[0] != weight.shape[0]:
            raise ValueError(f"{file}: the adapter was saved with a vocabulary of {saved.shape[0]} rows "
                             f"({key}) but the model's has {weight.shape[0]}: resize the base first "
                             f"(model.resize_token_embeddings({saved.shape[0]})) or load it onto the base it was "
                             "trained on")


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's line: ``trainable params: N || all params: M || trainable%: P`` (counted as PEFT does)."""
    trainable, total = trainable_parameters(model)
    share = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")


def resolve_dir(directory, adapter: str) -> Path:
    check_adapter_name(adapter)  # it may name a sub-directory: never "..", "/abs" or "a/b"
    d = Path(directory)
    if not (d / CONFIG_NAME).is_file() and (d / adapter / CONFIG_NAME).is_file():
        d = d / adapter
    if not d.is_dir():
        raise ValueError(f"{d}: adapter directory not found")
    if not (d / CONFIG_NAME).is_file():
        raise ValueError(f"{d}: no {CONFIG_NAME} in the adapter directory")
    return d


def read_adapter_config(directory, adapter: str = "default") -> LoraConfig:
    """The validated LoraConfig of an adapter directory (lorafit's or PEFT's)."""
    path = resolve_dir(directory, adapter) / CONFIG_NAME
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    return LoraConfig.from_peft_dict(data, source=str(path))


def read_adapter_tensors(directory, adapter: str = "default") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors without the PEFT prefix, safetensors metadata). Never unpickles."""
    d = resolve_dir(directory, adapter)
    path = d / WEIGHTS_NAME
    if not path.is_file():
        if (d / "adapter_model.bin").is_file():
            raise ValueError(f"{d / 'adapter_model.bin'}: pickled adapters are not loaded (unsafe); "
                             "convert it to adapter_model.safetensors")
        raise ValueError(f"{path}: file not found")
    check_safetensors_header(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: not a valid safetensors file ({exc})") from None
    return {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in tensors.items()}, meta


def check_safetensors_header(path: Path) -> None:
    """Check the file's first 8 bytes (the little-endian JSON header length) against its size.

    Done before any parser sees the file, so a zero-byte, truncated or foreign file, or one
    declaring a huge header, is refused with its size named and nothing allocated for it.

    Raises:
        ValueError: one line naming the file.
    """
    size = path.stat().st_size
    if size < 8:
        raise ValueError(f"{path}: not a valid safetensors file ({size} bytes; the 8-byte header length "
                         "is missing)")
    with open(path, "rb") as f:
        declared = int.from_bytes(f.read(8), "little")
    if declared > size - 8:
        raise ValueError(f"{path}: not a valid safetensors file (declares a {declared}-byte header but the file "
                         f"has {size} bytes: truncated, or not safetensors)")


def read_safetensors_shapes(path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """({key: shape}, metadata) of a safetensors file without reading any tensor data.

    Raises:
        ValueError: one line naming the file when it is missing, truncated or not safetensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    check_safetensors_header(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: not a valid safetensors file ({exc})") from None
    return shapes, meta


def adapter_tensors(layer: LoraLayer, ad) -> dict:
    """{PEFT key suffix: tensor} of one adapter on one layer: its kind's parts, then its variant's tensors."""
    out = {}
    for part, key_a, key_b in layer.peft_parts(ad):
        out[key_a], out[key_b] = part.lora_A, part.lora_B
    if ad.variant is not None:
        out.update(ad.variant.tensors(ad))
    return out


def live_state(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """{PEFT key without the ``base_model.model.`` prefix: the model's own tensor} of one adapter.

    The tensors are the live parameters (and `modules_to_save` state), so copying into them changes
    the adapter (`reload_adapter`); `adapter_state` gives detached, gathered copies for saving.
    """
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        if adapter in layer.adapters:
            for suffix, tensor in adapter_tensors(layer, layer.adapters[adapter]).items():
                out[f"{name}.{suffix}"] = tensor
    for name, mod in saved_modules(model):
        if adapter in mod.modules_to_save:
            for key, val in mod.modules_to_save[adapter].state_dict().items():
                out[f"{name}.{key}"] = val
    config = adapter_configs(model).get(adapter)
    if config is not None and config.bias != "none":
        for key, p in base_named_parameters(model):
            if key.rsplit(".", 1)[-1] == "bias" and p.requires_grad:
                out[key] = p
    return out


def adapter_state(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """PEFT-format tensors of one adapter (keys without the ``base_model.model.`` prefix), gathered whole."""
    return {k: full_tensor(v.detach()).contiguous() for k, v in live_state(model, adapter).items()}


def reload_adapter(model: nn.Module, directory, adapter: str = "default") -> nn.Module:
    """Overwrite the weights of the model's existing adapter `adapter` with a saved directory's.

    What a trainer's resume needs: the model keeps its modules (so the optimizer's parameters stay
    the same objects) and gets the checkpoint's values. The file must hold exactly the tensors the
    adapter has (same keys, same shapes; saved embedding layers are taken too); everything is read
    and checked before the first copy, so a bad file leaves the model unchanged.

    Raises:
        ValueError: one line naming the file and key (missing, unexpected, wrong shape), an unknown
            adapter, or a sharded model (restore those with `lorafit.distributed`).
    """
    check_adapter_name(adapter)
    if adapter not in adapter_configs(model):
        raise ValueError(f"model has no adapter {adapter!r} to reload (adapters: {sorted(adapter_configs(model))})")
    if is_sharded(model):
        raise ValueError("reload_adapter: the model is sharded; restore it with lorafit.distributed")
    tensors, _ = read_adapter_tensors(directory, adapter)
    file = resolve_dir(directory, adapter) / WEIGHTS_NAME
    check_embedding_rows(model, tensors, file)
    live = live_state(model, adapter)
    live.update({k: w for k, w in embedding_weights(model).items() if k in tensors})
    missing, extra = sorted(set(live) - set(tensors)), sorted(set(tensors) - set(live))
    if missing or extra:
        what = (f"lacks {PREFIX + missing[0]!r}" if missing
                else f"has {PREFIX + extra[0]!r}, which the adapter does not have")
        raise ValueError(f"{file}: does not fit adapter {adapter!r}: the file {what}")
    for key, dst in live.items():
        if tuple(tensors[key].shape) != tuple(dst.shape):
            raise ValueError(f"{file}: key {PREFIX + key!r} has shape {tuple(tensors[key].shape)} but the model "
                             f"needs {tuple(dst.shape)}")
    with torch.no_grad():
        for key, dst in live.items():
            dst.copy_(tensors[key].to(device=dst.device, dtype=dst.dtype))
    return model
