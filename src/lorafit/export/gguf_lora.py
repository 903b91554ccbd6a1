"""``lorafit export --format gguf-lora``: the adapter alone, as llama.cpp's LoRA GGUF (``llama-cli --lora``).

llama.cpp applies such a file to a base GGUF at run time: ``y = W x + scale * B (A x)``. The
layout it reads (``src/llama-adapter.cpp``, written by ``convert_lora_to_gguf.py``):

- keys ``general.architecture`` (the base's, checked against it), ``general.type = "adapter"``,
  ``adapter.type = "lora"``, ``adapter.lora.alpha``;
- per adapted matrix ``blk.N.attn_q.weight``: ``blk.N.attn_q.weight.lora_a`` holding A ``[r, in]``
  and ``.lora_b`` holding B ``[out, r]`` (numpy order; GGML's ``ne`` is reversed: a is
  ``(in, r)``, b is ``(r, out)``: ``a.ne[0]`` must equal the base's ``ne[0]`` and ``b.ne[1]`` its
  ``ne[1]``);
- ``scale = alpha / r`` with ``r`` read from each tensor's shape (times the user's ``--lora-scaled``
  factor). One alpha for the file: where an adapter's own scale is not ``alpha / r`` (rsLoRA:
  ``alpha / sqrt(r)``; ``alpha_pattern`` / ``rank_pattern``), the written alpha is the most common
  ``scale x r`` and the remaining ratio is folded into that layer's B (exact up to fp32 rounding;
  llama.cpp's own converter ignores rsLoRA);
- Q and K rows in llama.cpp's RoPE order: the base GGUF's ``attn_q`` / ``attn_k`` rows are
  reordered (:func:`~lorafit.export.gguf_write.llama_permute`), so B's rows (the update's rows)
  are reordered the same way; A is untouched.

What a llama.cpp LoRA cannot express is refused with one line: DoRA (a per-output rescale),
``modules_to_save`` (fully trained modules), adapters on embeddings or other non-linear layers,
trained biases, PiSSA / OLoRA (they change the base weights), an adapter on an ``lm_head`` tied to
the embedding (the base GGUF has no ``output.weight``).

Check (:func:`check_lora_file`): the file is read back with ``gguf.GGUFReader``; every expected
``.lora_a`` / ``.lora_b`` must be there with llama.cpp's shapes, nothing else, the keys as above,
and ``lora_b @ lora_a * alpha / r`` must equal the adapter's own update (``delta_weight``, Q/K
rows reordered) for each layer: max |diff| <= 1e-5 x max(1, max |delta|), else exit 1, no file.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn

import lorafit
from lorafit.common.errors import LorafitError
from lorafit.export.formats import ExportParityError
from lorafit.export.gguf import staged_file
from lorafit.export.gguf_load import LoraBase, load_lora_base
from lorafit.export.gguf_write import gguf_name, llama_permute, rope_heads, tensor_name_map, write_gguf
from lorafit.tree import adapter_configs, lora_layers, saved_modules

__all__ = ["LoraPair", "check_lora_file", "export_gguf_lora", "format_gguf_lora_report", "lora_pairs",
           "refuse_config", "write_lora_checked"]

TOLERANCE = 1e-5


@dataclass
class LoraPair:
    """One adapted matrix: ``a`` [r, in], ``b`` [out, r] (Q/K rows reordered), its ``scale``, ``delta`` [out, in]."""

    name: str  # the base tensor's GGUF name, e.g. blk.0.attn_q.weight
    a: np.ndarray
    b: np.ndarray
    scale: float
    delta: np.ndarray


def refuse_config(adapter_dir: Path) -> None:
    """Refuse, from ``adapter_config.json`` alone (before any weight is read), what llama.cpp LoRA cannot hold."""
    where = adapter_dir / "adapter_config.json"
    if not where.is_file():
        raise LorafitError(f"{adapter_dir}: not an adapter directory (no adapter_config.json)")
    try:
        cfg = lorafit.read_adapter_config(adapter_dir)
    except ValueError as exc:
        raise LorafitError(str(exc).splitlines()[0]) from None
    init = str(cfg.init)
    problems = [
        (cfg.use_dora, "use_dora: DoRA rescales each output, which a llama.cpp LoRA cannot express"),
        (bool(cfg.modules_to_save), f"modules_to_save {list(cfg.modules_to_save or [])}: fully trained modules "
                                    "are not a LoRA"),
        (cfg.bias != "none", f"bias {cfg.bias!r}: trained biases are not part of a llama.cpp LoRA"),
        (init.startswith(("pissa", "olora")), f"init {init!r}: PiSSA / OLoRA change the base weights (save it "
                                              "with convert_to_lora=True, or export --format gguf)"),
    ]
    for bad, why in problems:
        if bad:
            raise LorafitError(f"{where}: {why}; use --format gguf (the merged model)")


def lora_pairs(lb: LoraBase) -> list[LoraPair]:
    """The adapter of ``lb`` as llama.cpp LoRA tensors (see the module docstring for what is refused)."""
    refuse_config(lb.adapter_dir)
    if saved_modules(lb.model):
        raise LorafitError(f"{lb.adapter_dir}: fully trained modules (modules_to_save) are not a LoRA; use --format "
                           "gguf (the merged model)")
    name_map = tensor_name_map(lb.config)
    tied = lb.model.get_output_embeddings().weight is lb.model.get_input_embeddings().weight
    pairs = []
    for hf_name, layer in lora_layers(lb.model):
        where = f"{lb.adapter_dir}: {hf_name}"
        ad = layer.adapters["default"]
        if ad.variant is not None:
            raise LorafitError(f"{where}: a {ad.variant.name} adapter cannot be written as a llama.cpp LoRA")
        if not isinstance(layer.base_layer, nn.Linear) or len(ad.parts()) > 1 or ad.groups != 1:
            raise LorafitError(f"{where}: an adapter on {type(layer.base_layer).__name__}; a llama.cpp LoRA "
                               "holds adapters on linear layers only (use --format gguf)")
        if tied and hf_name.endswith("lm_head"):
            raise LorafitError(f"{where}: lm_head is tied to the embedding, so the base GGUF has no output.weight "
                               "to adapt (use --format gguf)")
        name = gguf_name(name_map, f"{hf_name}.weight")
        if name is None:
            raise LorafitError(f"{where}: no llama.cpp tensor for this layer")
        a = ad.lora_A.detach().float().cpu().numpy()
        b = ad.lora_B.detach().float().cpu().numpy()
        delta = layer.delta_weight(ad).detach().float().cpu().numpy()
        heads = rope_heads(name, lb.config)
        if heads is not None:
            b, delta = llama_permute(b, heads), llama_permute(delta, heads)
        pairs.append(LoraPair(name, a, b, float(ad.scaling), delta))
    if not pairs:
        raise LorafitError(f"{lb.adapter_dir}: the adapter has no LoRA layer to write")
    return pairs


def common_alpha(pairs: list[LoraPair]) -> tuple[float, int]:
    """llama.cpp's one ``alpha``: the most common ``scale x r``; returns (alpha, layers whose B absorbs a ratio)."""
    products = Counter(round(p.scale * p.a.shape[0], 9) for p in pairs)
    alpha = products.most_common(1)[0][0]
    return float(alpha), sum(n for k, n in products.items() if k != alpha)


