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
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ._version import __version__
from .config import LoraConfig
from .inject import check_adapter_name, commit, plan_injection, plan_saved
from .tree import adapter_names, base_named_parameters, lora_layers, saved_modules, walk
from .layers import LoraLayer, wrapper_for

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def fingerprint(named_weights) -> str | None:
    """A cheap, stable hash of base weights: names, shapes and 1024 evenly spaced values each."""
    h = hashlib.sha256()
    count = 0
    for name, w in sorted(named_weights, key=lambda t: t[0]):
        flat = w.detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, steps=min(flat.numel(), 1024), device=flat.device).long()
        h.update(name.encode())
        h.update(str(tuple(w.shape)).encode())
        h.update(flat[idx].float().cpu().numpy().tobytes())
        count += 1
    return h.hexdigest()[:32] if count else None


def _base_weights(layers):
    """(name, weight) of targeted full-precision bases (quantized bases are left out)."""
    return [(n, layer.base_weight()) for n, layer in layers
            if not getattr(layer.base_layer, "lorafit_quantized", False)]


def _temp_pattern(name: str) -> re.Pattern:
    """What `_atomic_write` names its temporary file for `name`: ``.<name>.<8 mkstemp chars>.tmp``."""
    return re.compile(rf"\.{re.escape(name)}\.[A-Za-z0-9_]{{8}}\.tmp")


def clean_stale_temps(directory: Path, names=(WEIGHTS_NAME, CONFIG_NAME)) -> list[Path]:
    """Delete the temporary files a killed save left in `directory` (only our own pattern).

    A save in progress never leaves them (it renames or deletes its file), so any still there
    come from a process that died mid-write. Two processes saving into one directory at once
    are not supported anyway (the last rename wins), so there is no live writer to protect.
    """
    removed = []
    if not directory.is_dir():
        return removed
    patterns = [_temp_pattern(n) for n in names]
    for entry in directory.iterdir():
        if any(p.fullmatch(entry.name) for p in patterns) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; an adapter is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def adapter_state(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """PEFT-format tensors of one adapter (keys without the ``base_model.model.`` prefix)."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        ad = layer.adapters[adapter] if adapter in layer.adapters else None
        if ad is None:
            continue
        magnitude = getattr(ad, "lora_magnitude_vector", None)  # DoRA, already in PEFT's shape
        if magnitude is not None:
            out[f"{name}.lora_magnitude_vector"] = magnitude
        if ad.kind == "embedding":
            out[f"{name}.lora_embedding_A"], out[f"{name}.lora_embedding_B"] = ad.lora_A, ad.lora_B
            continue
        out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = ad.lora_A, ad.lora_B
        if ad.kind == "mha_in":
            out[f"{name}.base_layer.out_proj.lora_A.weight"] = ad.out.lora_A
            out[f"{name}.base_layer.out_proj.lora_B.weight"] = ad.out.lora_B
    for name, mod in saved_modules(model):
        if adapter in mod.modules_to_save:
            for key, val in mod.modules_to_save[adapter].state_dict().items():
                out[f"{name}.{key}"] = val
    config = getattr(model, "_lorafit_configs", {}).get(adapter)
    if config is not None and config.bias != "none":
        for key, p in base_named_parameters(model):
            if key.rsplit(".", 1)[-1] == "bias" and p.requires_grad:
                out[key] = p
    return {k: v.detach().contiguous() for k, v in out.items()}


def save_adapter(model: nn.Module, directory, adapter: str = "default", base_model_name_or_path: str | None = None,
                 metadata: dict[str, str] | None = None, convert_to_lora: bool = False) -> Path:
    """Write adapter `adapter` in PEFT's format to `directory` (created if needed).

    With ``convert_to_lora=True`` a PiSSA/OLoRA adapter is written as the plain LoRA adapter
    (rank 2r) that gives the same model on the ORIGINAL, unmodified base (see
    `lorafit.variants.init`).

    Files are written to temporary names and renamed, so an interrupted save never leaves a
    corrupt adapter behind; temporary files left by a killed earlier save are deleted.

    Raises:
        ValueError: unknown or invalid adapter name, or `directory` (or a parent) is an
            existing file; nothing is written then.
    """
    from safetensors.torch import save_file

    check_adapter_name(adapter)
    directory = Path(directory)
    for parent in (directory, *directory.parents):  # before any work: a file in the way is a usage error
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise ValueError(f"{parent}: exists and is not a directory; save_adapter needs a directory path")
            break
    configs = getattr(model, "_lorafit_configs", {})
    if adapter not in configs:
        raise ValueError(f"model has no adapter {adapter!r} (adapters: {sorted(configs)})")
    config = configs[adapter]
    layers = [(n, layer) for n, layer in lora_layers(model) if adapter in layer.adapters]
    tensors = adapter_state(model, adapter)
    if convert_to_lora:
        from .variants import convert_to_lora as to_plain_lora
        tensors, config = to_plain_lora(model, adapter, tensors, config)
    ours = [n for n, layer in layers if layer.adapters[adapter].a_groups > 1]
    if ours:
        warnings.warn(f"adapter {adapter!r} uses lorafit's group-respecting conv form on {len(ours)} grouped conv(s) "
                      f"(e.g. {ours[0]}): lorafit loads it, PEFT cannot", stacklevel=2)
    if base_model_name_or_path is None:
        cfg = getattr(model, "config", None)
        base_model_name_or_path = getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None) or None
    fan = any(getattr(layer, "fan_in_fan_out", False) for _, layer in layers)
    data = config.to_peft_dict(base_model_name_or_path=base_model_name_or_path, fan_in_fan_out=fan,
                               target_modules=sorted(n for n, _ in layers))
    data["fan_in_fan_out"] = fan
    meta = {"format": "pt", "lorafit_version": __version__}
    fp = None if convert_to_lora else fingerprint(_base_weights(layers))  # converted: fits the original base
    if fp:
        meta["lorafit_base_fingerprint"] = fp
    meta.update(metadata or {})
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. a file created in the way since the check above, or no permission
        raise ValueError(f"{directory}: cannot create the adapter directory ({exc.strerror or exc})") from None
    clean_stale_temps(directory)
    _atomic_write(directory / WEIGHTS_NAME,
                  lambda tmp: save_file({PREFIX + k: v.cpu() for k, v in tensors.items()}, tmp, metadata=meta))
    _atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))
    return directory


def _resolve_dir(directory, adapter: str) -> Path:
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
    path = _resolve_dir(directory, adapter) / CONFIG_NAME
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    return LoraConfig.from_peft_dict(data, source=str(path))


def read_adapter_tensors(directory, adapter: str = "default") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors without the PEFT prefix, safetensors metadata). Never unpickles."""
    from safetensors import SafetensorError, safe_open

    d = _resolve_dir(directory, adapter)
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
    from safetensors import SafetensorError, safe_open

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


def _classify(tensors, infos, file) -> tuple[dict, dict]:
    """Split file keys into per-module LoRA tensors {path: {slot: tensor}} and the rest."""
    lora, rest = {}, {}
    suffixes = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A",
                ".lora_embedding_B": "B", ".lora_magnitude_vector": "M"}
    for key, val in tensors.items():
        for suf, slot in suffixes.items():
            if key.endswith(suf):
                path = key[: -len(suf)]
                if path.endswith(".base_layer.out_proj") and path[: -len(".base_layer.out_proj")] in infos:
                    path, slot = path[: -len(".base_layer.out_proj")], "out_" + slot
                lora.setdefault(path, {})[slot] = (PREFIX + key, val)
                break
        else:
            if "lora_" in key:
                raise ValueError(f"{file}: key {PREFIX + key!r} is not a LoRA weight lorafit understands")
            rest[key] = val
    return lora, rest


