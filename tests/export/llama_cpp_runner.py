"""Run a GGUF with llama.cpp (llama-cpp-python): logits and greedy continuations of given token ids.

Runs in whatever Python has ``llama_cpp`` (the test's own, or the one named by
``LORAFIT_LLAMA_CPP_PYTHON``, as a subprocess): it imports nothing of lorafit, torch or
transformers. Input: a JSON job on stdin ``{"model", "lora" (optional), "prompts": [[ids]],
"texts": [str], "new_tokens", "out"}``. Output: ``out`` (.npz) with ``logits_<i>`` [len(prompt), vocab]
per prompt, and on stdout JSON ``{"greedy": [[ids]], "tokenized": [[ids]]}`` where ``tokenized``
is llama.cpp's own tokenization of ``texts`` (special tokens parsed, no BOS added by us).
"""

from __future__ import annotations

import json
import sys

import numpy as np


def no_repack() -> None:
    """Turn off llama.cpp's extra (repacking) weight buffers, as ``llama-cli --no-repack`` does.

    On a CPU with AMX, llama.cpp 0.3.36 moves quantized weights into an AMX buffer, and a LoRA on
    such a base then crashes (segfault at the first eval; cf. ggml-org/llama.cpp#12587). With the
    plain CPU buffers both the merged model and base + LoRA run, through the same kernels.
    """
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params


def main() -> None:
    job = json.load(sys.stdin)
    no_repack()
    from llama_cpp import Llama

    llm = Llama(model_path=job["model"], lora_path=job.get("lora"), n_ctx=512, n_threads=2, logits_all=True,
                verbose=False, seed=0)
    eos = llm.token_eos()
    greedy, arrays = [], {}
    for i, ids in enumerate(job["prompts"]):
        llm.reset()
        llm.eval(ids)
        arrays[f"logits_{i}"] = np.array(llm.scores[: len(ids)], dtype=np.float32)
        new = []
        for _ in range(job["new_tokens"]):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            new.append(nxt)
            if nxt == eos:
                break
            llm.eval([nxt])
        greedy.append(new)
    np.savez(job["out"], **arrays)
    tokenized = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in job["texts"]]
    print(json.dumps({"greedy": greedy, "tokenized": tokenized}))


if __name__ == "__main__":
    main()
