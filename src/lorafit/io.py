"""Saving and loading adapters in PEFT's on-disk format.

A directory with `adapter_config.json` (PEFT's keys only: older PEFT versions fail on unknown
keys) and `adapter_model.safetensors` (keys ``base_model.model.<path>.lora_A.weight`` ...).
lorafit's own extras (a fingerprint of the targeted base weights, the conv form) go in the
safetensors metadata, which PEFT ignores. Loading never unpickles anything, and it is
planned completely (every key, shape and module checked, every tensor copied into new
adapter modules) before the model is touched.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import safetensors.torch

from . import variants
from ._version import __version__
from .common.files import atomic_write, clean_stale_temps
from .config import check_adapter_name
from .fingerprint import base_matches, fingerprint_metadata
from .inject import commit, plan_injection, plan_saved
from .layers import LoraLayer, peft_suffixes, wrapper_for
from .model_card import CARD_NAME, is_lorafit_card, model_card
from .peft_format import (CONFIG_NAME, PREFIX, WEIGHTS_NAME, adapter_state, adapter_tensors, base_vocab_size,  # noqa: F401
                          check_embedding_rows, check_safetensors_header, infer_task_type, live_state,
                          read_adapter_config, read_adapter_tensors, read_safetensors_shapes, reload_adapter,
                          resized_embeddings, resolve_dir)
from .tree import (adapter_configs, adapter_names, base_named_parameters, full_tensor, is_sharded, lora_layers,
                   on_new_state, walk)



def _base_weights(layers):
    """(name, weight) of targeted full-precision bases (quantized bases have none to hash)."""
    return [(n, w) for n, w in ((n, layer.fingerprint_weight()) for n, layer in layers) if w is not None]


def save_adapter(model: nn.Module, directory, adapter: str = "default", base_model_name_or_path: str | None = None,
                 metadata: dict[str, str] | None = None, convert_to_lora: bool = False, metrics: dict | None = None,
                 save_embedding_layers: bool | str = "auto") -> Path:
    """Write adapter `adapter` in PEFT's format to `directory` (created if needed).

    ``adapter_config.json`` gets the config's ``task_type`` or, when it has none, the one the model
    class implies (`lorafit.peft_format.infer_task_type`: what `AutoPeftModelFor...` needs), and
    the base's name. ``README.md`` gets a model card (`lorafit.model_card`; `metrics`, name -> value,
    are listed in it) unless the directory holds a README.md that lorafit did not write.

    `save_embedding_layers` is PEFT's: with ``"auto"`` the input / output embeddings are saved too
    (PEFT's keys, e.g. ``base_model.model.model.embed_tokens.weight``, with a warning) when their row
    count differs from the base's vocab_size (a resized vocabulary); True always, False never.

    With ``convert_to_lora=True`` a PiSSA/OLoRA adapter is written as the plain LoRA adapter
    (rank 2r) that gives the same model on the ORIGINAL, unmodified base (see
    `lorafit.variants.init`).

    Files are written to temporary names and renamed, so an interrupted save never leaves a
    corrupt adapter behind; temporary files left by a killed earlier save are deleted.

    On an FSDP2-sharded model (`lorafit.distributed.shard`) this is collective: every rank must
    call it; the adapter and the fingerprint are computed from gathered full weights, only rank 0
    writes, and every rank returns the path once the files are there (or raises rank 0's error).

    Raises:
        ValueError: unknown or invalid adapter name, or `directory` (or a parent) is an
            existing file; nothing is written then.
    """
    check_adapter_name(adapter)
    directory = Path(directory)
    for parent in (directory, *directory.parents):  # before any work: a file in the way is a usage error
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise ValueError(f"{parent}: exists and is not a directory; save_adapter needs a directory path")
            break
    configs = adapter_configs(model)
    if adapter not in configs:
        raise ValueError(f"model has no adapter {adapter!r} (adapters: {sorted(configs)})")
    config = configs[adapter]
    layers = [(n, layer) for n, layer in lora_layers(model) if adapter in layer.adapters]
    tensors = adapter_state(model, adapter)
    if convert_to_lora:
        tensors, config = variants.convert_to_lora(layers, adapter, tensors, config)
    ours = [(n, why) for n, layer in layers if (why := layer.peft_incompatibility(layer.adapters[adapter]))]
    if ours:
        warnings.warn(f"adapter {adapter!r} uses {ours[0][1]} ({len(ours)} layer(s), e.g. {ours[0][0]})",
                      stacklevel=2)
    if base_model_name_or_path is None:
        cfg = getattr(model, "config", None)
        base_model_name_or_path = getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None) or None
    fan = any(layer.fan_in_fan_out for _, layer in layers)
    data = config.to_peft_dict(base_model_name_or_path=base_model_name_or_path, fan_in_fan_out=fan,
                               target_modules=sorted(n for n, _ in layers))
    data["fan_in_fan_out"] = fan
    data["task_type"] = config.task_type or infer_task_type(model)
    embeddings = {k: full_tensor(v).contiguous() for k, v in
                  resized_embeddings(model, data["base_model_name_or_path"], save_embedding_layers).items()}
    if save_embedding_layers is True and not embeddings:
        warnings.warn(f"adapter {adapter!r}: save_embedding_layers=True but the model names no embedding layer "
                      "(get_input_embeddings / get_output_embeddings): none saved", stacklevel=2)
    if embeddings and save_embedding_layers == "auto":
        rows = sorted({int(v.shape[0]) for v in embeddings.values()})
        warnings.warn(f"adapter {adapter!r}: the vocabulary was resized ({'/'.join(map(str, rows))} rows, the base "
                      f"has {base_vocab_size(model, data['base_model_name_or_path'])}): saving the embedding layers "
                      f"with it ({', '.join(embeddings)})", stacklevel=2)
    card = model_card(config, data["base_model_name_or_path"], data["task_type"], [n for n, _ in layers],
                      sum(t.numel() for t in tensors.values()), sum(p.numel() for _, p in base_named_parameters(model)),
                      list(embeddings), metrics)
    tensors = {**tensors, **embeddings}
    meta = {"format": "pt", "lorafit_version": __version__}
    if not convert_to_lora:  # converted: it fits the original base, not this one
        meta.update(fingerprint_metadata(_base_weights(layers)))
    meta.update(metadata or {})

    def write():
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # e.g. a file created in the way since the check above, or no permission
            raise ValueError(f"{directory}: cannot create the adapter directory ({exc.strerror or exc})") from None
        clean_stale_temps(directory, (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME))
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: safetensors.torch.save_file(
            {PREFIX + k: v.cpu() for k, v in tensors.items()}, str(tmp), metadata=meta))
        atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))
        readme = directory / CARD_NAME
        if not readme.exists() or (readme.is_file() and is_lorafit_card(readme.read_text("utf-8", "replace"))):
            atomic_write(readme, lambda tmp: Path(tmp).write_text(card, encoding="utf-8"))

    if is_sharded(model):
        _rank0_writes(write)
    else:
        write()
    return directory


def _rank0_writes(write) -> None:
    """Rank 0 runs ``write``; then every rank learns whether it worked (the others raise rank 0's error)."""
    error, failure = None, None
    if dist.get_rank() == 0:
        try:
            write()
        except Exception as exc:  # reported to the other ranks before it is raised here
            error, failure = f"{type(exc).__name__}: {exc}", exc
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    if box[0] is not None:
        raise ValueError(f"rank 0 could not write the adapter ({box[0]})")












def classify_file(tensors, infos, file) -> tuple[dict, dict]:
    """Split file keys into per-module LoRA tensors {path: {suffix: (key, tensor)}} and the rest.

    A key is ``<path>.<suffix>`` with a suffix some layer kind or variant writes. Where several
    splits fit (``x.base_layer.out_proj.lora_A.weight``: MHA ``x``, or a linear
    ``x.base_layer.out_proj``) the one whose module exists and whose kind writes that suffix wins.
    """
    extra = variants.suffixes()
    suffixes = sorted(peft_suffixes() | extra, key=len, reverse=True)
    lora, rest = {}, {}
    for key, val in tensors.items():
        splits = [(key[: -len(suf) - 1], suf) for suf in suffixes if key.endswith("." + suf)]
        if not splits:
            if "lora_" in key:
                raise ValueError(f"{file}: key {PREFIX + key!r} is not a LoRA weight lorafit understands")
            rest[key] = val
            continue
        path, suffix = next(((p, s) for p, s in splits if p in infos and _writes(infos[p], s, extra)), splits[-1])
        lora.setdefault(path, {})[suffix] = (PREFIX + key, val)
    return lora, rest


def _writes(module: nn.Module, suffix: str, extra: set[str]) -> bool:
    base = module.base_layer if isinstance(module, LoraLayer) else module
    kind = wrapper_for(base)
    return kind is not None and (suffix in kind.peft_suffixes() or suffix in extra)


def _form(path, slots, infos, file) -> dict:
    """The `make_adapter` form of one module the file adapts, checked against the module."""
    if path not in infos:
        raise ValueError(f"{file}: key {slots[next(iter(slots))][0]!r}: the model has no module {path!r}")
    mod = infos[path]
    base = mod.base_layer if isinstance(mod, LoraLayer) else mod
    kind = wrapper_for(base)
    if kind is None:
        raise ValueError(f"{file}: module {path!r} is a {type(base).__name__}, which LoRA does not support")
    if kind.KEY_A not in slots or kind.KEY_B not in slots:
        raise ValueError(f"{file}: module {path!r} has only one of lora_A / lora_B")
    key_a = slots[kind.KEY_A][0]
    return kind.form_from_file(base, {s: t for s, (_, t) in slots.items()}, f"{file}: key {key_a!r}")


def _copy_plan(plan, lora, file) -> None:
    """Copy the file's tensors into the planned (not yet attached) adapters, every key and shape checked."""
    extra = variants.suffixes()
    with torch.no_grad():
        for item in plan:
            slots = lora[item.name]
            want = adapter_tensors(item.wrapper, item.adapter)
            for suffix in sorted(set(slots) - set(want)):
                if suffix in extra:
                    v = _owner(suffix)
                    raise ValueError(f"{file}: module {item.name!r}: the file has a {v.name} {suffix} but the config "
                                     f"says {v.config_field}=false")
                raise ValueError(f"{file}: key {slots[suffix][0]!r} does not fit module {item.name!r}")
            for suffix in want:
                if suffix not in slots:
                    what = f"{_owner(suffix).config_field} is set but the file has no" if suffix in extra \
                        else "the file lacks"
                    raise ValueError(f"{file}: module {item.name!r}: {what} {suffix}")
            for suffix, dst in want.items():
                key, src = slots[suffix]
                if tuple(src.shape) != tuple(dst.shape):
                    raise ValueError(f"{file}: key {key!r} has shape {tuple(src.shape)} but the model needs "
                                     f"{tuple(dst.shape)}")
                dst.copy_(src.to(dst.dtype))


def _owner(suffix: str):
    """The variant whose extra tensors use this key suffix (DoRA: lora_magnitude_vector)."""
    return next(v for v in variants.VARIANTS if suffix in v.suffixes())


def load_adapter(model: nn.Module, directory, adapter: str = "default") -> nn.Module:
    """Load an adapter directory written by lorafit or PEFT into `model` (injecting as needed).

    Everything is read and checked, and every new module built, before the model is touched
    (see `lorafit.inject.plan_injection`), so any failure leaves it exactly as it was.

    Raises:
        ValueError: one line naming the file and key for anything that does not fit, an
            invalid adapter name, or a name the model already has; the model is unchanged then.
    """
    check_adapter_name(adapter)
    if adapter in adapter_names(model) or adapter in adapter_configs(model):
        raise ValueError(f"the model already has an adapter {adapter!r}; load with another adapter= name "
                         "or lorafit.delete_adapter it first")
    config = read_adapter_config(directory, adapter)
    tensors, meta = read_adapter_tensors(directory, adapter)
    file = resolve_dir(directory, adapter) / WEIGHTS_NAME
    infos = {name: mod for name, mod, _, _ in walk(model) if name}
    lora, rest = classify_file(tensors, infos, file)
    check_embedding_rows(model, rest, file)  # a resized vocabulary onto a base of another size: one clear line
    only = {path: _form(path, slots, infos, file) for path, slots in lora.items()}
    if not only:
        raise ValueError(f"{file}: no LoRA weights in the file")
    plan = plan_injection(model, config, adapter, only=only)
    _copy_plan(plan, lora, file)
    saved = _load_saved(model, config, adapter, rest, file, {item.name for item in plan})
    biases = _load_biases(model, rest, file)
    if not base_matches(meta, _base_weights([(i.name, i.wrapper) for i in plan])):
        warnings.warn(f"{file}: the base weights differ from the ones this adapter was trained on "
                      "(fingerprint mismatch)", stacklevel=2)
    commit(model, config, adapter, plan, saved)
    with torch.no_grad():
        for param, val in biases:
            param.copy_(val)
    return model


def _load_saved(model, config, adapter, rest, file, lora_names):
    saved = []
    for name, parent, attr, wrapper, is_new in plan_saved(model, config, adapter, lora_names):
        module = copy.deepcopy(wrapper.original_module)
        prefix = f"{name}."
        state = {k[len(prefix):]: rest.pop(k) for k in list(rest) if k.startswith(prefix)}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            detail = " ".join(line.strip() for line in first[:3])
            raise ValueError(f"{file}: modules_to_save {name!r} does not fit: {detail}") from None
        for p in module.parameters():
            p.requires_grad_(True)
        saved.append((name, parent, attr, wrapper, is_new, module))
    return saved


def _load_biases(model, rest, file):
    """Trained biases (bias="all"/"lora_only") keyed as in PEFT (``<path>.base_layer.bias``)."""
    params = {n.replace(".base_layer.", "."): p for n, p in base_named_parameters(model)}
    out = []
    for key, val in rest.items():
        target = params.get(key.replace(".base_layer.", "."))
        if target is None:
            raise ValueError(f"{file}: key {PREFIX + key!r} matches no LoRA layer, saved module or bias of the model")
        if tuple(target.shape) != tuple(val.shape):
            raise ValueError(f"{file}: key {PREFIX + key!r} has shape {tuple(val.shape)} but the model needs "
                             f"{tuple(target.shape)}")
        out.append((target, val.to(target.dtype)))
    return out


def save_pretrained(model: nn.Module, save_directory, is_main_process: bool = True, state_dict=None,
                    selected_adapters: list[str] | None = None, save_embedding_layers: bool | str = "auto",
                    push_to_hub: bool = False, **ignored) -> None:
    """``model.save_pretrained`` of a LoRA-injected transformers model: its adapters, as PEFT's PeftModel writes them.

    Adapter "default" goes in `save_directory`, any other in ``save_directory/<name>`` (PEFT's layout;
    `selected_adapters` picks some). transformers' `Trainer` / TRL's `SFTTrainer` call this for every
    checkpoint and for `save_model`, so they hold the adapter, never the wrapped model under lorafit's
    module names (which ``from_pretrained`` would load with randomly initialised weights). Other
    keyword arguments of transformers' ``save_pretrained`` (``safe_serialization``, ``max_shard_size``,
    ...) are accepted and ignored: an adapter is one safetensors file.

    Raises:
        ValueError: a `state_dict` (DeepSpeed / accelerate FSDP hand the gathered weights this way:
            not supported, nothing is written), ``push_to_hub=True`` (save, then upload the directory),
            or no adapter left (after `delete_adapter`: `unload` the model to save the base).
    """
    if state_dict is not None:
        raise ValueError("save_pretrained of a lorafit model writes its adapters from its own weights; a state_dict "
                         "(DeepSpeed / accelerate FSDP) is not supported: save with lorafit.save_adapter")
    if push_to_hub:
        raise ValueError("save_pretrained(push_to_hub=True) is not supported for a lorafit model: save it, then "
                         "upload the directory (huggingface_hub.upload_folder)")
    if not adapter_configs(model):
        raise ValueError("save_pretrained: the model has no lorafit adapter left; lorafit.unload(model) first to "
                         "save the base model")
    if not is_main_process:
        return
    for name in selected_adapters or list(adapter_configs(model)):
        save_adapter(model, Path(save_directory) / name if name != "default" else save_directory, name,
                     save_embedding_layers=save_embedding_layers)


class AdapterSavePretrained:
    """The instance attribute ``model.save_pretrained`` of an injected model that has that method (duck typed:
    transformers' PreTrainedModel, diffusers' ModelMixin). `lorafit.tree.drop_state` removes it again, so a
    model that `merge_and_unload` returns saves as a whole model. Deep copies follow the copied model."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, save_directory, *args, **kwargs):
        return save_pretrained(self.model, save_directory, *args, **kwargs)


@on_new_state
def _transformers_view(model: nn.Module) -> dict:
    """What an injected model shows transformers: ``save_pretrained`` writes the adapters, and
    ``_hf_peft_config_loaded`` (transformers' own flag for "trainable adapters are attached": its
    Trainer refuses a quantized model without it, and gradient checkpointing then makes the inputs
    require grad, as for PEFT)."""
    out = {}
    if callable(getattr(type(model), "save_pretrained", None)):
        out["save_pretrained"] = AdapterSavePretrained(model)
    if getattr(type(model), "_hf_peft_config_loaded", None) is False:
        out["_hf_peft_config_loaded"] = True
    return out
