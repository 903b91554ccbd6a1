"""Tiny models for the quantization tests (CPU, seconds)."""

import torch


def tiny_llama_config(tie: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=tie,
    )  # fmt: skip


def make_llama(seed: int = 0, tie: bool = False, dtype=torch.float32):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(tie)).to(dtype).eval()
