"""Shared helpers for tests: tiny models and PEFT round trips."""

import copy

import torch
import torch.nn as nn


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def peft_load(base, directory):
    from peft import PeftModel
    return PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()


def peft_save(base, directory, **cfg):
    from peft import LoraConfig, get_peft_model
    cfg.setdefault("init_lora_weights", False)  # random non-zero B: a real test of the math
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(**cfg))
    pm.save_pretrained(str(directory))
    return pm.eval()


class Wrap(nn.Module):
    """Wrap a single layer so PEFT and lorafit both see a named child (`layer`)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, *args):
        out = self.layer(*args)
        return out[0] if isinstance(out, tuple) else out


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lin = nn.Linear(8, 12)
        self.cls = nn.Linear(12, 5)

    def forward(self, ids):
        return self.cls(torch.relu(self.lin(self.emb(ids))))


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()
