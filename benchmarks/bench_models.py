"""train_step.py's models: the 20-line LoRA, lorafit / PEFT models with identical adapter weights, and
the correctness check that compares them before any timing (a fast-but-wrong run must not pass).

Kept apart from the timing code so each file stays readable; shapes: adapter A is (r, in), B (out, r).
"""

from __future__ import annotations

import copy
import gc
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

R, ALPHA = 16, 32
N_ADAPTERS = 8
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# ----------------------------------------------------------------------------- the 20-line LoRA
class MiniLoRA(nn.Module):
    """y = W x + s * B(A(x)): the plainest honest LoRA linear (adapters in the base dtype)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        w = base.weight
        self.base = base
        self.A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=w.dtype))
        self.B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.s = alpha / r

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.A), self.B) * self.s


def minilora_wrap(model):
    for mod in list(model.modules()):
        for n in PROJ:
            child = getattr(mod, n, None)
            if isinstance(child, nn.Linear):
                setattr(mod, n, MiniLoRA(child, R, ALPHA))
    return model


def minilora_unwrap(model):
    for mod in list(model.modules()):
        for n, child in list(mod.named_children()):
            if isinstance(child, MiniLoRA):
                setattr(mod, n, child.base)
    return model


# ----------------------------------------------------------------------------- helpers
def sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def free(dev):
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()


def lf_config():
    import lorafit
    return lorafit.LoraConfig(r=R, alpha=ALPHA, dropout=0.0, target_modules="all-linear")


def peft_config():
    from peft import LoraConfig
    return LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def lora_layer_names(model):
    from lorafit.layers import LoraLayer
    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def peft_layer_names(pm):
    from peft.tuners.lora import LoraLayer
    inner = pm.base_model.model
    return [n for n, m in inner.named_modules() if isinstance(m, LoraLayer)]


def make_adapter_weights(model, names, seed=1234):
    """Non-zero A and B per adapter and layer (fp32), PEFT's ``init_lora_weights=False`` style."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in PROJ}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        per = {}
        for ln, lin in layers.items():
            a = (torch.rand(R, lin.in_features, generator=g) * 2 - 1) / math.sqrt(lin.in_features)
            b = (torch.rand(lin.out_features, R, generator=g) * 2 - 1) / math.sqrt(R)
            per[ln] = (a, b)  # kept on the CPU: nothing extra resident on the GPU while peaks are measured
        out[name] = per
    return out


def lorafit_model(base, weights, active):
    """deepcopy(base) with one lorafit adapter per key of `weights` (values copied in), `active` on."""
    import lorafit
    m = copy.deepcopy(base)
    for name in weights:
        lorafit.inject(m, lf_config(), adapter=name)
    mods = dict(m.named_modules())
    with torch.no_grad():
        for name, per in weights.items():
            for ln, (a, b) in per.items():
                ad = mods[ln].adapters[name]
                ad.lora_A.copy_(a)
                ad.lora_B.copy_(b)
    lorafit.set_adapter(m, active)
    return m


def peft_model(base, weights, active, copy_base=True):
    from peft import get_peft_model
    names = list(weights)
    pm = get_peft_model(copy.deepcopy(base) if copy_base else base, peft_config(), adapter_name=names[0])
    for name in names[1:]:
        pm.add_adapter(name, peft_config())
    mods = dict(pm.base_model.model.named_modules())
    with torch.no_grad():
        for name, per in weights.items():
            for ln, (a, b) in per.items():
                mods[ln].lora_A[name].weight.copy_(a)
                mods[ln].lora_B[name].weight.copy_(b)
    pm.set_adapter(active)
    return pm


def saved_bytes(model, ids):
    """Bytes autograd keeps for backward during one training forward: unique storages, no params/buffers."""
    skip = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in skip and ptr not in seen:
            seen[ptr] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=ids)
    del out
    return sum(seen.values()), len(seen)


def fingerprint(model):
    """Per-parameter sums (fp64, on the CPU): detects any change to the shared base weights."""
    with torch.no_grad():
        return torch.stack([p.detach().sum(dtype=torch.float64) for p in model.parameters()]).cpu()


