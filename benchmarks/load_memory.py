#!/usr/bin/env python3
"""Peak memory of loading a base model: fp32 (today's causal-LM default), bf16, and NF4 while loading.

A randomly initialised Llama of about 1.1B parameters (the anchor's shape; ``--small`` for a quick
one) is written once as bf16 safetensors, without ever holding it in fp32. Each way of loading it
then runs in a fresh process, and that process's peak RSS (``VmHWM``, reset at its start: a forked
child inherits its parent's high-water mark) is reported beside the peak of an empty process that
imported the same libraries, so the differences are the loading:

* ``fp32 then nf4``: ``from_pretrained(dtype=float32)`` then ``lorafit.quantize`` (what
  ``--task causal-lm --quantize nf4`` did before: the whole base in fp32 first);
* ``bf16``: ``from_pretrained(dtype=bfloat16)``;
* ``nf4 streamed``: ``lorafit.quant.load_streamed`` (the skeleton on the meta device, each
  Linear weight quantized as it is read).

After loading, every tensor is read once (safetensors loads can be mmap views whose pages are
faulted in only when read, as the first training step would), so the peak is the resident model.

Targets (issue 12): bf16 <= 1.15x the bf16 bytes + empty RSS; NF4 <= 0.45x the bf16 bytes + empty RSS.

    python benchmarks/load_memory.py            # ~1.1B, a few minutes and ~2.2 GB of disk
    python benchmarks/load_memory.py --small    # a ~60M model, seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

CHILD = r"""
import json, os, sys
try:  # a forked child starts with its parent's high-water mark: reset it (Linux), then measure VmHWM
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
import torch, transformers, lorafit
from transformers import AutoModelForCausalLM, AutoConfig
mode, path = sys.argv[1], sys.argv[2]
if mode == "fp32_then_nf4":
    model = lorafit.quantize(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), "nf4")
elif mode == "bf16":
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
elif mode == "nf4_streamed":
    with lorafit.quant.empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.bfloat16)
    lorafit.quant.load_streamed(model, path, fmt="nf4", dtype=torch.bfloat16)
elif mode == "empty":  # the same imports and a weightless skeleton: what every load pays besides the weights
    with lorafit.quant.empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.bfloat16)
else:
    raise SystemExit(f"unknown mode {mode}")
tensors = [] if mode == "empty" else [*model.parameters(), *model.buffers()]
for t in tensors:  # touch every byte: safetensors loads are mmap views, paged in only when read (as training will)
    t.detach().reshape(-1).view(torch.uint8).max()  # max: no dtype promotion, no temporary
held = sum(t.numel() * t.element_size() for t in tensors)
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print(json.dumps({"peak_rss": int(hwm.split()[1]) * 1024, "model_bytes": held}))
"""


def config(small: bool):
    from transformers import LlamaConfig

    if small:
        return LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)
    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)


def write_checkpoint(path: Path, small: bool) -> int:
    """Save a random-init bf16 Llama tensor by tensor (never the whole model in fp32); returns its bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    import lorafit

    cfg = config(small)
    with lorafit.quant.empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, p in model.named_parameters():
        t = torch.empty(p.shape, dtype=torch.bfloat16)
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        else:
            t.normal_(0, 0.02, generator=gen)
        state[name] = t
    if "lm_head.weight" in state and cfg.tie_word_embeddings:
        del state["lm_head.weight"]
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(path)
    return sum(t.numel() * t.element_size() for t in state.values())


def child(mode: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(path)], capture_output=True, text=True, check=False)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="a ~60M model instead of ~1.1B (a quick check)")
    ap.add_argument("--out", type=Path, default=None, help="JSON result path (default benchmarks/results/...)")
    args = ap.parse_args()
    gib = 2 ** 30
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        # written by a child process: this one never holds the weights (its children fork from it)
        code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import load_memory; " \
               f"print(load_memory.write_checkpoint(__import__('pathlib').Path({tmp!r}), {args.small}))"
        nbytes = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    check=True).stdout.split()[-1])
        print(f"checkpoint: {nbytes / gib:.2f} GiB bf16 ({nbytes // 2 / 1e9:.2f}B parameters)", flush=True)
        rows = {mode: child(mode, path) for mode in ("empty", "fp32_then_nf4", "bf16", "nf4_streamed")}
    empty = rows["empty"]["peak_rss"]
    targets = {"bf16": 1.15, "nf4_streamed": 0.45}
    print(f"{'load':<16}{'peak RSS':>12}{'- empty':>12}{'/ bf16 bytes':>14}  target")
    for mode, r in rows.items():
        if "error" in r:
            print(f"{mode:<16} failed: {r['error']}")
            continue
        added = r["peak_rss"] - empty
        r["added_over_bf16_bytes"] = added / nbytes
        target = targets.get(mode)
        verdict = "" if target is None else f"<= {target} {'met' if added / nbytes <= target else 'MISSED'}"
        print(f"{mode:<16}{r['peak_rss'] / gib:>10.2f} G{added / gib:>10.2f} G{added / nbytes:>13.2f}x  {verdict}")
    result = {"date": datetime.date.today().isoformat(), "machine": platform.platform(),
              "python": platform.python_version(),
              "checkpoint_bf16_bytes": nbytes, "small": args.small, "rows": rows, "targets": targets}
    import torch
    import transformers
    result["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    out = args.out or RESULTS / f"load-memory-cpu{'-small' if args.small else ''}-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
