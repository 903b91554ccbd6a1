"""gpu_suite.py's methods: the model shapes and one builder per measured method.

The setting is the anchors' (../shared/anchors/gpu_lora_anchor.py, gpu_multi_adapter_anchor.py,
gpu_qlora_anchor.py): a Llama built from a LlamaConfig with random weights (seed 0), sdpa
attention, the base in bf16 (fp32 on a CPU dry run), LoRA r=16 alpha=32 on all seven
projections, dropout 0, AdamW(lr=1e-5) on the trainable parameters, labels = inputs.

Every training method gets its own deep copy of one template model (so all of them can stay
resident and be timed interleaved, and so its resident bytes are its own). The eager methods keep
the floor's input-gradient hook (``enable_input_require_grads``, as in the anchor, where it stays
on the model for every later method); the compiled ones do not: that transformers hook calls
``requires_grad_`` on an intermediate, a graph break under dynamo for lorafit and PEFT alike
(measured on the tiny dry-run model: 0 breaks without it, several with it), and a LoRA step does
not need it (the adapters get their gradients without it).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from bench_models import N_ADAPTERS, lf_config, lorafit_model, make_adapter_weights, peft_config, peft_model
from gpu_runner import Built, Method, Skipped

# shape -> (LlamaConfig kwargs, (train batch, train seq), (infer rows, prefill seq) or None)
SHAPES = {
    # the dry run: same code paths, CPU-sized (hidden 64 divides NF4's block size 64)
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256), (2, 32), (16, 16)),
    # TinyLlama-1.1B, as the anchors
    "1b": (dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000), (4, 2048), (16, 512)),
    # Llama-3-8B, as the anchors (--big)
    "8b": (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256), (1, 4096), None),
}


def build_template(shape: str, dev: str, dtype: torch.dtype):
    """(frozen base model, config) on ``dev``: random init with seed 0, then cast, as the anchors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw, (_, seq), infer = SHAPES[shape]
    cfg = LlamaConfig(**kw, max_position_embeddings=max(seq, infer[1] if infer else 0, 2048))
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(dev):
        base = LlamaForCausalLM(cfg).to(dtype)
    for p in base.parameters():
        p.requires_grad_(False)
    return base, cfg


def _copy(template, input_grads: bool):
    m = copy.deepcopy(template)
    if input_grads:
        m.enable_input_require_grads()
    m.train()
    return m


def _trainable(module):
    return [p for p in module.parameters() if p.requires_grad]


def train_step(module, params, ids):
    """One training step: forward with labels, backward, AdamW step (none when nothing trains)."""
    opt = torch.optim.AdamW(params, lr=1e-5) if params else None

    def step():
        out = module(input_ids=ids, labels=ids)
        out.loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return out.loss.detach()
    return step


def _built(module, params, ids, **info):
    return Built(train_step(module, params, ids), {"trainable": sum(p.numel() for p in params), **info})


def _lorafit_cfg(**kw):
    import lorafit

    base = lf_config()
    return lorafit.LoraConfig(r=base.r, alpha=base.alpha, dropout=0.0, target_modules="all-linear", **kw)