def rel_err(a, b):
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- correctness
def _measure(kind, model, ids_c, prefill_c, names):
    """Outputs of one adapted model (8 adapters, a0 active), all as fp32 CPU tensors.

    train: logits, loss and a0's adapter gradients on ids_c; eval: a0 logits on prefill_c, the
    mixed batch (row i uses names[i]) and, for lorafit, the merge_and_unload model.
    """
    import lorafit
    out = {}
    call = model
    if kind == "lorafit":
        wanted = set(lora_layer_names(model))
        mods = {n: m for n, m in model.named_modules() if n in wanted}
        grad_of = lambda n, which: getattr(mods[n].adapters["a0"], which).grad  # noqa: E731
    else:
        wanted = set(peft_layer_names(model))
        mods = {n: m for n, m in model.base_model.model.named_modules() if n in wanted}
        grad_of = lambda n, which: getattr(mods[n], which)["a0"].weight.grad  # noqa: E731
    out["layers"] = sorted(mods)
    model.train()
    o = call(input_ids=ids_c, labels=ids_c)
    o.loss.backward()
    out["train logits"] = o.logits.detach().float().cpu()
    out["train loss"] = o.loss.detach().float().cpu().reshape(1)
    for which in ("lora_A", "lora_B"):
        out[f"grad {which}"] = torch.cat([grad_of(n, which).detach().float().flatten().cpu() for n in out["layers"]])
    del o
    model.eval()
    with torch.no_grad():
        out["eval logits"] = call(input_ids=prefill_c, use_cache=False).logits.float().cpu()
        if kind == "lorafit":
            with lorafit.adapter_batch(model, names):
                out["8 mixed adapters"] = model(input_ids=prefill_c, use_cache=False).logits.float().cpu()
            lorafit.merge_and_unload(model)
            out["no lorafit module left"] = not [n for n, m in model.named_modules()
                                                if type(m).__module__.startswith("lorafit")]
            out["merged logits"] = model(input_ids=prefill_c, use_cache=False).logits.float().cpu()
        else:
            mixed = call(input_ids=prefill_c, use_cache=False, adapter_names=names)
            out["8 mixed adapters"] = mixed.logits.float().cpu()
    return out


def run_checks(base, weights, ids, prefill, dev, dtype):
    """lorafit vs PEFT with identical non-zero adapter weights (8 adapters, a0 active).

    fp32: lorafit must equal PEFT (rel. error <= 1e-4). Low precision (bf16): both are compared
    with PEFT run in fp32 on the same weights, and lorafit's error must stay within
    max(2 x PEFT's own error, 1e-2) - lorafit runs the LoRA term in bf16 by design, PEFT upcasts.
    Returns a list of check dicts (ok=False flags a fast-but-wrong run).
    """
    names = [f"a{i % N_ADAPTERS}" for i in range(prefill.shape[0])]
    ids_c = ids[:1, : min(ids.shape[1], 128)]
    prefill_c = prefill[:, : min(prefill.shape[1], 32)]
    res = {}
    m = lorafit_model(base, weights, "a0")
    res["lorafit"] = _measure("lorafit", m, ids_c, prefill_c, names)
    del m
    free(dev)
    m = peft_model(base, weights, "a0")
    res["peft"] = _measure("peft", m, ids_c, prefill_c, names)
    del m
    free(dev)
    if dtype == torch.float32:
        ref = res["peft"]
    else:
        m = peft_model(copy.deepcopy(base).float(), weights, "a0", copy_base=False)
        ref = _measure("peft", m, ids_c, prefill_c, names)
        del m
        free(dev)
    with torch.no_grad():
        base_train = base(input_ids=ids_c, use_cache=False).logits.float().cpu()
        base_eval = base(input_ids=prefill_c, use_cache=False).logits.float().cpu()
    lf, pe = res["lorafit"], res["peft"]
    checks = [{"check": "same adapted layers", "lorafit": len(lf["layers"]), "peft": len(pe["layers"]),
               "ok": lf["layers"] == pe["layers"] and len(lf["layers"]) > 0},
              {"check": "merge_and_unload leaves no lorafit module", "ok": lf["no lorafit module left"]}]
    effects = {"train logits": rel_err(ref["train logits"], base_train),
               "eval logits": rel_err(ref["eval logits"], base_eval),
               # the mixed rows must differ from everyone-on-a0, else the mixed check proves nothing
               "8 mixed adapters": rel_err(ref["8 mixed adapters"], ref["eval logits"])}
    for key, ours in (("train logits", "train logits"), ("train loss", "train loss"), ("grad lora_A", "grad lora_A"),
                      ("grad lora_B", "grad lora_B"), ("eval logits", "eval logits"),
                      ("8 mixed adapters", "8 mixed adapters"), ("merged", "merged logits")):
        theirs = "eval logits" if key == "merged" else key
        err = rel_err(lf[ours], ref[theirs])
        peft_err = rel_err(pe[theirs], ref[theirs]) if ref is not pe else 0.0
        tol = 1e-4 if dtype == torch.float32 else max(2 * peft_err, 1e-2)
        effect = effects.get(key)
        ok = err <= tol and (effect is None or effect > 10 * tol)
        checks.append({"check": f"{key}: lorafit vs " + ("PEFT" if ref is pe else "PEFT fp32"), "rel_err": err,
                       "peft_rel_err": peft_err if ref is not pe else None, "tol": tol, "adapter_effect": effect,
                       "ok": bool(ok)})
    return checks