def write_lora_checked(lb: LoraBase, out) -> dict[str, Any]:
    """Write the adapter of ``lb`` as a llama.cpp LoRA GGUF at ``out`` (staged, read back, checked)."""
    import gguf  # lazy: optional extra lorafit[gguf]

    t0 = time.perf_counter()
    out = Path(out)
    pairs = lora_pairs(lb)
    alpha, folded = common_alpha(pairs)
    cfg = adapter_configs(lb.model)["default"]

    def metadata(writer) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)

    def tensors(writer) -> None:
        for p in pairs:
            ratio = p.scale * p.a.shape[0] / alpha
            b = p.b if ratio == 1.0 else p.b * np.float32(ratio)
            writer.add_tensor(f"{p.name}.lora_a", np.ascontiguousarray(p.a, dtype=np.float32))
            writer.add_tensor(f"{p.name}.lora_b", np.ascontiguousarray(b, dtype=np.float32))

    stage = staged_file(out)
    with stage as tmp:
        write_gguf(tmp, lb.arch, metadata, tensors)
        check = check_lora_file(tmp, pairs, lb.arch, alpha, base_shapes(lb))
        if check["max_rel_diff"] > TOLERANCE:
            raise ExportParityError(f"{out}: lora_b @ lora_a x alpha / r differs from the adapter's update at "
                                    f"{check['worst']} (relative {check['max_rel_diff']:.3g} > {TOLERANCE:g}); "
                                    "nothing written")
        stage.publish()
    ranks = sorted({p.a.shape[0] for p in pairs})
    return {"base": lb.spec, "out": str(out), "arch": lb.arch, "layers": len(pairs), "ranks": ranks, "alpha": alpha,
            "use_rslora": bool(cfg.use_rslora), "folded_layers": folded, "check": check,
            "sizes_bytes": {"adapter": sum(f.stat().st_size for f in lb.adapter_dir.glob("*.safetensors")),
                            "gguf_lora": out.stat().st_size},
            "seconds": {"write_and_check": round(time.perf_counter() - t0, 2)}}