def train_methods(template, ids, backend: str, big: bool = False) -> list[Method]:
    """The training methods, in build order (full fine-tuning last among the bf16 ones)."""
    import lorafit

    def floor():
        m = _copy(template, input_grads=True)
        return _built(m, [], ids, note="every weight frozen, embedding output requires grad, no optimizer")

    def lf():
        m = _copy(template, input_grads=True)
        lorafit.inject(m, _lorafit_cfg())
        return _built(m, _trainable(m), ids)

    def lf_compiled():
        m = _copy(template, input_grads=False)
        lorafit.inject(m, _lorafit_cfg())
        return _built(torch.compile(m, backend=backend), _trainable(m), ids, compile_backend=backend)

    def pe():
        from peft import get_peft_model

        pm = get_peft_model(_copy(template, input_grads=True), peft_config())
        return _built(pm, _trainable(pm), ids)

    def pe_compiled():
        from peft import get_peft_model

        pm = get_peft_model(_copy(template, input_grads=False), peft_config())
        return _built(torch.compile(pm, backend=backend), _trainable(pm), ids, compile_backend=backend)

    def full():
        m = _copy(template, input_grads=True)
        for p in m.parameters():
            p.requires_grad_(True)
        return _built(m, list(m.parameters()), ids)

    def dora():
        m = _copy(template, input_grads=True)
        lorafit.inject(m, _lorafit_cfg(use_dora=True))
        return _built(m, _trainable(m), ids)

    def qlora():
        from lorafit import quant

        m = _copy(template, input_grads=True)
        quant.quantize(m, "nf4")
        lorafit.inject(m, _lorafit_cfg())
        dev = ids.device
        built = _built(m, _trainable(m), ids, nf4_backend=quant.nf4_backend(dev),
                       weight_bytes=quant.weight_bytes(m))

        def step(fn=built.fn):  # records whether the Triton kernel fell back to the PyTorch path
            out = fn()
            built.info["nf4_backend_after_step"] = quant.nf4_backend(dev)
            return out
        built.fn = step
        return built

    def bnb():
        from peft import get_peft_model

        try:
            import bitsandbytes  # noqa: F401
        except Exception as e:
            raise Skipped(f"bitsandbytes is not importable here ({type(e).__name__}: {e})") from None
        m = _bnb_nf4(_copy(template, input_grads=True))
        pm = get_peft_model(m, peft_config())
        return _built(pm, _trainable(pm), ids, note="PEFT + bitsandbytes Linear4bit nf4, as gpu_qlora_anchor.py")

    if big:  # 8B: only what fits resident side by side (no full fine-tuning: its AdamW state alone is 32 GiB)
        return [Method("frozen_floor", "frozen floor", floor), Method("lorafit", "lorafit eager", lf),
                Method("peft", "PEFT eager", pe)]
    return [Method("frozen_floor", "frozen floor", floor), Method("lorafit", "lorafit eager", lf),
            Method("lorafit_compiled", "lorafit compiled", lf_compiled), Method("peft", "PEFT eager", pe),
            Method("peft_compiled", "PEFT compiled", pe_compiled), Method("lorafit_dora", "lorafit DoRA", dora),
            Method("lorafit_qlora_nf4", "lorafit QLoRA NF4", qlora),
            Method("peft_qlora_bnb_nf4", "PEFT QLoRA bitsandbytes NF4", bnb),
            Method("full_ft", "full fine-tuning", full)]


def _bnb_nf4(model):
    """Every Linear but lm_head -> bitsandbytes Linear4bit nf4 (gpu_qlora_anchor.py's to_nf4)."""
    import bitsandbytes as bnb

    dev = next(model.parameters()).device
    for mod in list(model.modules()):
        for cn, child in list(mod.named_children()):
            if type(child) is nn.Linear and cn != "lm_head":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=child.weight.dtype, quant_type="nf4", compress_statistics=True)
                q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                setattr(mod, cn, q.to(dev))
                del child
    return model


# ----------------------------------------------------------------------------- inference
INFER_PHASES = ("prefill", "decode")


