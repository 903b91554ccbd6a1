"""Adapters on disk for the serve tests: random LoRA weights (B not zero, so every adapter changes the output)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import lorafit
from lorafit.tree import lora_layers


def randomize(model, seed: int, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for ad in layer.adapters.values():
                ad.lora_B.copy_(torch.randn(ad.lora_B.shape, generator=g) * std)


def causal_adapter(model_dir: Path, out: Path, seed: int, r: int = 4) -> Path:
    """A causal-lm adapter for the tiny model in ``model_dir``, saved with its lorafit_job.json."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lorafit.inject(model, lorafit.LoraConfig(r=r, alpha=2 * r, target_modules="all-linear"))
    randomize(model, seed)
    lorafit.save_adapter(model, out)
    (out / "lorafit_job.json").write_text(json.dumps({"task": "causal-lm", "model": str(model_dir)}))
    return out


def load_reference(model_dir: Path, adapter: Path | None):
    """A fresh base with one adapter (or none) loaded the ordinary way: what the server must match."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if adapter is not None:
        lorafit.load_adapter(model, adapter)
    return model


def greedy(model, tok, prompt: str, max_tokens: int) -> str:
    """``model.generate`` greedy continuation of ``prompt`` (the text the server must return)."""
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