def base_shapes(lb: LoraBase) -> dict[str, tuple[int, ...]]:
    """GGUF name -> the base weight's shape [out, in], for every adapted layer."""
    name_map = tensor_name_map(lb.config)
    return {gguf_name(name_map, f"{n}.weight"): tuple(layer.base_layer.weight.shape) for n, layer in
            lora_layers(lb.model)}


def check_lora_file(path: Path, pairs: list[LoraPair], arch: str, alpha: float,
                    shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Read ``path`` back with ``gguf.GGUFReader``: keys, names, llama.cpp shapes, and each update.

    Raises:
        ExportParityError: a key, name or shape that llama.cpp would reject (one line).
    Returns:
        ``tensors`` (count), ``max_rel_diff`` (worst ``|b a alpha/r - delta| / max(1, max|delta|)``), ``worst``.
    """
    import gguf  # lazy: optional extra lorafit[gguf]

    reader = gguf.GGUFReader(path)

    def key(name: str):
        field = reader.fields.get(name)
        return None if field is None else field.contents()

    expected_keys = {"general.architecture": arch, "general.type": "adapter", "adapter.type": "lora"}
    for k, v in expected_keys.items():
        if key(k) != v:
            raise ExportParityError(f"{path.name}: metadata {k} is {key(k)!r}, llama.cpp expects {v!r}")
    if key("adapter.lora.alpha") is None or abs(key("adapter.lora.alpha") - alpha) > 1e-6 * max(1.0, alpha):
        raise ExportParityError(f"{path.name}: adapter.lora.alpha is {key('adapter.lora.alpha')!r}, not {alpha}")
    tensors = {t.name: t for t in reader.tensors}
    expected = {f"{p.name}.lora_{x}" for p in pairs for x in "ab"}
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)[:3]
        raise ExportParityError(f"{path.name}: tensor names differ from the adapter's layers (e.g. {odd})")
    worst, worst_name = 0.0, ""
    for p in pairs:
        ta, tb = tensors[f"{p.name}.lora_a"], tensors[f"{p.name}.lora_b"]
        out_f, in_f = shapes[p.name]
        a_ne, b_ne = [int(x) for x in ta.shape], [int(x) for x in tb.shape]  # GGML order: ne[0] first
        if a_ne[0] != in_f or b_ne[1] != out_f or a_ne[1] != b_ne[0]:
            raise ExportParityError(f"{path.name}: {p.name}: lora_a ne {a_ne} / lora_b ne {b_ne} do not fit the "
                                    f"base's ne [{in_f}, {out_f}] as llama.cpp requires")
        a, b = np.asarray(ta.data, dtype=np.float32), np.asarray(tb.data, dtype=np.float32)
        delta = (b @ a) * np.float32(alpha / a.shape[0])
        rel = float(np.abs(delta - p.delta).max()) / max(1.0, float(np.abs(p.delta).max()))
        if rel >= worst:
            worst, worst_name = rel, p.name
    return {"tensors": len(tensors), "max_rel_diff": worst, "worst": worst_name}


def export_gguf_lora(adapter, out, model: str | None = None) -> dict[str, Any]:
    """Write ``adapter`` as a llama.cpp LoRA GGUF at ``out`` (see the module docstring); returns the report."""
    t0 = time.perf_counter()
    refuse_config(Path(adapter))
    report = write_lora_checked(load_lora_base(adapter, model), out)
    report["seconds"]["total"] = round(time.perf_counter() - t0, 2)
    return report


def format_gguf_lora_report(r: dict[str, Any]) -> str:
    """The printed summary of :func:`export_gguf_lora`."""
    c = r["check"]
    rs = " (rsLoRA: alpha = lora_alpha x sqrt(r))" if r["use_rslora"] else ""
    fold = f"; {r['folded_layers']} layers' own scale folded into their lora_b" if r["folded_layers"] else ""
    return "\n".join([
        f"exported LoRA adapter (llama.cpp LoRA GGUF, {r['arch']}) -> {r['out']}  (llama-cli -m BASE.gguf --lora FILE)",
        f"base: {r['base']}; {r['layers']} layers, r {', '.join(map(str, r['ranks']))}, "
        f"adapter.lora.alpha {r['alpha']:g}{rs}{fold}",
        f"read back by gguf.GGUFReader: {c['tensors']} tensors, names and shapes as llama.cpp expects; "
        f"lora_b @ lora_a x alpha / r vs the adapter's update: max relative |diff| {c['max_rel_diff']:.3g} "
        f"<= {TOLERANCE:g}  OK",
        "size:    " + "  ".join(f"{k} {v / 1e6:.2f} MB" for k, v in r["sizes_bytes"].items()),
        "time: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["seconds"].items())])
