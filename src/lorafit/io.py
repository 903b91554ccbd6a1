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
import hashlib
import json
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import safetensors.torch
from safetensors import SafetensorError, safe_open

from . import variants
from ._version import __version__
from .common.files import atomic_write, clean_stale_temps
from .config import LoraConfig, check_adapter_name
from .inject import commit, plan_injection, plan_saved
from .layers import LoraLayer, peft_suffixes, wrapper_for
from .tree import (adapter_configs, adapter_names, base_named_parameters, full_tensor, is_sharded, lora_layers,
                   saved_modules, walk)

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def fingerprint(named_weights) -> str | None:
    """A cheap, stable hash of base weights: names, shapes and 1024 evenly spaced values each."""
    h = hashlib.sha256()
    count = 0
    for name, w in sorted(named_weights, key=lambda t: t[0]):
        flat = full_tensor(w.detach()).reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, steps=min(flat.numel(), 1024), device=flat.device).long()
        h.update(name.encode())
        h.update(str(tuple(w.shape)).encode())
        h.update(flat[idx].float().cpu().numpy().tobytes())
        count += 1
    return h.hexdigest()[:32] if count else None


def _base_weights(layers):
    """(name, weight) of targeted full-precision bases (quantized bases have none to hash)."""
    return [(n, w) for n, w in ((n, layer.fingerprint_weight()) for n, layer in layers) if w is not None]


def adapter_tensors(layer: LoraLayer, ad) -> dict:
    """{PEFT key suffix: tensor} of one adapter on one layer: its kind's parts, then its variant's tensors."""
    out = {}
    for part, key_a, key_b in layer.peft_parts(ad):
        out[key_a], out[key_b] = part.lora_A, part.lora_B
    if ad.variant is not None:
        out.update(ad.variant.tensors(ad))
    return out


def adapter_state(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """PEFT-format tensors of one adapter (keys without the ``base_model.model.`` prefix)."""
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
    return {k: full_tensor(v.detach()).contiguous() for k, v in out.items()}


def save_adapter(model: nn.Module, directory, adapter: str = "default", base_model_name_or_path: str | None = None,
                 metadata: dict[str, str] | None = None, convert_to_lora: bool = False) -> Path:
    """Write adapter `adapter` in PEFT's format to `directory` (created if needed).

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
    meta = {"format": "pt", "lorafit_version": __version__}
    fp = None if convert_to_lora else fingerprint(_base_weights(layers))  # converted: fits the original base
    if fp:
        meta["lorafit_base_fingerprint"] = fp
    meta.update(metadata or {})

    def write():
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # e.g. a file created in the way since the check above, or no permission
            raise ValueError(f"{directory}: cannot create the adapter directory ({exc.strerror or exc})") from None
        clean_stale_temps(directory, (WEIGHTS_NAME, CONFIG_NAME))
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: safetensors.torch.save_file(
            {PREFIX + k: v.cpu() for k, v in tensors.items()}, str(tmp), metadata=meta))
        atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))

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
    only = {path: _form(path, slots, infos, file) for path, slots in lora.items()}
    if not only:
        raise ValueError(f"{file}: no LoRA weights in the file")
    plan = plan_injection(model, config, adapter, only=only)
    _copy_plan(plan, lora, file)
    saved = _load_saved(model, config, adapter, rest, file, {item.name for item in plan})
    biases = _load_biases(model, rest, file)
    fp = fingerprint(_base_weights([(i.name, i.wrapper) for i in plan]))
    want = meta.get("lorafit_base_fingerprint")
    if want and fp and want != fp:
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
