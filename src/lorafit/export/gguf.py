"""``lorafit export --format gguf``: a causal-LM adapter merged into its base, as a GGUF file for llama.cpp.

Steps (:func:`export_gguf`):

1. load the base named by the adapter (:mod:`lorafit.export.gguf_load`; Llama only) with the
   adapter on it, and take its logits on a fixed prompt set (:data:`~lorafit.export.gguf_load.PROMPTS`);
2. :func:`lorafit.merge_and_unload` (plain ``nn.Linear`` weights ``W + s B A``) and the merged
   logits (their difference to the unmerged model is fp32 rounding, reported);
3. write the GGUF (``gguf.GGUFWriter``) into a temporary directory beside ``out``: metadata
   carried over from a GGUF base or built from a transformers directory
   (:mod:`~lorafit.export.gguf_meta`), tensors renamed / reordered / encoded as llama.cpp reads
   them (:mod:`~lorafit.export.gguf_write`);
4. read it back with transformers (``from_pretrained(dir, gguf_file=name)``, an independent
   reader that undoes llama.cpp's Q/K row order itself) and compare logits with the merged model.
   f16 must hold ``max |diff| <= 1e-2 x max(1, max |logit|)`` or the export fails
   (:class:`~lorafit.export.formats.ExportParityError`, exit 1, no file left); for q8_0 / q4_0 / q4_1
   the same figure and the top-1 agreement are reported, not enforced (rounding to 8 / 4 bits is
   the point). The tokenizer read back must give the same ids on the prompts and carry the chat
   template;
5. only then rename it onto ``out``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import lorafit
from lorafit.common.errors import LorafitError
from lorafit.export.formats import ExportParityError
from lorafit.export.gguf_load import LoraBase, compare_logits, load_lora_base, logits_of, prompt_ids, read_back
from lorafit.export.gguf_meta import QUANTS, add_transformers_metadata, copy_gguf_metadata
from lorafit.export.gguf_write import add_model_tensors, write_gguf

__all__ = ["GGUF_FORMATS", "QUANTS", "MergedLlama", "export_gguf", "format_gguf_report", "merge_lora_base",
           "staged_file", "write_checked"]

GGUF_FORMATS = ("gguf", "gguf-lora")


def run_name(adapter_dir: Path) -> str:
    """The run an adapter belongs to (``runs/x/adapter`` -> ``x``), for the exported model's name."""
    adapter_dir = adapter_dir.resolve()
    return adapter_dir.parent.name if adapter_dir.name in ("adapter", "best") else adapter_dir.name


class staged_file:
    """A temporary path beside ``out`` (same file system); :meth:`publish` renames it onto ``out``.

    Used as a context manager: whatever was not published is deleted on exit, so a failed
    check leaves nothing behind and an existing ``out`` is never half-overwritten.
    """

    def __init__(self, out: Path):
        self.out = Path(out)

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", dir=self.out.parent))
        return self.dir / self.out.name

    def publish(self) -> None:
        os.replace(self.dir / self.out.name, self.out)

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class MergedLlama:
    """A merged causal LM ready to write: ``model`` (plain modules), the prompt ``ids``, their logits ``ref``."""

    base: LoraBase
    model: Any
    ids: list[list[int]]
    ref: list[torch.Tensor]
    merge: dict[str, Any]  # merged vs unmerged logits (fp32 rounding of the merge)


def merge_lora_base(lb: LoraBase) -> MergedLlama:
    """Merge the adapter of ``lb`` into its base in place (``lb.model`` is the merged model afterwards)."""
    ids = prompt_ids(lb.tokenizer)
    lora_logits = logits_of(lb.model, ids)
    merged = lorafit.merge_and_unload(lb.model).eval()
    ref = logits_of(merged, ids)
    return MergedLlama(lb, merged, ids, ref, compare_logits(lora_logits, ref))


def export_gguf(adapter, out, quant: str = "f16", model: str | None = None) -> dict[str, Any]:
    """Merge ``adapter`` into its base and write ``out`` as GGUF (``quant``: f16 / q8_0 / q4_0 / q4_1), checked.

    Returns:
        the report of :func:`write_checked`, plus ``seconds.total``.
    Raises:
        LorafitError: bad input (one line); ExportParityError when an f16 file does not read back
        as the merged model (exit 1, nothing written).
    """
    if quant not in QUANTS:
        raise LorafitError(f"--quant {quant}: choose from {', '.join(QUANTS)}")
    t0 = time.perf_counter()
    report = write_checked(merge_lora_base(load_lora_base(adapter, model)), out, quant)
    report["seconds"]["total"] = round(time.perf_counter() - t0, 2)
    return report