def infer_methods(template, prefill, onetok, shared: dict) -> list[Method]:
    """Forward-only methods (eval, no_grad, use_cache=False), each for a prefill and one token per row.

    ``shared`` receives the adapted models (built on first use) for the correctness check.
    Keys are 'variant.phase'; row i of a mixed batch uses adapter a[i % 8].
    """
    import lorafit

    rows = prefill.shape[0]
    names = [f"a{i % N_ADAPTERS}" for i in range(rows)]
    shared["names"] = names
    inputs = {"prefill": prefill, "decode": onetok}

    def weights():
        if "weights" not in shared:
            shared["weights"] = make_adapter_weights(template, [f"a{i}" for i in range(N_ADAPTERS)])
        return shared["weights"]

    def model(kind):
        if kind not in shared:
            make = lorafit_model if kind.startswith("lorafit") else peft_model
            shared[kind] = make(template, weights(), "a0").eval()
        return shared[kind]

    def fwd(m, x, **kw):
        def call():
            m(input_ids=x, use_cache=False, **kw)
        return call

    def variant(key, label, make):
        out = []
        for ph in INFER_PHASES:
            def build(ph=ph):
                fn, cleanup = make(inputs[ph])
                return Built(fn, {"rows": rows, "tokens": inputs[ph].numel()}, cleanup)
            out.append(Method(f"{key}.{ph}", f"{label} ({ph})", build))
        return out

    def base(x):
        template.eval()
        return fwd(template, x), None

    def lf_single(x):
        return fwd(model("lorafit"), x), None

    def lf_mixed(x):
        m = model("lorafit")

        def call():
            with lorafit.adapter_batch(m, names):
                m(input_ids=x, use_cache=False)
        return call, None

    def lf_mixed_ctx(x):
        # one adapter_batch context kept open: the stacked adapter weights are built once
        import contextlib

        m = model("lorafit_ctx")
        stack = contextlib.ExitStack()
        stack.enter_context(lorafit.adapter_batch(m, names))
        return fwd(m, x), stack.close

    def pe_single(x):
        return fwd(model("peft"), x), None

    def pe_mixed(x):
        return fwd(model("peft"), x, adapter_names=names), None

    return (variant("base", "base", base) + variant("lorafit", "lorafit one adapter", lf_single)
            + variant("lorafit_mixed8", "lorafit 8 mixed (adapter_batch)", lf_mixed)
            + variant("lorafit_mixed8_ctx", "lorafit 8 mixed, ctx kept", lf_mixed_ctx)
            + variant("peft", "PEFT one adapter", pe_single)
            + variant("peft_mixed8", "PEFT 8 mixed (adapter_names)", pe_mixed))


def mixed_check(shared: dict, prefill, dtype) -> dict:
    """lorafit's 8-adapter mixed batch vs PEFT's on the same adapter weights (logits, first 32 tokens).

    fp32: relative error <= 1e-4. bf16 (train_step.py's rule): both are compared with PEFT run in
    fp32 on the same weights, and lorafit may be at most 2x as far from it as PEFT's own bf16 run
    (floor 1e-2; lorafit keeps the LoRA term in bf16, PEFT upcasts). Either way the adapters must
    change the logits by > 10x the tolerance, else equality proves nothing.
    """
    import lorafit

    lf, pm, names = shared.get("lorafit"), shared.get("peft"), shared["names"]
    if lf is None or pm is None:
        return {"check": "8 mixed adapters: lorafit vs PEFT logits", "ok": None, "note": "a model is missing"}
    x = prefill[:, :32]

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    with torch.no_grad():
        with lorafit.adapter_batch(lf, names):
            a = lf(input_ids=x, use_cache=False).logits.float()
        b = pm(input_ids=x, use_cache=False, adapter_names=names).logits.float()
        with lorafit.disabled(lf):
            base = lf(input_ids=x, use_cache=False).logits.float()
        if dtype == torch.float32:
            ref, peft_err, tol = b, None, 1e-4
        else:
            ref_model = copy.deepcopy(pm).float()
            ref = ref_model(input_ids=x, use_cache=False, adapter_names=names).logits.float()
            del ref_model
            peft_err = rel(b, ref)
            tol = max(2 * peft_err, 1e-2)
    err, effect = rel(a, ref), rel(ref, base)
    return {"check": "8 mixed adapters: lorafit vs PEFT" + (" fp32" if ref is not b else "") + " logits",
            "rel_err": err, "peft_rel_err": peft_err, "tol": tol, "adapter_effect": effect,
            "ok": bool(err <= tol and effect > 10 * tol)}
