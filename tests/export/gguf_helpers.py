"""Builders for the GGUF export tests: tiny random Llamas saved as transformers directories, adapters on them.

The tiny Llama has a byte-level BPE tokenizer trained here (tests/train/train_helpers) and
``initializer_range`` 0.2 rather than 0.02, so its logits are large enough (|logit| ~ 10) that a
mistake in the export (a Q/K row order, a dropped tensor) moves them far beyond the tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import lorafit
from tests.train.train_helpers import CHAT_TEMPLATE, make_bpe_tokenizer


def make_llama_dir(directory: Path, tie: bool = False, intermediate: int = 64, model_type: str = "llama") -> Path:
    """A 2-layer Llama (hidden 64, 4 heads / 2 KV heads, head_dim 16) or GPT-2 with a BPE tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = make_bpe_tokenizer(CHAT_TEMPLATE)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    torch.manual_seed(0)
    if model_type == "llama":
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          initializer_range=0.2, tie_word_embeddings=tie, **ids)
        model = LlamaForCausalLM(cfg)
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64, **ids))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def make_adapter(base, directory: Path, spec: str, b_std: float = 0.1, task: str = "causal-lm", **config) -> Path:
    """Inject a LoRA into ``base`` (a loaded model), give B random values, save it with its lorafit_job.json."""
    config = {"r": 4, "alpha": 8, "target_modules": "all-linear", **config}
    torch.manual_seed(1)
    model = lorafit.inject(base, lorafit.LoraConfig(**config))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.normal_(0, b_std)
    lorafit.save_adapter(model, directory)
    (directory / "lorafit_job.json").write_text(json.dumps({"task": task, "model": spec}))
    return directory


def adapter_for(base_dir: Path, directory: Path, **kwargs) -> Path:
    """An adapter on the transformers directory ``base_dir`` (loaded in float32)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return make_adapter(base, directory, str(base_dir), **kwargs)