def write_checked(m: MergedLlama, out, quant: str, check_tokenizer: bool = True) -> dict[str, Any]:
    """Write the merged model as GGUF at ``out`` (staged, read back, compared, then renamed).

    ``check_tokenizer=False`` skips re-reading the tokenizer (seconds for a 49k vocabulary): its keys do
    not depend on ``quant``, so a caller writing several encodings of one model may check it once.

    Returns:
        the report: ``base``, ``out``, ``quant``, ``metadata`` / ``tokenizer`` / ``name``, ``tensors``
        (counts per GGML type, ``exceptions``, ``tied``), ``merge`` (merged vs unmerged logits),
        ``readback`` (transformers' reading vs the merged model: ``max_abs_diff``, ``tolerance``,
        ``top1_agreement`` ...), ``enforced``, ``tokenizer_same_ids``, ``chat_template_kept``,
        ``sizes_bytes``, ``seconds``.
    """
    t0 = time.perf_counter()
    lb, out = m.base, Path(out)
    report: dict[str, Any] = {"base": lb.spec, "out": str(out), "quant": quant, "arch": lb.arch, "merge": m.merge}
    name_suffix = f"+ LoRA {run_name(lb.adapter_dir)} (merged by lorafit, {quant})"
    info: dict[str, Any] = {}

    def metadata(writer) -> None:
        if lb.source is not None:
            info.update(copy_gguf_metadata(writer, lb.reader, lb.source.path, quant, name_suffix))
        else:
            info.update(add_transformers_metadata(writer, lb.path, lb.config, lb.tokenizer, quant,
                                                  f"{lb.path.name} {name_suffix}"))

    def tensors(writer) -> None:
        info["tensors"] = add_model_tensors(writer, m.model, lb.config, quant)

    stage = staged_file(out)
    with stage as tmp:
        write_gguf(tmp, lb.arch, metadata, tensors)
        t_write = time.perf_counter() - t0
        try:
            back, back_tok = read_back(tmp, tokenizer=check_tokenizer)
        except Exception as exc:  # any failure of the independent reader means the file is not what we meant
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ExportParityError(f"{out}: transformers cannot read the written GGUF back ({why}); nothing "
                                    "written") from None
        rb = report["readback"] = compare_logits(m.ref, logits_of(back, m.ids))
        if back_tok is not None:
            report["tokenizer_same_ids"] = prompt_ids(back_tok) == m.ids
            report["chat_template_kept"] = getattr(back_tok, "chat_template", None) == lb.tokenizer.chat_template
        report["enforced"] = quant == "f16"
        if report["enforced"] and not rb["max_abs_diff"] <= rb["tolerance"]:
            raise ExportParityError(f"{out}: the GGUF read back by transformers differs from the merged model: max "
                                    f"|diff| {rb['max_abs_diff']:.3g} > {rb['tolerance']:.3g}; nothing written")
        if report.get("tokenizer_same_ids") is False:
            raise ExportParityError(f"{out}: the tokenizer read back from the GGUF encodes the prompts differently; "
                                    "nothing written")
        stage.publish()  # only a checked file reaches the destination
    summary = info.pop("tensors")
    report.update(info)
    report["tensors"] = {"counts": summary.counts, "exceptions": summary.exceptions, "tied": summary.tied}
    report["sizes_bytes"] = {"adapter": sum(p.stat().st_size for p in lb.adapter_dir.glob("*.safetensors"))}
    if lb.source is not None:
        report["sizes_bytes"]["base_gguf"] = lb.source.path.stat().st_size
    report["sizes_bytes"]["gguf"] = out.stat().st_size
    report["seconds"] = {"write": round(t_write, 2), "check": round(time.perf_counter() - t0 - t_write, 2)}
    return report


def format_gguf_report(r: dict[str, Any]) -> str:
    """The printed summary of :func:`export_gguf` (the onnx export's layout)."""
    t, rb, m = r["tensors"], r["readback"], r["merge"]
    checked = ("not re-read" if "tokenizer_same_ids" not in r else
               f"read back: same ids on the prompt set {'yes' if r['tokenizer_same_ids'] else 'NO'}, chat template "
               f"{'kept' if r['chat_template_kept'] else 'absent'}")
    lines = [f"exported causal-lm model ({r['arch']}, GGUF {r['quant']}) -> {r['out']}",
             f"base: {r['base']}; metadata {r['metadata']}; name {r['name']!r}",
             f"tokenizer: {r['tokenizer']}; {checked}",
             "tensors: " + ", ".join(f"{n} {k}" for k, n in sorted(t["counts"].items()))
             + ("; output tied to token_embd" if t["tied"] else "")]
    lines += [f"  kept: {e}" for e in t["exceptions"]]
    verdict = "OK" if r["enforced"] else "(reported, not enforced)"
    lines += [f"read back by transformers vs merged PyTorch ({rb['positions']} positions of the prompt set): "
              f"max |diff| {rb['max_abs_diff']:.3g} <= tolerance {rb['tolerance']:.3g}  {verdict}"
              if rb["max_abs_diff"] <= rb["tolerance"] else
              f"read back by transformers vs merged PyTorch ({rb['positions']} positions): max |diff| "
              f"{rb['max_abs_diff']:.3g} > {rb['tolerance']:.3g} {verdict}",
              f"top-1 agreement: {rb['top1_agreement']:.1%} of positions, next token after each prompt "
              f"{rb['last_top1_agreement']:.0%}",
              f"merged vs unmerged LoRA in PyTorch: max |diff| {m['max_abs_diff']:.3g} (max |logit| "
              f"{m['max_abs_logit']:.3g})",
              "size:    " + "  ".join(f"{k} {v / 1e6:.2f} MB" for k, v in r["sizes_bytes"].items()),
              "time: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["seconds"].items())]
    return "\n".join(lines)