def _expected_a_groups(base: nn.Module, a, file, key) -> int | None:
    if not isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or a.dim() < 3:
        return None
    if a.shape[1] == base.in_channels:
        return 1  # PEFT's form
    if base.groups > 1 and a.shape[1] == base.in_channels // base.groups:
        return base.groups
    raise ValueError(f"{file}: key {key!r} has shape {tuple(a.shape)}, which does not fit conv "
                     f"{tuple(base.weight.shape)}")


def load_adapter(model: nn.Module, directory, adapter: str = "default") -> nn.Module:
    """Load an adapter directory written by lorafit or PEFT into `model` (injecting as needed).

    Everything is read and checked, and every new module built, before the model is touched
    (see `lorafit.inject.plan_injection`), so any failure leaves it exactly as it was.

    Raises:
        ValueError: one line naming the file and key for anything that does not fit, an
            invalid adapter name, or a name the model already has; the model is unchanged then.
    """
    check_adapter_name(adapter)
    if adapter in adapter_names(model) or adapter in getattr(model, "_lorafit_configs", {}):
        raise ValueError(f"the model already has an adapter {adapter!r}; load with another adapter= name "
                         "or lorafit.delete_adapter it first")
    config = read_adapter_config(directory, adapter)
    tensors, meta = read_adapter_tensors(directory, adapter)
    file = _resolve_dir(directory, adapter) / WEIGHTS_NAME
    infos = {name: mod for name, mod, _, _ in walk(model) if name}
    lora, rest = _classify(tensors, infos, file)
    only = {}
    for path, slots in lora.items():
        if path not in infos:
            raise ValueError(f"{file}: key {slots[next(iter(slots))][0]!r}: the model has no module {path!r}")
        mod = infos[path]
        base = mod.base_layer if isinstance(mod, LoraLayer) else mod
        if wrapper_for(base) is None:
            raise ValueError(f"{file}: module {path!r} is a {type(base).__name__}, which LoRA does not support")
        if "A" not in slots or "B" not in slots:
            raise ValueError(f"{file}: module {path!r} has only one of lora_A / lora_B")
        only[path] = {"a_groups": _expected_a_groups(base, slots["A"][1], file, slots["A"][0])}
    if not only:
        raise ValueError(f"{file}: no LoRA weights in the file")
    plan = plan_injection(model, config, adapter, only=only)
    with torch.no_grad():
        for item in plan:
            slots = lora[item.name]
            pairs = [(slots["A"], item.adapter.lora_A), (slots["B"], item.adapter.lora_B)]
            if item.adapter.kind == "mha_in":
                if "out_A" not in slots or "out_B" not in slots:
                    raise ValueError(f"{file}: MultiheadAttention {item.name!r} lacks its out_proj LoRA weights")
                pairs += [(slots["out_A"], item.adapter.out.lora_A), (slots["out_B"], item.adapter.out.lora_B)]
            magnitude = getattr(item.adapter, "lora_magnitude_vector", None)
            if (magnitude is None) != ("M" not in slots):
                raise ValueError(f"{file}: module {item.name!r}: " + (
                    "the file has a DoRA lora_magnitude_vector but the config says use_dora=false"
                    if magnitude is None else "use_dora is set but the file has no lora_magnitude_vector"))
            if magnitude is not None:
                pairs.append((slots["M"], magnitude))
            for (key, src), dst in pairs:
                if tuple(src.shape) != tuple(dst.shape):
                    raise ValueError(f"{file}: key {key!r} has shape {tuple(src.shape)} but the model needs "
                                     f"{tuple(dst.shape)}")
                dst.copy_(src.to(dst.dtype))
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
    model._lorafit_configs = {**getattr(model, "_lorafit_configs", {}), adapter: config}
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
