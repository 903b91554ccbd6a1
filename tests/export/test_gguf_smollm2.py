"""The real SmolLM2-135M-Instruct + a LoRA, exported for llama.cpp (the session fixture in conftest.py).

Checked against readers lorafit does not implement: transformers' GGUF loader (logits on the
fixed prompt set) and gguf's ``GGUFReader`` against the bundled base GGUF itself (the shapes
llama.cpp's LoRA loader compares).
"""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")  # the dev extra installs it: a skip here means a broken venv


def test_f16_reads_back_as_the_merged_model(smollm2):
    r = smollm2["f16"]
    rb = r["readback"]
    assert r["enforced"] and rb["max_abs_diff"] <= rb["tolerance"]
    assert rb["max_abs_logit"] > 10 and rb["top1_agreement"] >= 0.99 and rb["last_top1_agreement"] == 1.0
    assert "tokenizer_same_ids" not in r  # not re-read here: the keys are compared below
    assert r["tensors"]["tied"] and r["tensors"]["counts"] == {"F16": 211, "F32": 61}  # no output.weight
    assert r["merge"]["max_abs_diff"] < 1e-3 * r["merge"]["max_abs_logit"]
    # the adapter matters: the merged model's next token differs from the base's on some prompt
    merged_next = [int(x[-1].argmax()) for x in smollm2["merged"].ref]
    assert merged_next != smollm2["base_next"]
    # metadata carried over from the bundled GGUF, with what changed updated
    reader, base = gguf.GGUFReader(r["out"]), smollm2["base_reader"]
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.pre", "tokenizer.chat_template",
                "tokenizer.ggml.eos_token_id", "llama.rope.freq_base", "llama.attention.head_count_kv"):
        assert reader.fields[key].contents() == base.fields[key].contents(), key
    assert reader.fields["general.file_type"].contents() == 1 and base.fields["general.file_type"].contents() == 3
    assert reader.fields["general.name"].contents().endswith("+ LoRA run (merged by lorafit, f16)")


def test_q8_0_top1_agreement(smollm2):
    r = smollm2["q8_0"]
    assert not r["enforced"] and r["tensors"]["counts"] == {"Q8_0": 211, "F32": 61}
    reader, base = gguf.GGUFReader(r["out"]), smollm2["base_reader"]
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template"):
        assert reader.fields[key].contents() == base.fields[key].contents(), key
    assert reader.fields["general.file_type"].contents() == 7
    assert r["readback"]["top1_agreement"] >= 0.9, r["readback"]  # measured 0.98 on the 208 positions
    assert r["sizes_bytes"]["gguf"] < 0.6 * smollm2["f16"]["sizes_bytes"]["gguf"]


def test_lora_gguf_fits_the_bundled_base_as_llama_cpp_checks(smollm2):
    """llama-adapter.cpp: a.ne[0] == base.ne[0], b.ne[1] == base.ne[1], a.ne[1] == b.ne[0]; every base matrix."""
    r = smollm2["lora"]
    assert r["layers"] == 30 * 7 and r["alpha"] == 16 and r["check"]["max_rel_diff"] <= 1e-5
    lora = {t.name: t for t in gguf.GGUFReader(r["out"]).tensors}
    base = {t.name: [int(x) for x in t.shape] for t in smollm2["base_reader"].tensors}
    assert len(lora) == 420
    for name, t in lora.items():
        stem, part = name.rsplit(".", 1)
        assert stem in base and part in ("lora_a", "lora_b") and t.tensor_type.name == "F32"
        a, b = [int(x) for x in lora[f"{stem}.lora_a"].shape], [int(x) for x in lora[f"{stem}.lora_b"].shape]
        assert a[0] == base[stem][0] and b[1] == base[stem][1] and a[1] == b[0] == 8, (name, a, b, base[stem])
    a, b = lora["blk.0.attn_k.weight.lora_a"], lora["blk.0.attn_k.weight.lora_b"]
    assert list(a.shape) == [576, 8] and list(b.shape) == [8, 192]  # K: 3 KV heads x 64
    assert np.asarray(b.data).shape == (192, 8)
